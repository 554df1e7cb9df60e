"""Transcoder training: settings (:mod:`.config`), the token stream (:mod:`.buffer`), the losses
(:mod:`.losses`), the trainer (:mod:`.trainer`) and its checkpoints (:mod:`.checkpoint`). Torch
only.
"""

from .buffer import ShuffleBuffer, TokenBatch, harvest
from .config import AUTOCAST_DTYPES, KERNELS, TrainingConfig
from .timer import TIMING_KEYS
from .trainer import LOG_EVERY, Trainer, TrainingLog, train_transcoders

__all__ = [
    "AUTOCAST_DTYPES",
    "KERNELS",
    "LOG_EVERY",
    "TIMING_KEYS",
    "ShuffleBuffer",
    "TokenBatch",
    "Trainer",
    "TrainingConfig",
    "TrainingLog",
    "harvest",
    "train_transcoders",
]
