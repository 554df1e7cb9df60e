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
from .._enrichment import best_terms, ora_many, prerank_many
from .._genesets import clean_genes, gene_sets_in_background, source_name
from ._feature_genes import features_record

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: ``adata.uns[key]`` entry with the per-layer summary table.
INTERPRETABILITY = "interpretability"
ANNOTATION_COLUMNS = ("best_term", "best_pvalue", "best_fdr", "interpretable")
GSEA_COLUMNS = ("gsea_best_term", "gsea_best_nes", "gsea_best_fdr", "gsea_interpretable")
SUMMARY_COLUMNS = (
    "layer",
    "total_live",
    "interpretable",
    "fraction",
    "baseline_interpretable",
    "baseline_fraction",
    "seconds",
)
GSEA_SUMMARY_COLUMNS = (
    "gsea_interpretable",
    "gsea_fraction",
    "gsea_baseline_interpretable",
    "gsea_baseline_fraction",
    "gsea_seconds",
)
METHODS = ("ora", "prerank", "both")


def annotate_features(
    adata: AnnData,
    gene_sets: Mapping[str, Iterable[str]] | str | os.PathLike | pd.DataFrame,
    *,
    layers: Sequence[int] | None = None,
    method: Literal["ora", "prerank", "both"] = "ora",
    n_top_genes: int = 50,
    fdr: float = 0.05,
    live_threshold: float | None = None,
    min_size: int = 5,
    max_size: int = 500,
    baseline: Literal["shuffled"] | None = "shuffled",
    n_shuffles: int = 1,
    permutations: int = 1000,
    gsea_weight: float = 0.0,
    seed: int = 0,
    allow_network: bool = False,
    key: str = Key.uns,
    copy: bool = False,
) -> AnnData | None:
    """Label each live feature by the gene set it is most enriched in (ORA and/or preranked GSEA).

    ``method="ora"`` (over-representation, the paper's criterion): for every live feature, the
    query is its top ``n_top_genes`` genes (from :func:`feature_genes`) and the background all
    genes of the sentences. Gene sets are restricted to the background and kept when
    ``min_size <= size <= max_size`` there. All live features of a layer are tested at once
    (:func:`~sctranscoder._enrichment.ora_many`, hypergeometric test, BH FDR per feature over
    all tested sets). A feature is *interpretable* when its best set has FDR < ``fdr`` (the
    paper's Table 4).

    ``method="prerank"``: preranked GSEA of each live feature's ranking of all background
    genes by its mean activation per cell that contains the gene (the summed activation of
    :func:`feature_genes` over the gene's cells, ``gene_sums / gene_cells``; 0 where it never
    fired, so most genes tie at 0, which the test handles without depending on their order).
    All live features of a layer are tested at once
    (:func:`~sctranscoder._enrichment.prerank_many`: gseapy's ES, gene-set permutation null,
    NES, nominal p and FDR q-value, ``permutations`` permutations seeded by ``seed``, the same
    sets as ORA). A feature's best set is its positively enriched set (``nes > 0``) with the
    largest NES (:func:`~sctranscoder._enrichment.best_prerank_terms`), and the feature is
    *GSEA-interpretable* when that set's FDR q < ``fdr``. ``method="both"`` runs the two.

    The chance baseline (``baseline="shuffled"``) runs the same tests after a seeded
    permutation of the gene labels over the background: for ORA each feature keeps its query
    size, but its genes are replaced by the genes those labels are moved to; for GSEA each
    feature's scores are moved with the labels. Both methods use the same permutations.

    Parameters
    ----------
    adata
        Annotated data after :func:`feature_genes`.
    gene_sets
        Anything :func:`~sctranscoder._genesets.gene_sets` takes: a dict, a GMT path, a
        decoupler net, ``"markers:<obs column>"`` or a library name.
    layers
        Layers to annotate (default: all layers of :func:`feature_genes`).
    method
        ``"ora"`` (default), ``"prerank"`` or ``"both"``. With ``"prerank"`` alone the ORA
        columns (``best_term``, ``best_pvalue``, ``best_fdr``, ``interpretable``) and the
        summary's ``interpretable``, ``fraction`` and ``baseline_*`` hold the GSEA results
        (``best_pvalue`` is the nominal GSEA p-value), so that everything reading them follows
        the method run; the ``gsea_*`` columns are written as well.
    n_top_genes
        Query genes per feature for ORA; at most the ``n_top`` of :func:`feature_genes`.
    fdr
        FDR threshold of ``interpretable`` and ``gsea_interpretable``.
    live_threshold
        log10 firing rate from which a feature is live; default: the one of :func:`feature_genes`
        (the ``live`` column is then used as is).
    min_size, max_size
        Gene set sizes kept, counted in the background.
    baseline
        ``"shuffled"`` for the shuffled-gene-label baseline, or ``None``.
    n_shuffles
        Permutations averaged in the baseline.
    permutations
        Gene-set permutations of the GSEA null (``method`` ``"prerank"`` or ``"both"``); the
        smallest nominal p-value is about ``1 / permutations``.
    gsea_weight
        Exponent of the scores in the GSEA running sum (gseapy's ``weight``). Default ``0``:
        classic Kolmogorov-Smirnov steps, in effect the fraction of the set among the genes
        the feature fires on. gseapy's default ``1`` (the weighted ES) saturates on feature
        rankings, which are mostly zeros: any set with one scored gene near the top scores
        close to 1, and the null does too. Measured on the embedded model (150 cells,
        ``"markers:bulk_labels"``), weight 1 found no more features than shuffled gene labels
        (0.02-0.08 vs 0.03-0.05), weight 0 found 0.14-0.55 (shuffled 0.03).
    seed
        Seed of the label permutations and of the GSEA null.
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
        recomputed when ``live_threshold`` is given. With ``method`` ``"prerank"`` or ``"both"``
        also ``gsea_best_term`` (str, ``""`` for dead features or without a positively enriched
        set), ``gsea_best_nes`` and ``gsea_best_fdr`` (float, NaN then) and
        ``gsea_interpretable`` (bool: ``gsea_best_fdr < fdr``). With ``method="ora"``, ``gsea_*``
        columns left by an earlier call are removed.
    ``adata.uns[key]["interpretability"]`` : :class:`~pandas.DataFrame`
        One row per layer (index ``"layer_<i>"``): ``layer``, ``total_live``, ``interpretable``,
        ``fraction``, ``baseline_interpretable`` (mean over shuffles), ``baseline_fraction`` (NaN
        without a baseline) and ``seconds`` (time of the layer's enrichment, both methods and
        baselines included); with GSEA then ``gsea_interpretable``, ``gsea_fraction``,
        ``gsea_baseline_interpretable`` and ``gsea_baseline_fraction`` (shuffled-gene-label
        baseline; NaN without a baseline) and ``gsea_seconds`` (time of the layer's GSEA,
        baseline included). Columns may be added after these by other tools.
    ``adata.uns[key]["features"]["annotation"]`` : dict
        ``params`` of this call (including ``method``, ``permutations`` and ``gsea_weight``),
        ``n_sets`` (sets
        tested) and ``n_background`` (background genes).
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
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    ora, gsea = method in ("ora", "both"), method in ("prerank", "both")
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
    if int(permutations) != permutations or permutations < 1:
        raise ValueError(f"permutations must be a positive integer, got {permutations}.")
    if not np.isfinite(gsea_weight) or gsea_weight < 0:
        raise ValueError(f"gsea_weight must be finite and >= 0, got {gsea_weight}.")
    if live_threshold is not None and not np.isfinite(live_threshold):
        raise ValueError(f"live_threshold must be finite, got {live_threshold}.")
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}.")
    if gsea:
        gsea_missing = [
            name
            for x in layers
            for name in (f"{Key.layer(x)}_gene_sums", "gene_cells")
            if name not in record
        ]
        if gsea_missing:
            raise KeyError(
                f"method={method!r} needs {sorted(set(gsea_missing))} from feature_genes, "
                "which are missing: rerun `sct.tl.feature_genes(adata)`."
            )

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
        n_live = len(live)
        perms = [
            rng.permutation(len(background)) if baseline == "shuffled" else None
            for _ in range(n_shuffles)
        ]
        row: dict[str, float] = {"layer": layer, "total_live": n_live}
        if ora:
            Q = _query_matrix(table.loc[live, "top_genes"], background, n_top_genes)
            best = _best(Q, sets, background, live)
            _set_best(table, live, best, "best_pvalue", "pvalue")
            table["interpretable"] = (table["best_fdr"] < fdr).to_numpy(dtype=bool)
            row["interpretable"] = int(table["interpretable"].sum())
            base = np.nan
            if baseline == "shuffled":
                hits = []
                for perm in perms:
                    b = _best(Q[:, perm], sets, background, live)
                    hits.append(int((b["fdr"].to_numpy(dtype=float) < fdr).sum()))
                base = float(np.mean(hits))
            row["baseline_interpretable"] = base
        if not gsea:  # drop what an earlier GSEA run left: it would not match this call
            table = table.drop(columns=[c for c in GSEA_COLUMNS if c in table.columns])
        else:
            gsea_start = time.perf_counter()
            scores = _mean_activation(record, layer, live, background)
            gsea_args = (sets, background, live, permutations, gsea_weight, seed)
            best = _gsea_best(scores, *gsea_args)
            table["gsea_best_term"] = ""
            table["gsea_best_nes"] = np.nan
            table["gsea_best_fdr"] = np.nan
            table.loc[live, "gsea_best_term"] = best["term"].fillna("").astype(str).to_numpy()
            table.loc[live, "gsea_best_nes"] = best["nes"].to_numpy(dtype=float)
            table.loc[live, "gsea_best_fdr"] = best["fdr"].to_numpy(dtype=float)
            table["gsea_interpretable"] = (table["gsea_best_fdr"] < fdr).to_numpy(dtype=bool)
            row["gsea_interpretable"] = int(table["gsea_interpretable"].sum())
            base = np.nan
            if baseline == "shuffled":
                hits = []
                for perm in perms:
                    b = _gsea_best(scores[:, perm], *gsea_args)
                    hits.append(int((b["fdr"].to_numpy(dtype=float) < fdr).sum()))
                base = float(np.mean(hits))
            row["gsea_baseline_interpretable"] = base
            row["gsea_seconds"] = time.perf_counter() - gsea_start
            if not ora:  # the ORA columns follow the method run
                pvalues = best["pvalue"].to_numpy(dtype=float)
                table["best_term"] = table["gsea_best_term"]
                table["best_pvalue"] = np.nan
                table.loc[live, "best_pvalue"] = pvalues
                table["best_fdr"] = table["gsea_best_fdr"]
                table["interpretable"] = table["gsea_interpretable"]
                row["interpretable"] = row["gsea_interpretable"]
                row["baseline_interpretable"] = base
        row["seconds"] = time.perf_counter() - start
        for prefix in ("", "gsea_") if gsea else ("",):
            n_int = row[f"{prefix}interpretable"]
            row[f"{prefix}fraction"] = n_int / n_live if n_live else np.nan
            row[f"{prefix}baseline_fraction"] = (
                row[f"{prefix}baseline_interpretable"] / n_live if n_live else np.nan
            )
        tables[Key.layer(layer)] = table
        rows.append(row)
        logger.info(
            "layer %d (%s): %d of %d live features interpretable (%.1f%%; shuffled baseline %s)"
            "%s in %.1fs",
            layer,
            method,
            row["interpretable"],
            n_live,
            100 * row["fraction"] if n_live else float("nan"),
            f"{100 * row['baseline_fraction']:.1f}%" if baseline else "none",
            (
                f"; GSEA {row['gsea_interpretable']} ({100 * row['gsea_fraction']:.1f}%, "
                f"baseline {100 * row['gsea_baseline_fraction']:.1f}%)"
                if method == "both" and n_live
                else ""
            ),
            row["seconds"],
        )
    columns = list(SUMMARY_COLUMNS) + (list(GSEA_SUMMARY_COLUMNS) if gsea else [])
    summary = pd.DataFrame(rows, columns=columns)
    summary.index = summary["layer"].map(Key.layer).to_numpy()

    if copy:
        adata = adata.copy()
    out = adata.uns[key]["features"]
    out.update(tables)
    out["annotation"] = {
        "params": {
            "gene_sets": source_name(gene_sets),
            "layers": np.asarray(layers, dtype=np.int64),
            "method": str(method),
            "n_top_genes": int(n_top_genes),
            "fdr": float(fdr),
            "live_threshold": float(
                params["live_threshold"] if live_threshold is None else live_threshold
            ),
            "min_size": int(min_size),
            "max_size": int(max_size),
            "baseline": str(baseline),
            "n_shuffles": int(n_shuffles),
            "permutations": int(permutations),
            "gsea_weight": float(gsea_weight),
            "seed": int(seed),
        },
        "n_sets": len(sets),
        "n_background": len(background),
    }
    adata.uns[key][INTERPRETABILITY] = summary
    logger.info(
        "annotated the live features of %d layers with %d gene sets (%s)\n    added columns %s "
        "to adata.uns[%r]['features']['layer_<i>'], 'interpretability' (adata.uns[%r])",
        len(layers),
        len(sets),
        method,
        list(ANNOTATION_COLUMNS) + (list(GSEA_COLUMNS) if gsea else []),
        key,
        key,
    )
    return adata if copy else None


def _set_best(
    table: pd.DataFrame, live: pd.Index, best: pd.DataFrame, pcol: str, source: str
) -> None:
    """Write ORA's best term, p-value and FDR of the live features (others: "" and NaN)."""
    table["best_term"] = ""
    table[pcol] = np.nan
    table["best_fdr"] = np.nan
    table.loc[live, "best_term"] = best["term"].fillna("").astype(str).to_numpy()
    table.loc[live, pcol] = best[source].to_numpy(dtype=float)
    table.loc[live, "best_fdr"] = best["fdr"].to_numpy(dtype=float)


