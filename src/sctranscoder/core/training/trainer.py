"""The trainer: transcoders for every chosen layer, trained together from one stream of tokens.

The model reads a stream of prompt batches; forward hooks collect each layer's MLP input and
output at the real (non-padding) tokens into a bounded shuffle buffer (:mod:`.buffer`); the
buffer is cut into token batches on which all layers' transcoders take one optimiser step
together (:class:`Trainer`). Nothing is cached to disk. Torch only.

Speed: the TopK encoder's backward touches only the ``k`` selected features per token
(:func:`~sctranscoder.core.topk.topk_encode`), decoding gathers ``k`` decoder rows
(``embedding_bag``), the loss curves stay on the device and are copied to the host every
:data:`LOG_EVERY` steps, and optionally the model runs under autocast (``bf16``/``fp16``) and the
per-layer loss is compiled. With ``TrainingConfig(profile=True)`` the seconds spent in each phase
are recorded (:data:`~.timer.TIMING_KEYS`). Under ``torch.distributed`` every rank trains on its
own tokens and all ranks keep identical transcoders (see :func:`train_transcoders`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..transcoder import Transcoder, TranscoderConfig
from .buffer import LayerTensors, ShuffleBuffer, TokenBatch, buffer_tokens, harvest
from .checkpoint import Checkpoints, check_arguments, default_every, run_header
from .config import AUTOCAST_DTYPES
from .losses import LayerLossFunction, initialise_from_data, remove_parallel_grad
from .stacked import StackedTranscoders, use_stacked
from .timer import Timer

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from .config import TrainingConfig

logger = logging.getLogger(__name__)

#: Steps between copies of the loss curves from the device to the host.
LOG_EVERY = 32
#: Devices where Adam runs as one fused kernel (torch's ``fused=True``).
FUSED_ADAM_DEVICES = ("cpu", "cuda")


@dataclass
class TrainingLog:
    """What happened in training, per layer: loss curve (per step), dead fraction at the end;
    and the learning rate used (``lr``).

    ``tokens`` counts tokens over all ranks; ``seconds`` is the wall time of training and
    ``timings`` (only with ``TrainingConfig(profile=True)``) its split by phase
    (:data:`~.timer.TIMING_KEYS`), which adds up to ``seconds``.
    """

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    lr: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    loss: dict[int, list[float]] = field(default_factory=dict)
    fvu: dict[int, list[float]] = field(default_factory=dict)
    dead_fraction: dict[int, float] = field(default_factory=dict)


class Trainer:
    """Transcoders of ``layers`` and their optimiser: initialised from the first batch, then one
    :meth:`step` per batch for all layers together; :meth:`flush` copies the loss curves to the
    host (every :data:`LOG_EVERY` steps, in one transfer).

    Under ``torch.distributed`` this rank takes ``config.batch_size // world_size`` tokens a step;
    the transcoders are broadcast from rank 0 after initialisation and the gradients and firing
    counts are averaged over ranks every step, so all ranks stay identical.
    """

    def __init__(
        self,
        config: TrainingConfig,
        layers: Sequence[int],
        *,
        d_in: int,
        d_out: int,
        device: torch.device,
        timer: Timer | None = None,
    ):
        n_ranks = dist.world_size()
        if config.batch_size % n_ranks:
            raise ValueError(
                f"batch_size ({config.batch_size}) is the global batch and must be divisible by "
                f"the number of ranks ({n_ranks})."
            )
        self.config = config
        self.layers = [int(layer) for layer in layers]
        self.device = torch.device(device)
        self.batch = config.batch_size // n_ranks  # this rank's tokens a step
        self.timer = timer or Timer(config.profile, self.device)
        gen = torch.Generator().manual_seed(config.seed)
        self.transcoder_config = TranscoderConfig(
            d_in=d_in,
            d_out=d_out,
            n_features=config.expansion_factor * d_in,
            activation=config.activation,
            k=config.k,
            skip=config.skip,
        )
        n_features = self.transcoder_config.n_features
        self.transcoders = {
            layer: Transcoder(self.transcoder_config, generator=gen).to(self.device)
            for layer in self.layers
        }
        #: all layers stacked and trained by one batched step (see :mod:`.stacked`), or None
        self.stack: StackedTranscoders | None = None
        if use_stacked(config, self.device):
            self.stack = StackedTranscoders(self.transcoders, self.layers).to(self.device)
            self.transcoders = {}  # the stack holds the weights
            self.params = list(self.stack.parameters())
        else:
            self.params = [p for tc in self.transcoders.values() for p in tc.parameters()]
        self.lr = config.learning_rate(n_features)
        # one fused kernel for all parameters (the same update, in fewer passes): on the CPU
        # 0.46 ms a step against 1.9 ms for the per-tensor loop (16 tensors, 4 layers x d 128)
        self.optimizer = torch.optim.Adam(
            self.params, lr=self.lr, fused=self.device.type in FUSED_ADAM_DEVICES
        )
        self.dead_tokens = (
            config.dead_tokens if config.dead_tokens is not None else config.n_tokens // 10
        )
        self.k_aux = min(d_out // 2, n_features)
        # tokens since each feature last fired, (layers, features); per layer as views
        self._since_fired = torch.zeros(
            len(self.layers), n_features, dtype=torch.long, device=self.device
        )
        self.since_fired = {la: self._since_fired[i] for i, la in enumerate(self.layers)}
        self.loss_fn = LayerLossFunction(config, self.device, self.timer)
        self.log = TrainingLog(
            loss={la: [] for la in self.layers}, fvu={la: [] for la in self.layers}, lr=self.lr
        )
        self.initialised = False
        # per step, its losses then FVUs (one entry per layer each), still on the device
        self._pending: list[torch.Tensor] = []
        # off the CPU: whether each layer had dead features at the last flush (AuxK runs only
        # then; a feature that dies between flushes gets AuxK at most LOG_EVERY steps late)
        self._any_dead = dict.fromkeys(self.layers, True)

    def _layer_modules(self) -> dict[int, Any]:
        """Per layer, what holds its weights: its transcoder, or views into the stack."""
        if self.stack is None:
            return self.transcoders
        return {
            layer: _LayerView(self.stack.config, self.stack.layer_weights(i))
            for i, layer in enumerate(self.layers)
        }

    def initialise(self, X: LayerTensors, Y: LayerTensors) -> None:
        """Initialise every layer from the first batch of its tokens, then broadcast rank 0's."""
        with self.timer("other"):
            for layer, tc in self._layer_modules().items():
                initialise_from_data(tc, X[layer][: self.batch], Y[layer][: self.batch])
        with self.timer("communication"):
            for module in [self.stack] if self.stack is not None else self.transcoders.values():
                dist.broadcast_module(module)
        self.initialised = True

    def _dead_mask(self, layer: int, may_be_dead: bool) -> torch.Tensor | None:
        """Dead features of ``layer`` for AuxK, or None when AuxK can be skipped."""
        if not may_be_dead:
            return None
        dead = self.since_fired[layer] > self.dead_tokens
        # on the CPU looking is free; elsewhere (no host sync in the loop) AuxK runs while the
        # last flush saw dead features, gated on the device
        if self.device.type == "cpu":
            return dead if bool(dead.any()) else None
        return dead if self._any_dead[layer] else None

    def step(self, X: LayerTensors, Y: LayerTensors, rows: torch.Tensor) -> None:
        """One optimiser step of every layer on the tokens ``rows`` of ``X`` and ``Y``."""
        cfg = self.config
        # no feature can be dead before dead_tokens tokens: skip AuxK without looking
        may_be_dead = cfg.auxk_alpha > 0 and self.log.tokens > self.dead_tokens
        if self.stack is None:
            losses, fvus, fired = self._layer_losses(X, Y, rows, may_be_dead)
        else:
            losses, fvus, fired = self._stacked_losses(X, Y, rows, may_be_dead)
        with self.timer("optimizer"):
            self.optimizer.zero_grad(set_to_none=True)
        with self.timer("backward"):
            losses.sum().backward()
        with self.timer("communication"):
            _all_reduce_step(self.params, [fired])
        self._update()
        with self.timer("other"):
            self._since_fired.add_(cfg.batch_size).masked_fill_(fired > 0, 0)
            self._pending.append(torch.cat([losses, fvus]).detach())
        self.log.steps += 1
        self.log.tokens += cfg.batch_size
        if self.log.steps % LOG_EVERY == 0:
            self.flush()

    def _layer_losses(
        self, X: LayerTensors, Y: LayerTensors, rows: torch.Tensor, may_be_dead: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per layer in turn: losses ``(L,)``, FVUs ``(L,)`` and fire counts ``(L, n_features)``."""
        losses, fvus, fired = [], [], []
        for layer, tc in self.transcoders.items():
            with self.timer("other"):
                # index_select, not X[rows]: 0.03 ms against 0.13 ms for 2,048 rows of d = 128
                x, y = X[layer].index_select(0, rows), Y[layer].index_select(0, rows)
            dead = self._dead_mask(layer, may_be_dead)
            loss, fvu, f = self.loss_fn(tc, x, y, dead, self.k_aux)
            losses.append(loss)
            fvus.append(fvu)
            fired.append(f)
        return torch.stack(losses), torch.stack(fvus), torch.stack(fired)

    def _stacked_losses(
        self, X: LayerTensors, Y: LayerTensors, rows: torch.Tensor, may_be_dead: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_layer_losses` of the stack, every layer in one batched computation."""
        cfg = self.config
        with self.timer("other"):
            x = torch.stack([X[la].index_select(0, rows) for la in self.layers])
            y = torch.stack([Y[la].index_select(0, rows) for la in self.layers])
        dead = None
        if may_be_dead:
            masks = [self._dead_mask(la, True) for la in self.layers]
            if any(m is not None for m in masks):
                none = torch.zeros_like(self._since_fired[0], dtype=torch.bool)
                dead = torch.stack([none if m is None else m for m in masks])
        with self.timer("encoder"):
            return self.stack.loss(
                x,
                y,
                dead,
                self.k_aux,
                cfg.auxk_alpha,
                dense=cfg.resolved_kernels(self.device) == "dense",
                compute_dtype=AUTOCAST_DTYPES.get(cfg.autocast),
            )

    def _update(self) -> None:
        """Adam step; ReLU transcoders keep unit-norm decoder rows."""
        unit_decoder = self.config.activation != "topk"
        with self.timer("optimizer"):
            if unit_decoder:
                for tc in self.transcoders.values():
                    remove_parallel_grad(tc)
            self.optimizer.step()
            if unit_decoder:
                for tc in self.transcoders.values():
                    tc.normalize_decoder()

    def flush(self, *, dead_flags: bool = True) -> None:
        """Copy the pending loss curves (and the dead flags) to the host in one transfer.

        ``dead_flags=False`` leaves the dead flags as the last regular flush set them (a
        checkpoint flushes between regular flushes without changing when AuxK runs).
        """
        if not self._pending:
            return
        block = torch.stack(self._pending)
        with self.timer("communication"):
            dist.all_reduce_([block], "sum", mean=True)
        n = len(self.layers)
        flags = torch.stack([(self.since_fired[la] > self.dead_tokens).any() for la in self.layers])
        host = torch.cat([block.reshape(-1), flags.to(block.dtype)]).cpu()
        for row in host[: block.numel()].reshape(block.shape).tolist():
            for j, layer in enumerate(self.layers):
                self.log.loss[layer].append(row[j])
                self.log.fvu[layer].append(row[n + j])
        if dead_flags:
            for layer, flag in zip(self.layers, host[block.numel() :].tolist(), strict=True):
                self._any_dead[layer] = bool(flag)
        self._pending.clear()

    def state_dict(self) -> dict:
        """Everything a resumed run needs of the trainer, loss curves flushed first: every
        transcoder, the Adam state, the dead-feature counters and flags, the log so far and the
        profile's seconds. Tensors stay where they are (``torch.save`` them as they are).
        """
        self.flush(dead_flags=False)
        log = self.log
        return {
            "transcoders": {la: m.state_dict() for la, m in self._layer_modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "since_fired": dict(self.since_fired),
            "any_dead": dict(self._any_dead),
            # float64 holds the host's Python floats exactly
            "log": {
                "steps": log.steps,
                "tokens": log.tokens,
                "seconds": log.seconds,
                "loss": {la: torch.tensor(v, dtype=torch.float64) for la, v in log.loss.items()},
                "fvu": {la: torch.tensor(v, dtype=torch.float64) for la, v in log.fvu.items()},
            },
            "timings": dict(self.timer.seconds),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (of a trainer with the same config and layers)."""
        if self.stack is not None:
            for i, layer in enumerate(self.layers):
                self.stack.load_layer(i, state["transcoders"][layer])
        for layer, tc in self.transcoders.items():
            tc.load_state_dict(state["transcoders"][layer])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a checkpoint's own choice is not kept
            group["fused"] = self.device.type in FUSED_ADAM_DEVICES
        for layer in self.layers:
            self.since_fired[layer].copy_(state["since_fired"][layer])
            self._any_dead[layer] = bool(state["any_dead"][layer])
        saved = state["log"]
        self.log.steps, self.log.tokens = int(saved["steps"]), int(saved["tokens"])
        self.log.seconds = float(saved["seconds"])
        self.log.loss = {la: saved["loss"][la].tolist() for la in self.layers}
        self.log.fvu = {la: saved["fvu"][la].tolist() for la in self.layers}
        self.timer.seconds.update({k: float(v) for k, v in state["timings"].items()})
        self._pending.clear()
        self.initialised = True

    def mean_fvu(self) -> float:
        """Mean over layers of the last flushed FVU."""
        return sum(self.log.fvu[la][-1] for la in self.layers) / len(self.layers)

    def finish(self, seconds: float) -> tuple[dict[int, Transcoder], TrainingLog]:
        """Flush, freeze the transcoders and complete the log (``seconds`` of wall time)."""
        self.flush()
        if self.stack is not None:
            self.transcoders = self.stack.transcoders()
        for layer, tc in self.transcoders.items():
            self.log.dead_fraction[layer] = float(
                (self.since_fired[layer] > self.dead_tokens).float().mean()
            )
            tc.eval()
            tc.requires_grad_(False)
        self.log.seconds = seconds
        if self.config.profile:
            self.log.timings = self.timer.split(seconds)
        return self.transcoders, self.log


class _LayerView:
    """One layer of a stack as the per-layer code reads a transcoder: ``config`` and weights
    (views of the stack's parameters), e.g. for :func:`~.losses.initialise_from_data`.
    """

    def __init__(self, config: TranscoderConfig, weights: dict[str, torch.Tensor]):
        self.config = config
        self.W_skip = None
        for name, value in weights.items():
            setattr(self, name, value)
        self._weights = weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights by name (detached views: saved with the stack's storage, not copied)."""
        return {name: value.detach() for name, value in self._weights.items()}


def _all_reduce_step(params: list[nn.Parameter], fired: list[torch.Tensor]) -> None:
    """Average gradients and fired counts over ranks, in one collective (no-op alone).

    Every rank then agrees on which features fired, hence on which are dead. Missing gradients
    are zero-filled first so that every rank reduces the same tensors.
    """
    if not dist.is_distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    dist.all_reduce_([*(p.grad for p in params), *fired], "sum", mean=True)


def train_transcoders(
    model: nn.Module,
    batches: Iterable[TokenBatch] | Callable[[int], Iterable[TokenBatch]],
    *,
    layers: Sequence[int],
    config: TrainingConfig,
    d_in: int,
    d_out: int,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    identity: Mapping[str, Any] | None = None,
    callback: Callable[[TrainingLog], object] | None = None,
) -> tuple[dict[int, Transcoder], TrainingLog]:
    """Train one transcoder per layer in ``layers`` on the prompts in ``batches``.

    Under ``torch.distributed`` (see :mod:`sctranscoder.core.distributed`) every rank passes its
    own shard of the prompts and takes ``config.batch_size // world_size`` tokens a step; the
    transcoders are broadcast from rank 0 after initialisation, gradients and the dead-feature
    counts are all-reduced every step, so all ranks take the same steps and end with identical
    transcoders (and identical logs). Single-process, nothing of this happens.

    **Checkpoints** (:mod:`.checkpoint`). With ``checkpoint_dir``, the whole state of training
    is written there at the first boundary between buffer rounds after every
    ``checkpoint_every`` tokens, and when training ends. ``resume=True`` continues from it: on
    the CPU, a resumed run ends with the same transcoders and log, bit for bit, as one that was
    never interrupted (tested); writing checkpoints changes no number either.

    Parameters
    ----------
    model
        A frozen causal LM (see :func:`sctranscoder.core.model.mlp_modules` for layouts).
    batches
        ``(input_ids, attention_mask)`` prompt batches; iterated until ``config.n_tokens`` tokens
        have been used, so pass an endless (e.g. epoch-cycling, shuffled) iterator. Or a function
        of the number of batches to skip returning such an iterator from there
        (:func:`~sctranscoder.core.prompts.prompt_batches` with ``start=``), which lets a resumed
        run skip without reading; an iterator is read up to its position and the batches are
        dropped (no forward pass either way). The stream must give the same batches in the
        same order in the resumed run.
    layers
        MLP layers to train transcoders for.
    config
        Hyper-parameters.
    d_in, d_out
        Width of the MLP input and output.
    device
        Device of the model and transcoders (default: the model's).
    progress
        Show a tqdm progress bar.
    checkpoint_dir
        Directory of the checkpoint (created when needed; one file, replaced atomically). A new
        run refuses a directory that already holds a checkpoint.
    checkpoint_every
        Training tokens (over all ranks) between checkpoints; default: a tenth of
        ``config.n_tokens``. Needs ``checkpoint_dir``.
    resume
        Continue from the checkpoint in ``checkpoint_dir``; refused, naming the difference, when
        it was written for another config (but ``profile``), other layers or widths, another
        number of ranks or another ``identity``.
    identity
        What else identifies the run (strings and numbers: the model's fingerprint, the cells),
        stored in the checkpoint and compared on resume.
    callback
        Called with the :class:`TrainingLog` after every step (its loss curves are copied every
        :data:`LOG_EVERY` steps). An exception raised there, as by a ``KeyboardInterrupt``,
        stops training and propagates; the last checkpoint is kept.

    Returns
    -------
    The transcoders by layer, and a :class:`TrainingLog` (after a resume: the whole run's,
    ``seconds`` summed over the sessions up to the checkpoint and this one).
    """
    t_start = time.perf_counter()
    check_arguments(checkpoint_dir, checkpoint_every, resume)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    checkpoints = None
    if checkpoint_dir is not None:
        header = run_header(
            config,
            layers,
            d_in=d_in,
            d_out=d_out,
            identity=identity,
            stacked=use_stacked(config, device),
        )
        every = checkpoint_every if checkpoint_every is not None else default_every(config)
        checkpoints = Checkpoints(checkpoint_dir, every=every, header=header, device=device)
    saved = checkpoints.load() if checkpoints is not None and resume else None
    trainer = Trainer(config, layers, d_in=d_in, d_out=d_out, device=device)
    if saved is not None:
        trainer.load_state_dict(saved["trainer"])
        t_start -= trainer.log.seconds  # the clock goes on from the checkpoint's seconds
        logger.info(
            "resuming from %s at step %d (%d of %d tokens)",
            checkpoints.path,
            trainer.log.steps,
            trainer.log.tokens,
            config.n_tokens,
        )
    else:
        logger.info(
            "training %d transcoders (%s, %d features, lr %.2e) on %d tokens each",
            len(trainer.layers),
            config.activation,
            trainer.transcoder_config.n_features,
            trainer.lr,
            config.n_tokens,
        )
    position = int(saved["rank"]["batches_read"]) if saved is not None else 0
    buffer = ShuffleBuffer(
        harvest(
            model,
            _stream(batches, position),
            trainer.layers,
            device=device,
            autocast=config.autocast,
        ),
        trainer.layers,
        capacity=buffer_tokens(config, len(trainer.layers), d_in, d_out, trainer.batch),
        batch=trainer.batch,
        # each rank shuffles its own tokens its own way
        generator=torch.Generator(device="cpu").manual_seed(config.seed + 1 + dist.rank()),
        device=device,
        timer=trainer.timer,
        batches_read=position,
    )
    if saved is not None:
        buffer.load_state_dict(saved["rank"])
    del saved
    bar = tqdm(
        total=config.n_tokens,
        initial=min(trainer.log.tokens, config.n_tokens),
        unit="tok",
        desc="transcoders",
        disable=not progress,
    )
    try:
        while trainer.log.tokens < config.n_tokens:
            X, Y, rounds = buffer.next_round()
            if not trainer.initialised:
                trainer.initialise(X, Y)
            for rows in rounds:
                if trainer.log.tokens >= config.n_tokens:
                    break
                trainer.step(X, Y, rows)
                bar.update(config.batch_size)
                if trainer.log.steps % LOG_EVERY == 0:
                    bar.set_postfix(fvu=f"{trainer.mean_fvu():.3f}")
                if callback is not None:
                    callback(trainer.log)
            del X, Y
            done = trainer.log.tokens >= config.n_tokens
            if checkpoints is not None and (done or checkpoints.due(trainer.log.tokens)):
                checkpoints.save(trainer, buffer, seconds=time.perf_counter() - t_start)
    finally:
        bar.close()
        buffer.close()
    return trainer.finish(time.perf_counter() - t_start)


def _stream(
    batches: Iterable[TokenBatch] | Callable[[int], Iterable[TokenBatch]], start: int
) -> Iterator[TokenBatch]:
    """``batches`` from its ``start``-th batch on (a function is asked; an iterator is read)."""
    if callable(batches):
        return iter(batches(start))
    stream = iter(batches)
    collections.deque(itertools.islice(stream, start), maxlen=0)  # read and drop
    return stream
