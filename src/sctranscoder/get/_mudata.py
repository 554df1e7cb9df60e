"""Expression and feature activations together, as one MuData."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._constants import Key
from .._records import activation_layers, activations_record
from ._activations import activations

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from mudata import MuData


def mudata(
    adata: AnnData,
    *,
    layers: Sequence[int] | None = None,
    activations_key: str = Key.activations(Key.transcoders),
    modality: str = "rna",
) -> MuData:
    """A :class:`~mudata.MuData` with the expression and one modality of features per layer.

    The expression modality is ``adata`` itself (a reference, not a copy); each feature modality
    ``"L<layer>"`` is :func:`sctranscoder.get.activations` of that layer (cells x features). The
    result writes to ``.h5mu`` (``mdata.write(path)``) and reads back with ``mudata.read_h5mu``,
    so muon's and scverse's multimodal tools see features as one more modality.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_activations`.
    layers
        Layers to include (default: every layer with activations).
    activations_key
        ``adata.uns`` key of the activation record.
    modality
        Name of the expression modality.
    """
    from mudata import MuData

    rec = activations_record(adata, activations_key)
    mods = {modality: adata}
    for layer in activation_layers(rec, layers, activations_key):
        mods[Key.feature_modality(layer)] = activations(
            adata, layer, activations_key=activations_key
        )
    return MuData(mods)
