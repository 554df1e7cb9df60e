"""Per-feature tables from an activation record: firing rate, live flag, top genes, annotation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Key, feature_names
from .._records import activations_record, record, strings
from .._validate import check_finite, check_layer, check_positive_int

if TYPE_CHECKING:
    from anndata import AnnData


def gene_tables(rec: dict, layer: int, activations_key: str):
    """``(genes, n_cells, counts, sums)`` of one layer of an activation record."""
    genes = rec.get("genes")
    name = Key.layer(layer)
    if not genes or name not in genes.get("counts", {}):
        sae = rec.get("params", {}).get("sae_key")  # an SAE's concepts get them by attribution
        fix = (
            f"run `sct.tl.concept_attribution(adata, key={str(sae)!r})`"
            if sae is not None
            else "rerun `sct.tl.feature_activations(adata, genes=True)`"
        )
        raise KeyError(
            f"adata.uns[{activations_key!r}] has no genes x features tables for layer {layer}: "
            f"{fix}."
        )
    return (
        strings(genes["names"]),
        np.asarray(genes["n_cells"], dtype=np.int64),
        sparse.csc_matrix(genes["counts"][name]),
        sparse.csc_matrix(genes["sums"][name]),
    )


def top_genes(
    counts: sparse.spmatrix, sums: sparse.spmatrix, n_top: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each feature (column), ``(rows, counts)`` of its top ``n_top`` genes.

    Genes it fires on, ranked by the number of cells in which it fires on them, then by the mean
    activation there, then by gene order.
    """
    C = sparse.csc_matrix(counts, dtype=np.float64)
    C.sort_indices()
    inv = C.copy()
    inv.data = 1.0 / inv.data
    M = sparse.csc_matrix(sparse.csc_matrix(sums, dtype=np.float64).multiply(inv))
    M.sort_indices()
    out = []
    for j in range(C.shape[1]):
        lo, hi = C.indptr[j], C.indptr[j + 1]
        rows, c = C.indices[lo:hi], C.data[lo:hi]
        m = np.zeros(len(rows))
        mrows = M.indices[M.indptr[j] : M.indptr[j + 1]]
        m[np.searchsorted(rows, mrows)] = M.data[M.indptr[j] : M.indptr[j + 1]]
        order = np.lexsort((rows, -m, -c))[:n_top]
        out.append((rows[order], c[order].astype(np.int64)))
    return out


def live_mask(rec: dict, layer: int, live_threshold: float | None = None) -> np.ndarray:
    """Which features of a layer are live: ``log10(firing_rate) >= live_threshold`` (default:
    the activation record's threshold).
    """
    threshold = rec["params"]["live_threshold"] if live_threshold is None else live_threshold
    rate = np.asarray(rec["firing_rate"][Key.layer(layer)], dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log10(rate) >= float(threshold)


def feature_table(
    adata: AnnData,
    layer: int,
    *,
    activations_key: str = Key.activations(Key.transcoders),
    annotation_key: str | None = None,
    live_threshold: float | None = None,
    n_top: int | None = None,
) -> pd.DataFrame:
    """One layer's features: firing rate, live flag, top genes and, when annotated, best terms.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_activations`.
    layer
        Layer index.
    activations_key
        ``adata.uns`` key of the activation record.
    annotation_key
        ``adata.uns`` key of an :func:`sctranscoder.tl.annotate_features` record whose columns
        are joined; default: its default key, when present.
    live_threshold
        log10 firing rate from which a feature is live, a finite number ``<= 0`` (default: the
        recorded one).
    n_top
        Genes listed per feature, a positive integer (default: the recorded ``n_top``).

    Returns
    -------
    A DataFrame indexed by feature name (``"L<layer>F<j>"``): ``firing_rate`` (fraction of
    prompt tokens on which it fires), ``log10_firing_rate`` (``-inf`` when it never fires),
    ``live`` (bool) and, with gene tables, ``n_genes`` (genes it fires on), ``top_genes`` and
    ``top_gene_counts`` (up to ``n_top`` genes and their cell counts, ``;``-joined, ranked by
    count then mean activation); after annotation, the ``ora_*`` and ``gsea_*`` columns of
    :func:`sctranscoder.tl.annotate_features`.
    """
    layer = check_layer(layer)
    if n_top is not None:
        n_top = check_positive_int(n_top, "n_top")
    if live_threshold is not None and check_finite(live_threshold, "live_threshold") > 0:
        raise ValueError(
            f"live_threshold is a log10 firing rate, at most 0 (e.g. -5), got {live_threshold!r}."
        )
    rec = activations_record(adata, activations_key)
    name = Key.layer(layer)
    if name not in rec["firing_rate"]:
        available = sorted(Key.parse_layer(k) for k in rec["firing_rate"])
        raise KeyError(f"No activations for layer {layer}; available layers: {available}.")
    params = rec["params"]
    rate = np.asarray(rec["firing_rate"][name], dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_rate = np.log10(rate)
    table = pd.DataFrame(
        {
            "firing_rate": rate,
            "log10_firing_rate": log_rate,
            "live": live_mask(rec, int(layer), live_threshold),
        },
        index=feature_names(int(layer), len(rate)),
    )
    if rec.get("genes"):
        genes, _, counts, sums = gene_tables(rec, int(layer), activations_key)
        top = top_genes(counts, sums, int(params["n_top"] if n_top is None else n_top))
        table["n_genes"] = np.diff(counts.indptr).astype(np.int64)
        table["top_genes"] = [";".join(genes[rows]) for rows, _ in top]
        table["top_gene_counts"] = [";".join(map(str, c.tolist())) for _, c in top]
    ann_key = annotation_key or Key.derived(activations_key, "annotation")
    ann = adata.uns.get(ann_key)
    if annotation_key is not None:  # asked for: it must fit
        ann = record(adata, ann_key, kind="annotation", hint="run `sct.tl.annotate_features`.")
        of = str(ann.get("params", {}).get("activations_key", activations_key))
        if of != activations_key:
            raise ValueError(
                f"adata.uns[{ann_key!r}] annotates the features of adata.uns[{of!r}], not of "
                f"adata.uns[{activations_key!r}]: pass activations_key={of!r}."
            )
        if name not in ann.get("features", {}):
            raise KeyError(f"adata.uns[{ann_key!r}] has no annotation of layer {layer}.")
    if isinstance(ann, dict) and name in ann.get("features", {}):
        if str(ann.get("params", {}).get("activations_key", activations_key)) == activations_key:
            table = table.join(pd.DataFrame(ann["features"][name]))
    return table
