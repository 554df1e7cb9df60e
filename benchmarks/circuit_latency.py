"""Seconds and peak memory per traced circuit.

Cases: the embedded model (transcoders trained here on pbmc68k_reduced) and a randomly
initialised model of the real C2S-Pythia-410m architecture shrunk in depth (random transcoders,
expansion 8, k 32; the real Pythia tokenizer from ../shared), each with 64- and 200-gene prompts.
Each case runs in its own process, so its peak resident memory is its own.

    python benchmarks/circuit_latency.py                       # all cases
    python benchmarks/circuit_latency.py --out benchmarks/results/circuit_latency_cpu.json

Results are written as JSON with the machine, versions and command, and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "assets" / "pythia_20B_tokenizer.json"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _case(kind: str, n_genes: int, max_feature_nodes: int, threads: int, queue) -> None:
    import numpy as np
    import scanpy as sc
    import torch

    import sctranscoder as sct
    from sctranscoder.core.attribution import Target, build_graph, prune
    from sctranscoder.core.replacement import ReplacementModel
    from sctranscoder.core.sentences import PromptSettings, rank_genes
    from sctranscoder.core.transcoder import Transcoder, TranscoderConfig

    torch.set_num_threads(threads)
    pbmc = sc.datasets.pbmc68k_reduced()
    genes = [g.upper() for g in pbmc.raw.var_names]
    sentence = rank_genes(pbmc.raw.X[:1], genes, n_genes=n_genes, seed=0)[0]
    if kind == "tiny_c2s":
        model = sct.datasets.tiny_c2s()
        adata = pbmc.copy()
        sct.pp.cell_sentences(adata, model=model)
        sct.tl.train_transcoders(adata, model, n_tokens=200_000, progress=False)
        tcs = sct.get.transcoders(adata)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from _models import c2s_410m_shrunk

        path = c2s_410m_shrunk(Path(tempfile.mkdtemp()) / "c2s", TOKENIZER, n_layers=4)
        model = sct.load_model(path, settings=PromptSettings(n_genes=200))
        d = model.d_model
        gen = torch.Generator().manual_seed(0)
        cfg = TranscoderConfig(d_in=d, d_out=d, n_features=8 * d, k=32)
        tcs = {
            i: Transcoder(cfg, generator=gen).eval().requires_grad_(False)
            for i in range(model.n_layers)
        }
    batch = model.tokenize([sentence])
    ids = batch.input_ids[0, : int(batch.lengths[0])]
    token = model.tokenizer(" CD", add_special_tokens=False)["input_ids"][0]
    base = _rss_mib()
    t0 = time.perf_counter()
    rm = ReplacementModel(model.model, tcs, ids)
    t1 = time.perf_counter()
    graph = build_graph(rm, Target(kind="logit", token=token), max_feature_nodes=max_feature_nodes)
    t2 = time.perf_counter()
    pruned = prune(graph)
    t3 = time.perf_counter()
    queue.put(
        {
            "model": kind,
            "n_genes": n_genes,
            "n_tokens": int(ids.numel()),
            "n_layers": int(model.n_layers),
            "d_model": int(model.d_model),
            "n_features": int(next(iter(tcs.values())).config.n_features),
            "active_features": int(pruned.scores["n_active_features"]),
            "explored_features": int(pruned.scores["n_explored_features"]),
            "kept_nodes": int(pruned.nodes.size),
            "kept_edges": int(pruned.edges.shape[0]),
            "replacement_score": float(pruned.scores["replacement_score"]),
            "completeness_score": float(pruned.scores["completeness_score"]),
            "seconds_replacement_model": t1 - t0,
            "seconds_attribution": t2 - t1,
            "seconds_prune": t3 - t2,
            "seconds_total": t3 - t0,
            "peak_rss_mib": _rss_mib(),
            "rss_before_tracing_mib": base,
            "max_exactness_error": float(
                max(
                    abs(graph.rows[n].astype(np.float64).sum() + graph.bias[n] - graph.value[n])
                    for n in graph.rows
                )
            ),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "circuit_latency_cpu.json"
    )
    ap.add_argument("--max-feature-nodes", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["tiny_c2s", "c2s_410m_arch_4_layers"])
    ap.add_argument("--genes", nargs="+", type=int, default=[64, 200])
    args = ap.parse_args()

    import torch

    ctx = mp.get_context("spawn")
    results = []
    for kind in args.models:
        if kind != "tiny_c2s" and not TOKENIZER.exists():
            print(f"skipping {kind}: {TOKENIZER} not found", file=sys.stderr)
            continue
        for n in args.genes:
            q = ctx.Queue()
            p = ctx.Process(target=_case, args=(kind, n, args.max_feature_nodes, args.threads, q))
            p.start()
            res = q.get()
            p.join()
            results.append(res)
            print(
                f"{kind} {n} genes: {res['seconds_total']:.1f}s, peak {res['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    doc = {
        "benchmark": "circuit_latency",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": mp.cpu_count(),
            "threads": args.threads,
            "device": "cpu",
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "max_feature_nodes": args.max_feature_nodes,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"\n{'model':<24}{'genes':>6}{'tokens':>8}{'active':>8}{'kept':>6}{'seconds':>9}{'peak MiB':>10}{'repl.':>7}{'compl.':>7}"
    )
    for r in results:
        print(
            f"{r['model']:<24}{r['n_genes']:>6}{r['n_tokens']:>8}{r['active_features']:>8}{r['kept_nodes']:>6}"
            f"{r['seconds_total']:>9.1f}{r['peak_rss_mib']:>10.0f}{r['replacement_score']:>7.2f}{r['completeness_score']:>7.2f}"
        )
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
