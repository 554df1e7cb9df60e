"""Enrichment of every live feature's genes in gene sets, with a shuffled-label chance baseline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy import sparse

from .._constants import Key, feature_names
from .._genesets import (
    MARKERS_PREFIX,
    clean_genes,
    clean_symbol,
    gene_sets_in_background,
    is_reloadable,
    source_name,
)
from .._gsea import prerank_many
from .._ora import best_terms, ora_many
from .._records import activation_layers, activations_record, check_key, strings
from .._validate import (
    check_bool,
    check_copy_backed,
    check_fraction,
    check_in_memory,
    check_layer_list,
    check_live_threshold,
    check_positive_int,
    check_seed,
    check_set_sizes,
)
from ..get._features import gene_tables, live_mask, top_genes

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Mapping, Sequence

    from anndata import AnnData

METHODS = ("ora", "prerank", "both")
#: Per-feature columns written by each method.
ORA_COLUMNS = ("ora_term", "ora_pvalue", "ora_fdr", "ora_interpretable")
GSEA_COLUMNS = ("gsea_term", "gsea_nes", "gsea_pvalue", "gsea_fdr", "gsea_interpretable")


@dataclass(frozen=True)
class _Settings:
    """The validated arguments that the per-layer work needs."""

    sets: dict[str, list[str]]
    background: pd.Index
    ora: bool
    gsea: bool
    n_top: int
    fdr: float
    live_threshold: float | None
    baseline: str | None
    n_shuffles: int
    permutations: int
    gsea_weight: float
    seed: int


def annotate_features(
    adata: AnnData,
    *,
    gene_sets: Mapping[str, Iterable[str]] | str | os.PathLike | pd.DataFrame,
    layers: Sequence[int] | None = None,
    method: Literal["ora", "prerank", "both"] = "ora",
    n_top: int = 50,
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
    activations_key: str = Key.activations(Key.transcoders),
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Label each live feature by the gene set it is most enriched in (ORA and/or preranked GSEA).

    ``method="ora"`` (over-representation, the paper's criterion): for every live feature, the
    query is its top ``n_top`` genes (by the number of cells in which it fires on them, then mean
    activation; :func:`feature_activations`) and the background all genes of the sentences. Gene
    sets are restricted to the background and kept when ``min_size <= size <= max_size`` there.
    All live features of a layer are tested at once (:func:`~sctranscoder._ora.ora_many`,
    one-sided hypergeometric test, BH FDR per feature over all tested sets). A feature is
    *interpretable* when its best set has FDR < ``fdr`` (the paper's Table 4).

    ``method="prerank"``: preranked GSEA of each live feature's ranking of all background genes
    by its mean activation per cell that contains the gene (0 where it never fired, so most genes
    tie at 0, which the test handles without depending on their order), all live features of a
    layer at once (:func:`~sctranscoder._gsea.prerank_many`: gseapy's ES, gene-set permutation
    null, NES, nominal p and FDR q-value). A feature's best set is its positively enriched set
    (``nes > 0``) with the largest NES, and the feature is *GSEA-interpretable* when that set's
    FDR q < ``fdr``. ``method="both"`` runs the two.

    The chance baseline (``baseline="shuffled"``) runs the same tests after a seeded permutation
    of the gene labels over the background: for ORA each feature keeps its query size, but its
    genes are replaced by the genes those labels are moved to; for GSEA each feature's scores
    are moved with the labels. Both methods use the same permutations.

    Parameters
    ----------
    adata
        Annotated data after :func:`feature_activations` (with its gene tables).
    gene_sets
        Anything :func:`~sctranscoder._genesets.gene_sets` takes: a dict, a GMT path, a
        decoupler net, ``"markers:<obs column>"`` or a library name. Markers are computed from
        the expression matrix: not from a backed ``adata`` (call ``adata.to_memory()``, or pass
        the sets themselves).
    layers
        Layers to annotate (default: all layers of the activation record).
    method
        ``"ora"`` (default), ``"prerank"`` or ``"both"``.
    n_top
        Query genes per feature for ORA.
    fdr
        FDR threshold of ``ora_interpretable`` and ``gsea_interpretable``.
    live_threshold
        log10 firing rate (finite, at most 0) from which a feature is live; default: the
        activation record's.
    min_size, max_size
        Gene set sizes kept, counted in the background (integers, ``1 <= min_size <=
        max_size``).
    baseline
        ``"shuffled"`` for the shuffled-gene-label baseline, or ``None``.
    n_shuffles
        Permutations averaged in the baseline.
    permutations
        Gene-set permutations of the GSEA null; the smallest nominal p-value is about
        ``1 / permutations``.
    gsea_weight
        Exponent of the scores in the GSEA running sum (gseapy's ``weight``). Default ``0``:
        classic Kolmogorov-Smirnov steps, in effect the fraction of the set among the genes the
        feature fires on. gseapy's default ``1`` saturates on feature rankings, which are mostly
        zeros: any set with one scored gene near the top scores close to 1, and the null does
        too. Measured on the embedded model (150 cells, ``"markers:bulk_labels"``), weight 1 found
        no more features than shuffled gene labels (0.02-0.08 vs 0.03-0.05), weight 0 found
        0.14-0.55 (shuffled 0.03).
    seed
        Seed of the label permutations and of the GSEA null (a non-negative integer).
    allow_network
        Let a named library be downloaded (see :func:`~sctranscoder._genesets.gene_sets`).
    activations_key
        ``adata.uns`` key of the activation record.
    key_added
        ``adata.uns`` key of the annotation record; default: ``"<stem>_annotation"`` of the
        activation record (``"sct_annotation"`` for ``"sct_activations"``), so that a second
        gene-set source can be kept beside the first under another key.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``adata.uns[key_added]``, a dict:

    ``features`` : dict of :class:`~pandas.DataFrame`
        Per ``"layer_<i>"``, one row per feature (index ``"L<i>F<j>"``; joined by
        :func:`sctranscoder.get.feature_table`). ORA: ``ora_term`` (str, ``""`` when none),
        ``ora_pvalue`` and ``ora_fdr`` (float, NaN for features not live or without any
        overlap), ``ora_interpretable`` (bool). GSEA: ``gsea_term`` (``""`` for features not
        live or without a positively enriched set), ``gsea_nes``, ``gsea_pvalue`` (nominal),
        ``gsea_fdr`` (NaN then), ``gsea_interpretable`` (bool).
    ``summary`` : :class:`~pandas.DataFrame`
        One row per layer (index ``"layer_<i>"``): ``layer``, ``total_live``; per method run
        (prefix ``ora_`` or ``gsea_``) ``interpretable``, ``fraction``,
        ``baseline_interpretable`` (mean over shuffles), ``baseline_fraction`` (NaN without a
        baseline) and ``seconds``.
    ``params`` : dict
        The arguments (``gene_sets`` as a name or path, or the type of object given, and
        ``gene_sets_reloadable``: whether that name loads them again),
        ``activations_key``, ``n_sets`` (sets tested) and ``n_background`` (background genes).
    """
    if isinstance(gene_sets, str) and gene_sets.startswith(MARKERS_PREFIX):
        check_in_memory(
            adata, f"gene_sets={gene_sets!r}", otherwise="pass gene sets as a dict or a GMT path"
        )
    rec = activations_record(adata, activations_key)
    if layers is not None:  # an empty list would annotate nothing
        layers = check_layer_list(layers, [Key.parse_layer(k) for k in rec["obsm_keys"]])
    layers = activation_layers(rec, layers, activations_key)
    record_key = check_key(
        key_added if key_added is not None else Key.derived(activations_key, "annotation"),
        adata=adata,
        kind="annotation",
    )
    copy = check_bool(copy, "copy")
    allow_network = check_bool(allow_network, "allow_network")
    check_copy_backed(adata, copy)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if baseline not in ("shuffled", None):
        raise ValueError(f"baseline must be 'shuffled' or None, got {baseline!r}.")
    for value, name in (
        (n_top, "n_top"),
        (n_shuffles, "n_shuffles"),
        (permutations, "permutations"),
    ):
        check_positive_int(value, name)
    check_fraction(fdr, "fdr")
    if not np.isfinite(gsea_weight) or gsea_weight < 0:
        raise ValueError(f"gsea_weight must be finite and >= 0, got {gsea_weight}.")
    if live_threshold is not None:
        live_threshold = check_live_threshold(live_threshold)
    seed = check_seed(seed)
    min_size, max_size = check_set_sizes(min_size, max_size)
    sets, background = _sets_in_background(
        adata, rec, activations_key, gene_sets, min_size, max_size, allow_network
    )
    settings = _Settings(
        sets,
        background,
        method in ("ora", "both"),
        method in ("prerank", "both"),
        int(n_top),
        float(fdr),
        live_threshold,
        baseline,
        int(n_shuffles),
        int(permutations),
        float(gsea_weight),
        int(seed),
    )
    start = logg.info(f"annotating the live features of layers {layers} ({method})")
    rng = np.random.default_rng(seed)
    tables, rows = {}, []
    for layer in layers:
        table, row = _annotate_layer(rec, activations_key, layer, settings, rng)
        tables[Key.layer(layer)] = table
        rows.append(row)
        _log_layer(row, method)
    summary = pd.DataFrame(rows)
    summary.index = [Key.layer(x) for x in summary["layer"]]
    params = {
        "gene_sets": source_name(gene_sets),
        "gene_sets_reloadable": is_reloadable(gene_sets),
        "activations_key": activations_key,
        # the transcoders the activations came from: the annotation is stale without them
        **{
            k: rec["params"][k] for k in ("transcoders_key", "transcoders_id") if k in rec["params"]
        },
        "layers": np.asarray(layers, dtype=np.int64),
        "method": str(method),
        "n_top": int(n_top),
        "fdr": float(fdr),
        "live_threshold": float(
            rec["params"]["live_threshold"] if live_threshold is None else live_threshold
        ),
        "min_size": int(min_size),
        "max_size": int(max_size),
        "baseline": str(baseline or "none"),
        "n_shuffles": int(n_shuffles),
        "permutations": int(permutations),
        "gsea_weight": float(gsea_weight),
        "seed": int(seed),
        "n_sets": len(settings.sets),
        "n_background": len(settings.background),
    }
    if copy:
        adata = adata.copy()
    adata.uns[record_key] = {"params": params, "features": tables, "summary": summary}
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {record_key!r}, per-feature terms and per-layer summary (adata.uns)",
    )
    return adata if copy else None


