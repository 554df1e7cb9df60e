from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from .._constants import Key
from .._store import gene_lists, model_record, transcoders_to_uns
from ..core import distributed as dist
from ..core.evaluation import layer_metrics, replacement_hooks, replacement_metrics
from ..core.hooks import replace_mlp_outputs
from ..core.model import C2SModel, greedy_answers, load_model
from ..core.training import TrainingConfig
from ..core.training import train_transcoders as _train

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


def prompt_batches(
    model: C2SModel,
    sentences: Sequence[Sequence[str]],
    cells: np.ndarray,
    *,
    batch_size: int,
    seed: int | None,
    repeat: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenised prompts of ``cells`` in batches; shuffled every epoch when ``seed`` is set."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(cells) if seed is not None else cells
        for start in range(0, len(order), batch_size):
            batch = model.tokenize([sentences[i] for i in order[start : start + batch_size]])
            yield batch.input_ids, batch.attention_mask
        if not repeat:
            return


def train_transcoders(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    layers: Sequence[int] | None = None,
    activation: Literal["topk", "relu"] = "topk",
    expansion_factor: int = 8,
    k: int = 32,
    skip: bool = False,
    l1_coefficient: float = 1.4e-4,
    lr: float | None = None,
    batch_size: int = 2048,
    n_tokens: int = 1_000_000,
    prompt_batch_size: int = 16,
    validation_fraction: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    autocast: Literal["bf16", "fp16"] | None = None,
    compile: bool = False,
    sentence_key: str = Key.sentence,
    key_added: str = Key.uns,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Train a transcoder for each chosen MLP layer of a C2S model on the cells' sentences.

    A transcoder maps an MLP's input (for GPT-NeoX, ``post_attention_layernorm`` of the layer
    input) to the MLP's output through many sparse features. All layers are trained together from
    one forward pass of the model over a shuffled stream of the training cells' prompt tokens;
    memory is bounded by a shuffle buffer whatever the number of cells. Cells are split at random
    (seeded) into training and validation; quality is measured on the validation cells.

    **Data-parallel training.** Launched with ``torchrun`` and called after
    ``torch.distributed.init_process_group()`` (more than one rank), every rank computes the same
    seeded split, runs the model only on its shard of the training cells (every
    ``world_size``-th cell, from position ``rank``), and trains an identical copy of the
    transcoders: they are initialised on rank 0 and broadcast, and gradients are averaged over
    ranks at every step. ``batch_size`` and ``n_tokens`` stay global (each step uses
    ``batch_size // world_size`` tokens per rank). Validation is not sharded: every rank evaluates
    all validation cells, and rank 0's metrics are broadcast, so every rank ends with the same
    ``adata.uns[key_added]`` and ``adata.obs`` column; save from rank 0 only. See
    ``docs/scaling.md``.

    **Backed AnnData.** Only ``adata.obs[sentence_key]`` is read, so ``adata`` may be opened with
    ``anndata.read_h5ad(path, backed="r")``; the results go to ``uns`` and ``obs``, which are held
    in memory (save with ``adata.write_h5ad(new_path)``).

    Parameters
    ----------
    adata
        Annotated data with cell sentences in ``adata.obs[sentence_key]``
        (:func:`sctranscoder.pp.cell_sentences`). Each prompt holds the top
        ``model.settings.n_genes`` genes of the cell's sentence.
    model
        A :class:`~sctranscoder.core.model.C2SModel` (e.g. :func:`sctranscoder.datasets.tiny_c2s`),
        a local model directory or a hub id. Default: the embedded model.
    layers
        MLP layers to train (default: all).
    activation
        ``"topk"`` (keep the ``k`` largest features per token) or ``"relu"`` (with an L1 penalty;
        the settings of Hosokawa et al. 2025 are ``expansion_factor=8, lr=1e-4,
        l1_coefficient=1.4e-4, batch_size=2048``).
    expansion_factor
        Features per model dimension.
    k
        Active features per token (TopK).
    skip
        Add a linear skip connection from the MLP input to the output.
    l1_coefficient
        L1 penalty (ReLU).
    lr
        Learning rate (default: ``2e-4 / sqrt(n_features / 2**14)`` for TopK, ``1e-4`` for ReLU).
    batch_size
        Tokens per optimiser step.
    n_tokens
        Training tokens per layer (every layer sees the same tokens).
    prompt_batch_size
        Cells per forward pass of the model.
    validation_fraction
        Fraction of cells held out for the quality metrics.
    seed
        Seed of the split, initialisation and shuffling.
    device
        ``"cpu"``, ``"cuda"``, ... Default: where the model is; in data-parallel training with
        CUDA available, ``cuda:<LOCAL_RANK>`` (the GPU ``torchrun`` assigns to the rank).
    autocast
        Run the frozen model's forward pass, and the TopK encoder's matmul and selection, in
        ``"bf16"`` or ``"fp16"`` (``torch.autocast``; the GPU setting). MLP inputs and outputs
        are cast back to float32; the transcoders' weights, gradients and optimiser stay in
        float32. Default: the model's own precision, float32 transcoders.
    compile
        ``torch.compile`` the transcoders' encoder and decoder-plus-loss (falls back to eager,
        with a logged warning, where compilation fails).
    sentence_key
        ``adata.obs`` column with the cell sentences.
    key_added
        ``adata.uns`` key (and prefix of the obs/obsm keys) for the results.
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata`` (not for a backed ``adata``).

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets these fields:

    ``adata.uns[key_added]["transcoders"]`` : dict
        Per layer (``"layer_<i>"``): ``config`` and the weights ``W_enc`` (features x d_in),
        ``b_enc``, ``W_dec`` (features x d_out), ``b_dec`` (and ``W_skip``), float32 arrays.
    ``adata.uns[key_added]["params"]`` : dict
        The training parameters, trained layers, tokens seen (over all ranks), ``world_size``
        (number of data-parallel ranks, 1 without ``torch.distributed``) and ``device`` (rank
        0's).
    ``adata.uns[key_added]["model"]`` : dict
        Base model name, fingerprint (checked whenever the transcoders are used), architecture
        and prompt settings.
    ``adata.uns[key_added]["metrics"]["layers"]`` : :class:`pandas.DataFrame`
        Per layer on the validation cells: ``fvu`` (fraction of variance unexplained), ``l0``
        (mean active features per token), ``dead_fraction`` (features that never fire),
        ``train_dead_fraction`` (not fired in the last ``n_tokens // 10`` training tokens),
        ``n_tokens``.
    ``adata.uns[key_added]["metrics"]["model"]`` : dict
        On the validation cells, next-token cross-entropy of the original model
        (``ce_original``), with every trained MLP replaced by its transcoder (``ce_replaced``) and
        removed (``ce_removed``), ``kl_replaced``/``kl_removed`` to the original,
        ``ce_recovered`` and ``prediction_agreement`` (fraction of cells whose greedy answer is
        unchanged by the replacement).
    ``adata.obs[f"{key_added}_split"]`` : categorical
        ``"train"`` or ``"validation"``.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    if copy and adata.isbacked:
        raise ValueError(
            "copy=True would load the backed matrix into memory. Use copy=False (a backed "
            "AnnData holds obs and uns in memory; save them with `adata.write_h5ad(new_path)`), "
            "or call `adata.to_memory()` first."
        )
    n_ranks = dist.world_size()
    if batch_size % n_ranks:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of the number of ranks ({n_ranks}): "
            "it is the global batch, split evenly over the ranks."
        )
    if model is None:
        from ..datasets import tiny_c2s

        model = tiny_c2s()
    elif not isinstance(model, C2SModel):
        model = load_model(model)
    sentences = gene_lists(adata, sentence_key, n_genes=model.settings.n_genes)
    n_model_layers = model.n_layers
    layers = list(range(n_model_layers)) if layers is None else sorted({int(x) for x in layers})
    bad = [x for x in layers if not 0 <= x < n_model_layers]
    if bad:
        raise ValueError(
            f"Layers {bad} do not exist: the model has MLP layers 0..{n_model_layers - 1}."
        )
    n_cells = adata.n_obs
    n_val = max(1, round(validation_fraction * n_cells))
    if n_cells - n_val < 1:
        raise ValueError(f"Need at least 2 cells to train and validate, got {n_cells}.")
    config = TrainingConfig(
        activation=activation,
        expansion_factor=expansion_factor,
        k=k,
        skip=skip,
        l1_coefficient=l1_coefficient,
        lr=lr,
        batch_size=batch_size,
        n_tokens=n_tokens,
        seed=seed,
        autocast=autocast,
        compile=compile,
    )
    if device is None:
        device = _default_device()
    if device is not None:
        model.model.to(device)
    dev = model.device

    rng = np.random.default_rng(seed)
    is_val = np.zeros(n_cells, dtype=bool)
    is_val[rng.choice(n_cells, size=n_val, replace=False)] = True
    train_cells, val_cells = np.flatnonzero(~is_val), np.flatnonzero(is_val)

    # Data parallel: the split above is the same on every rank; each rank streams its own shard.
    rank_cells = np.asarray(dist.shard(train_cells))
    if rank_cells.size == 0:
        raise ValueError(
            f"{train_cells.size} training cells cannot be shared by {n_ranks} ranks: use more "
            "cells or fewer ranks."
        )

    start = time.perf_counter()
    if n_ranks > 1:
        logger.info(
            "training transcoders on %d cells (%d for validation), %d ranks (%d cells on rank %d)",
            train_cells.size,
            n_val,
            n_ranks,
            rank_cells.size,
            dist.rank(),
        )
    else:
        logger.info("training transcoders on %d cells (%d for validation)", train_cells.size, n_val)
    stream = prompt_batches(
        model, sentences, rank_cells, batch_size=prompt_batch_size, seed=seed, repeat=True
    )
    d = model.d_model
    transcoders, log = _train(
        model.model,
        stream,
        layers=layers,
        config=config,
        d_in=d,
        d_out=d,
        device=dev,
        progress=progress,
    )
    train_seconds = time.perf_counter() - start

    def val_stream():
        return prompt_batches(
            model, sentences, val_cells, batch_size=prompt_batch_size, seed=None, repeat=False
        )

    # Not sharded: every rank evaluates all validation cells (no collective while some ranks
    # work and others wait), then rank 0's numbers are broadcast so that every rank stores the
    # same record, bit for bit.
    per_layer = layer_metrics(model.model, transcoders, val_stream(), device=dev)
    whole = replacement_metrics(model.model, transcoders, val_stream(), device=dev)
    whole["prediction_agreement"] = _prediction_agreement(model, transcoders, sentences, val_cells)
    per_layer, whole, train_dead, tokens_seen, steps, train_seconds, dev_name = _from_rank0(
        (per_layer, whole, log.dead_fraction, log.tokens, log.steps, train_seconds, str(dev)), dev
    )
    metrics_df = pd.DataFrame(
        {
            "layer": layers,
            "fvu": [per_layer[x]["fvu"] for x in layers],
            "l0": [per_layer[x]["l0"] for x in layers],
            "dead_fraction": [per_layer[x]["dead_fraction"] for x in layers],
            "train_dead_fraction": [train_dead[x] for x in layers],
            "n_tokens": [int(per_layer[x]["n_tokens"]) for x in layers],
        },
        index=[Key.layer(x) for x in layers],
    )

    params = {k: v for k, v in config.to_dict().items() if v is not None}
    params.update(
        layers=np.asarray(layers, dtype=np.int64),
        lr=float(config.learning_rate(expansion_factor * d)),
        tokens_seen=int(tokens_seen),
        steps=int(steps),
        prompt_batch_size=int(prompt_batch_size),
        validation_fraction=float(validation_fraction),
        sentence_key=sentence_key,
        train_seconds=float(train_seconds),
        device=dev_name,
        world_size=int(n_ranks),
    )
    record = {
        "params": params,
        "model": model_record(model),
        "transcoders": transcoders_to_uns(transcoders),
        "metrics": {"layers": metrics_df, "model": {k: float(v) for k, v in whole.items()}},
    }
    split = pd.Categorical(
        np.where(is_val, "validation", "train"), categories=["train", "validation"]
    )

    if copy:
        adata = adata.copy()
    adata.uns[key_added] = record
    adata.obs[f"{key_added}_split"] = split
    logger.info(
        "trained %d transcoders in %.0fs: mean FVU %.3f, mean L0 %.1f, CE recovered %.3f\n"
        "    added 'transcoders', 'params', 'model', 'metrics' (adata.uns[%r]) and %r (adata.obs)",
        len(layers),
        train_seconds,
        metrics_df["fvu"].mean(),
        metrics_df["l0"].mean(),
        whole["ce_recovered"],
        key_added,
        f"{key_added}_split",
    )
    return adata if copy else None


def _default_device() -> str | None:
    """``cuda:<LOCAL_RANK>`` in data-parallel training with CUDA, else ``None`` (keep the model's)."""
    if not dist.is_distributed() or not torch.cuda.is_available():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", dist.rank()))
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def _from_rank0(obj, device: torch.device):
    """``obj`` as rank 0 has it (a small picklable object); ``obj`` itself without ranks."""
    if not dist.is_distributed():
        return obj
    import torch.distributed as tdist

    box = [obj]
    # NCCL moves the pickled object through the rank's GPU; gloo through the CPU.
    tdist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


@torch.no_grad()
def _prediction_agreement(model: C2SModel, transcoders, sentences, cells: np.ndarray) -> float:
    """Fraction of cells whose greedy answer is the same with every MLP replaced."""
    hooks = replacement_hooks(transcoders)
    same, total = 0, 0
    for start in range(0, len(cells), 32):
        batch = model.tokenize([sentences[i] for i in cells[start : start + 32]])
        original = greedy_answers(model, batch, max_new_tokens=24)
        with replace_mlp_outputs(model.model, hooks):
            replaced = greedy_answers(model, batch, max_new_tokens=24)
        same += sum(a == b for a, b in zip(original, replaced, strict=True))
        total += len(original)
    return same / max(total, 1)
