"""Enrichment of every live feature's genes in gene sets, with a shuffled-label chance baseline."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Key
from .._enrichment import best_terms, ora_many
from .._genesets import clean_genes, gene_sets_in_background
from ._feature_genes import features_record

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: ``adata.uns[key]`` entry with the per-layer summary table.
INTERPRETABILITY = "interpretability"
ANNOTATION_COLUMNS = ("best_term", "best_pvalue", "best_fdr", "interpretable")
SUMMARY_COLUMNS = (
    "layer",
    "total_live",
    "interpretable",
    "fraction",
    "baseline_interpretable",
    "baseline_fraction",
    "seconds",
)


def annotate_features(
    adata: AnnData,
    gene_sets: Mapping[str, Iterable[str]] | str | os.PathLike | pd.DataFrame,
    *,
    layers: Sequence[int] | None = None,
    n_top_genes: int = 50,
    fdr: float = 0.05,
    live_threshold: float | None = None,
    min_size: int = 5,
    max_size: int = 500,
    baseline: Literal["shuffled"] | None = "shuffled",
    n_shuffles: int = 1,
    seed: int = 0,
    allow_network: bool = False,
    key: str = Key.uns,
    copy: bool = False,
) -> AnnData | None:
    """Label each live feature by the gene set its top genes are most enriched in (ORA, BH FDR).

    For every live feature, the query is its top ``n_top_genes`` genes (from
    :func:`feature_genes`) and the background all genes of the sentences. Gene sets are
    restricted to the background and kept when ``min_size <= size <= max_size`` there. All live
    features of a layer are tested at once (:func:`~sctranscoder._enrichment.ora_many`,
    hypergeometric test, BH FDR per feature over all tested sets). A feature is *interpretable*
    when its best set has FDR < ``fdr`` (the paper's criterion, its Table 4).

    The chance baseline (``baseline="shuffled"``) runs the same test after a seeded permutation
    of the gene labels over the background: each feature keeps its query size, but its genes are
    replaced by the genes those labels are moved to.

    Parameters
    ----------
    adata
        Annotated data after :func:`feature_genes`.
    gene_sets
        Anything :func:`~sctranscoder._genesets.gene_sets` takes: a dict, a GMT path, a
        decoupler net, ``"markers:<obs column>"`` or a library name.
    layers
        Layers to annotate (default: all layers of :func:`feature_genes`).
    n_top_genes
        Query genes per feature; at most the ``n_top`` of :func:`feature_genes`.
    fdr
        FDR threshold of ``interpretable``.
    live_threshold
        log10 firing rate from which a feature is live; default: the one of :func:`feature_genes`
        (the ``live`` column is then used as is).
    min_size, max_size
        Gene set sizes kept, counted in the background.
    baseline
        ``"shuffled"`` for the shuffled-gene-label baseline, or ``None``.
    n_shuffles
        Permutations averaged in the baseline.
    seed
        Seed of the permutations.
    allow_network
        Let a named library be downloaded (see :func:`~sctranscoder._genesets.gene_sets`).
    key
        ``adata.uns`` key of the transcoders.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets:

    ``adata.uns[key]["features"]["layer_<i>"]`` : :class:`~pandas.DataFrame`
        Gains ``best_term`` (str, ``""`` when none), ``best_pvalue`` and ``best_fdr`` (float, NaN
        for dead features or without any overlap) and ``interpretable`` (bool); ``live`` is
        recomputed when ``live_threshold`` is given.
    ``adata.uns[key]["interpretability"]`` : :class:`~pandas.DataFrame`
        One row per layer: ``layer``, ``total_live``, ``interpretable``, ``fraction``,
        ``baseline_interpretable`` (mean over shuffles), ``baseline_fraction`` (NaN without a
        baseline) and ``seconds`` (time of the layer's enrichment, baseline included).
    ``adata.uns[key]["features"]["annotation"]`` : dict
        ``params`` of this call and ``n_sets`` (sets tested).
    """
    # --- validate everything before computing or writing anything
    record = features_record(adata, key)
    params = record["params"]
    stored_layers = [int(x) for x in np.atleast_1d(params["layers"])]
    layers = stored_layers if layers is None else [int(x) for x in layers]
    missing = [x for x in layers if Key.layer(x) not in record]
    if missing:
        raise KeyError(
            f"No feature genes for layer(s) {missing}; computed: {stored_layers}. Run "
            f"`sct.tl.feature_genes(adata, layers=...)` for them."
        )
    if not 1 <= n_top_genes <= int(params["n_top"]):
        raise ValueError(
            f"n_top_genes must be within [1, {int(params['n_top'])}] (the n_top of "
            f"feature_genes), got {n_top_genes}."
        )
    if not 0 < fdr <= 1:
        raise ValueError(f"fdr must be in (0, 1], got {fdr}.")
    if baseline not in ("shuffled", None):
        raise ValueError(f"baseline must be 'shuffled' or None, got {baseline!r}.")
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be positive, got {n_shuffles}.")
    if live_threshold is not None and not np.isfinite(live_threshold):
        raise ValueError(f"live_threshold must be finite, got {live_threshold}.")
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}.")

    background = pd.Index(pd.unique(np.asarray(clean_genes(record["genes"]), dtype=object)))
    sets = gene_sets_in_background(
        gene_sets,
        background,
        adata=adata,
        min_size=min_size,
        max_size=max_size,
        allow_network=allow_network,
    )

    # --- compute
    rng = np.random.default_rng(seed)
    tables, rows = {}, []
    for layer in layers:
        start = time.perf_counter()
        table = record[Key.layer(layer)].copy()
        if live_threshold is not None:
            table["live"] = table["log10_firing_rate"].to_numpy() >= live_threshold
        live = table.index[table["live"].to_numpy(dtype=bool)]
        Q = _query_matrix(table.loc[live, "top_genes"], background, n_top_genes)
        best = _best(Q, sets, background, live)
        table["best_term"] = ""
        table["best_pvalue"] = np.nan
        table["best_fdr"] = np.nan
        table.loc[live, "best_term"] = best["term"].fillna("").astype(str).to_numpy()
        table.loc[live, "best_pvalue"] = best["pvalue"].to_numpy(dtype=float)
        table.loc[live, "best_fdr"] = best["fdr"].to_numpy(dtype=float)
        table["interpretable"] = (table["best_fdr"] < fdr).to_numpy(dtype=bool)
        n_live, n_int = len(live), int(table["interpretable"].sum())
        base = np.nan
        if baseline == "shuffled":
            hits = []
            for _ in range(n_shuffles):
                perm = rng.permutation(len(background))
                b = _best(Q[:, perm], sets, background, live)
                hits.append(int((b["fdr"].to_numpy(dtype=float) < fdr).sum()))
            base = float(np.mean(hits))
        seconds = time.perf_counter() - start
        tables[Key.layer(layer)] = table
        rows.append(
            {
                "layer": layer,
                "total_live": n_live,
                "interpretable": n_int,
                "fraction": n_int / n_live if n_live else np.nan,
                "baseline_interpretable": base,
                "baseline_fraction": base / n_live if n_live else np.nan,
                "seconds": seconds,
            }
        )
        logger.info(
            "layer %d: %d of %d live features interpretable (%.1f%%; shuffled baseline %s) in %.1fs",
            layer,
            n_int,
            n_live,
            100 * rows[-1]["fraction"] if n_live else float("nan"),
            f"{100 * rows[-1]['baseline_fraction']:.1f}%" if baseline else "none",
            seconds,
        )
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    summary.index = summary["layer"].map(Key.layer).to_numpy()

    if copy:
        adata = adata.copy()
    out = adata.uns[key]["features"]
    out.update(tables)
    out["annotation"] = {
        "params": {
            "gene_sets": (
                os.fspath(gene_sets)
                if isinstance(gene_sets, str | os.PathLike)
                else type(gene_sets).__name__
            ),
            "layers": np.asarray(layers, dtype=np.int64),
            "n_top_genes": int(n_top_genes),
            "fdr": float(fdr),
            "live_threshold": float(
                params["live_threshold"] if live_threshold is None else live_threshold
            ),
            "min_size": int(min_size),
            "max_size": int(max_size),
            "baseline": str(baseline),
            "n_shuffles": int(n_shuffles),
            "seed": int(seed),
        },
        "n_sets": len(sets),
        "n_background": len(background),
    }
    adata.uns[key][INTERPRETABILITY] = summary
    logger.info(
        "annotated the live features of %d layers with %d gene sets\n    added columns %s to "
        "adata.uns[%r]['features']['layer_<i>'], 'interpretability' (adata.uns[%r])",
        len(layers),
        len(sets),
        list(ANNOTATION_COLUMNS),
        key,
        key,
    )
    return adata if copy else None


def _query_matrix(top_genes: pd.Series, background: pd.Index, n_top: int) -> sparse.csr_matrix:
    """(features x background) membership of each feature's first ``n_top`` genes."""
    lists = [clean_genes(s.split(";"))[:n_top] if s else [] for s in top_genes.astype(str)]
    cols = background.get_indexer([g for q in lists for g in q])
    rows = np.repeat(np.arange(len(lists)), [len(q) for q in lists])
    keep = cols >= 0
    Q = sparse.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.int32), (rows[keep], cols[keep])),
        shape=(len(lists), len(background)),
    )
    Q.sum_duplicates()
    Q.data[:] = 1
    return Q


def _best(
    Q: sparse.csr_matrix, sets: dict[str, list[str]], background: pd.Index, names: pd.Index
) -> pd.DataFrame:
    """Best set (term, pvalue, fdr) of each query row, NaN where none overlaps."""
    if Q.shape[0] == 0:
        return pd.DataFrame({"term": [], "pvalue": [], "fdr": []}, index=pd.Index([]))
    table = ora_many(Q, sets, background=list(background), query_names=list(names))
    return best_terms(table, list(names))
