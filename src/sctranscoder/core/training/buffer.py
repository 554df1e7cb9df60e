"""Where training tokens come from: MLP inputs and outputs harvested from one forward pass, held
in a bounded buffer and served in shuffled batches. Nothing is cached to disk; memory is bounded
by the buffer whatever the number of cells.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..hooks import capture_mlp_io, causal_mask, run_to_layers
from .config import AUTOCAST_DTYPES, TrainingConfig

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from .timer import Timer

#: ``(input_ids, attention_mask)`` of a batch of prompts.
TokenBatch = tuple[torch.Tensor, torch.Tensor]
#: Per layer, ``(n_tokens, d)`` MLP inputs (or outputs).
LayerTensors = dict[int, torch.Tensor]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device``: through pinned memory and asynchronously for CUDA."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def harvest(
    model: nn.Module,
    batches: Iterable[TokenBatch],
    layers: Sequence[int],
    *,
    device: torch.device,
    autocast: str | None = None,
) -> Iterator[tuple[LayerTensors, LayerTensors]]:
    """For each prompt batch, the MLP inputs and outputs of ``layers`` at real tokens, ``(n, d)``.

    With ``autocast`` (``"bf16"`` or ``"fp16"``) the model runs under :func:`torch.autocast`;
    the activations are returned in float32 whatever the model's precision.

    The attention mask's values say how many times each token is taken (0: padding; 1: once;
    ``w``: ``w`` times, one after another, which the buffer's shuffle then spreads); the model
    is given ``mask > 0``. This is how answer positions are weighted
    (:func:`~sctranscoder.core.prompts.with_answers`).
    """
    dtype = AUTOCAST_DTYPES[autocast] if autocast is not None else None
    device = torch.device(device)
    with capture_mlp_io(model, layers) as store:
        for ids, mask in batches:
            # positions of real tokens, found where the mask is (no device sync for host masks)
            counts = mask.reshape(-1)
            if bool((counts > 1).any()):
                flat = torch.arange(counts.numel(), device=counts.device)
                keep = to_device(torch.repeat_interleave(flat, counts.clamp_min(0)), device)
                mask = (mask > 0).to(mask.dtype)
            else:
                keep = to_device(counts.nonzero().squeeze(1), device)
            mask = causal_mask(mask)  # None for right-padded host batches (faster attention)
            ids = to_device(ids, device)
            mask = None if mask is None else to_device(mask, device)
            if dtype is None:
                run_to_layers(model, ids, mask)
            else:
                with torch.autocast(device.type, dtype=dtype):
                    run_to_layers(model, ids, mask)
            xs = {layer: _real_rows(store[layer][0], keep) for layer in layers}
            ys = {layer: _real_rows(store[layer][1], keep) for layer in layers}
            store.clear()
            yield xs, ys


def _real_rows(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).index_select(0, keep).float()


def buffer_tokens(cfg: TrainingConfig, n_layers: int, d_in: int, d_out: int, batch: int) -> int:
    """Tokens held in this rank's shuffle buffer (``batch``: this rank's tokens a step)."""
    if cfg.buffer_tokens is not None:
        return max(cfg.buffer_tokens, batch)
    per_token = n_layers * (d_in + d_out) * 4
    return max(batch, min(32 * batch, (1 << 30) // per_token))


class ShuffleBuffer:
    """Fill a buffer of tokens, shuffle it, serve whole batches, keep the remainder for next time.

    Parameters
    ----------
    source
        What :func:`harvest` yields: per prompt batch, inputs and outputs by layer.
    layers
        The layers in ``source``.
    capacity
        Tokens to gather before each shuffle (at least ``batch``).
    batch
        Tokens per batch.
    generator
        CPU generator of the shuffles.
    device
        Where the tokens are.
    timer
        Times the model's forward (``"model_forward"``) and the shuffling (``"other"``).
    batches_read
        Items of ``source`` read before (by a run this one resumes); counted on in
        :attr:`batches_read`.
    """

    def __init__(
        self,
        source: Iterator[tuple[LayerTensors, LayerTensors]],
        layers: Sequence[int],
        *,
        capacity: int,
        batch: int,
        generator: torch.Generator,
        device: torch.device,
        timer: Timer,
        batches_read: int = 0,
    ):
        self.source = source
        self.layers = list(layers)
        self.capacity = capacity
        self.batch = batch
        self.generator = generator
        self.device = device
        self.timer = timer
        self._x: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._y: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._n = 0
        #: items of ``source`` read so far: the position of the prompt stream
        self.batches_read = batches_read

    def next_round(self) -> tuple[LayerTensors, LayerTensors, list[torch.Tensor]]:
        """Fill up, shuffle: ``(X, Y, batches)`` with ``batches`` the row indices of each batch.

        The rows that do not fill a whole batch are kept for the next round.
        """
        while self._n < self.capacity:
            try:
                with self.timer("model_forward"):
                    xs, ys = next(self.source)
            except StopIteration:
                break
            self.batches_read += 1
            for layer in self.layers:
                self._x[layer].append(xs[layer])
                self._y[layer].append(ys[layer])
            self._n += next(iter(xs.values())).shape[0]
        if self._n < self.batch:
            raise ValueError(
                f"The prompts gave only {self._n} tokens, fewer than one batch ({self.batch}); "
                "use more cells or a smaller batch_size."
            )
        with self.timer("other"):
            X = {layer: torch.cat(self._x[layer]) for layer in self.layers}
            Y = {layer: torch.cat(self._y[layer]) for layer in self.layers}
            perm = to_device(torch.randperm(self._n, generator=self.generator), self.device)
            n_full = self._n // self.batch
            batches = [perm[b * self.batch : (b + 1) * self.batch] for b in range(n_full)]
            rest = perm[n_full * self.batch :]
            for layer in self.layers:
                self._x[layer] = [X[layer][rest]] if rest.numel() else []
                self._y[layer] = [Y[layer][rest]] if rest.numel() else []
            self._n = int(rest.numel())
        return X, Y, batches

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this buffer: the shuffling generator's state, the
        rows kept for the next round (on the CPU) and :attr:`batches_read`.

        Taken between rounds (after :meth:`next_round`'s batches were used), the buffer holds
        only the remainder, fewer rows than a batch.
        """
        return {
            "generator": self.generator.get_state(),
            "batches_read": self.batches_read,
            "x": {layer: [t.cpu() for t in self._x[layer]] for layer in self.layers},
            "y": {layer: [t.cpu() for t in self._y[layer]] for layer in self.layers},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (the source must already be at ``batches_read``)."""
        self.generator.set_state(state["generator"])
        self.batches_read = int(state["batches_read"])
        self._x = {la: [to_device(t, self.device) for t in state["x"][la]] for la in self.layers}
        self._y = {la: [to_device(t, self.device) for t in state["y"][la]] for la in self.layers}
        self._n = sum(int(t.shape[0]) for t in self._x[self.layers[0]])

    def close(self) -> None:
        """Stop the source (its forward hooks are removed)."""
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
