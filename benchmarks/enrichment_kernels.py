"""Why sctranscoder keeps its own enrichment kernels: each against the library call it replaces.

Side by side, in one run, on the same inputs:

* ``hypergeom``: the upper tail of the hypergeometric distribution for ``--pairs`` (feature, set)
  pairs whose parameters all differ, ours (:func:`sctranscoder._ora.hypergeom_sf`) against
  ``scipy.stats.hypergeom.sf``; the largest relative difference is reported.
* ``ora``: the best set of every feature of a layer (1,024 features, background of the
  embedded model's sentence genes, marker sets of ``pbmc68k_reduced``), ours
  (:func:`sctranscoder._ora.ora_many`, one sparse product) against decoupler's ``dc.mt.ora``
  (features as samples, each feature's top ``--n-top`` genes as its query; a two-sided Fisher
  test, so only the time is compared; best of two calls, the first compiling numba's kernels).
* ``prerank``: preranked GSEA of ``--rankings`` feature rankings, ours
  (:func:`sctranscoder._gsea.prerank_many`) against ``gseapy.prerank`` called once per ranking,
  ``--permutations`` each; the agreement of the best terms is reported.

Run: ``python benchmarks/enrichment_kernels.py`` (writes
``benchmarks/results/enrichment_kernels_cpu.json``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from _common import RESULTS, document, write


def _timed(fn, repeats: int = 1):
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_hypergeom(pairs: int, seed: int) -> dict:
    from scipy import stats

    from sctranscoder._ora import hypergeom_sf

    rng = np.random.default_rng(seed)
    N = 5000
    K = rng.integers(5, 500, pairs)
    n = rng.integers(10, 60, pairs)
    k = np.minimum(rng.integers(1, 8, pairs), np.minimum(K, n))
    ours_s, ours = _timed(lambda: hypergeom_sf(k, N, K, n), repeats=3)
    scipy_s, ref = _timed(lambda: stats.hypergeom.sf(k - 1, N, K, n))
    rel = np.abs(ours - ref) / np.maximum(ref, 1e-300)
    return {
        "pairs": pairs,
        "ours_seconds": ours_s,
        "scipy_seconds": scipy_s,
        "speedup": scipy_s / ours_s,
        "max_relative_difference": float(rel.max()),
    }


def _features(n_top: int):
    """Feature rankings of layer 2 of the embedded model on pbmc68k_reduced, and marker sets."""
    import scanpy as sc

    import sctranscoder as sct
    from sctranscoder._genesets import gene_sets

    adata = sc.datasets.pbmc68k_reduced()
    model = sct.datasets.tiny_c2s()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, layers=[2], n_tokens=65_536, progress=False)
    sct.tl.feature_activations(adata, progress=False)
    genes = sct.get.gene_activations(adata, 2)  # genes x features, X: mean activation
    sets = gene_sets("markers:bulk_labels", adata=adata, min_size=1, max_size=10**9)
    return genes, sets


def bench_ora(genes, sets, n_top: int) -> dict:
    import decoupler as dc

    from sctranscoder._ora import ora_many

    scores = sp.csr_matrix(genes.layers["count"].T, dtype=np.float64)  # features x genes
    background = list(genes.obs_names)
    # each feature's top n_top genes by count, as ours and decoupler's n_up select them
    dense = scores.toarray()
    order = np.argsort(-dense, axis=1, kind="stable")[:, :n_top]
    Q = np.zeros_like(dense)
    np.put_along_axis(Q, order, 1.0, axis=1)
    Q[dense == 0] = 0
    ours_s, _ = _timed(
        lambda: ora_many(sp.csr_matrix(Q), sets, background=background, min_size=5), repeats=3
    )
    net = pd.DataFrame(
        [(name, g) for name, members in sets.items() for g in members if g in set(background)],
        columns=["source", "target"],
    )
    data = pd.DataFrame(dense, index=[f"f{i}" for i in range(len(dense))], columns=background)
    n_up = len(background) - n_top
    # best of two: the first call includes numba's compilation
    dc_s, _ = _timed(lambda: dc.mt.ora(data, net, tmin=5, n_up=n_up, verbose=False), repeats=2)
    return {
        "features": int(dense.shape[0]),
        "background_genes": len(background),
        "sets": len(sets),
        "ours_seconds": ours_s,
        "decoupler_seconds": dc_s,
        "speedup": dc_s / ours_s,
    }


def bench_prerank(genes, sets, rankings: int, permutations: int) -> dict:
    import gseapy

    from sctranscoder._gsea import best_prerank_terms, prerank_many

    X = sp.csr_matrix(genes.X.T, dtype=np.float64)  # features x genes: mean activation
    busiest = np.argsort(-np.diff(X.indptr), kind="stable")[:rankings]
    X = X[busiest]
    names = list(genes.obs_names)
    ours_s, ours = _timed(
        lambda: prerank_many(
            X,
            names,
            sets,
            permutations=permutations,
            seed=0,
            weight=1.0,
            min_size=5,
            report="best",
        )
    )

    def run_gseapy():
        best = []
        for row in X.toarray():
            ranking = pd.Series(row, index=names).sort_values(ascending=False)
            res = gseapy.prerank(
                rnk=ranking,
                gene_sets=sets,
                permutation_num=permutations,
                seed=0,
                min_size=5,
                max_size=1000,
                outdir=None,
                no_plot=True,
                threads=1,
                verbose=False,
            ).res2d
            res = res.assign(nes=res["NES"].astype(float), term=res["Term"])
            positive = res[res["nes"] > 0]
            best.append(positive.sort_values("nes").iloc[-1]["term"] if len(positive) else "")
        return best

    gseapy_s, theirs = _timed(run_gseapy)
    mine = best_prerank_terms(ours.reset_index())["term"].fillna("").tolist()
    agree = float(np.mean([a == b for a, b in zip(mine, theirs, strict=True)]))
    return {
        "rankings": int(X.shape[0]),
        "permutations": permutations,
        "ours_seconds": ours_s,
        "gseapy_seconds": gseapy_s,
        "speedup": gseapy_s / ours_s,
        "best_term_agreement": agree,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--n-top", type=int, default=50)
    parser.add_argument("--rankings", type=int, default=32)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "enrichment_kernels_cpu.json")
    args = parser.parse_args()
    hyper = bench_hypergeom(args.pairs, args.seed)
    print("hypergeom", hyper)
    genes, sets = _features(args.n_top)
    ora = bench_ora(genes, sets, args.n_top)
    print("ora", ora)
    pre = bench_prerank(genes, sets, args.rankings, args.permutations)
    print("prerank", pre)
    write(
        document("enrichment_kernels", "cpu", None, hypergeom=hyper, ora=ora, prerank=pre),
        args.out,
    )


if __name__ == "__main__":
    main()
