"""Reading MLP inputs and outputs: what the shortcuts of the forward pass leave unchanged.

A right-padded batch runs without an attention mask (:func:`causal_mask`), and a parallel-residual
GPT-NeoX stops before its top block's attention; the recorded MLP inputs and outputs at real
tokens must be those of a full, masked forward pass.
"""

from __future__ import annotations

import pytest
import torch
from _models import random_prompts, tiny_gpt2, tiny_neox

from sctranscoder.core.hooks import capture_mlp_io, causal_mask, run_to_layers
from sctranscoder.core.model import mlp_modules


def _full_forward(model, ids, mask, layers):
    """MLP inputs/outputs of ``layers`` from the whole model with its mask (no shortcut)."""
    got = {}
    handles = [
        mlp_modules(model)[la].register_forward_hook(
            lambda _m, inp, out, la=la: got.__setitem__(la, (inp[0], out))
        )
        for la in layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def test_causal_mask_drops_only_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert causal_mask(right) is None
    assert causal_mask(torch.ones(2, 3, dtype=torch.long)) is None
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert causal_mask(left) is left  # a real token after padding: the mask is needed
    weighted = torch.tensor([[1, 4, 4, 0]])  # answer weights: still right-padded
    assert causal_mask(weighted) is None
    assert causal_mask(right.to("meta")) is not None  # device masks are not inspected


@pytest.mark.parametrize(
    ("make", "parallel"),
    [
        (lambda: tiny_neox(n_layers=3), True),
        (lambda: tiny_neox(n_layers=3, parallel_residual=False), False),
        (lambda: tiny_gpt2(n_layers=3), False),
    ],
)
@pytest.mark.parametrize("layers", [[0, 2], [1]])
def test_shortcuts_record_what_the_full_forward_computes(make, parallel, layers):
    model = make()
    ids, mask = next(random_prompts(3, batch=5, seq=40))
    real = mask.bool()
    want = _full_forward(model, ids, mask, layers)
    calls = []
    blocks = getattr(getattr(model, "gpt_neox", None), "layers", None)
    if blocks is None:
        blocks = model.transformer.h
    top_attention = getattr(blocks[max(layers)], "attention", None) or blocks[max(layers)].attn
    handle = top_attention.register_forward_hook(lambda *_: calls.append(1))
    try:
        with capture_mlp_io(model, layers) as store:
            run_to_layers(model, ids, causal_mask(mask))
            got = dict(store)
    finally:
        handle.remove()
    for layer in layers:
        for a, b in zip(got[layer], want[layer], strict=True):
            torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-6)
    # the top block's attention is skipped exactly when the MLP reads the block's input
    assert (len(calls) == 0) == parallel


def test_a_bare_gpt_neox_base_model_is_read_the_same_way():
    lm = tiny_neox(n_layers=2)
    base = lm.gpt_neox  # GPTNeoXModel, without the LM head
    ids, mask = next(random_prompts(4, batch=3, seq=20))
    real = mask.bool()
    with capture_mlp_io(lm, [1]) as store:
        run_to_layers(lm, ids, causal_mask(mask))
        want = dict(store)
    with capture_mlp_io(base, [1]) as store:
        run_to_layers(base, ids, causal_mask(mask))
        got = dict(store)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a[real], b[real])