def _sets_in_background(
    adata: AnnData,
    rec: dict,
    activations_key: str,
    gene_sets,
    min_size: int,
    max_size: int,
    allow_network: bool,
) -> tuple[dict[str, list[str]], pd.Index]:
    """The gene sets cut to the background: every gene of the sentences (cleaned)."""
    if not rec.get("genes"):
        raise KeyError(
            f"adata.uns[{activations_key!r}] has no genes x features tables: rerun "
            "`sct.tl.feature_activations(adata, genes=True)`."
        )
    genes = strings(rec["genes"]["names"])
    background = pd.Index(pd.unique(np.asarray(clean_genes(genes), dtype=object)))
    sets = gene_sets_in_background(
        gene_sets,
        background,
        adata=adata,
        min_size=min_size,
        max_size=max_size,
        allow_network=allow_network,
    )
    return sets, background


def _annotate_layer(
    rec: dict,
    activations_key: str,
    layer: int,
    s: _Settings,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, dict]:
    """The per-feature columns and the summary row of one layer."""
    is_live = live_mask(rec, layer, s.live_threshold)
    names = pd.Index(feature_names(layer, len(is_live)))
    live, columns = names[is_live], np.flatnonzero(is_live)
    genes, n_cells, counts, sums = gene_tables(rec, layer, activations_key)
    perms = (
        [rng.permutation(len(s.background)) for _ in range(s.n_shuffles)]
        if s.baseline == "shuffled"
        else []
    )
    table = pd.DataFrame(index=names)
    row: dict[str, float] = {"layer": layer, "total_live": len(live)}
    if s.ora:
        Q = _query_matrix(genes, counts, sums, columns, s.background, s.n_top)
        row.update(_with_fractions(_ora_layer(table, Q, live, s, perms), "ora_", len(live)))
    if s.gsea:
        scores = _mean_activation(genes, n_cells, sums, columns, s.background)
        row.update(_with_fractions(_gsea_layer(table, scores, live, s, perms), "gsea_", len(live)))
    return table, row


