"""Feature-pair connections: each feature's strongest input-independent partners."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg

from .._constants import Key, feature_name, parse_feature_name
from .._records import check_key, model_and_transcoders, transcoders_id
from .._validate import check_bool, check_copy_backed, check_feature, check_positive_int
from ..core.architectures import architecture
from ..core.connections import partners

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..core.model import C2SModel


def feature_connections(
    adata: AnnData,
    features: str | Sequence[str],
    model: C2SModel | str | None = None,
    *,
    n_top: int = 20,
    chunk_size: int = 8192,
    key: str = Key.transcoders,
    key_added: str = Key.feature_connections,
    copy: bool = False,
) -> AnnData | None:
    """Each feature's strongest input-independent partners in earlier and later layers.

    The connection from feature ``i`` of layer ``l`` to feature ``j`` of a later layer ``l'`` is
    ``f_enc(l', j) . (w * C f_dec(l, i))``: what ``i`` writes into the residual stream, read by
    ``j`` through the norm before its MLP with the norm's effective weight ``w`` (``C`` removes the
    mean for LayerNorm models such as C2S-Pythia; RMSNorm models such as C2S-Scale have none). The
    norm's input-dependent ``1/rms`` scale is left out (set to 1), so connections are properties of
    the weights alone; in a traced circuit (:func:`trace_circuit`) each feature-to-feature edge
    also records this connection and the part ``activation x frozen scale x connection`` that
    flows through the residual stream. Attention is not part of a connection.

    Computed ``chunk_size`` partner features at a time for all query features of a layer at once,
    so thousands of queries against every layer fit in memory.

    Parameters
    ----------
    adata
        Annotated data with transcoders.
    features
        Feature names ``"L<layer>F<id>"``: one (a str) or a list.
    model
        The base model, for its norm weights (default: the one recorded with the transcoders).
    n_top
        Partners kept per feature and direction, by absolute connection.
    chunk_size
        Partner features per matrix product.
    key
        ``adata.uns`` key of the transcoders.
    key_added
        ``adata.uns`` key of the result. A result already there is replaced, with a warning that
        names its features.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``adata.uns[key_added]``, a dict:

    ``connections`` : :class:`pandas.DataFrame`
        One row per (feature, partner): ``feature``, ``direction`` (``"upstream"``: the partner
        writes what the feature reads; ``"downstream"``: the partner reads what it writes),
        ``partner``, ``partner_layer``, ``partner_feature``, ``connection`` and ``rank`` (1 =
        strongest, per feature and direction).
    ``params`` : dict
        ``features``, ``n_top``, ``transcoders_key``, ``model_fingerprint`` and ``norms`` (how the
        norms are treated).
    """
    if isinstance(features, str):
        features = [features]
    elif isinstance(features, list | tuple | np.ndarray | pd.Index | pd.Series):
        features = list(features)
    else:
        raise TypeError(
            f"features takes feature names such as 'L2F17' (one, or a list), got {features!r}."
        )
    if not features:
        raise ValueError("Pass at least one feature name such as 'L2F17'.")
    copy = check_bool(copy, "copy")
    queries = [parse_feature_name(f) for f in features]
    check_positive_int(n_top, "n_top")
    check_positive_int(chunk_size, "chunk_size")
    check_copy_backed(adata, copy)
    key_added = check_key(key_added, adata=adata, kind="feature connections")
    model, tset = model_and_transcoders(adata, key, model)
    widths = {la: tset[la].config.n_features for la in tset.layers}
    for layer, j in queries:
        check_feature(layer, j, widths, key=key)
    start = logg.info(f"connecting {len(features)} feature(s) across {len(tset.layers)} layers")
    arch = architecture(model.model)
    found = partners(
        {i: tset[i] for i in tset.layers},
        [blk.mlp_norm for blk in arch.blocks],
        queries,
        n_top=n_top,
        chunk_size=chunk_size,
    )
    table = pd.DataFrame(
        {
            "feature": np.asarray(features, dtype=object)[found.query],
            "direction": found.direction.astype(str),
            "partner": [
                feature_name(a, b) for a, b in zip(found.layer, found.feature, strict=True)
            ],
            "partner_layer": found.layer.astype(np.int64),
            "partner_feature": found.feature.astype(np.int64),
            "connection": found.weight.astype(np.float64),
        }
    )
    table["rank"] = (
        table.groupby(["feature", "direction"], sort=False)["connection"]
        .transform(lambda w: w.abs().rank(ascending=False, method="first"))
        .astype(np.int64)
    )
    table = table.sort_values(["feature", "direction", "rank"], ignore_index=True)
    table.index = table.index.astype(str)
    result = {
        "connections": table,
        "params": {
            "features": list(features),
            "n_top": int(n_top),
            "transcoders_key": key,
            "transcoders_id": transcoders_id(adata, key),
            "model_fingerprint": model.fingerprint,
            "norms": "reading norm's weight (and mean removal for LayerNorm); 1/rms scale set to 1",
        },
    }
    if copy:
        adata = adata.copy()
    old = adata.uns.get(key_added)
    if isinstance(old, dict) and "connections" in old:  # the default key is one for all features
        logg.warning(
            f"replaced adata.uns[{key_added!r}], the connections of "
            f"{list(map(str, old.get('params', {}).get('features', [])))}: pass key_added= to "
            "keep both"
        )
    adata.uns[key_added] = result
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, partners of each feature (adata.uns)",
    )
    return adata if copy else None
