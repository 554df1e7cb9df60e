"""Prompt streams for training and evaluation, and the seeded train/validation split. Torch only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from .model import C2SModel
    from .tokens import TokenizedPrompts


def prompt_batches(
    model: C2SModel,
    sentences: Sequence[Sequence[str]],
    cells: np.ndarray,
    *,
    batch_size: int,
    seed: int | None,
    repeat: bool,
    start: int = 0,
    answers: Mapping[int, Sequence[int]] | None = None,
    answer_weight: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenised prompts ``(input_ids, attention_mask)`` of ``cells``, ``batch_size`` at a time.

    With ``seed``, the cells are shuffled every epoch; with ``repeat``, epochs never end (the
    stream training draws from). ``start`` skips that many batches: the stream continues where
    one that yielded ``start`` batches stopped (what a resumed training run needs); skipping
    draws the skipped epochs' permutations and tokenises nothing. With ``answers`` (token ids
    by cell, from :meth:`~sctranscoder.core.model.C2SModel.answer_tokens`), each prompt is
    followed by its cell's answer, teacher-forced (:func:`with_answers`; ``answer_weight`` is
    its ``weight``).
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
            chosen = order[first : first + batch_size]
            # training reads ids and masks only: no gene index (10 ms saved a batch of 16)
            batch = model.tokenize([sentences[i] for i in chosen], gene_index=False)
            if answers is None:
                yield batch.input_ids, batch.attention_mask
            else:
                pad = model.tokenizer.pad_token_id
                said = [answers[int(i)] for i in chosen]
                ids, mask, _ = with_answers(batch, said, pad, weight=answer_weight)
                yield ids, mask
        skip = 0
        if not repeat:
            return


def with_answers(
    batch: TokenizedPrompts,
    answers: Sequence[Sequence[int]],
    pad_id: int | None,
    *,
    weight: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt of ``batch`` followed by its answer's tokens, right-padded.

    The answer's last token (the stop token the model ended on, or the last one generated) is
    not fed: its position would predict nothing the answer needs. What is added are the
    positions at which the model reads its own answer, so that their MLP inputs and outputs are
    those of the model answering. Returns ``input_ids``, ``attention_mask`` and
    ``answer_mask``: the positions whose next token is an answer token (the last prompt token
    and every answer token fed), ``len(answers[i])`` of them in row ``i``.

    ``answers[i]`` is :meth:`~sctranscoder.core.model.C2SModel.answer_tokens`' output for
    prompt ``i``. With ``weight > 1`` the attention mask holds ``weight`` at the answer
    positions: training's harvest takes a token as many times as its mask value says
    (:func:`~sctranscoder.core.training.harvest`); give the model ``mask > 0``.
    """
    lengths = batch.lengths.tolist()
    if len(answers) != len(lengths):
        raise ValueError(f"{len(answers)} answers for {len(lengths)} prompts.")
    fed = [list(a[:-1]) for a in answers]
    longest = max(L + len(f) for L, f in zip(lengths, fed, strict=True))
    pad = pad_id if pad_id is not None else 0
    ids = torch.full((len(lengths), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), longest), dtype=torch.long)
    scored = torch.zeros((len(lengths), longest), dtype=torch.bool)
    for i, (L, f) in enumerate(zip(lengths, fed, strict=True)):
        ids[i, :L] = batch.input_ids[i, :L]
        ids[i, L : L + len(f)] = torch.as_tensor(f, dtype=torch.long)
        mask[i, : L + len(f)] = 1
        scored[i, L - 1 : L + len(f)] = True
    if weight != 1:
        mask[scored] = int(weight)
    return ids, mask, scored


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
