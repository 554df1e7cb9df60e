"""Stored activations as AnnData objects that scanpy, decoupler and squidpy read directly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Key, feature_names
from .._records import activations_record, obsm_activations
from .._validate import check_layer
from ._features import gene_tables

if TYPE_CHECKING:
    from anndata import AnnData

_DEFAULT = Key.activations(Key.transcoders)


def activations(adata: AnnData, layer: int, *, activations_key: str = _DEFAULT) -> AnnData:
    """Cells x features AnnData of one layer's feature activations, ready for scanpy plots.

    ``X`` holds the activations (CSR), ``obs`` and every ``obsm`` embedding (e.g. ``X_umap``) and
    ``*_colors`` entry of ``uns`` are copied from ``adata``, so ``sc.pl.umap(fa, color=...)``
    overlays features on the UMAP; so is a :func:`~sctranscoder.tl.rank_features_groups` result of
    this layer alone, so ``sc.pl.rank_genes_groups_dotplot(fa, key=...)`` works. ``var`` has
    ``layer``, ``feature``, ``firing_rate`` (fraction of prompt tokens on which the feature
    fires), ``frac_cells`` (fraction of cells in which it is active) and ``mean_activation``.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_activations`.
    layer
        Layer index.
    activations_key
        ``adata.uns`` key of the activation record.
    """
    import anndata as ad

    layer = check_layer(layer)
    rec = activations_record(adata, activations_key)
    name = Key.layer(layer)
    if name not in rec["obsm_keys"]:
        available = sorted(Key.parse_layer(k) for k in rec["obsm_keys"])
        raise KeyError(f"No activations for layer {layer}; available layers: {available}.")
    X = sparse.csr_matrix(obsm_activations(adata, rec, int(layer), activations_key))
    n_features = X.shape[1]
    var = pd.DataFrame(
        {
            "layer": np.full(n_features, int(layer)),
            "feature": np.arange(n_features),
            "firing_rate": np.asarray(rec["firing_rate"][name], dtype=np.float64),
            "frac_cells": np.asarray((X > 0).mean(0)).ravel(),
            "mean_activation": np.asarray(X.mean(0)).ravel(),
        },
        index=feature_names(int(layer), n_features),
    )
    out = ad.AnnData(X=X.copy(), obs=adata.obs.copy(), var=var)
    written = {str(k) for k in rec["obsm_keys"].values()}
    for k, v in adata.obsm.items():
        if k not in written:
            out.obsm[k] = v.copy()
    for k, v in adata.uns.items():
        if k.endswith("_colors"):
            out.uns[k] = v.copy() if hasattr(v, "copy") else v
        elif _ranks_this_layer(v, activations_key, int(layer)):
            # a feature ranking of this layer alone: scanpy's rank_genes_groups plots then work
            out.uns[k] = v
    return out


def _ranks_this_layer(value, activations_key: str, layer: int) -> bool:
    """Whether ``value`` is a rank_features_groups result of ``layer`` alone."""
    if not isinstance(value, dict) or not isinstance(value.get("params"), dict):
        return False
    params = value["params"]
    layers = np.atleast_1d(np.asarray(params.get("layers", [])))
    return (
        str(params.get("activations_key", "")) == activations_key
        and layers.size == 1
        and int(layers[0]) == layer
    )


def gene_activations(adata: AnnData, layer: int, *, activations_key: str = _DEFAULT) -> AnnData:
    """Genes x features AnnData of one layer: the features' activation on each gene.

    Rows are every gene of the cell sentences (not only ``adata.var_names``), columns the
    features. ``X`` is the mean activation of the feature on the gene's tokens over the cells
    whose sentence contains the gene (0 where it never fires), ``layers["count"]`` the number of
    cells in which it fires on the gene and ``layers["sum"]`` the summed activation there;
    ``obs["n_cells"]`` counts the cells containing each gene. As decoupler reads features x
    genes, ``gene_activations(adata, 2).T`` is ready for ``dc.mt.*``.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_activations` (``genes=True``).
    layer
        Layer index.
    activations_key
        ``adata.uns`` key of the activation record.
    """
    import anndata as ad

    layer = check_layer(layer)
    rec = activations_record(adata, activations_key)
    genes, n_cells, counts, sums = gene_tables(rec, layer, activations_key)
    inv = np.divide(1.0, n_cells, out=np.zeros(len(n_cells)), where=n_cells > 0)
    mean = sparse.csr_matrix(sparse.diags(inv.astype(np.float32)) @ sums.tocsr(), dtype=np.float32)
    mean.eliminate_zeros()
    return ad.AnnData(
        X=mean,
        obs=pd.DataFrame({"n_cells": n_cells}, index=pd.Index(genes, name="gene")),
        var=pd.DataFrame(index=feature_names(int(layer), counts.shape[1])),
        layers={"count": counts.tocsr().astype(np.int32), "sum": sums.tocsr().astype(np.float32)},
    )
