"""Expression and feature activations together, as one MuData."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._constants import Key
from .._records import activation_layers, activations_record, check_key
from .._validate import check_layer_list
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
        Layers to include (layer numbers; default: every layer with activations). An empty list
        is refused.
    activations_key
        ``adata.uns`` key of the activation record.
    modality
        Name of the expression modality: a name the ``.h5mu`` file can store, not that of a
        feature modality (``"L<layer>"``).
    """
    from mudata import MuData

    check_key(modality, "modality")
    rec = activations_record(adata, activations_key)
    if layers is not None:
        available = sorted(Key.parse_layer(k) for k in rec["obsm_keys"])
        layers = check_layer_list(layers, available)
    layers = activation_layers(rec, layers, activations_key)
    taken = [Key.feature_modality(layer) for layer in layers]
    if modality in taken:
        raise ValueError(
            f"modality={modality!r} is the name of a feature modality (layers are {taken}): "
            "choose another name for the expression, such as 'rna'."
        )
    mods = {modality: adata}
    for layer in layers:
        mods[Key.feature_modality(layer)] = activations(
            adata, layer, activations_key=activations_key
        )
    return MuData(mods)
