"""Share transcoders between AnnData objects: a directory of safetensors plus a JSON config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._constants import Key
from ._store import check_fingerprint, sct_uns, stored_transcoders, transcoders_to_uns
from .core import transcoder as _tc

if TYPE_CHECKING:
    from anndata import AnnData

    from .core.model import C2SModel


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def save_transcoders(adata: AnnData, path: str | Path, *, key: str = Key.uns) -> Path:
    """Write the transcoders in ``adata.uns[key]`` to a directory.

    The directory holds ``layer_<i>.safetensors`` and a ``config.json`` with the base model's
    identity (name, fingerprint), the training parameters and the quality metrics.
    """
    record = sct_uns(adata, key)
    transcoders = stored_transcoders(adata, key)
    metrics = record.get("metrics", {})
    layers_df = pd.DataFrame(metrics.get("layers", pd.DataFrame()))
    metadata = {
        "model": _plain(dict(record["model"])),
        "params": _plain(dict(record.get("params", {}))),
        "metrics": {
            "layers": _plain(layers_df.reset_index(names="name").to_dict(orient="list")),
            "model": _plain(dict(metrics.get("model", {}))),
        },
    }
    return _tc.save_transcoders(transcoders, path, metadata=metadata)


def load_transcoders(
    path: str | Path,
    adata: AnnData | None = None,
    *,
    model: C2SModel | None = None,
    key_added: str = Key.uns,
):
    """Read transcoders written by :func:`save_transcoders`.

    Parameters
    ----------
    path
        The directory.
    adata
        If given, the transcoders, model identity, parameters and metrics are written to
        ``adata.uns[key_added]``, ready for :func:`sctranscoder.tl.feature_activations`.
    model
        If given, its fingerprint must match the one recorded with the transcoders.
    key_added
        ``adata.uns`` key to write.

    Returns
    -------
    Without ``adata``: ``(transcoders by layer, metadata)``. With ``adata``: ``None``; sets
    ``adata.uns[key_added]`` with ``transcoders``, ``model``, ``params`` and ``metrics``.
    """
    transcoders, metadata = _tc.load_transcoders(path)
    if "model" not in metadata:
        raise ValueError(f"{path} records no base model; it was not written by sctranscoder.")
    if model is not None:
        check_fingerprint(metadata["model"], model)
    if adata is None:
        return transcoders, metadata
    params = {
        k: (np.asarray(v) if isinstance(v, list) else v)
        for k, v in metadata.get("params", {}).items()
    }
    m = metadata.get("metrics", {})
    layers_df = pd.DataFrame(m.get("layers", {}))
    if "name" in layers_df:
        layers_df = layers_df.set_index("name")
        layers_df.index.name = None
    adata.uns[key_added] = {
        "params": params,
        "model": dict(metadata["model"]),
        "transcoders": transcoders_to_uns(transcoders),
        "metrics": {"layers": layers_df, "model": dict(m.get("model", {}))},
    }
    return None
