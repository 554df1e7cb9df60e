from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .._constants import Key
from .._store import sct_uns, stored_transcoders

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.transcoder import Transcoder


def metrics(adata: AnnData, *, key: str = Key.uns) -> tuple[pd.DataFrame, dict[str, float]]:
    """Quality of the stored transcoders: the per-layer table and the whole-model scores."""
    m = sct_uns(adata, key)["metrics"]
    return pd.DataFrame(m["layers"]), {k: float(v) for k, v in m["model"].items()}


def transcoders(
    adata: AnnData, *, key: str = Key.uns, layers: list[int] | None = None
) -> dict[int, Transcoder]:
    """The stored transcoders as torch modules, by layer."""
    return stored_transcoders(adata, key, layers)
