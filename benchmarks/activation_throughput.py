"""Cells per second of ``sct.tl.feature_activations`` with 64- and 200-gene prompts.

The embedded model (``sct.datasets.tiny_c2s()``, 4 layers, d=128) on pbmc68k_reduced (700 cells,
tiled ``--copies`` times), transcoders on all 4 layers (expansion 8, k 32). By default the
transcoders are trained briefly first (``--train-tokens``, with
:func:`sctranscoder.core.training.train_transcoders`, no validation pass); their quality does not
matter for speed, only that they are sparse like real ones. ``--random-transcoders`` skips
training. ``feature_activations`` runs with its defaults (``aggregate="max"``, the genes x
features tables on, 32 cells a batch), timed end to end (tokenisation, model, encoders,
aggregation, sparse result assembly, writing ``obsm`` and the activation record in ``uns``).

    python benchmarks/activation_throughput.py
    python benchmarks/activation_throughput.py --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


def transcoders_for(cm, args):
    """Transcoders on every layer (trained briefly, or random), their config and training time."""
    import numpy as np
    import torch

    import sctranscoder as sct
    from sctranscoder._records import sentences
    from sctranscoder.core.prompts import prompt_batches
    from sctranscoder.core.training import TrainingConfig, train_transcoders
    from sctranscoder.core.transcoder import Transcoder, TranscoderConfig

    d = cm.d_model
    layers = list(range(cm.n_layers))
    config = TrainingConfig(
        expansion_factor=args.expansion, k=args.k, seed=args.seed, prompt_batch_size=16
    )
    if args.random_transcoders:
        gen = torch.Generator().manual_seed(args.seed)
        cfg = TranscoderConfig(d_in=d, d_out=d, n_features=args.expansion * d, k=args.k)
        return {layer: Transcoder(cfg, generator=gen).eval() for layer in layers}, config, 0.0
    config = config.replace(n_tokens=args.train_tokens)

    adata = _common.pbmc()
    sct.pp.cell_sentences(adata, model=cm)
    cells = sentences(adata, "cell_sentence", n_genes=cm.settings.n_genes)
    stream = prompt_batches(
        cm,
        cells,
        np.arange(adata.n_obs),
        batch_size=config.prompt_batch_size,
        seed=args.seed,
        repeat=True,
    )
    t0 = time.perf_counter()
    tcs, _ = train_transcoders(
        cm.model, stream, layers=layers, config=config, d_in=d, d_out=d, progress=False
    )
    return tcs, config, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--genes", nargs="+", type=int, default=[64, 200])
    ap.add_argument("--copies", type=int, default=1, help="tile pbmc68k_reduced (700 cells)")
    ap.add_argument("--batch-size", type=int, default=32, help="cells per forward pass")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per case (best kept)")
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--train-tokens", type=int, default=40_960)
    ap.add_argument("--random-transcoders", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    _common.snapshot_code()

    import torch

    import sctranscoder as sct
    from sctranscoder._records import write_transcoders
    from sctranscoder.core.transcoder_set import TranscoderSet

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    out_path = args.out or _common.RESULTS / f"activation_throughput_{kind}.json"

    cm = sct.datasets.tiny_c2s()
    tcs, config, train_seconds = transcoders_for(cm, args)
    cm.model.to(args.device)
    tset = TranscoderSet(tcs, model=cm.record(), config=config)
    params = {"config": config.to_dict(), "sentence_key": "cell_sentence"}
    results = []
    for n_genes in args.genes:
        model = dataclasses.replace(cm, settings=dataclasses.replace(cm.settings, n_genes=n_genes))
        adata = _common.pbmc(args.copies)
        sct.pp.cell_sentences(adata, model=model, n_genes=n_genes)
        write_transcoders(adata, "sct", tset, params=params)
        n_tokens = int(
            sum(
                int(model.tokenize([s.split()]).lengths[0])
                for s in adata.obs["cell_sentence"].astype(str)[:200]
            )
            / min(200, adata.n_obs)
            * adata.n_obs
        )
        if kind == "cuda":  # warm-up
            sct.tl.feature_activations(adata[:64].copy(), model, progress=False)
        times, loads = [], []
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            if kind == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sct.tl.feature_activations(adata, model, batch_size=args.batch_size, progress=False)
            if kind == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = min(times)
        nnz = {k: int(adata.obsm[k].nnz) for k in adata.obsm if k.startswith("X_sct_")}
        res = {
            "n_genes": n_genes,
            "n_cells": adata.n_obs,
            "n_tokens_estimated": n_tokens,
            "mean_prompt_tokens": n_tokens / adata.n_obs,
            "seconds": times,
            "best_seconds": best,
            "cells_per_second": adata.n_obs / best,
            "tokens_per_second": n_tokens / best,
            "load_average_1min_before": loads,
            "obsm_nnz_per_cell": {k: v / adata.n_obs for k, v in nnz.items()},
            "peak_rss_mib_so_far": _common.peak_rss_mib(),
        }
        results.append(res)
        print(
            f"{n_genes} genes: {adata.n_obs} cells in {best:.1f}s = "
            f"{res['cells_per_second']:.1f} cells/s (load {loads[0]:.1f})",
            flush=True,
        )

    doc = _common.document(
        "activation_throughput",
        kind,
        threads,
        model={"name": "sct.datasets.tiny_c2s()", "n_layers": cm.n_layers, "d_model": cm.d_model},
        transcoders={
            "layers": sorted(tcs),
            "expansion_factor": args.expansion,
            "k": args.k,
            "trained": not args.random_transcoders,
            "train_tokens": 0 if args.random_transcoders else args.train_tokens,
            "train_seconds": train_seconds,
        },
        settings={
            "batch_size": args.batch_size,
            "aggregate": "max",
            "gene_activations": True,
            "repeats": args.repeats,
            "copies": args.copies,
        },
        results=results,
        peak_rss_mib=_common.peak_rss_mib(),
    )
    _common.write(doc, out_path)
    print(f"\n{'genes':>6}{'cells':>7}{'tok/cell':>9}{'seconds':>9}{'cells/s':>9}{'tok/s':>9}")
    for r in results:
        print(
            f"{r['n_genes']:>6}{r['n_cells']:>7}{r['mean_prompt_tokens']:>9.0f}"
            f"{r['best_seconds']:>9.1f}{r['cells_per_second']:>9.1f}{r['tokens_per_second']:>9.0f}"
        )


if __name__ == "__main__":
    main()
