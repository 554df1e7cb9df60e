"""Checks shared by the tools: each raises a clear error before anything is written."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from .core.model import C2SModel


def check_copy_backed(adata: AnnData, copy: bool) -> None:
    """``copy=True`` of a backed AnnData would load its matrix: refuse, saying what to do."""
    if copy and adata.isbacked:
        raise ValueError(
            "copy=True would load the backed matrix into memory. Use copy=False (a backed "
            "AnnData holds obs, obsm and uns in memory; save them with "
            "`adata.write_h5ad(new_path)`), or call `adata.to_memory()` first."
        )


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int, or a ValueError when it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_fraction(value: object, name: str, *, closed: bool = True) -> float:
    """``value`` in ``(0, 1]`` (or ``(0, 1)`` when not ``closed``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (0 < value < 1 or (closed and value == 1))
    if not ok:
        raise ValueError(f"{name} must be in (0, 1{']' if closed else ')'}, got {value!r}.")
    return float(value)


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """``layers`` (default: all ``n_layers``), sorted, unique and within the model."""
    if layers is None:
        return list(range(n_layers))
    layers = sorted({int(x) for x in np.atleast_1d(layers)})
    if not layers:
        raise ValueError(f"No layers given: pass some of 0..{n_layers - 1}, or None for all.")
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"Layers {bad} do not exist: the model has MLP layers 0..{n_layers - 1}.")
    return layers


def model_or_default(model: C2SModel | str | None) -> C2SModel:
    """``model`` loaded if given as a name or path; the embedded model when None."""
    from .core.model import C2SModel, load_model

    if model is None:
        from .datasets import tiny_c2s

        return tiny_c2s()
    return model if isinstance(model, C2SModel) else load_model(model)
