"""How good are the transcoders? Per layer (FVU, L0, dead features) and for the whole model.

Whole-model metrics follow Hosokawa et al. 2025 (Tables 1-2): next-token cross-entropy of the
original model, of the model with every MLP replaced by its transcoder, and with every MLP removed
(zero output); the KL divergences of the latter two to the original; and the fraction of
cross-entropy recovered, ``(CE_removed - CE_replaced) / (CE_removed - CE_original)``. Torch only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .hooks import replace_mlp_outputs
from .model import C2SModel, greedy_answers
from .prompts import with_answers
from .training import TokenBatch, harvest

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from .transcoder import Transcoder


@torch.no_grad()
def layer_metrics(
    model: nn.Module,
    transcoders: Mapping[int, Transcoder],
    batches: Iterable[TokenBatch],
    *,
    device: torch.device,
) -> dict[int, dict[str, float]]:
    """Per layer on the tokens of ``batches``: FVU, mean L0, dead fraction, firing counts.

    FVU is the summed squared error over the total variance of the MLP output (over all tokens).
    A feature is dead when it fires on none of the tokens.
    """
    layers = sorted(transcoders)
    acc = {
        layer: {
            "err": 0.0,
            "sum": None,
            "sumsq": 0.0,
            "n": 0,
            "l0": 0.0,
            "fired": torch.zeros(
                transcoders[layer].config.n_features, dtype=torch.long, device=device
            ),
        }
        for layer in layers
    }
    for xs, ys in harvest(model, batches, layers, device=device):
        for layer in layers:
            tc, a = transcoders[layer], acc[layer]
            x, y = xs[layer], ys[layer]
            acts = tc.encode(x)
            y_hat = tc.decode(acts, x)
            a["err"] += float((y_hat - y).double().pow(2).sum())
            s = y.double().sum(0)
            a["sum"] = s if a["sum"] is None else a["sum"] + s
            a["sumsq"] += float(y.double().pow(2).sum())
            a["n"] += y.shape[0]
            active = acts > 0
            a["l0"] += float(active.sum())
            a["fired"] += active.sum(0)
    out = {}
    for layer in layers:
        a = acc[layer]
        n = max(a["n"], 1)
        total_var = a["sumsq"] - float(a["sum"].pow(2).sum()) / n
        out[layer] = {
            "fvu": a["err"] / max(total_var, 1e-12),
            "l0": a["l0"] / n,
            "dead_fraction": float((a["fired"] == 0).float().mean()),
            "n_tokens": float(a["n"]),
        }
    return out


def replacement_hooks(transcoders: Mapping[int, Transcoder]):
    """Hooks for :func:`~sctranscoder.core.hooks.replace_mlp_outputs`: MLP -> transcoder."""
    return {layer: (lambda x, _out, tc=tc: tc(x.float())) for layer, tc in transcoders.items()}


def _ablation_hooks(layers: Sequence[int]):
    return {layer: (lambda _x, out: torch.zeros_like(out)) for layer in layers}


@torch.no_grad()
def replacement_metrics(
    model: nn.Module,
    transcoders: Mapping[int, Transcoder],
    batches: Iterable[TokenBatch],
    *,
    device: torch.device,
    ablate_layers: Sequence[int] | None = None,
) -> dict[str, float]:
    """Next-token CE and KL of the original, replaced and MLP-removed models on ``batches``.

    Every layer in ``transcoders`` is replaced at once; ``ablate_layers`` (default: the same
    layers) have their MLP output set to zero for the "removed" baseline. Tokens are the
    next-token predictions inside each prompt (padding excluded).
    """
    ablate = list(ablate_layers) if ablate_layers is not None else sorted(transcoders)
    sums = {
        "ce_original": 0.0,
        "ce_replaced": 0.0,
        "ce_removed": 0.0,
        "kl_replaced": 0.0,
        "kl_removed": 0.0,
    }
    n_tok = 0
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        target = ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).bool()

        def logprobs(mask=mask, ids=ids, valid=valid):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            return F.log_softmax(logits.float(), dim=-1)[valid]

        t = target[valid]
        lp_orig = logprobs()
        with replace_mlp_outputs(model, replacement_hooks(transcoders)):
            lp_rep = logprobs()
        with replace_mlp_outputs(model, _ablation_hooks(ablate)):
            lp_abl = logprobs()
        p_orig = lp_orig.exp()
        for name, lp in (("original", lp_orig), ("replaced", lp_rep), ("removed", lp_abl)):
            sums[f"ce_{name}"] += float(-lp.gather(1, t[:, None]).sum())
        sums["kl_replaced"] += float((p_orig * (lp_orig - lp_rep)).sum())
        sums["kl_removed"] += float((p_orig * (lp_orig - lp_abl)).sum())
        n_tok += int(valid.sum())
    if n_tok == 0:
        raise ValueError("No tokens to evaluate on.")
    out = {k: v / n_tok for k, v in sums.items()}
    gap = out["ce_removed"] - out["ce_original"]
    out["ce_recovered"] = (
        (out["ce_removed"] - out["ce_replaced"]) / gap if gap > 0 else float(np.nan)
    )
    out["n_tokens"] = float(n_tok)
    return out


@torch.no_grad()
def prediction_agreement(
    model: C2SModel,
    transcoders: Mapping[int, Transcoder],
    sentences: Sequence[Sequence[str]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 24,
) -> float:
    """Fraction of sentences whose greedy answer is the same with every MLP replaced."""
    hooks = replacement_hooks(transcoders)
    same, total = 0, 0
    for start in range(0, len(sentences), batch_size):
        batch = model.tokenize(sentences[start : start + batch_size])
        original = greedy_answers(model, batch, max_new_tokens=max_new_tokens)
        with replace_mlp_outputs(model.model, hooks):
            replaced = greedy_answers(model, batch, max_new_tokens=max_new_tokens)
        same += sum(a == b for a, b in zip(original, replaced, strict=True))
        total += len(original)
    return same / max(total, 1)


#: The keys of :func:`answer_metrics`.
ANSWER_METRICS = (
    "answer_ce_original",
    "answer_ce_replaced",
    "answer_kl_replaced",
    "answer_token_agreement",
    "answer_agreement",
    "answer_n_tokens",
)


@torch.no_grad()
def answer_metrics(
    model: C2SModel,
    transcoders: Mapping[int, Transcoder],
    sentences: Sequence[Sequence[str]],
    answers: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
) -> dict[str, float]:
    """How the replacement behaves where the model answers: at the positions that predict the
    tokens of the model's own greedy answer, fed teacher-forced after each prompt
    (:func:`~sctranscoder.core.prompts.with_answers`), with every MLP in ``transcoders`` replaced.

    Returns ``answer_ce_original`` and ``answer_ce_replaced`` (cross-entropy of the answer's
    tokens), ``answer_kl_replaced`` (KL of the replaced model's next-token distribution to the
    original's), ``answer_token_agreement`` (fraction of those positions where both models'
    most likely token is the same), ``answer_agreement`` (fraction of cells where it is the same
    at every position of the answer: exactly the cells whose greedy answer the replacement does
    not change, token for token) and ``answer_n_tokens`` (positions scored).
    """
    if len(answers) != len(sentences):
        raise ValueError(f"{len(answers)} answers for {len(sentences)} sentences.")
    hooks = replacement_hooks(transcoders)
    sums = dict.fromkeys(ANSWER_METRICS[:4], 0.0)
    n_tok, n_same_cells = 0, 0
    device = model.device
    for start in range(0, len(sentences), batch_size):
        batch = model.tokenize(sentences[start : start + batch_size])
        chunk = answers[start : start + batch_size]
        ids, mask, scored = with_answers(batch, chunk, model.tokenizer.pad_token_id)
        target = torch.zeros_like(ids)
        for i, (L, a) in enumerate(zip(batch.lengths.tolist(), chunk, strict=True)):
            target[i, L - 1 : L - 1 + len(a)] = torch.as_tensor(list(a), dtype=torch.long)
        ids, mask, scored, target = (t.to(device) for t in (ids, mask, scored, target))

        def logprobs(ids=ids, mask=mask):
            logits = model.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return F.log_softmax(logits.float(), dim=-1)

        lp_orig = logprobs()
        if hooks:
            with replace_mlp_outputs(model.model, hooks):
                lp_rep = logprobs()
        else:  # nothing replaced: the replaced model is the model
            lp_rep = lp_orig
        t = target[scored]
        o, r = lp_orig[scored], lp_rep[scored]
        sums["answer_ce_original"] += float(-o.gather(1, t[:, None]).sum())
        sums["answer_ce_replaced"] += float(-r.gather(1, t[:, None]).sum())
        sums["answer_kl_replaced"] += float((o.exp() * (o - r)).sum())
        same = lp_orig.argmax(-1) == lp_rep.argmax(-1)
        sums["answer_token_agreement"] += float(same[scored].sum())
        n_same_cells += int((same | ~scored).all(dim=1).sum())
        n_tok += int(scored.sum())
    if n_tok == 0:
        raise ValueError("No answer tokens to evaluate on.")
    out = {k: v / n_tok for k, v in sums.items()}
    out["answer_agreement"] = n_same_cells / len(sentences)
    out["answer_n_tokens"] = float(n_tok)
    return out
