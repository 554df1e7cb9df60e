"""Feature activations overlaid on an embedding, through scanpy's own plot."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key, feature_name
from .._validate import check_positive_int
from ..get import activations as get_activations
from ._utils import check_save, finish

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData


def activations(
    adata: AnnData,
    layer: int,
    *,
    features: Sequence[int] | Sequence[str] | str | int | None = None,
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
        Feature indices or names (``"L2F17"``), or one of them; default: the ``n_top`` features
        with the most variable activation across cells.
    n_top
        How many features to show when ``features`` is not given.
    basis
        Embedding in ``adata.obsm`` (``"umap"`` reads ``X_umap``).
    activations_key
        ``adata.uns`` key of the activation record.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``ax``, ``ncols``, ``cmap``, ...; not ``color``:
        the features are the colours). ``show``, ``save`` and ``return_fig`` work as in the other
        ``sct.pl`` plots: ``save`` is ``True`` or a file-name suffix, saved to
        ``sc.settings.figdir`` as ``<basis><suffix>.<format>``, where an extension matplotlib
        writes (``.png``, ``.svg``, ``.jpg``, ...) sets the format.

    Returns
    -------
    What :func:`scanpy.pl.embedding` returns: the figure with ``return_fig``; else the axes,
    unless shown.
    """
    import scanpy as sc

    if "color" in kwargs:
        raise TypeError(
            "pl.activations colours the embedding by features: pass features=['L2F17', ...] (or "
            "indices), not color=; for obs columns use sc.pl.embedding(adata, basis, color=...)."
        )
    show, save = kwargs.pop("show", None), kwargs.pop("save", None)
    return_fig = kwargs.pop("return_fig", False)
    check_save(save)
    n_top = check_positive_int(n_top, "n_top")
    if isinstance(features, str | numbers.Integral):
        features = [features]
    if features is not None:
        features = list(features)
        if not features:
            raise ValueError(
                "features is empty: pass some feature names ('L2F17') or indices, or None for "
                "the n_top most variable features."
            )
        bad = [
            f for f in features if isinstance(f, bool) or not isinstance(f, str | numbers.Integral)
        ]
        if bad:
            raise TypeError(
                f"features takes feature names ('L2F17') or integer indices, got {bad!r}."
            )
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
    axes = sc.pl.embedding(fa, basis, color=names, show=False, save=False, **kwargs)
    fig = (axes[0] if isinstance(axes, list) else axes).figure
    return finish(fig, axes, writekey=basis, show=show, save=save, return_fig=return_fig)
