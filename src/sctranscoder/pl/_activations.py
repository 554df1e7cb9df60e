"""Feature activations overlaid on an embedding, through scanpy's own plot."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key, feature_name
from ..get import activations as get_activations

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData


def activations(
    adata: AnnData,
    layer: int,
    *,
    features: Sequence[int] | Sequence[str] | None = None,
    n_top: int = 4,
    basis: str = "umap",
    activations_key: str = Key.activations(Key.transcoders),
    **kwargs,
):
    """Overlay feature activations on an embedding (:func:`scanpy.pl.embedding` of the features).

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_activations`.
    layer
        Layer index.
    features
        Feature indices or names (``"L2F17"``); default: the ``n_top`` features with the most
        variable activation across cells.
    n_top
        How many features to show when ``features`` is not given.
    basis
        Embedding in ``adata.obsm`` (``"umap"`` reads ``X_umap``).
    activations_key
        ``adata.uns`` key of the activation record.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``show``, ``save``, ``return_fig``, ``ax``,
        ``ncols``, ``cmap``, ...), with scanpy's semantics.

    Returns
    -------
    What :func:`scanpy.pl.embedding` returns.
    """
    import scanpy as sc

    fa = get_activations(adata, layer, activations_key=activations_key)
    if f"X_{basis}" not in fa.obsm and basis not in fa.obsm:
        raise KeyError(f"No embedding {basis!r} in adata.obsm; compute it (e.g. sc.tl.umap) first.")
    if features is None:
        X = fa.X
        mean = np.asarray(X.mean(0)).ravel()
        var = np.asarray(X.multiply(X).mean(0)).ravel() - mean**2
        names = fa.var_names[np.argsort(-var)[:n_top]].tolist()
    else:
        names = [f if isinstance(f, str) else feature_name(layer, int(f)) for f in features]
        unknown = [n for n in names if n not in fa.var_names]
        if unknown:
            raise KeyError(f"Unknown features {unknown} for layer {layer}.")
    kwargs.setdefault("cmap", "viridis")
    return sc.pl.embedding(fa, basis, color=names, **kwargs)
