from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key
from ..get import activations as get_activations

if TYPE_CHECKING:
    from anndata import AnnData


def activations(
    adata: AnnData,
    layer: int,
    *,
    features: Sequence[int] | Sequence[str] | None = None,
    n_top: int = 4,
    basis: str = "umap",
    key: str = Key.uns,
    **kwargs,
):
    """Overlay feature activations on an embedding (``sc.pl.embedding`` of the features).

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
    key
        ``adata.uns`` key of the transcoders.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``show``, ``save``, ``ncols``, ``cmap``, ...).

    Returns
    -------
    What :func:`scanpy.pl.embedding` returns (axes when ``show=False``).
    """
    import scanpy as sc

    fa = get_activations(adata, layer, key=key)
    if f"X_{basis}" not in fa.obsm and basis not in fa.obsm:
        raise KeyError(f"No embedding {basis!r} in adata.obsm; compute it (e.g. sc.tl.umap) first.")
    if features is None:
        X = fa.X
        mean = np.asarray(X.mean(0)).ravel()
        var = np.asarray(X.multiply(X).mean(0)).ravel() - mean**2
        names = fa.var_names[np.argsort(-var)[:n_top]].tolist()
    else:
        names = [f if isinstance(f, str) else fa.var_names[int(f)] for f in features]
        unknown = [n for n in names if n not in fa.var_names]
        if unknown:
            raise KeyError(f"Unknown features {unknown} for layer {layer}.")
    kwargs.setdefault("cmap", "viridis")
    return sc.pl.embedding(fa, basis, color=names, **kwargs)
