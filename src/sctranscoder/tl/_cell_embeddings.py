"""C2S's own cell embedding: a layer's residual stream pooled over each cell's prompt."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from scanpy import logging as logg

from .._constants import Key
from .._records import cell_prompts, check_key
from .._sae import check_obsm_free
from .._validate import (
    check_bool,
    check_copy_backed,
    check_layer,
    check_positive_int,
    model_or_default,
)
from ..core.embeddings import POOLS, embed_sentences

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.model import C2SModel


def cell_embeddings(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    layer: int | None = None,
    pool: Literal["mean", "last"] = "mean",
    batch_size: int = 32,
    sentence_key: str = Key.sentence,
    key_added: str = Key.cell_embedding,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """C2S's own cell embedding: the residual stream after a layer, pooled over the prompt.

    Each cell's prompt (its sentence cut to the model's ``n_genes``, in the model's template) is
    run through the model up to block ``layer``; the residual stream after that block (the
    hidden state it passes on: embeddings plus every attention and MLP output up to it, before
    any final norm) is averaged over the tokens of the cell's genes (``pool="mean"``) or read at
    the last prompt token (``"last"``, where the model starts its answer). The result is an
    embedding like ``X_pca``: for :func:`train_sae`, ``sc.pp.neighbors(adata, use_rep=...)``
    and anything else that reads ``obsm``.

    Parameters
    ----------
    adata
        Annotated data with cell sentences (:func:`sctranscoder.pp.cell_sentences`).
    model
        A :class:`~sctranscoder.core.model.C2SModel`, a local model directory or a hub id
        (default: the embedded model).
    layer
        Transformer block (0-based) whose output is pooled; default: the last
        (``model.n_layers - 1``).
    pool
        ``"mean"`` over the cell's gene tokens, or ``"last"`` prompt token.
    batch_size
        Cells per forward pass.
    sentence_key
        ``adata.obs`` column with the cell sentences.
    key_added
        ``adata.uns`` key of the record; the embedding goes to ``adata.obsm[f"X_{key_added}"]``.
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets these fields:

    ``adata.obsm[f"X_{key_added}"]`` : :class:`numpy.ndarray`, float32
        Cells x ``model.d_model``.
    ``adata.uns[key_added]["obsm_key"]`` : str
        ``f"X_{key_added}"``.
    ``adata.uns[key_added]["model"]`` : dict
        The model's record (name, fingerprint, architecture, prompt settings): tools that run
        cells through the model again (:func:`concept_attribution`) check it.
    ``adata.uns[key_added]["params"]`` : dict
        ``layer``, ``pool``, ``sentence_key``, ``n_cells``, ``d_model``.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}.")
    check_positive_int(batch_size, "batch_size")
    progress = check_bool(progress, "progress")
    copy = check_bool(copy, "copy")
    check_copy_backed(adata, copy)
    key_added = check_key(key_added, adata=adata, kind="cell embedding")
    obsm_key = Key.obsm(key_added)
    check_obsm_free(adata, obsm_key, key_added, "cell embedding")
    if layer is not None:
        layer = check_layer(layer)
    model = model_or_default(model)
    if layer is None:
        layer = model.n_layers - 1
    if not 0 <= layer < model.n_layers:
        raise ValueError(
            f"layer {layer} does not exist: the model has layers 0..{model.n_layers - 1}."
        )
    cells, model = cell_prompts(adata, sentence_key, model)
    start = logg.info(
        f"computing C2S cell embeddings of {len(cells)} cells (layer {layer}, {pool})"
    )
    E = embed_sentences(
        model, cells, layer=layer, pool=pool, batch_size=batch_size, progress=progress
    )
    rec = {
        "params": {
            "layer": int(layer),
            "pool": str(pool),
            "sentence_key": str(sentence_key),
            "n_cells": int(adata.n_obs),
            "d_model": int(E.shape[1]),
        },
        "model": model.record(),
        "obsm_key": obsm_key,
    }
    if copy:
        adata = adata.copy()
    adata.obsm[obsm_key] = np.asarray(E, dtype=np.float32)
    adata.uns[key_added] = rec
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {obsm_key!r}, cells x {E.shape[1]} embedding (adata.obsm)\n"
        f"    {key_added!r}, params and model (adata.uns)",
    )
    return adata if copy else None
