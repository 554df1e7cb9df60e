"""The stored transcoders and their quality, as objects and tables."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .._constants import Key
from .._records import _recorded_layers, transcoder_record, transcoder_set
from .._validate import check_device, check_layer_list

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ..core.transcoder_set import TranscoderSet


def transcoders(
    adata: AnnData,
    *,
    key: str = Key.transcoders,
    layers: list[int] | None = None,
    device: torch.device | str | None = None,
) -> TranscoderSet:
    """The stored transcoders as a :class:`~sctranscoder.core.transcoder_set.TranscoderSet`.

    Built once per record and device and cached: weights stored in ``adata.uns`` are used
    without a copy on the CPU, a linked directory is read (and checked) once.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.train_transcoders` or
        :func:`sctranscoder.load_transcoders`.
    key
        ``adata.uns`` key of the transcoders.
    layers
        Only these layers (layer numbers; default: all). An empty list is refused.
    device
        Where to put them: one of this machine's devices (``"cpu"``, ``"cuda:0"``, ``"mps"``;
        others are refused, naming those available). Default: CPU.
    """
    if layers is not None:
        layers = check_layer_list(layers, _recorded_layers(transcoder_record(adata, key)))
    return transcoder_set(adata, key, layers=layers, device=check_device(device))


def metrics(adata: AnnData, *, key: str = Key.transcoders) -> tuple[pd.DataFrame, dict[str, float]]:
    """Quality of the stored transcoders: the per-layer table and the whole-model scores."""
    m = transcoder_record(adata, key)["metrics"]
    return pd.DataFrame(m["layers"]), {k: float(v) for k, v in m["model"].items()}
