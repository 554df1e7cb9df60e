"""Data-parallel transcoder training on ``torch.distributed`` (launched by ``torchrun``).

Every rank runs the frozen model on its own shard of the cells and trains identical copies of
the transcoders: parameters are broadcast from rank 0 after initialisation, and gradients are
averaged over ranks before every optimiser step, so all copies stay equal. Without an
initialised process group (or with one rank) every function here is a no-op, and single-process
code needs no special case. Torch only.

Launch with ``torchrun --nproc-per-node <n> your_script.py`` (one process per GPU, backend
``nccl``; ``gloo`` on CPU) and call ``torch.distributed.init_process_group()`` first.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import numpy as np

__all__ = [
    "all_reduce_",
    "average_gradients",
    "broadcast_module",
    "broadcast_object",
    "default_device",
    "gather_object",
    "is_distributed",
    "rank",
    "shard",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """The rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def shard(items: Sequence | np.ndarray) -> Sequence | np.ndarray:
    """The share of ``items`` of this rank: every ``world_size``-th item, from position ``rank``.

    Shards are disjoint, cover ``items`` and differ in length by at most one.
    """
    return items[rank() :: world_size()]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from rank ``src`` to every rank, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def _coalesced(tensors: list[torch.Tensor], op: dist.ReduceOp, scale: float | None) -> None:
    """All-reduce same-dtype, same-device tensors through one flat buffer."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op)
    if scale is not None:
        flat.mul_(scale)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_(tensors: Iterable[torch.Tensor], op: str = "sum", *, mean: bool = False) -> None:
    """All-reduce ``tensors`` in place (``op``: ``"sum"``, ``"max"`` or ``"min"``).

    Tensors are grouped by dtype and device and reduced one flat buffer per group, so a step
    costs one collective per group, not one per tensor. ``mean=True`` divides a sum by the
    number of ranks.
    """
    if not is_distributed():
        return
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}.")
    if mean and op != "sum":
        raise ValueError("mean=True needs op='sum'.")
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    scale = 1.0 / world_size() if mean else None
    for group in groups.values():
        _coalesced(group, ops[op], scale)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks (parameters without a gradient skipped)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if any(g.is_sparse for g in grads):
        raise ValueError("average_gradients takes dense gradients only.")
    all_reduce_(grads, "sum", mean=True)


def broadcast_object(obj: Any, device: torch.device | None = None) -> Any:
    """``obj`` as rank 0 has it (a small picklable object); ``obj`` itself without ranks.

    NCCL moves the pickled object through the rank's GPU (pass its ``device``); gloo through the
    CPU.
    """
    if not is_distributed():
        return obj
    box = [obj]
    cuda = device is not None and torch.device(device).type == "cuda"
    dist.broadcast_object_list(box, src=0, device=torch.device(device) if cuda else None)
    return box[0]


def gather_object(obj: Any, device: torch.device | None = None) -> list[Any] | None:
    """Every rank's ``obj`` (picklable; tensors on the CPU), as a list by rank on rank 0 and
    ``None`` on the others; ``[obj]`` without ranks. Devices as in :func:`broadcast_object`.
    """
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    cuda = device is not None and torch.device(device).type == "cuda"
    # NCCL moves the pickled objects through the current CUDA device
    with torch.cuda.device(torch.device(device)) if cuda else contextlib.nullcontext():
        dist.gather_object(obj, out, dst=0)
    return out


def default_device() -> str | None:
    """``cuda:<LOCAL_RANK>`` in data-parallel runs with CUDA, else None (keep the model's)."""
    if not is_distributed() or not torch.cuda.is_available():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", rank()))
    return f"cuda:{local_rank % torch.cuda.device_count()}"
