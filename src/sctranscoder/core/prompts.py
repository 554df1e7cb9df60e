"""Prompt streams for training and evaluation, and the seeded train/validation split. Torch only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import torch

    from .model import C2SModel


def prompt_batches(
    model: C2SModel,
    sentences: Sequence[Sequence[str]],
    cells: np.ndarray,
    *,
    batch_size: int,
    seed: int | None,
    repeat: bool,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenised prompts ``(input_ids, attention_mask)`` of ``cells``, ``batch_size`` at a time.

    With ``seed``, the cells are shuffled every epoch; with ``repeat``, epochs never end (the
    stream training draws from). ``start`` skips that many batches: the stream continues where
    one that yielded ``start`` batches stopped (what a resumed training run needs); skipping
    draws the skipped epochs' permutations and tokenises nothing.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}.")
    per_epoch = -(-len(cells) // batch_size)
    if per_epoch == 0:
        return
    epochs, skip = divmod(start, per_epoch)
    if epochs and not repeat:
        return
    rng = np.random.default_rng(seed)
    if seed is not None:
        for _ in range(epochs):  # the generator's state after the skipped epochs
            rng.permutation(cells)
    while True:
        order = rng.permutation(cells) if seed is not None else cells
        for first in range(skip * batch_size, len(order), batch_size):
            batch = model.tokenize([sentences[i] for i in order[first : first + batch_size]])
            yield batch.input_ids, batch.attention_mask
        skip = 0
        if not repeat:
            return


def split_cells(n_cells: int, validation_fraction: float, seed: int) -> np.ndarray:
    """Seeded boolean mask of validation cells: ``round(fraction * n)`` cells, at least one.

    Raises a ``ValueError`` when fewer than one training cell would remain.
    """
    n_val = max(1, round(validation_fraction * n_cells))
    if n_cells - n_val < 1:
        raise ValueError(f"Need at least 2 cells to train and validate, got {n_cells}.")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(n_cells, dtype=bool)
    is_val[rng.choice(n_cells, size=n_val, replace=False)] = True
    return is_val
