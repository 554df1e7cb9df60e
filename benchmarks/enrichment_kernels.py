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
* ``gsea_decoupler``: the same rankings, ours (:func:`sctranscoder._gsea.prerank_matrices`,
  ``weight=1`` as decoupler's walk) against decoupler's ``dc.mt.gsea`` (``times=
  --permutations``; best of two calls, the first compiling numba's kernels); seconds per
  ranking and the agreement of the best positively enriched sets. decoupler's walk orders tied
  scores arbitrarily (a feature's ranking is mostly tied zeros) and has no ``weight=0``.
* ``ulm``: decoupler's ``dc.mt.ulm`` on every feature of the layer (the weighted method
  ``annotate_features(method="ulm")`` uses; we have no kernel of our own for it).
* ``tables`` (``--tables``): ``sct.tl.annotate_features(method=["ora", "prerank", "ulm"])`` on
  every trained layer, and the size of the features x sets tables it keeps in ``uns`` (bytes of
  their arrays, and of the ``.h5ad`` with and without them). The stored size does not depend on
  the permutations, so GSEA runs ``--table-permutations`` of them there.

The gene sets are ``--gene-sets``: the marker sets of ``pbmc68k_reduced`` (default), or e.g.
``GO_BP_2022`` (the shipped GO Biological Process).

Run: ``python benchmarks/enrichment_kernels.py`` (writes
``benchmarks/results/enrichment_kernels_cpu.json``); with GO BP and the tables of all four layers:
``python benchmarks/enrichment_kernels.py --gene-sets GO_BP_2022 --layers 0 1 2 3 --tables
--rankings 8 --out benchmarks/results/enrichment_kernels_go_cpu.json``.
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


def _features(source: str, layers: list[int]):
    """Transcoders of ``layers`` of the embedded model on pbmc68k_reduced, feature rankings of
    layer 2 (the first of ``layers`` without it), and the gene sets in their background.
    """
    import scanpy as sc

    import sctranscoder as sct
    from sctranscoder._genesets import gene_sets_in_background

    adata = sc.datasets.pbmc68k_reduced()
    model = sct.datasets.tiny_c2s()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, layers=layers, n_tokens=65_536, progress=False)
    sct.tl.feature_activations(adata, progress=False)
    layer = 2 if 2 in layers else layers[0]
    genes = sct.get.gene_activations(adata, layer)  # genes x features, X: mean activation
    # as annotate_features takes them: cut to the sentence genes, aliases matched
    sets = gene_sets_in_background(
        source, list(genes.obs_names), adata=adata, min_size=1, max_size=10**9
    )
    return adata, genes, sets


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
    ours_s, ours = _timed(
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
        "sets_tested": int(sum(len(m) >= 5 for m in sets.values())),
        "pairs_with_overlap": len(ours),
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


def bench_gsea_decoupler(genes, sets, rankings: int, permutations: int) -> dict:
    import decoupler as dc

    from sctranscoder._gsea import prerank_matrices

    X = sp.csr_matrix(genes.X.T, dtype=np.float64)  # features x genes: mean activation
    busiest = np.argsort(-np.diff(X.indptr), kind="stable")[:rankings]
    X = X[busiest]
    names = list(genes.obs_names)
    sets = {t: g for t, g in sets.items() if 5 <= len(g) < len(names)}
    ours_s, ours = _timed(
        lambda: prerank_matrices(
            X, names, sets, permutations=permutations, seed=0, weight=1.0, min_size=5, keep=False
        )
    )
    net = pd.DataFrame(
        [(t, g) for t, members in sets.items() for g in members], columns=["source", "target"]
    )
    data = pd.DataFrame(X.toarray(), index=[f"f{i}" for i in range(X.shape[0])], columns=names)
    dc_s, (nes, _) = _timed(
        lambda: dc.mt.gsea(data, net, tmin=5, times=permutations, seed=1, verbose=False),
        repeats=2,
    )
    theirs = [
        str(row.idxmax()) if (row > 0).any() else ""
        for _, row in nes.reindex(data.index).iterrows()
    ]
    mine = ours.best["term"].fillna("").astype(str).tolist()
    return {
        "rankings": int(X.shape[0]),
        "sets": len(sets),
        "permutations": permutations,
        "ours_seconds": ours_s,
        "decoupler_seconds": dc_s,
        "ours_seconds_per_ranking": ours_s / X.shape[0],
        "decoupler_seconds_per_ranking": dc_s / X.shape[0],
        "speedup": dc_s / ours_s,
        "best_term_agreement": float(np.mean([a == b for a, b in zip(mine, theirs, strict=True)])),
    }


def bench_ulm(genes, sets) -> dict:
    from sctranscoder._ulm import ulm_many

    X = sp.csr_matrix(genes.X.T, dtype=np.float64)
    seconds, (terms, _) = _timed(lambda: ulm_many(X, list(genes.obs_names), sets, min_size=5), 2)
    return {"features": int(X.shape[0]), "sets": len(terms), "decoupler_ulm_seconds": seconds}


def _nbytes(value) -> int:
    """Bytes of the arrays in a (nested) record: CSR data, indices and indptr included."""
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if sp.issparse(value):
        return int(value.data.nbytes + value.indices.nbytes + value.indptr.nbytes)
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return 0


def bench_tables(adata, source: str, permutations: int, tmp: Path) -> dict:
    import sctranscoder as sct

    t0 = time.perf_counter()
    sct.tl.annotate_features(
        adata,
        gene_sets=source,
        method=["ora", "prerank", "ulm"],
        baseline=None,
        permutations=permutations,
        key_added="bench_annotation",
    )
    seconds = time.perf_counter() - t0
    record = adata.uns["bench_annotation"]
    tables = record["tables"]
    per_test = {
        test: sum(_nbytes(layer.get(test, {})) for layer in tables.values())
        for test in ("ora", "gsea", "ulm")
    }
    ora_nnz = sum(layer["ora"]["overlap"].nnz for layer in tables.values())
    live = sum(len(layer["features"]) for layer in tables.values())
    with_path, without_path = tmp / "with_tables.h5ad", tmp / "without_tables.h5ad"
    adata.write_h5ad(with_path)
    del record["tables"]
    adata.write_h5ad(without_path)
    return {
        "layers": len(tables),
        "live_features": live,
        "sets_tested": len(record["sets"]),
        "gsea_permutations": permutations,
        "annotate_seconds": seconds,
        "ora_pairs_with_overlap": ora_nnz,
        "ora_pair_fraction_with_overlap": ora_nnz / (live * len(record["sets"])),
        "bytes_per_test": per_test,
        "bytes_total": sum(per_test.values()),
        "h5ad_bytes_with_tables": with_path.stat().st_size,
        "h5ad_bytes_without_tables": without_path.stat().st_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--n-top", type=int, default=50)
    parser.add_argument("--rankings", type=int, default=32)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gene-sets", default="markers:bulk_labels")
    parser.add_argument("--layers", type=int, nargs="+", default=[2])
    parser.add_argument("--tables", action="store_true")
    parser.add_argument("--table-permutations", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "enrichment_kernels_cpu.json")
    args = parser.parse_args()
    hyper = bench_hypergeom(args.pairs, args.seed)
    print("hypergeom", hyper)
    adata, genes, sets = _features(args.gene_sets, args.layers)
    ora = bench_ora(genes, sets, args.n_top)
    print("ora", ora)
    pre = bench_prerank(genes, sets, args.rankings, args.permutations)
    print("prerank", pre)
    gsea_dc = bench_gsea_decoupler(genes, sets, args.rankings, args.permutations)
    print("gsea_decoupler", gsea_dc)
    ulm = bench_ulm(genes, sets)
    print("ulm", ulm)
    fields = {"hypergeom": hyper, "ora": ora, "prerank": pre, "gsea_decoupler": gsea_dc, "ulm": ulm}
    if args.tables:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fields["tables"] = bench_tables(
                adata, args.gene_sets, args.table_permutations, Path(tmp)
            )
        print("tables", fields["tables"])
    from importlib import metadata

    fields["gene_sets"] = args.gene_sets
    fields["libraries"] = {p: metadata.version(p) for p in ("decoupler", "gseapy", "scipy")}
    write(document("enrichment_kernels", "cpu", None, **fields), args.out)


if __name__ == "__main__":
    main()