def _with_fractions(counts: dict, prefix: str, n_live: int) -> dict:
    """A method's summary entries in their documented order, with the fractions of live features:
    interpretable, fraction, baseline_interpretable, baseline_fraction, seconds.
    """
    out = {}
    for name in ("interpretable", "baseline_interpretable"):
        out[prefix + name] = counts[prefix + name]
        frac = name.replace("interpretable", "fraction")
        out[prefix + frac] = counts[prefix + name] / n_live if n_live else np.nan
    out[prefix + "seconds"] = counts[prefix + "seconds"]
    return out


def _ora_layer(table, Q, live, s: _Settings, perms) -> dict:
    start = time.perf_counter()
    best = _best_ora(Q, s.sets, s.background, live)
    table["ora_term"] = ""
    table["ora_pvalue"] = np.nan
    table["ora_fdr"] = np.nan
    table.loc[live, "ora_term"] = best["term"].fillna("").astype(str).to_numpy()
    table.loc[live, "ora_pvalue"] = best["pvalue"].to_numpy(dtype=float)
    table.loc[live, "ora_fdr"] = best["fdr"].to_numpy(dtype=float)
    table["ora_interpretable"] = (table["ora_fdr"] < s.fdr).to_numpy(dtype=bool)
    base = np.nan
    if s.baseline == "shuffled":
        hits = [
            int((_best_ora(Q[:, p], s.sets, s.background, live)["fdr"] < s.fdr).sum())
            for p in perms
        ]
        base = float(np.mean(hits))
    return {
        "ora_interpretable": int(table["ora_interpretable"].sum()),
        "ora_baseline_interpretable": base,
        "ora_seconds": time.perf_counter() - start,
    }


