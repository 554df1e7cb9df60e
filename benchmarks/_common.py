"""Shared helpers of the benchmark scripts: machine, versions, code version, memory, data.

Not a benchmark itself. Every script writes one JSON document with ``benchmark``, ``command``,
``machine``, ``versions``, ``code`` (git commit and uncommitted changes) and its results.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOKENIZER = ROOT.parent / "shared" / "assets" / "pythia_20B_tokenizer.json"
PACKAGE = ROOT / "src" / "sctranscoder"
#: Source files whose sha256 identifies the code a result was measured on (paths under
#: ``src/sctranscoder``): every module of the training package, the transcoder, its TopK kernels
#: and the activation pass.
CORE_MODULES = (
    *sorted(
        p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "core" / "training").glob("*.py")
    ),
    "core/transcoder.py",
    "core/topk.py",
    "core/activations.py",
)


def command() -> str:
    """The command line that produced a result."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux: ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine(device: str, threads: int | None = None) -> dict:
    """Where it ran: CPU model and count, memory, load average, GPU (when used)."""
    import torch

    info = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _total_memory_gib(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = p.total_memory / 2**30
        info["cuda"] = torch.version.cuda
    return info


def versions(*extra: str) -> dict:
    """Python and package versions (packages not installed are left out)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "numpy", "scanpy", "anndata", "sctranscoder", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


_CODE_AT_START: dict | None = None


def snapshot_code() -> dict:
    """Record the code version now (call at start: others may edit the tree during a run)."""
    global _CODE_AT_START
    _CODE_AT_START = code_version()
    return _CODE_AT_START


def code_version() -> dict:
    """Git commit, a summary of uncommitted changes to ``src/``, sha256 of :data:`CORE_MODULES`."""
    import hashlib

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        # a copy of the tree whose .git is missing or stale (e.g. on a GPU machine) names its
        # commit in SCT_COMMIT; the hashes below identify the code either way
        "commit": os.environ.get("SCT_COMMIT") or git("rev-parse", "HEAD"),
        "uncommitted_src": git("diff", "--stat", "--", "src").splitlines()[-1:]
        or ["(no uncommitted changes in src/)"],
        "untracked_src": [
            line for line in git("status", "--porcelain", "--", "src").splitlines() if "??" in line
        ],
        "sha256_12": {
            name: hashlib.sha256((PACKAGE / name).read_bytes()).hexdigest()[:12]
            for name in CORE_MODULES
            if (PACKAGE / name).exists()
        },
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def document(benchmark: str, device: str, threads: int | None, **fields) -> dict:
    doc = {
        "benchmark": benchmark,
        "command": command(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(device, threads),
        "versions": versions("eai-sparsify"),
        "code": _CODE_AT_START or code_version(),
    }
    doc.update(fields)
    return doc


def write(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    print(f"\nwritten: {path}")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"Cannot serialise {type(o).__name__} to JSON.")


def pbmc(n_copies: int = 1):
    """``pbmc68k_reduced`` (700 cells), tiled ``n_copies`` times with new cell names."""
    import anndata as ad
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    if n_copies > 1:
        parts = []
        for i in range(n_copies):
            part = adata.copy()
            part.obs_names = [f"{name}-{i}" for name in adata.obs_names]
            parts.append(part)
        raw = ad.concat([p.raw.to_adata() for p in parts], merge="same")
        adata = ad.concat(parts, merge="same")
        adata.raw = raw
    return adata


def measure_cpu_peak_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """Achieved float32 GFLOP/s of a large square matmul on this CPU (best of ``reps``)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
