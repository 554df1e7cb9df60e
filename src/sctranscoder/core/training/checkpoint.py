"""Checkpoints of transcoder training: written every so many tokens, read to resume a run.

A checkpoint is one file, ``<checkpoint_dir>/checkpoint.pt`` (:data:`FILENAME`), written by
``torch.save`` to a temporary sibling and renamed over the previous one
(:func:`~sctranscoder.core.files.atomic_file`): a run killed while writing leaves the previous
checkpoint whole. It holds what identifies the run (:func:`run_header`: the training config,
layers, widths, number of ranks and the caller's ``identity``, e.g. the model's fingerprint),
the trainer's state (:meth:`Trainer.state_dict <.trainer.Trainer.state_dict>`: transcoders,
Adam, dead-feature counters, the log so far) and, per rank, the shuffle buffer's state
(:meth:`ShuffleBuffer.state_dict <.buffer.ShuffleBuffer.state_dict>`: generator, the rows kept
for the next round, prompt batches read). Checkpoints are taken between buffer rounds, when the
buffer holds fewer rows than a batch, so the buffer is never saved whole.

It is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
only, never arbitrary code. Under ``torch.distributed`` the ranks' buffer states are gathered to
rank 0, which writes; on resume every rank reads the file (on a file system all ranks see) and
takes its own part. Torch only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed as dist
from ..files import atomic_file

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence

    from .buffer import ShuffleBuffer
    from .config import TrainingConfig
    from .trainer import Trainer

logger = logging.getLogger(__name__)

#: The checkpoint's file in ``checkpoint_dir``.
FILENAME = "checkpoint.pt"
#: ``format`` of a checkpoint, and the version of its layout.
FORMAT, VERSION = "sctranscoder.training_checkpoint", 1
#: :class:`TrainingConfig` fields a resumed run may change: they do not change the numbers.
MAY_DIFFER = frozenset({"profile", "stack_layers"})  # the header holds the resolved one


def checkpoint_file(checkpoint_dir: str | os.PathLike) -> Path:
    """The checkpoint file of ``checkpoint_dir``."""
    return Path(checkpoint_dir) / FILENAME


def default_every(config: TrainingConfig) -> int:
    """Tokens between checkpoints when none is given: a tenth of ``n_tokens`` (at least a
    batch).
    """
    return max(config.batch_size, config.n_tokens // 10)


def check_arguments(
    checkpoint_dir: str | os.PathLike | None, checkpoint_every: int | None, resume: bool
) -> None:
    """Refuse inconsistent checkpoint arguments before anything runs or is written.

    ``resume=True`` needs a checkpoint in ``checkpoint_dir``; a new run needs a
    ``checkpoint_dir`` without one (a run never overwrites another's checkpoint).
    """
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
    ):
        raise TypeError(f"checkpoint_every must be an int (tokens), got {checkpoint_every!r}.")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 token, got {checkpoint_every}.")
    if checkpoint_dir is None:
        if resume:
            raise ValueError(
                "resume=True continues the checkpoint of an earlier run: pass its directory as "
                "checkpoint_dir=."
            )
        if checkpoint_every is not None:
            raise ValueError(
                "checkpoint_every needs a directory to write to: pass checkpoint_dir= as well."
            )
        return
    if Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise NotADirectoryError(
            f"checkpoint_dir {checkpoint_dir} is a file: pass a directory (it is created if "
            "needed)."
        )
    path = checkpoint_file(checkpoint_dir)
    if resume and not path.is_file():
        raise FileNotFoundError(
            f"resume=True, but {checkpoint_dir} holds no checkpoint ({FILENAME} not found): pass "
            "the checkpoint_dir of the interrupted run, or resume=False to start a new one."
        )
    if not resume and path.exists():
        raise FileExistsError(
            f"{checkpoint_dir} already holds a training checkpoint: pass resume=True to continue "
            "that run, or choose another checkpoint_dir (a new run never overwrites one)."
        )


def run_header(
    config: TrainingConfig,
    layers: Sequence[int],
    *,
    d_in: int,
    d_out: int,
    identity: Mapping[str, Any] | None = None,
    stacked: bool = False,
) -> dict[str, Any]:
    """What identifies a run, stored in its checkpoints and compared on resume: the config
    (but :data:`MAY_DIFFER`), layers, widths, whether the layers train stacked (the optimiser's
    state is laid out differently; :mod:`.stacked`), number of ranks and ``identity`` (strings
    and numbers, e.g. ``{"model_fingerprint": ...}``).
    """
    return {
        "config": {k: v for k, v in config.to_dict().items() if k not in MAY_DIFFER},
        "layers": [int(layer) for layer in layers],
        "d_in": int(d_in),
        "d_out": int(d_out),
        "stacked": bool(stacked),
        "world_size": dist.world_size(),
        "identity": dict(identity or {}),
    }


class Checkpoints:
    """The checkpoints of one run, in ``directory``: due at the first round boundary after
    every ``every`` tokens (over all ranks); :meth:`save` gathers the ranks' buffer states and
    rank 0 writes; :meth:`load` reads and validates a checkpoint to resume from.

    Parameters
    ----------
    directory
        Where :data:`FILENAME` is written (created when needed).
    every
        Training tokens between checkpoints.
    header
        The run's :func:`run_header`.
    device
        The training device (NCCL gathers through it).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int,
        header: dict[str, Any],
        device: torch.device,
    ):
        self.directory = Path(directory)
        self.path = checkpoint_file(directory)
        self.every = int(every)
        self.header = header
        self.device = device
        self._next = self.every

    def due(self, tokens: int) -> bool:
        """Whether ``tokens`` trained tokens call for a checkpoint."""
        return tokens >= self._next

    def _advance(self, tokens: int) -> None:
        self._next = (tokens // self.every + 1) * self.every

    def save(self, trainer: Trainer, buffer: ShuffleBuffer, *, seconds: float) -> None:
        """Write the state of ``trainer`` and every rank's ``buffer`` (collective: every rank
        calls it at the same step), ``seconds`` of training so far. Rank 0 writes.
        """
        t0 = time.perf_counter()
        trainer.log.seconds = seconds
        state = trainer.state_dict()  # flushes the loss curves: an all-reduce
        parts = dist.gather_object(buffer.state_dict(), self.device)
        self._advance(trainer.log.tokens)
        if dist.rank() != 0:
            return
        doc = {"format": FORMAT, "version": VERSION, **self.header, "trainer": state}
        doc["ranks"] = parts
        with atomic_file(self.path) as tmp:
            torch.save(doc, tmp)
        logger.info(
            "checkpoint at step %d (%d tokens): %s, %.1f MiB in %.2f s",
            trainer.log.steps,
            trainer.log.tokens,
            self.path,
            self.path.stat().st_size / 2**20,
            time.perf_counter() - t0,
        )

    def load(self) -> dict[str, Any]:
        """The checkpoint to resume from, validated against this run's header: ``"trainer"``
        (for :meth:`Trainer.load_state_dict <.trainer.Trainer.load_state_dict>`) and ``"rank"``,
        this rank's buffer state. Tensors are on the CPU.
        """
        doc = read(self.path)
        check_header(doc, self.header, self.directory)
        self._advance(int(doc["trainer"]["log"]["tokens"]))
        return {"trainer": doc["trainer"], "rank": doc["ranks"][dist.rank()]}


def read(path: Path) -> dict[str, Any]:
    """The checkpoint in ``path`` as written (``weights_only``: no code is run), or a clear
    error when it is damaged, not a checkpoint, or of a newer layout.
    """
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{path} cannot be read as a training checkpoint ({type(err).__name__}: "
            f"{first_line}): it is damaged or was not written by sctranscoder. Delete it, or "
            "choose another checkpoint_dir, to start a new run."
        ) from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a training checkpoint of sctranscoder: delete it, or choose another "
            "checkpoint_dir, to start a new run."
        )
    if int(doc.get("version", 0)) > VERSION:
        raise ValueError(
            f"{path} was written by a newer sctranscoder (checkpoint version {doc['version']}, "
            f"this one reads up to {VERSION}): upgrade sctranscoder to resume it."
        )
    return doc