def _gsea_layer(table, scores, live, s: _Settings, perms) -> dict:
    start = time.perf_counter()
    best = _best_gsea(scores, live, s)
    table["gsea_term"] = ""
    for column in ("gsea_nes", "gsea_pvalue", "gsea_fdr"):
        table[column] = np.nan
    table.loc[live, "gsea_term"] = best["term"].fillna("").astype(str).to_numpy()
    table.loc[live, "gsea_nes"] = best["nes"].to_numpy(dtype=float)
    table.loc[live, "gsea_pvalue"] = best["pvalue"].to_numpy(dtype=float)
    table.loc[live, "gsea_fdr"] = best["fdr"].to_numpy(dtype=float)
    table["gsea_interpretable"] = (table["gsea_fdr"] < s.fdr).to_numpy(dtype=bool)
    base = np.nan
    if s.baseline == "shuffled":
        hits = [int((_best_gsea(scores[:, p], live, s)["fdr"] < s.fdr).sum()) for p in perms]
        base = float(np.mean(hits))
    return {
        "gsea_interpretable": int(table["gsea_interpretable"].sum()),
        "gsea_baseline_interpretable": base,
        "gsea_seconds": time.perf_counter() - start,
    }


def _log_layer(row: dict, method: str) -> None:
    parts = []
    for prefix, name in (("ora_", "ORA"), ("gsea_", "GSEA")):
        if f"{prefix}interpretable" in row and row["total_live"]:
            parts.append(
                f"{name} {row[f'{prefix}interpretable']} ({100 * row[f'{prefix}fraction']:.1f}%, "
                f"shuffled {100 * row[f'{prefix}baseline_fraction']:.1f}%)"
            )
    logg.debug(f"    layer {row['layer']}: {row['total_live']} live features; " + "; ".join(parts))


