"""Enrichment of every live feature's genes in gene sets, with a shuffled-label chance baseline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy import sparse, stats

from .._constants import Key, feature_names
from .._genesets import (
    MARKERS_PREFIX,
    clean_genes,
    clean_symbol,
    gene_sets_in_background,
    ignored_weights,
    is_reloadable,
    set_weights,
    source_name,
)
from .._gsea import best_sets, prerank_matrices
from .._ora import best_terms, ora_many, overlap_matrix
from .._records import activation_layers, activations_record, check_key, strings
from .._ulm import ulm_many, ulm_pvalues
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

METHODS = ("ora", "prerank", "both", "ulm")
#: The tests ``method`` can name, in the order they run and their columns come.
TESTS = ("ora", "prerank", "ulm")
#: Prefix of each test's per-feature and summary columns, and its name in the tables.
PREFIX = {"ora": "ora_", "prerank": "gsea_", "ulm": "ulm_"}
TABLE = {"ora": "ora", "prerank": "gsea", "ulm": "ulm"}
#: Per-feature columns written by each method.
ORA_COLUMNS = ("ora_term", "ora_pvalue", "ora_fdr", "ora_interpretable")
GSEA_COLUMNS = ("gsea_term", "gsea_nes", "gsea_pvalue", "gsea_fdr", "gsea_interpretable")
ULM_COLUMNS = ("ulm_term", "ulm_score", "ulm_pvalue", "ulm_fdr", "ulm_interpretable")


@dataclass(frozen=True)
class _Settings:
    """The validated arguments that the per-layer work needs."""

    sets: dict[str, list[str]]
    background: pd.Index
    methods: tuple[str, ...]
    tables: bool
    n_top: int
    fdr: float
    live_threshold: float | None
    baseline: str | None
    n_shuffles: int
    permutations: int
    gsea_weight: float
    seed: int

    @property
    def ora(self) -> bool:
        return "ora" in self.methods

    @property
    def gsea(self) -> bool:
        return "prerank" in self.methods

    @property
    def ulm(self) -> bool:
        return "ulm" in self.methods


def annotate_features(
    adata: AnnData,
    *,
    gene_sets: Mapping[str, Iterable[str]] | str | os.PathLike | pd.DataFrame,
    layers: Sequence[int] | None = None,
    method: Literal["ora", "prerank", "both", "ulm"] = "ora",
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
    tables: bool = True,
    activations_key: str = Key.activations(Key.transcoders),
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Label each live feature by the gene set it is most enriched in (ORA, preranked GSEA, ULM).

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

    ``method="ulm"``: decoupler's univariate linear model (:func:`decoupler.mt.ulm`, through
    :func:`~sctranscoder._ulm.ulm_many`) of the same per-gene mean activations (features as
    observations, background genes as variables) on each set's weights: the t-value of the
    slope, its two-sided p-value and BH over the tested sets (decoupler's ``padj``). It is the
    method that uses a **weighted or signed net** (a decoupler net with a ``weight`` column,
    e.g. CollecTRI's +1/-1 regulons; 1 for every member of unweighted sets): a feature that
    fires on a regulon's activated targets and not on its repressed ones scores positive. A
    feature's best set is the one with the largest positive t (``ulm_*`` columns). ORA and GSEA
    test membership only: they ignore the weights (a target counts as a member whatever its
    weight or sign), and say so in a warning when the weights are not all 1.

    ``method`` may also list several of ``"ora"``, ``"prerank"`` and ``"ulm"``, e.g.
    ``["ora", "ulm"]``.

    With ``tables=True`` (default) the full (live features x tested sets) results of every test
    are kept, not only each feature's best set: read them with
    :func:`sctranscoder.get.enrichment` as an AnnData that scanpy and decoupler tools take.

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
        ``"ora"`` (default), ``"prerank"``, ``"both"`` (ORA and preranked GSEA), ``"ulm"``, or a
        list of ``"ora"``, ``"prerank"`` and ``"ulm"``.
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
    tables
        Keep the full features x sets results (``tables`` below). Measured with the shipped
        GO_BP_2022 (1,892 sets tested against ``pbmc68k_reduced``'s 750 sentence genes) on 4
        layers of 1,024 features (4,077 live): 22.0 MB of arrays for ORA (CSR overlaps, 57% of
        the pairs overlap), 123.4 MB for GSEA and 30.9 MB for ULM (dense float32); the
        ``.h5ad`` grew from 45 to 221 MB with all three (``benchmarks/enrichment_kernels.py``).
        ``False`` keeps only the per-feature best sets.
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
        ``gsea_fdr`` (NaN then), ``gsea_interpretable`` (bool). ULM: ``ulm_term`` (``""`` for
        features not live or without a positive t), ``ulm_score`` (t-value), ``ulm_pvalue``,
        ``ulm_fdr`` (BH over the tested sets; NaN then), ``ulm_interpretable`` (bool).
    ``sets`` : :class:`~pandas.DataFrame`
        The tested sets (index: name, in the order of the tables' columns) with ``size``, their
        genes in the background.
    ``tables`` : dict (with ``tables=True``)
        Per ``"layer_<i>"``, a dict: ``features`` (int array, the index of each live feature: the
        tables' rows) and per test run: ``ora``, ``{"overlap": CSR (live features x sets,
        unsigned integers; no entry: no overlap), "n_query": int array (query genes in the
        background)}``, from which every p-value, BH-adjusted p and odds ratio follows exactly
        (:func:`~sctranscoder._ora.ora_statistics`); ``gsea``, ``{"es", "nes", "pvalue",
        "fdr"}`` (dense float32, NaN for a set GSEA cannot test: one with every background
        gene); ``ulm``, ``{"score"}`` (dense float32 t-values). Read with
        :func:`sctranscoder.get.enrichment`.
    ``summary`` : :class:`~pandas.DataFrame`
        One row per layer (index ``"layer_<i>"``): ``layer``, ``total_live``; per method run
        (prefix ``ora_``, ``gsea_`` or ``ulm_``) ``interpretable``, ``fraction``,
        ``baseline_interpretable`` (mean over shuffles), ``baseline_fraction`` (NaN without a
        baseline) and ``seconds``.
    ``params`` : dict
        The arguments (``gene_sets`` as a name or path, or the type of object given, and
        ``gene_sets_reloadable``: whether that name loads them again),
        ``activations_key``, ``n_sets`` (sets tested), ``n_background`` (background genes),
        ``weighted`` (whether the sets carried weights) and ``tables``.
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
    tables = check_bool(tables, "tables")
    check_copy_backed(adata, copy)
    methods = _methods(method)
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
    if (dropped := ignored_weights(sets)) and {"ora", "prerank"} & set(methods):
        logg.warning(f"ORA and GSEA test set membership only: {dropped}")
    settings = _Settings(
        sets,
        background,
        methods,
        tables,
        int(n_top),
        float(fdr),
        live_threshold,
        baseline,
        int(n_shuffles),
        int(permutations),
        float(gsea_weight),
        int(seed),
    )
    start = logg.info(f"annotating the live features of layers {layers} ({', '.join(methods)})")
    rng = np.random.default_rng(seed)
    features, rows, full = {}, [], {}
    for layer in layers:
        table, row, kept = _annotate_layer(rec, activations_key, layer, settings, rng)
        features[Key.layer(layer)] = table
        rows.append(row)
        if tables:
            full[Key.layer(layer)] = kept
        _log_layer(row)
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
        "method": str(method) if isinstance(method, str) else np.asarray(methods, dtype=str),
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
        "weighted": set_weights(settings.sets) is not None,
        "tables": tables,
    }
    result = {"params": params, "features": features, "summary": summary}
    result["sets"] = pd.DataFrame(
        {"size": np.array([len(g) for g in settings.sets.values()], dtype=np.int64)},
        index=pd.Index(list(settings.sets), dtype=object, name="term"),
    )
    if tables:
        result["tables"] = full
    if copy:
        adata = adata.copy()
    adata.uns[record_key] = result
    what = "per-feature terms, per-layer summary" + (
        " and features x sets tables" if tables else ""
    )
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {record_key!r}, {what} (adata.uns)",
    )
    return adata if copy else None


def _methods(method: object) -> tuple[str, ...]:
    """The tests ``method`` names (a name of :data:`METHODS` or a list of them, as the command
    line gives it), in :data:`TESTS` order.
    """
    names = [method] if isinstance(method, str) else method
    try:
        names = list(names) if not isinstance(names, bytes) else None
    except TypeError:
        names = None
    if not names or not all(isinstance(m, str) and m in METHODS for m in names):
        raise ValueError(f"method must be one of {METHODS} or a list of {TESTS}, got {method!r}.")
    wanted = {t for m in names for t in (("ora", "prerank") if m == "both" else (m,))}
    return tuple(m for m in TESTS if m in wanted)


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
) -> tuple[pd.DataFrame, dict, dict]:
    """The per-feature columns, the summary row and the full tables of one layer."""
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
    kept: dict = {"features": columns.astype(np.int64)}
    if s.ora:
        Q = _query_matrix(genes, counts, sums, columns, s.background, s.n_top)
        counts_row, kept_ora = _ora_layer(table, Q, live, s, perms)
        row.update(_with_fractions(counts_row, "ora_", len(live)))
        kept["ora"] = kept_ora
    if s.gsea or s.ulm:
        scores = _mean_activation(genes, n_cells, sums, columns, s.background)
    if s.gsea:
        counts_row, kept["gsea"] = _gsea_layer(table, scores, live, s, perms)
        row.update(_with_fractions(counts_row, "gsea_", len(live)))
    if s.ulm:
        counts_row, kept["ulm"] = _ulm_layer(table, scores, live, s, perms)
        row.update(_with_fractions(counts_row, "ulm_", len(live)))
    return table, row, kept


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


def _put_best(table, live, prefix: str, best: pd.DataFrame, stats: tuple, fdr: float) -> None:
    """Each live feature's best set of one test into ``table``: ``<prefix>term``, then ``stats``,
    ``pvalue`` and ``fdr`` of ``best`` as ``<prefix><stat>`` (empty or NaN for features not
    tested) and ``<prefix>interpretable`` (FDR below ``fdr``).
    """
    table[prefix + "term"] = ""
    table.loc[live, prefix + "term"] = best["term"].fillna("").astype(str).to_numpy()
    for stat in (*stats, "pvalue", "fdr"):
        table[prefix + stat] = np.nan
        table.loc[live, prefix + stat] = best[stat].to_numpy(dtype=float)
    table[prefix + "interpretable"] = (table[prefix + "fdr"] < fdr).to_numpy(dtype=bool)


def _ora_layer(table, Q, live, s: _Settings, perms) -> tuple[dict, dict]:
    start = time.perf_counter()
    best = _best_ora(Q, s.sets, s.background, live)
    _put_best(table, live, "ora_", best, (), s.fdr)
    kept = {}
    if s.tables:  # the overlaps of ora_many's test: every statistic follows from them
        kept = {
            "overlap": overlap_matrix(Q, s.sets, list(s.background)),
            "n_query": np.asarray(Q.sum(axis=1)).ravel().astype(np.int64),
        }
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
    }, kept


def _gsea_layer(table, scores, live, s: _Settings, perms) -> tuple[dict, dict]:
    start = time.perf_counter()
    result = _gsea(scores, live, s, keep=s.tables)
    best = result.best
    _put_best(table, live, "gsea_", best, ("nes",), s.fdr)
    kept = {}
    if s.tables and result.es is not None:
        # columns of every set in the record; a set GSEA cannot test (all genes) stays NaN
        cols = pd.Index(list(s.sets)).get_indexer(result.terms.astype(str))
        for name in ("es", "nes", "pvalue", "fdr"):
            full = np.full((len(live), len(s.sets)), np.nan, dtype=np.float32)
            full[:, cols] = getattr(result, name)
            kept[name] = full
    base = np.nan
    if s.baseline == "shuffled":
        hits = [
            int((_gsea(scores[:, p], live, s, keep=False).best["fdr"] < s.fdr).sum()) for p in perms
        ]
        base = float(np.mean(hits))
    return {
        "gsea_interpretable": int(table["gsea_interpretable"].sum()),
        "gsea_baseline_interpretable": base,
        "gsea_seconds": time.perf_counter() - start,
    }, kept


def _ulm_layer(table, scores, live, s: _Settings, perms) -> tuple[dict, dict]:
    start = time.perf_counter()
    t = _ulm_scores(scores, live, s)
    best = ulm_best(t, np.array(list(s.sets), dtype=object), len(s.background))
    _put_best(table, live, "ulm_", best, ("score",), s.fdr)
    kept = {"score": t} if s.tables else {}
    base = np.nan
    if s.baseline == "shuffled":
        terms = np.array(list(s.sets), dtype=object)
        hits = [
            int(
                (
                    ulm_best(_ulm_scores(scores[:, p], live, s), terms, len(s.background))["fdr"]
                    < s.fdr
                ).sum()
            )
            for p in perms
        ]
        base = float(np.mean(hits))
    return {
        "ulm_interpretable": int(table["ulm_interpretable"].sum()),
        "ulm_baseline_interpretable": base,
        "ulm_seconds": time.perf_counter() - start,
    }, kept


def _ulm_scores(scores: sparse.csr_matrix, names: pd.Index, s: _Settings) -> np.ndarray:
    """(live features x sets) float32 ULM t-values, columns in the order of ``s.sets``; a
    feature constant over the background (no slope to test) scores 0.
    """
    if scores.shape[0] == 0:
        return np.zeros((0, len(s.sets)), dtype=np.float32)
    terms, t = ulm_many(scores, list(s.background), s.sets, query_names=list(names))
    full = np.zeros((len(names), len(s.sets)), dtype=np.float32)
    full[:, pd.Index(list(s.sets)).get_indexer(terms.astype(str))] = np.nan_to_num(t, nan=0.0)
    return full


def ulm_statistics(t: np.ndarray, n_background: int) -> dict[str, np.ndarray]:
    """``pvalue`` (two-sided, decoupler's) and ``padj`` (BH per feature over the sets, as
    decoupler's ``padj``) of (features x sets) ULM t-values.
    """
    pvalue = ulm_pvalues(t, n_background)
    padj = stats.false_discovery_control(pvalue, axis=1, method="bh") if pvalue.size else pvalue
    return {"pvalue": pvalue, "padj": padj}


def ulm_best(t: np.ndarray, terms: np.ndarray, n_background: int) -> pd.DataFrame:
    """Each feature's set with the largest positive t: ``term``, ``score``, ``pvalue``, ``fdr``
    (NaN without a positive t; ties: the p-value, then the name).
    """
    found = ulm_statistics(t, n_background)
    rank = np.empty(len(terms), dtype=np.int64)
    rank[np.argsort(terms.astype(str), kind="stable")] = np.arange(len(terms))
    t64 = np.asarray(t, dtype=np.float64)
    j = best_sets(t64, found["pvalue"], found["padj"], rank)
    ok, r, c = j >= 0, np.arange(len(j)), np.maximum(j, 0)

    def pick(values):
        return np.where(ok, values[r, c], np.nan) if len(j) else np.empty(0)

    return pd.DataFrame(
        {
            "term": np.where(ok, terms[c], np.nan) if len(j) else np.empty(0, dtype=object),
            "score": pick(t64),
            "pvalue": pick(found["pvalue"]),
            "fdr": pick(found["padj"]),
        }
    )


def _log_layer(row: dict) -> None:
    parts = []
    for prefix, name in (("ora_", "ORA"), ("gsea_", "GSEA"), ("ulm_", "ULM")):
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


def _gsea(scores: sparse.csr_matrix, names: pd.Index, s: _Settings, *, keep: bool):
    """:func:`~sctranscoder._gsea.prerank_matrices` of the live features: each one's best
    positively enriched set (term, nes, pvalue, fdr; NaN where none) and, with ``keep``, the
    float32 matrices.
    """
    return prerank_matrices(
        scores,
        list(s.background),
        s.sets,
        permutations=s.permutations,
        seed=s.seed,
        weight=s.gsea_weight,
        min_size=1,
        max_size=10**9,
        query_names=list(names),
        keep=keep,
    )
