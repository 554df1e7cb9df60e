"""Reconstruction of a cell embedding by TopK SAE concepts, by expansion factor (Claye et al.'s
Figure 2), on ``pbmc68k_reduced``: the stored PCA (50 dims) and C2S's own cell embedding from the
embedded default (``sct.tl.cell_embeddings``), both through ``sct.tl.sae_sweep``.

Run: ``python benchmarks/sae_sweep.py [--k 8] [--n-steps 2000]``
Writes ``benchmarks/results/sae_sweep_cpu.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--n-steps", type=int, default=2000)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--out", default=str(_common.RESULTS / "sae_sweep_cpu.json"))
    args = p.parse_args()
    _common.snapshot_code()

    import scanpy as sc
    import torch

    import sctranscoder as sct

    sc.settings.verbosity = 0
    model = sct.datasets.tiny_c2s()
    adata = _common.pbmc()
    sct.pp.cell_sentences(adata, model=model)
    t0 = time.perf_counter()
    sct.tl.cell_embeddings(adata, model, progress=False)
    embed_seconds = time.perf_counter() - t0

    sweeps = {}
    for rep in ("X_pca", "X_c2s"):
        key = f"sweep_{rep}"
        sct.tl.sae_sweep(
            adata, use_rep=rep, expansion_factors=tuple(args.factors), k=args.k,
            n_steps=args.n_steps, key_added=key, progress=False,
        )  # fmt: skip
        table = adata.uns[key]["sweep"]
        sweeps[rep] = {
            "n_dims": int(adata.obsm[rep].shape[1]),
            "rows": table.round(4).to_dict(orient="records"),
        }
        print(rep, table[["expansion_factor", "train_r2", "validation_r2", "dead_fraction",
                          "seconds"]].round(3).to_string(index=False), sep="\n", flush=True)  # fmt: skip
    doc = _common.document(
        "sae_sweep",
        "cpu",
        torch.get_num_threads(),
        data="pbmc68k_reduced (700 cells, 10% validation)",
        k=args.k,
        n_steps=args.n_steps,
        cell_embeddings_seconds=round(embed_seconds, 2),
        sweeps=sweeps,
    )
    _common.write(doc, Path(args.out))


if __name__ == "__main__":
    main()