def _query_matrix(
    genes: np.ndarray,
    counts: sparse.spmatrix,
    sums: sparse.spmatrix,
    columns: np.ndarray,
    background: pd.Index,
    n_top: int,
) -> sparse.csr_matrix:
    """(live features x background) membership of each feature's top ``n_top`` genes."""
    top = top_genes(counts[:, columns], sums[:, columns], n_top)
    cleaned = np.asarray([clean_symbol(g) for g in genes], dtype=object)
    cols = background.get_indexer(cleaned[np.concatenate([r for r, _ in top] or [[]]).astype(int)])
    rows = np.repeat(np.arange(len(top)), [len(r) for r, _ in top])
    keep = cols >= 0
    Q = sparse.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.int32), (rows[keep], cols[keep])),
        shape=(len(top), len(background)),
    )
    Q.sum_duplicates()
    Q.data[:] = 1
    return Q


def _mean_activation(
    genes: np.ndarray,
    n_cells: np.ndarray,
    sums: sparse.spmatrix,
    columns: np.ndarray,
    background: pd.Index,
) -> sparse.csr_matrix:
    """(live features x background) mean activation per cell containing each gene.

    ``sums / n_cells``; genes whose symbols coincide once cleaned (upper-cased) are pooled (sums
    and cells added); a gene in no cell scores 0.
    """
    symbols = [clean_symbol(g) for g in genes]
    cols = background.get_indexer(symbols)
    keep = np.flatnonzero(cols >= 0)
    pool = sparse.csr_matrix(
        (np.ones(len(keep)), (keep, cols[keep])), shape=(len(symbols), len(background))
    )
    pooled = (pool.T @ sparse.csc_matrix(sums, dtype=np.float64)[:, columns]).T.tocsr()
    per_gene = np.asarray(pool.T @ n_cells.astype(np.float64)).ravel()
    inv = np.divide(1.0, per_gene, out=np.zeros_like(per_gene), where=per_gene > 0)
    scores = sparse.csr_matrix(pooled @ sparse.diags(inv))
    scores.eliminate_zeros()
    return scores


def _best_ora(
    Q: sparse.csr_matrix, sets: dict[str, list[str]], background: pd.Index, names: pd.Index
) -> pd.DataFrame:
    """Best set (term, pvalue, fdr) of each query row, NaN where none overlaps."""
    if Q.shape[0] == 0:
        return pd.DataFrame({"term": [], "pvalue": [], "fdr": []}, index=pd.Index([]))
    table = ora_many(Q, sets, background=list(background), query_names=list(names))
    return best_terms(table, list(names))


def _best_gsea(scores: sparse.csr_matrix, names: pd.Index, s: _Settings) -> pd.DataFrame:
    """Best positively enriched set (term, nes, pvalue, fdr) of each row, NaN where none."""
    if scores.shape[0] == 0:
        return pd.DataFrame({c: [] for c in ("term", "nes", "pvalue", "fdr")}, index=pd.Index([]))
    best = prerank_many(
        scores,
        list(s.background),
        s.sets,
        permutations=s.permutations,
        seed=s.seed,
        weight=s.gsea_weight,
        min_size=1,
        max_size=10**9,
        query_names=list(names),
        report="best",
    )
    return best.reindex(pd.Index(list(names), name="query"))
