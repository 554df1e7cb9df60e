"""Host memory of training and of ``feature_activations`` against the number of cells.

pbmc68k_reduced (700 cells) is tiled to each size (new cell names), and each (task, size) runs in
a fresh process, so its peak resident memory is its own. Inside the process, a thread samples the
resident set (``VmRSS``) every 5 ms while the tool runs; reported are the resident memory just
before the call (model, data and sentences loaded), the sampled peak during the call, their
difference (the tool's working memory plus what it writes), and the size of what it writes to the
AnnData (the ``obsm`` sparse matrices grow with cells by design, so they are reported separately,
with the genes x features tables of the activation record). Whole-process ``ru_maxrss`` is
recorded too.

* ``train``: ``sct.tl.train_transcoders`` (embedded model, all 4 layers, a fixed ``--n-tokens``,
  with its validation metrics on 10% of the cells, as a user runs it).
* ``activations``: ``sct.tl.feature_activations`` (default aggregate and genes x features tables)
  with random transcoders on all 4 layers (memory does not depend on training).

Prompts hold ``--n-genes`` genes (default 16, ~100 tokens) so that the largest size stays quick
on a CPU; prompt length scales memory per batch, not per cell.

    python benchmarks/memory_scaling.py
    python benchmarks/memory_scaling.py --cells 700 2800 11200 --tasks train activations  # slower
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


class RssSampler:
    """Max of VmRSS sampled in a background thread."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _common.current_rss_mib())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = _common.current_rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _common.current_rss_mib())


def _nbytes(m) -> int:
    if hasattr(m, "data") and hasattr(m, "indices"):
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
    return int(getattr(m, "nbytes", 0))


def _case(task: str, n_cells: int, args_dict: dict, queue) -> None:
    import gc

    import torch

    import sctranscoder as sct
    from sctranscoder._records import write_transcoders
    from sctranscoder.core.training import TrainingConfig
    from sctranscoder.core.transcoder import Transcoder, TranscoderConfig
    from sctranscoder.core.transcoder_set import TranscoderSet

    torch.set_num_threads(args_dict["threads"])
    copies = -(-n_cells // 700)
    adata = _common.pbmc(copies)[:n_cells].copy()
    model = sct.datasets.tiny_c2s()
    n_genes = args_dict["n_genes"]
    model.settings = dataclasses.replace(model.settings, n_genes=n_genes)
    sct.pp.cell_sentences(adata, model=model, n_genes=n_genes)
    if task == "activations":
        d = model.d_model
        gen = torch.Generator().manual_seed(0)
        cfg = TranscoderConfig(d_in=d, d_out=d, n_features=8 * d, k=32)
        tcs = {i: Transcoder(cfg, generator=gen).eval() for i in range(model.n_layers)}
        config = TrainingConfig(expansion_factor=8, k=32)
        tset = TranscoderSet(tcs, model=model.record(), config=config)
        write_transcoders(
            adata,
            "sct",
            tset,
            params={"config": config.to_dict(), "sentence_key": "cell_sentence"},
        )
    gc.collect()
    before = _common.current_rss_mib()
    t0 = time.perf_counter()
    with RssSampler() as s:
        if task == "train":
            sct.tl.train_transcoders(
                adata, model, n_tokens=args_dict["n_tokens"], progress=False, seed=0
            )
        else:
            sct.tl.feature_activations(adata, model, progress=False)
    seconds = time.perf_counter() - t0
    written = 0
    if task == "activations":
        written = sum(_nbytes(adata.obsm[k]) for k in adata.obsm if k.startswith("X_sct_"))
        genes = adata.uns["sct_activations"]["genes"]  # the genes x features tables
        written += sum(_nbytes(m) for part in ("counts", "sums") for m in genes[part].values())
    else:
        written = sum(
            _nbytes(v)
            for entry in adata.uns["sct"]["transcoders"].values()
            for k, v in entry.items()
            if k != "config"
        )
    queue.put(
        {
            "task": task,
            "n_cells": int(adata.n_obs),
            "seconds": seconds,
            "rss_before_mib": before,
            "peak_rss_during_mib": s.peak,
            "increase_mib": s.peak - before,
            "written_mib": written / 2**20,
            "increase_minus_written_mib": s.peak - before - written / 2**20,
            "process_maxrss_mib": _common.peak_rss_mib(),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cells", nargs="+", type=int, default=[350, 1400, 5600])
    ap.add_argument("--tasks", nargs="+", default=["train", "activations"])
    ap.add_argument("--n-tokens", type=int, default=40_960, help="training tokens per layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--n-genes", type=int, default=16, help="genes per prompt (short prompts keep it quick)"
    )
    ap.add_argument("--out", type=Path, default=_common.RESULTS / "memory_scaling_cpu.json")
    args = ap.parse_args()
    _common.snapshot_code()

    ctx = mp.get_context("spawn")
    results = []

    def save() -> None:  # after every case, so that an interrupted run keeps what it measured
        doc = _common.document(
            "memory_scaling",
            "cpu",
            args.threads,
            settings={
                "data": "pbmc68k_reduced tiled with new obs_names",
                "model": "sct.datasets.tiny_c2s()",
                "train_n_tokens": args.n_tokens,
                "n_genes": args.n_genes,
                "activations": "feature_activations defaults, random transcoders, expansion 8, k 32",
            },
            results=results,
        )
        _common.write(doc, args.out)

    for task in args.tasks:
        for n in args.cells:
            q = ctx.Queue()
            p = ctx.Process(
                target=_case,
                args=(
                    task,
                    n,
                    {"threads": args.threads, "n_tokens": args.n_tokens, "n_genes": args.n_genes},
                    q,
                ),
            )
            p.start()
            res = q.get()
            p.join()
            results.append(res)
            print(
                f"{task} {n} cells: {res['seconds']:.0f}s, +{res['increase_mib']:.0f} MiB "
                f"(written {res['written_mib']:.1f} MiB), peak {res['peak_rss_during_mib']:.0f} MiB",
                flush=True,
            )
            save()
    print(
        f"\n{'task':<12}{'cells':>7}{'seconds':>9}{'before':>9}{'peak':>8}{'+MiB':>8}"
        f"{'written':>9}{'+ - wr.':>9}"
    )
    for r in results:
        print(
            f"{r['task']:<12}{r['n_cells']:>7}{r['seconds']:>9.0f}{r['rss_before_mib']:>9.0f}"
            f"{r['peak_rss_during_mib']:>8.0f}{r['increase_mib']:>8.0f}{r['written_mib']:>9.1f}"
            f"{r['increase_minus_written_mib']:>9.0f}"
        )


if __name__ == "__main__":
    main()