def _mean_activation(
    record: dict, layer: int, live: pd.Index, background: pd.Index
) -> sparse.csr_matrix:
    """(live features x background) mean activation per cell containing each gene.

    ``gene_sums / gene_cells`` from :func:`feature_genes`; genes whose symbols coincide once
    cleaned (upper-cased) are pooled (sums and cells added); a gene in no cell scores 0.
    """
    sums = sparse.csc_matrix(record[f"{Key.layer(layer)}_gene_sums"], dtype=np.float64)
    cells = np.asarray(record["gene_cells"], dtype=np.float64)
    symbols = [str(g).strip().upper() for g in np.asarray(record["genes"]).astype(str)]
    cols = background.get_indexer(symbols)
    keep = np.flatnonzero(cols >= 0)
    pool = sparse.csr_matrix(
        (np.ones(len(keep)), (keep, cols[keep])), shape=(len(symbols), len(background))
    )
    features = np.flatnonzero(record[Key.layer(layer)].index.isin(live))
    pooled = (pool.T @ sums[:, features]).T.tocsr()  # live features x background
    per_gene = np.asarray(pool.T @ cells).ravel()
    inv = np.divide(1.0, per_gene, out=np.zeros_like(per_gene), where=per_gene > 0)
    scores = sparse.csr_matrix(pooled @ sparse.diags(inv))
    scores.eliminate_zeros()
    return scores


def _gsea_best(
    scores: sparse.csr_matrix,
    sets: dict[str, list[str]],
    background: pd.Index,
    names: pd.Index,
    permutations: int,
    weight: float,
    seed: int,
) -> pd.DataFrame:
    """Best positively enriched set (term, nes, pvalue, fdr) of each row, NaN where none."""
    if scores.shape[0] == 0:
        return pd.DataFrame({c: [] for c in ("term", "nes", "pvalue", "fdr")}, index=pd.Index([]))
    best = prerank_many(
        scores,
        list(background),
        sets,
        permutations=int(permutations),
        seed=int(seed),
        weight=float(weight),
        min_size=1,
        max_size=10**9,
        query_names=list(names),
        report="best",
    )
    return best.reindex(pd.Index(list(names), name="query"))


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
