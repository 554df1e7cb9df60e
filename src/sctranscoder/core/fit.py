"""Train transcoders on cell sentences and measure them: the whole of a training run. Torch only."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from . import distributed as dist
from .evaluation import answer_metrics, layer_metrics, prediction_agreement, replacement_metrics
from .prompts import prompt_batches
from .training import TrainingConfig
from .training import train_transcoders as _train
from .transcoder_set import TranscoderSet

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Sequence

    from .model import C2SModel
    from .training import TrainingLog

#: Training cells whose sentences identify the cells of a checkpointed run (evenly spaced).
IDENTITY_CELLS = 1024


def fit_transcoders(
    model: C2SModel,
    cells: Sequence[Sequence[str]],
    is_val: np.ndarray,
    layers: list[int],
    config: TrainingConfig,
    progress: bool = True,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    callback: Callable[[TrainingLog], object] | None = None,
) -> tuple[TranscoderSet, dict]:
    """Train transcoders on the training cells' prompts and measure them on the validation ones.

    Parameters
    ----------
    model
        The base model.
    cells
        One ranked gene list per cell.
    is_val
        Which cells are held out (:func:`~sctranscoder.core.prompts.split_cells`).
    layers
        MLP layers to train.
    config
        Training settings.
    progress
        Show a progress bar.
    checkpoint_dir, checkpoint_every, resume
        Checkpoints of training and resuming from one
        (:func:`~sctranscoder.core.training.train_transcoders`); a checkpoint also records the
        model's fingerprint, the prompt settings and the cells (:func:`run_identity`), and
        resuming is refused when they differ.
    callback
        Called with the training log after every step (raise in it to stop training).

    With ``config.answer_tokens``, each training cell's greedy answer is computed first and fed
    after its prompt in the training stream (:func:`~sctranscoder.core.prompts.with_answers`).
    The whole-model metrics always include those at the answer positions of the validation
    cells (:func:`~sctranscoder.core.evaluation.answer_metrics`).

    Returns
    -------
    The :class:`TranscoderSet` (with its metrics) and the run's facts (``layers``, ``lr``,
    ``tokens_seen``, ``steps``, ``train_seconds``, ``device``, ``world_size``).

    Under ``torch.distributed`` each rank trains on its share of the training cells; every rank
    evaluates all validation cells (no collective while some ranks work and others wait), then
    rank 0's numbers are broadcast, so that every rank returns the same set and facts.
    """
    train_cells, val_cells = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    rank_cells = np.asarray(dist.shard(train_cells))
    if rank_cells.size == 0:
        raise ValueError(
            f"{train_cells.size} training cells cannot be shared by {dist.world_size()} ranks: "
            "use more cells or fewer ranks."
        )
    dev, d = model.device, model.d_model
    answers = None
    if config.answer_tokens:  # what the model answers, fed back after each training prompt
        said = model.answer_tokens(
            [cells[i] for i in rank_cells], batch_size=config.prompt_batch_size, progress=progress
        )
        answers = dict(zip(rank_cells.tolist(), said, strict=True))

    def stream(start: int):
        return prompt_batches(
            model,
            cells,
            rank_cells,
            batch_size=config.prompt_batch_size,
            seed=config.seed,
            repeat=True,
            start=start,
            answers=answers,
            answer_weight=config.answer_weight,
        )

    transcoders, log = _train(
        model.model,
        stream,
        layers=layers,
        config=config,
        d_in=d,
        d_out=d,
        device=dev,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        identity=run_identity(model, cells, is_val) if checkpoint_dir is not None else None,
        callback=callback,
    )

    def val_stream():
        return prompt_batches(
            model, cells, val_cells, batch_size=config.prompt_batch_size, seed=None, repeat=False
        )

    per_layer = layer_metrics(model.model, transcoders, val_stream(), device=dev)
    whole = replacement_metrics(model.model, transcoders, val_stream(), device=dev)
    val_sentences = [cells[i] for i in val_cells]
    whole["prediction_agreement"] = prediction_agreement(model, transcoders, val_sentences)
    whole.update(
        answer_metrics(
            model,
            transcoders,
            val_sentences,
            model.answer_tokens(val_sentences, batch_size=config.prompt_batch_size),
            batch_size=config.prompt_batch_size,
        )
    )
    facts = (per_layer, whole, log.dead_fraction, log.tokens, log.steps, log.seconds, str(dev))
    per_layer, whole, train_dead, tokens, steps, seconds, dev_name = dist.broadcast_object(
        facts, dev
    )
    metrics = {
        "layers": {
            "layer": layers,
            "fvu": [per_layer[x]["fvu"] for x in layers],
            "l0": [per_layer[x]["l0"] for x in layers],
            "dead_fraction": [per_layer[x]["dead_fraction"] for x in layers],
            "train_dead_fraction": [train_dead[x] for x in layers],
            "n_tokens": [int(per_layer[x]["n_tokens"]) for x in layers],
        },
        "model": {k: float(v) for k, v in whole.items()},
    }
    run = {
        "layers": np.asarray(layers, dtype=np.int64),
        "lr": float(log.lr),
        "tokens_seen": int(tokens),
        "steps": int(steps),
        "train_seconds": float(seconds),
        "device": dev_name,
        "world_size": int(dist.world_size()),
    }
    tset = TranscoderSet(
        transcoders, model=model.record(), config=config, run=dict(run), metrics=metrics
    )
    return tset, run


def run_identity(model: C2SModel, cells: Sequence[Sequence[str]], is_val: np.ndarray) -> dict:
    """What a training checkpoint records of the model and the data, to refuse resuming with
    others: the model's fingerprint, its prompt settings, the train/validation split, and a hash
    of the sentences of up to :data:`IDENTITY_CELLS` evenly spaced training cells.
    """
    train_cells = np.flatnonzero(~is_val)
    sample = train_cells[np.linspace(0, train_cells.size - 1, IDENTITY_CELLS).astype(int)]
    sentences = hashlib.sha256()
    for i in np.unique(sample):
        sentences.update((" ".join(map(str, cells[i])) + "\n").encode())
    split = hashlib.sha256(np.packbits(np.asarray(is_val, dtype=bool)).tobytes())
    return {
        "model_fingerprint": model.fingerprint,
        "prompt_template": str(model.settings.template),
        "prompt_organism": str(model.settings.organism),
        "n_genes": int(model.settings.n_genes),
        "n_cells": len(is_val),
        "cell_split": split.hexdigest()[:16],
        "cell_sentences": sentences.hexdigest()[:16],
    }
