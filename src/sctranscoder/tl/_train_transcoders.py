"""Train transcoders on every MLP layer of a C2S model, from an AnnData's cell sentences."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scanpy import logging as logg

from .._constants import Key
from .._records import EMBED_LIMIT_BYTES, cell_prompts, check_key, write_transcoders
from .._validate import (
    check_copy_backed,
    check_device,
    check_layers,
    check_path,
    model_or_default,
)
from ..core import distributed as dist
from ..core.fit import fit_transcoders
from ..core.prompts import split_cells
from ..core.training import TrainingConfig
from ..core.training.checkpoint import check_arguments as check_checkpoint_arguments
from ..core.transcoder_set import manifest_sha256

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from ..core.model import C2SModel


def train_transcoders(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    config: TrainingConfig | None = None,
    layers: Sequence[int] | None = None,
    device: str | None = None,
    weights_dir: str | os.PathLike | None = None,
    sentence_key: str = Key.sentence,
    key_added: str = Key.transcoders,
    progress: bool = True,
    copy: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    **overrides: Any,
) -> AnnData | None:
    """Train a transcoder for each chosen MLP layer of a C2S model on the cells' sentences.

    A transcoder maps an MLP's input (for GPT-NeoX, ``post_attention_layernorm`` of the layer
    input) to the MLP's output through many sparse features. All layers are trained together from
    one forward pass of the model over a shuffled stream of the training cells' prompt tokens;
    memory is bounded by a shuffle buffer whatever the number of cells. Cells are split at random
    (seeded) into training and validation; quality is measured on the validation cells.

    Every training setting is a field of :class:`~sctranscoder.core.training.TrainingConfig`:
    pass one whole as ``config=``, or any field as a keyword (``n_tokens=``, ``k=``,
    ``activation="relu"``, ``kernels=``, ...), which then overrides ``config``.

    **Data-parallel training.** Launched with ``torchrun`` and called after
    ``torch.distributed.init_process_group()`` (more than one rank), every rank computes the same
    seeded split, runs the model only on its shard of the training cells (every
    ``world_size``-th cell, from position ``rank``), and trains an identical copy of the
    transcoders: they are initialised on rank 0 and broadcast, and gradients are averaged over
    ranks at every step. ``batch_size`` and ``n_tokens`` stay global (each step uses
    ``batch_size // world_size`` tokens per rank). Validation is not sharded: every rank evaluates
    all validation cells, and rank 0's metrics are broadcast, so every rank ends with the same
    record; save from rank 0 only. See ``docs/scaling.md``.

    **Checkpoints.** With ``checkpoint_dir``, the whole state of training (transcoders, Adam,
    dead-feature counters, the loss curves so far, the shuffle buffer and each rank's position
    in the prompt stream) is written there every ``checkpoint_every`` tokens and when training
    ends; after an interruption, the same call with ``resume=True`` continues from it and ends
    with the same transcoders as an uninterrupted run (bit for bit on the CPU). Under
    ``torchrun`` rank 0 writes and every rank resumes, with the same number of ranks.

    **Backed AnnData.** Only ``adata.obs[sentence_key]`` is read, so ``adata`` may be opened with
    ``anndata.read_h5ad(path, backed="r")``; the results go to ``uns`` and ``obs``, which are held
    in memory (save with ``adata.write_h5ad(new_path)``).

    Parameters
    ----------
    adata
        Annotated data with cell sentences in ``adata.obs[sentence_key]``
        (:func:`sctranscoder.pp.cell_sentences`). Each prompt holds the top
        ``model.settings.n_genes`` genes of the cell's sentence (a warning says so when the
        sentences are longer) and names the organism recorded with the sentences
        (``adata.uns[sentence_key]["params"]["organism"]``, else the model's); the transcoder
        record's ``model`` says which. Every later tool builds its prompts the same way, and
        warns when they name another organism than the transcoders were trained on.
    model
        A :class:`~sctranscoder.core.model.C2SModel` (e.g. :func:`sctranscoder.datasets.tiny_c2s`),
        a local model directory or a hub id. Default: the embedded model.
    config
        Training settings, a :class:`~sctranscoder.core.training.TrainingConfig` or a dict of
        its fields (default: ``TrainingConfig()``: TopK, expansion 8, k 32, 1M tokens).
        The settings of Hosokawa et al. 2025 are ``TrainingConfig(activation="relu",
        expansion_factor=8, lr=1e-4, l1_coefficient=1.4e-4, batch_size=2048)``.
    layers
        MLP layers to train (default: all).
    device
        ``"cpu"``, ``"cuda"``, ... (a device this machine lacks is refused, naming those it has).
        Default: where the model is; in data-parallel training with CUDA available,
        ``cuda:<LOCAL_RANK>`` (the GPU ``torchrun`` assigns to the rank).
    weights_dir
        Write the weights to this new directory (:meth:`TranscoderSet.save
        <sctranscoder.core.transcoder_set.TranscoderSet.save>`) and keep only a link to it (path
        and checksum) in ``adata.uns``: for large models, whose weights would make the ``.h5ad``
        gigabytes large. Default: the weights go into ``adata.uns`` (one self-contained file); a
        warning suggests ``weights_dir`` above 1 GiB of weights.
    sentence_key
        ``adata.obs`` column with the cell sentences.
    key_added
        ``adata.uns`` key of the transcoder record (and prefix of the ``obs`` split column).
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata`` (not for a backed ``adata``).
    checkpoint_dir
        Directory of the training checkpoint (``checkpoint.pt``, replaced atomically at each
        checkpoint; created when needed). A new run refuses a directory that holds a checkpoint.
        Under ``torchrun`` it must be on a file system every rank reads.
    checkpoint_every
        Training tokens (over all ranks) between checkpoints, taken at the first boundary
        between shuffle-buffer rounds after each multiple. Default: a tenth of ``n_tokens``.
    resume
        Continue the run whose checkpoint is in ``checkpoint_dir``. Refused, naming the
        difference, when it was written for other training settings (any field but
        ``profile``), layers, base model (fingerprint, prompt settings), cells or split, or
        another number of ranks. ``train_seconds`` then sums the sessions' training time.
    **overrides
        Fields of :class:`~sctranscoder.core.training.TrainingConfig`.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets these fields:

    ``adata.uns[key_added]["transcoders"]`` : dict
        Per layer (``"layer_<i>"``): ``config`` and the weights ``W_enc`` (features x d_in),
        ``b_enc``, ``W_dec`` (features x d_out), ``b_dec`` (and ``W_skip``), float32 arrays.
        With ``weights_dir``, instead ``adata.uns[key_added]["weights"]``: ``path``,
        ``manifest_sha256`` and ``n_bytes``.
    ``adata.uns[key_added]["params"]`` : dict
        ``config`` (the :class:`TrainingConfig`, ``to_dict()``), and the run: ``layers``,
        ``lr`` (the learning rate used), ``tokens_seen`` (over all ranks), ``steps``,
        ``train_seconds``, ``sentence_key``, ``world_size`` (data-parallel ranks, 1 without
        ``torch.distributed``) and ``device`` (rank 0's).
    ``adata.uns[key_added]["model"]`` : dict
        Base model name, fingerprint (checked whenever the transcoders are used), architecture
        and prompt settings.
    ``adata.uns[key_added]["metrics"]["layers"]`` : :class:`pandas.DataFrame`
        One row per layer (index ``"layer_<i>"``, column ``layer``), on the validation cells:
        ``fvu`` (fraction of variance unexplained), ``l0``
        (mean active features per token), ``dead_fraction`` (features that never fire),
        ``train_dead_fraction`` (not fired in the last ``dead_tokens`` training tokens),
        ``n_tokens``.
    ``adata.uns[key_added]["metrics"]["model"]`` : dict
        On the validation cells, next-token cross-entropy of the original model
        (``ce_original``), with every trained MLP replaced by its transcoder (``ce_replaced``) and
        removed (``ce_removed``), ``kl_replaced``/``kl_removed`` to the original,
        ``ce_recovered`` and ``prediction_agreement`` (fraction of cells whose greedy answer is
        unchanged by the replacement); at the positions that predict the model's own answer fed
        teacher-forced (:func:`~sctranscoder.core.evaluation.answer_metrics`):
        ``answer_ce_original``, ``answer_ce_replaced``, ``answer_kl_replaced``,
        ``answer_token_agreement``, ``answer_agreement`` and ``answer_n_tokens``.
    ``adata.obs[f"{key_added}_split"]`` : categorical
        ``"train"`` or ``"validation"``.
    """
    if isinstance(config, dict):
        config = TrainingConfig.from_dict(config)
    elif config is not None and not isinstance(config, TrainingConfig):
        raise TypeError(
            f"config must be a TrainingConfig or a dict of its fields, got {config!r}; single "
            "settings go as keywords, e.g. train_transcoders(adata, k=16, activation='topk')."
        )
    config = (config or TrainingConfig()).replace(**overrides)
    check_key(key_added, adata=adata, kind="transcoders", obs_columns=[Key.split(key_added)])
    check_copy_backed(adata, copy)
    check_checkpoint_arguments(checkpoint_dir, checkpoint_every, resume)
    if weights_dir is not None and check_path(weights_dir, "weights_dir").exists():
        raise FileExistsError(f"weights_dir {weights_dir} exists: choose a new directory.")
    model = model_or_default(model)
    layers = check_layers(layers, model.n_layers)
    cells, model = cell_prompts(adata, sentence_key, model)  # the sentences' organism
    is_val = split_cells(adata.n_obs, config.validation_fraction, config.seed)
    device = check_device(device) or dist.default_device()
    if device is not None:
        model.model.to(device)

    start = logg.info(f"training transcoders on {int((~is_val).sum())} cells")
    tset, run = fit_transcoders(
        model,
        cells,
        is_val,
        layers,
        config,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    run["sentence_key"] = sentence_key
    link = None
    if weights_dir is not None:  # rank 0 writes; every rank records rank 0's checksum
        if dist.rank() == 0:
            link = manifest_sha256(tset.save(weights_dir))
        link = dist.broadcast_object(link, model.device)
    if weights_dir is None and tset.n_bytes > EMBED_LIMIT_BYTES:
        logg.warning(
            f"the transcoders hold {tset.n_bytes / 2**30:.1f} GiB of weights, all stored in "
            "adata.uns: pass weights_dir= to keep them in a directory beside the .h5ad"
        )
    if copy:
        adata = adata.copy()
    write_transcoders(
        adata,
        key_added,
        tset,
        params={"config": config.to_dict(), **run},
        weights_dir=weights_dir,
        manifest=link,
    )
    split = Key.split(key_added)
    adata.obs[split] = pd.Categorical(
        np.where(is_val, "validation", "train"), categories=["train", "validation"]
    )
    scores = tset.metrics["model"]
    logg.info(
        f"    finished: mean FVU {np.mean(tset.metrics['layers']['fvu']):.3f}, mean L0 "
        f"{np.mean(tset.metrics['layers']['l0']):.1f}, CE recovered {scores['ce_recovered']:.3f}",
        time=start,
        deep=f"added\n    {key_added!r}, transcoders, params, model, metrics (adata.uns)\n"
        f"    {split!r}, train/validation split (adata.obs)",
    )
    return adata if copy else None
