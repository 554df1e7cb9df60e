from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from .._store import sct_uns

if TYPE_CHECKING:
    from anndata import AnnData


def feature_names(layer: int, n_features: int) -> list[str]:
    """Names of a layer's features: ``"L<layer>F<index>"``."""
    return [f"L{layer}F{j}" for j in range(n_features)]


def activations(adata: AnnData, layer: int, *, key: str = Key.uns) -> AnnData:
    """Cells x features AnnData of one layer's feature activations, ready for scanpy plots.

    ``X`` holds the activations (CSR), ``obs`` and every ``obsm`` embedding (e.g. ``X_umap``) and
    ``*_colors`` entry of ``uns`` are copied from ``adata``, so ``sc.pl.umap(fa, color=...)``
    overlays features on the UMAP; so is a :func:`~sctranscoder.tl.rank_features_groups` result of
    this layer alone, so ``sc.pl.rank_genes_groups_dotplot(fa, key=...)`` works. ``var`` has ``layer``, ``feature``, ``firing_rate`` (fraction
    of prompt tokens on which the feature fires), ``frac_cells`` (fraction of cells in which it is
    active) and ``mean_activation``.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_activations`.
    layer
        Layer index.
    key
        ``adata.uns`` key of the transcoders.
    """
    import anndata as ad

    record = sct_uns(adata, key)
    if "activations" not in record:
        raise KeyError(
            f"No activations under adata.uns[{key!r}]: run `sct.tl.feature_activations(adata)`."
        )
    acts = record["activations"]
    name = Key.layer(int(layer))
    if name not in acts["obsm_keys"]:
        available = sorted(int(k.split("_")[1]) for k in acts["obsm_keys"])
        raise KeyError(f"No activations for layer {layer}; available layers: {available}.")
    X = adata.obsm[acts["obsm_keys"][name]]
    n_features = X.shape[1]
    firing = np.asarray(acts["firing_rate"][name])
    var = pd.DataFrame(
        {
            "layer": np.full(n_features, int(layer)),
            "feature": np.arange(n_features),
            "firing_rate": firing,
            "frac_cells": np.asarray((X > 0).mean(0)).ravel(),
            "mean_activation": np.asarray(X.mean(0)).ravel(),
        },
        index=feature_names(int(layer), n_features),
    )
    out = ad.AnnData(X=X.copy(), obs=adata.obs.copy(), var=var)
    for k, v in adata.obsm.items():
        if not k.startswith(f"X_{key}_L"):
            out.obsm[k] = v.copy()
    for k, v in adata.uns.items():
        if k.endswith("_colors"):
            out.uns[k] = v.copy() if hasattr(v, "copy") else v
        elif _ranks_this_layer(v, key, int(layer)):
            # a feature ranking of this layer alone: scanpy's rank_genes_groups plots then work
            out.uns[k] = v
    return out


def _ranks_this_layer(value, key: str, layer: int) -> bool:
    """Whether ``value`` is a :func:`~sctranscoder.tl.rank_features_groups` result of ``layer`` alone."""
    if not isinstance(value, dict) or not isinstance(value.get("params"), dict):
        return False
    params = value["params"]
    layers = np.atleast_1d(np.asarray(params.get("layers", [])))
    return str(params.get("sct_key", "")) == key and layers.size == 1 and int(layers[0]) == layer