def check_header(doc: dict[str, Any], header: dict[str, Any], directory: Path) -> None:
    """Refuse to resume a checkpoint written by a different run, naming every difference."""
    if doc["world_size"] != header["world_size"]:
        raise ValueError(
            f"The checkpoint in {directory} was written by {doc['world_size']} rank(s) and this "
            f"run has {header['world_size']}: every rank's data position and shuffle buffer are "
            f"in it, so resume with {doc['world_size']} rank(s) (torchrun --nproc-per-node ...)."
        )
    diffs = []
    for name in sorted(set(doc["config"]) | set(header["config"])):
        then, now = doc["config"].get(name), header["config"].get(name)
        if then != now:
            diffs.append(f"config.{name} was {then!r}, is {now!r}")
    for name in ("layers", "d_in", "d_out", "stacked"):
        then, now = doc.get(name, False), header.get(name, False)  # no "stacked": per layer
        if then != now:
            diffs.append(f"{name} was {then!r}, is {now!r}")
    for name in sorted(set(doc["identity"]) | set(header["identity"])):
        then, now = doc["identity"].get(name), header["identity"].get(name)
        if then != now:
            diffs.append(f"{name} was {then!r}, is {now!r}")
    if diffs:
        raise ValueError(
            f"The checkpoint in {directory} was written by a different run: {'; '.join(diffs)}. "
            "Resume with the settings, layers, model and cells it was written with, or start a "
            "new run in another checkpoint_dir."
        )
