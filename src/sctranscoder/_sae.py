"""Records of cell embeddings and sparse autoencoders in an AnnData: read, checked, rebuilt.

C2S's cell embedding (:func:`~sctranscoder.tl.cell_embeddings`)::

    uns[key]       {"params": {layer, pool, sentence_key, ...}, "model": model record,
                    "obsm_key": "X_<key>"}
    obsm["X_<key>"]  cells x d_model, float32

An SAE (:func:`~sctranscoder.tl.train_sae`)::

    uns[key]       {"params": {use_rep, config, scale, activations_key, ...},
                    "sae": {"config": {...}, "W_enc", "b_enc", "W_dec", "b_dec"},
                    "metrics": {train_/validation_ fvu, r2, l0; dead_fraction, ...},
                    "weights_id": str}
    uns[key + "_activations"]  an activation record of one pseudo-layer 0 (concepts "L0F<j>")
    obsm["X_<key>"]  cells x concepts, CSR float32

Its concepts are named as features of a pseudo-layer 0 (``"L0F<j>"``, record key ``"layer_0"``)
so that every reader of activation records (:func:`~sctranscoder.tl.rank_features_groups`,
:func:`~sctranscoder.tl.annotate_features`, :func:`~sctranscoder.get.feature_table`,
:func:`~sctranscoder.pl.feature`) takes them as they are; the 0 names no layer of any model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from ._records import record, record_kind
from .core.transcoder import WEIGHTS, Transcoder, TranscoderConfig

if TYPE_CHECKING:
    from anndata import AnnData


def embedding(adata: AnnData, use_rep: object) -> np.ndarray:
    """``adata.obsm[use_rep]`` as a float32 cells x dimensions array, checked: present,
    two-dimensional with at least one column, numeric and finite.
    """
    if not isinstance(use_rep, str) or not use_rep:
        raise TypeError(
            f"use_rep must name an entry of adata.obsm (e.g. 'X_pca'), got {use_rep!r}."
        )
    if use_rep not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{use_rep!r}] not found; entries: {list(adata.obsm)}. Compute the "
            "embedding first (e.g. `sc.pp.pca(adata)`, `sct.tl.cell_embeddings(adata)`, or "
            "`adata.obsm['X_scVI'] = model.get_latent_representation()`)."
        )
    value = adata.obsm[use_rep]
    if isinstance(value, pd.DataFrame):
        value = value.to_numpy()
    X = value.toarray() if sparse.issparse(value) else np.asarray(value)
    if X.ndim != 2 or X.shape[1] < 1:
        raise ValueError(
            f"adata.obsm[{use_rep!r}] has shape {X.shape}: an embedding is cells x dimensions."
        )
    if not (np.issubdtype(X.dtype, np.number) and not np.issubdtype(X.dtype, np.complexfloating)):
        raise ValueError(f"adata.obsm[{use_rep!r}] holds {X.dtype} values, not numbers.")
    X = X.astype(np.float32)
    bad = ~np.isfinite(X).all(1)
    if bad.any():
        raise ValueError(
            f"adata.obsm[{use_rep!r}] has NaN or infinite values in {int(bad.sum())} cells (e.g. "
            f"{list(adata.obs_names[bad][:3])}): drop those cells or fix the embedding first."
        )
    return X


def sae_record(adata: AnnData, key: str) -> dict:
    """The SAE record ``adata.uns[key]``."""
    rec = record(
        adata,
        key,
        kind="SAE",
        hint="run `sct.tl.train_sae(adata, use_rep=...)` first, or pass the `key=` you used.",
    )
    if record_kind(rec) != "sae":
        raise KeyError(f"adata.uns[{key!r}] is not an SAE record of `sct.tl.train_sae`.")
    return rec


def sae_module(rec: dict, device=None) -> tuple[Transcoder, float]:
    """The SAE of a record as a frozen module (on ``device``) and its embedding scale."""
    entry = rec["sae"]
    config = TranscoderConfig.from_dict(dict(entry["config"]))
    weights = {name: np.asarray(entry[name]) for name in WEIGHTS if name in entry}
    sae = Transcoder.from_tensors(config, weights, copy=True)
    if device is not None:
        sae = sae.moved(device)
    return sae, float(rec["params"]["scale"])


def embedding_record(adata: AnnData, use_rep: str) -> tuple[str, dict] | None:
    """``(key, record)`` of the C2S cell embedding stored in ``adata.obsm[use_rep]``, or None
    when no :func:`~sctranscoder.tl.cell_embeddings` record points there.
    """
    for key, value in adata.uns.items():
        if record_kind(value) == "cell embedding" and str(value["obsm_key"]) == use_rep:
            return str(key), value
    return None


def check_obsm_free(adata: AnnData, obsm_key: str, key: str, kind: str) -> None:
    """Refuse writing ``adata.obsm[obsm_key]`` over an entry that the record ``adata.uns[key]``
    of ``kind`` did not write (a user's ``X_pca``, say).
    """
    if obsm_key not in adata.obsm:
        return
    ours = adata.uns.get(key)
    if record_kind(ours) == kind and obsm_key in _written(ours, adata):
        return
    raise ValueError(
        f"key_added={key!r} would replace adata.obsm[{obsm_key!r}], which this tool did not "
        "write: choose another key_added."
    )


def _written(rec: dict, adata: AnnData) -> set[str]:
    """``obsm`` keys written with a record: a cell embedding's, or an SAE's concept matrix."""
    if "obsm_key" in rec:
        return {str(rec["obsm_key"])}
    act = adata.uns.get(str(rec.get("params", {}).get("activations_key", "")))
    if isinstance(act, dict) and "obsm_keys" in act:
        return {str(v) for v in act["obsm_keys"].values()}
    return set()
