"""Seconds per phase of training, for ``TrainingConfig(profile=True)``."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Phases timed with ``TrainingConfig(profile=True)``, the keys of ``TrainingLog.timings``:
#: the frozen model's forward and the gathering of real tokens, the encoder (pre-activations and
#: TopK), the decoder (sparse decoding and the loss), backward, the optimiser (step, decoder
#: normalisation, removal of the parallel gradient), all-reduces between ranks, and the rest
#: (buffer shuffling, batch gathering, bookkeeping).
TIMING_KEYS = (
    "model_forward",
    "encoder",
    "decoder",
    "backward",
    "optimizer",
    "communication",
    "other",
)


class Timer:
    """Seconds per phase (:data:`TIMING_KEYS`), synchronising the device around each; a no-op
    (no synchronisation) unless enabled.
    """

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = dict.fromkeys(TIMING_KEYS, 0.0)
        self._null = nullcontext()

    def __call__(self, key: str) -> AbstractContextManager:
        """A context timing phase ``key`` (a no-op when disabled)."""
        return self._section(key) if self.enabled else self._null

    @contextmanager
    def _section(self, key: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[key] += time.perf_counter() - t0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def split(self, total: float) -> dict[str, float]:
        """The phases' seconds, ``"other"`` being what ``total`` leaves after the timed phases."""
        timings = dict(self.seconds)
        timings["other"] = 0.0
        timings["other"] = max(0.0, total - sum(timings.values()))
        return timings
