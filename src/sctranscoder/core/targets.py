"""What a circuit explains: a cell type's logit (its first distinguishing token) or a feature."""

from __future__ import annotations

import difflib
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._constants import is_feature_name, parse_feature_name
from .attribution import Target

if TYPE_CHECKING:
    from .model import C2SModel

logger = logging.getLogger(__name__)


def label_tokens(model: C2SModel, label: str) -> list[int]:
    """Token ids of an answer ``label`` as the model reads it after the prompt."""
    tok = model.tokenizer
    ids = tok(model.settings.answer_prefix + label, add_special_tokens=False)["input_ids"]
    unk = tok.unk_token_id
    if not label.strip() or not ids or (unk is not None and unk in ids):
        raise ValueError(
            f"The tokenizer cannot encode the label {label!r}; pass a label the model can answer"
            + (f" (it knows: {model.labels})." if model.labels else ".")
        )
    return ids


def check_label(model: C2SModel, label: str, label_token: str) -> None:
    """Refuse (``"distinct"``) or warn about (``"first"``) a label the model is not known to
    answer; nothing is checked when the model records no labels.
    """
    if not isinstance(label, str):
        raise TypeError(f"target must be a label or a feature name (a str), got {label!r}.")
    if not model.labels or label in model.labels:
        return
    close = difflib.get_close_matches(label, model.labels, n=3, cutoff=0.5)
    hint = f"did you mean {close}? " if close else ""
    if label_token == "distinct":
        raise ValueError(
            f"{label!r} is not a label the model answers ({model.labels}): {hint}Pass one of "
            "them, or label_token='first' to trace the first token of another label anyway."
        )
    logger.warning(
        "%r is not a label the model answers (%s); %stracing the first token of its answer",
        label,
        model.labels,
        hint,
    )


def resolve_target(
    model: C2SModel,
    genes: list[str],
    target: str | None,
    *,
    label_token: str = "distinct",
    subtract_mean: bool = True,
) -> tuple[Target, list[int], dict]:
    """The attribution target, the answer tokens to append to the prompt (teacher forcing), and
    a description of the target to store.

    ``target``: None (the model's predicted label), a label, or a feature name ``"L<l>F<j>"``
    (its pre-activation at the last prompt token). For a label, ``label_token="distinct"``
    targets the first token at which it differs from every other label the model knows, after
    feeding the shared prefix as the start of the answer; ``"first"`` its first token.
    """
    if label_token not in ("first", "distinct"):
        raise ValueError(f"label_token must be 'first' or 'distinct', got {label_token!r}.")
    if target is not None and is_feature_name(target):
        layer, feature = parse_feature_name(target)
        info = {"kind": "feature", "label": "", "layer": layer, "feature": feature}
        return Target(kind="feature", layer=layer, feature=feature), [], info
    if target is not None:
        check_label(model, target, label_token)
    predicted = model.predict([genes])[0]
    label = predicted if target is None else target
    ids = label_tokens(model, label)
    prefix_len = 0
    if label_token == "distinct" and model.labels:
        others = [label_tokens(model, lab) for lab in model.labels if lab != label]
        # first position where no other label shares the label's tokens so far
        while prefix_len < len(ids) - 1 and any(
            o[: prefix_len + 1] == ids[: prefix_len + 1] for o in others
        ):
            prefix_len += 1
    token = ids[prefix_len]
    info = {
        "kind": "logit",
        "label": label,
        "predicted": predicted,
        "token": model.tokenizer.decode([token]),
        "token_id": int(token),
        "answer_prefix": model.tokenizer.decode(ids[:prefix_len]),
        "subtract_mean": bool(subtract_mean),
    }
    return (
        Target(kind="logit", token=int(token), subtract_mean=subtract_mean),
        ids[:prefix_len],
        info,
    )


def teacher_forced(
    model: C2SModel, genes: list[str], answer_ids: list[int]
) -> tuple[torch.Tensor, np.ndarray]:
    """Token ids of the prompt of ``genes`` followed by ``answer_ids``, and the gene index of
    every token (-1 for prompt text and answer).
    """
    batch = model.tokenize([genes])
    n = int(batch.lengths[0])
    ids = torch.cat([batch.input_ids[0, :n], torch.as_tensor(answer_ids, dtype=torch.long)])
    gene_index = np.concatenate([batch.gene_index[0, :n].numpy(), np.full(len(answer_ids), -1)])
    return ids, gene_index
