"""One layer's features x gene sets enrichment as an AnnData, the way decoupler lays out scores."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Key, feature_name
from .._ora import ora_statistics
from .._records import record, strings
from .._validate import check_layer

if TYPE_CHECKING:
    from anndata import AnnData

#: The tests a record can hold, as named in its tables, and what each one's ``X`` holds.
SCORES = {
    "ora": "-log10(pvalue)",
    "gsea": "nes",
    "ulm": "t-value",
}
#: Names ``method`` accepts for each table (``"prerank"`` is annotate_features' name of GSEA).
_ALIASES = {"ora": "ora", "gsea": "gsea", "prerank": "gsea", "ulm": "ulm"}


def enrichment(
    adata: AnnData,
    layer: int,
    *,
    method: Literal["ora", "gsea", "prerank", "ulm"] | None = None,
    annotation_key: str = Key.derived(Key.activations(Key.transcoders), "annotation"),
) -> AnnData:
    """Features x gene sets AnnData of one layer's enrichment: scores, p-values, adjusted p.

    Laid out as decoupler lays out its results (observations x sources, one score matrix and
    its adjusted p-values), so that scanpy and decoupler tools read it: ``sc.pl.heatmap(en,
    var_names=[...], groupby=...)``, ``sc.pl.matrixplot``, ``en.to_df("padj")``, or
    ``sc.tl.rank_genes_groups(en, groupby)`` on features grouped by any ``obs`` column. The
    record must come from :func:`sctranscoder.tl.annotate_features` with ``tables=True``.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.annotate_features`.
    layer
        Layer index.
    method
        ``"ora"``, ``"gsea"`` (or ``"prerank"``, its name in ``annotate_features``) or
        ``"ulm"``; default: the first of these the annotation ran.
    annotation_key
        ``adata.uns`` key of the annotation record.

    Returns
    -------
    An AnnData with one row per **live** feature of the layer (the features tested; ``obs_names``
    ``"L<layer>F<j>"``, ``obs``: the annotation's per-feature columns, e.g. ``ora_term``,
    ``ora_fdr``, and ``feature``, the index) and one column per **tested** gene set (``var_names``
    the set names, ``var["size"]``: its genes in the background). Sets outside the size limits
    and features that are not live are not in it.

    ``method="ora"``: ``X`` = ``-log10(pvalue)`` (float32; 0 for a set the feature's top genes
    do not overlap), ``layers["pvalue"]`` (one-sided hypergeometric; 1 without overlap),
    ``layers["padj"]`` (BH per feature over every tested set, ``ora_fdr``; 1 without overlap),
    ``layers["overlap"]`` (query genes in the set) and ``layers["odds_ratio"]`` (Haldane-Anscombe
    corrected, as gseapy's and decoupler's; decoupler's ``score_ora`` is its log), computed
    exactly from the stored overlaps. ``method="gsea"``: ``X`` = NES, ``layers["pvalue"]``
    (nominal), ``layers["padj"]`` (gseapy's FDR q-value, ``gsea_fdr``) and ``layers["es"]``
    (float32; all NaN for a set GSEA cannot test, one holding every background gene).
    ``method="ulm"``: ``X`` = the t-value (decoupler's ``score_ulm``; float32),
    ``layers["pvalue"]`` (two-sided) and ``layers["padj"]`` (BH per feature, decoupler's
    ``padj_ulm``). ``uns["enrichment"]``: ``annotation_key``, ``layer``, ``method`` and
    ``score`` (what ``X`` holds).
    """
    import anndata as ad

    layer = check_layer(layer)
    if method is not None and method not in _ALIASES:
        raise ValueError(f"method must be 'ora', 'gsea', 'prerank', 'ulm' or None, got {method!r}.")
    ann = record(adata, annotation_key, kind="annotation", hint="run `sct.tl.annotate_features`.")
    if "features" not in ann or "summary" not in ann:
        raise KeyError(f"adata.uns[{annotation_key!r}] is not an annotation record.")
    tables = ann.get("tables")
    if not isinstance(tables, dict) or "sets" not in ann:
        raise KeyError(
            f"adata.uns[{annotation_key!r}] keeps only each feature's best set, not the features "
            "x sets tables: rerun `sct.tl.annotate_features(adata, ..., tables=True)`."
        )
    name = Key.layer(layer)
    if name not in tables:
        available = sorted(Key.parse_layer(k) for k in tables)
        raise KeyError(
            f"adata.uns[{annotation_key!r}] has no tables for layer {layer}; layers: {available}."
        )
    kept = tables[name]
    ran = [m for m in SCORES if m in kept]
    table = ran[0] if method is None else _ALIASES[method]
    if table not in kept:
        raise KeyError(
            f"adata.uns[{annotation_key!r}] has no {table!r} results for layer {layer} (it has "
            f"{ran}): pass method= one of them, or rerun `sct.tl.annotate_features` with it."
        )
    params = ann["params"]
    sets = pd.DataFrame(ann["sets"])
    terms = pd.Index(strings(sets.index.to_numpy()), name=None)
    size = sets["size"].to_numpy(dtype=np.int64)
    X, layers = _matrices(table, kept[table], size, int(params["n_background"]))

    features = np.asarray(kept["features"], dtype=np.int64)
    names = [feature_name(layer, j) for j in features]
    obs = pd.DataFrame(ann["features"][name]).reindex(names)
    obs.insert(0, "feature", features)
    var = pd.DataFrame({"size": size}, index=terms)
    out = ad.AnnData(X=X, obs=obs, var=var, layers=layers)
    out.uns["enrichment"] = {
        "annotation_key": annotation_key,
        "layer": int(layer),
        "method": table,
        "score": SCORES[table],
    }
    return out


def _matrices(
    table: str, kept: dict, size: np.ndarray, n_background: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``X`` and the layers of one test's stored table."""
    if table == "ora":
        found = ora_statistics(
            sparse.csr_matrix(kept["overlap"]), size, kept["n_query"], n_background
        )
        pvalue = found["pvalue"]
        # + 0.0: no overlap (p = 1) scores 0, not -0
        X = (-np.log10(np.maximum(pvalue, np.finfo(np.float64).tiny)) + 0.0).astype(np.float32)
        layers = {
            "pvalue": pvalue,
            "padj": found["padj"],
            "overlap": found["overlap"].astype(np.int32),
            "odds_ratio": found["odds_ratio"],
        }
        return X, layers
    if table == "gsea":
        layers = {
            "pvalue": np.asarray(kept["pvalue"]),
            "padj": np.asarray(kept["fdr"]),
            "es": np.asarray(kept["es"]),
        }
        return np.asarray(kept["nes"]), layers
    from ..tl._annotate_features import ulm_statistics

    t = np.asarray(kept["score"])
    return t, ulm_statistics(t, n_background)
