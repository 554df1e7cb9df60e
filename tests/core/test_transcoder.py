"""The transcoder (TopK, ReLU, skip), its training core and the whole-model evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import TINY_VOCAB, random_prompts, tiny_neox

from sctranscoder.core import evaluation
from sctranscoder.core.evaluation import layer_metrics, replacement_metrics
from sctranscoder.core.hooks import replace_mlp_outputs
from sctranscoder.core.training import TrainingConfig, train_transcoders
from sctranscoder.core.transcoder import Transcoder, TranscoderConfig

CPU = torch.device("cpu")
D = 64  # width of the tiny model
LAYERS = [0, 1]
#: Small enough for a few seconds per run; 5000 is not a multiple of the batch on purpose.
TRAIN = {"n_tokens": 5000, "batch_size": 256, "buffer_tokens": 2048}


def _transcoder(activation="topk", *, k=8, skip=False, d_in=16, d_out=12, n_features=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = TranscoderConfig(d_in, d_out, n_features, activation=activation, k=k, skip=skip)
    tc = Transcoder(cfg, generator=gen)
    with torch.no_grad():
        # a positive encoder bias: every pre-activation of the test inputs is positive, so TopK
        # always has k candidates and its sparsity is exactly k
        tc.b_enc.copy_(torch.rand(n_features, generator=gen) + 10.0)
        tc.b_dec.copy_(torch.randn(d_out, generator=gen))
        if skip:
            tc.W_skip.copy_(torch.randn(d_out, d_in, generator=gen))
    return tc


def _inputs(tc, *shape, seed=1):
    return torch.randn(*shape, tc.config.d_in, generator=torch.Generator().manual_seed(seed))


def _heldout(n: int = 4):
    stream = random_prompts(12345)
    return [next(stream) for _ in range(n)]


def _train(model, seed=0, **overrides):
    config = TrainingConfig(**{**TRAIN, "seed": seed, **overrides})
    return train_transcoders(
        model, random_prompts(seed), layers=LAYERS, config=config, d_in=D, d_out=D, progress=False
    )


@pytest.fixture(scope="module")
def neox():
    """A random 2-layer GPT-NeoX (not the embedded model of ``conftest.model``)."""
    return tiny_neox(n_layers=2, d=D)


@pytest.fixture(scope="module")
def neox_trained(neox):
    """Transcoders of both layers of :func:`neox`, trained on random prompts, and their log."""
    return _train(neox, seed=0)


# -- the transcoder itself ---------------------------------------------------------------------


def test_topk_keeps_exactly_k_features_per_token():
    tc = _transcoder("topk", k=8)
    x = _inputs(tc, 5, 7)
    acts = tc.encode(x)
    assert acts.shape == (5, 7, 64)
    assert ((acts > 0).sum(-1) == 8).all()
    # the kept features are the largest pre-activations
    pre = tc.pre_activations(x)
    kth = pre.topk(8, dim=-1).values[..., -1:]
    assert torch.equal(acts > 0, pre >= kth)


def test_topk_dense_and_sparse_paths_agree():
    tc = _transcoder("topk", k=8)
    x = _inputs(tc, 5, 7)
    values, indices = tc.encode_sparse(x)
    assert values.shape == indices.shape == (5, 7, 8)
    dense = torch.zeros(5, 7, 64).scatter_(-1, indices, values)
    assert torch.equal(tc.encode(x), dense)
    y = tc.decode(tc.encode(x))
    torch.testing.assert_close(tc.decode_sparse(values, indices), y)
    torch.testing.assert_close(tc(x), y)
    torch.testing.assert_close(y, tc.encode(x) @ tc.W_dec + tc.b_dec)


def test_skip_connection_adds_w_skip_x():
    tc = _transcoder("topk", k=8, skip=True)
    x = _inputs(tc, 10)
    acts = tc.encode(x)
    expected = acts @ tc.W_dec + tc.b_dec + x @ tc.W_skip.T
    torch.testing.assert_close(tc(x), expected)
    torch.testing.assert_close(tc.decode(acts, x), expected)
    with pytest.raises(ValueError, match="skip connection"):
        tc.decode(acts)
    with pytest.raises(ValueError, match="skip connection"):
        tc.decode_sparse(*tc.encode_sparse(x))


def test_relu_encodes_relu_of_pre_activations():
    tc = _transcoder("relu")
    with torch.no_grad():
        tc.b_enc.zero_()  # some pre-activations negative
    x = _inputs(tc, 20)
    pre = tc.pre_activations(x)
    assert (pre < 0).any()
    assert (pre > 0).any()
    torch.testing.assert_close(tc.encode(x), F.relu(pre))
    torch.testing.assert_close(tc(x), tc.decode(tc.encode(x)))
    values, indices = tc.encode_sparse(x)
    torch.testing.assert_close(tc.decode_sparse(values, indices), tc(x))


def test_normalize_decoder_keeps_relu_output():
    tc = _transcoder("relu")
    with torch.no_grad():
        tc.W_dec.mul_(torch.rand(64, 1) * 3 + 0.1)  # rows of different norms
    x = _inputs(tc, 20)
    before = tc(x)
    tc.normalize_decoder()
    torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(tc(x), before, rtol=1e-5, atol=1e-5)


def test_normalize_decoder_keeps_topk_output_under_uniform_scale():
    # TopK selection is invariant to scaling every feature by the same factor (a row-dependent
    # rescale can change which features win, so only the uniform case is exact)
    tc = _transcoder("topk", k=8)
    with torch.no_grad():
        tc.W_dec.mul_(2.5)
    x = _inputs(tc, 20)
    before, selected = tc(x), tc.encode(x) > 0
    tc.normalize_decoder()
    torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(tc.encode(x) > 0, selected)
    torch.testing.assert_close(tc(x), before, rtol=1e-5, atol=1e-5)


def test_numpy_round_trip_and_shape_check():
    tc = _transcoder("topk", k=8, skip=True)
    weights = tc.to_numpy()
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}
    assert all(w.dtype == np.float32 for w in weights.values())
    back = Transcoder.from_numpy(tc.config, weights)
    x = _inputs(tc, 6)
    assert torch.equal(back(x), tc(x))

    bad = dict(weights, W_enc=weights["W_enc"][:, :-1])
    with pytest.raises(ValueError, match="W_enc"):
        Transcoder.from_numpy(tc.config, bad)
    with pytest.raises(ValueError, match="W_skip"):
        Transcoder.from_numpy(tc.config, {k: v for k, v in weights.items() if k != "W_skip"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "gelu"}, "activation"),
        ({"activation": "topk", "k": 65}, "k must be"),
        ({"activation": "topk", "k": 0}, "k must be"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TranscoderConfig(d_in=8, d_out=8, n_features=64, **kwargs)


# -- training ----------------------------------------------------------------------------------


def test_training_lowers_fvu_and_counts_tokens(neox_trained):
    tcs, log = neox_trained
    assert sorted(tcs) == LAYERS
    steps = math.ceil(TRAIN["n_tokens"] / TRAIN["batch_size"])
    assert log.steps == steps
    assert log.tokens == steps * TRAIN["batch_size"]
    for layer in LAYERS:
        assert len(log.fvu[layer]) == len(log.loss[layer]) == steps
        assert log.fvu[layer][-1] < 0.5 * log.fvu[layer][0]
        assert 0.0 <= log.dead_fraction[layer] <= 1.0
        assert not tcs[layer].W_enc.requires_grad
        # TopK decoders start at zero and are free: features that were used grew an output
        norms = tcs[layer].W_dec.norm(dim=1)
        assert (norms > 0).float().mean() > 1 - log.dead_fraction[layer] - 0.05


def test_trained_transcoders_explain_heldout_tokens(neox, neox_trained):
    tcs, _ = neox_trained
    metrics = layer_metrics(neox, tcs, _heldout(), device=CPU)
    n_real = sum(int(mask.sum()) for _, mask in _heldout())
    for layer in LAYERS:
        m = metrics[layer]
        assert m["n_tokens"] == n_real  # padding is left out
        assert m["fvu"] < 0.6
        assert 0 < m["l0"] <= TrainingConfig().k


def test_training_is_seeded(neox, neox_trained):
    tcs, _ = neox_trained
    again, _ = _train(neox, seed=0)
    other, _ = _train(neox, seed=1)
    for layer in LAYERS:
        for name, p in tcs[layer].state_dict().items():
            assert torch.equal(again[layer].state_dict()[name], p), name
        assert not torch.equal(other[layer].W_enc, tcs[layer].W_enc)
        assert not torch.equal(other[layer].W_dec, tcs[layer].W_dec)


def test_relu_training_and_l1_controls_sparsity(neox):
    l0 = {}
    for l1 in (0.0, 3e-2):
        tcs, log = _train(neox, activation="relu", lr=1e-3, l1_coefficient=l1)
        for layer in LAYERS:
            assert log.fvu[layer][-1] < log.fvu[layer][0]
            # ReLU keeps unit-norm decoder rows (its L1 penalty is on activation x norm)
            torch.testing.assert_close(tcs[layer].W_dec.norm(dim=1), torch.ones(8 * D))
        metrics = layer_metrics(neox, tcs, _heldout(), device=CPU)
        l0[l1] = [metrics[layer]["l0"] for layer in LAYERS]
    assert all(hi < 0.8 * lo for lo, hi in zip(l0[0.0], l0[3e-2], strict=True)), l0


def test_too_few_tokens_for_one_batch(neox):
    ids, mask = next(random_prompts(0))
    config = TrainingConfig(n_tokens=1024, batch_size=1024)
    assert int(mask.sum()) < 1024
    with pytest.raises(ValueError, match="batch_size"):
        train_transcoders(
            neox, [(ids, mask)], layers=LAYERS, config=config, d_in=D, d_out=D, progress=False
        )


# -- whole-model evaluation -------------------------------------------------------------------


@torch.no_grad()
def _greedy_prompts(model, *, n: int = 4, prompt: int = 4, total: int = 24):
    """Sequences the model itself continues greedily: removing its MLPs must cost cross-entropy."""
    ids = torch.randint(2, TINY_VOCAB, (n, prompt), generator=torch.Generator().manual_seed(7))
    while ids.shape[1] < total:
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # one right-padded prompt
    return [(ids, mask)]


def test_identity_replacement_leaves_logits_unchanged(neox):
    ids, mask = _greedy_prompts(neox)[0]
    original = neox(input_ids=ids, attention_mask=mask).logits
    with replace_mlp_outputs(neox, {layer: (lambda _x, out: out) for layer in LAYERS}):
        same = neox(input_ids=ids, attention_mask=mask).logits
    with replace_mlp_outputs(neox, {1: (lambda _x, out: torch.zeros_like(out))}):
        ablated = neox(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(same, original)
    assert not torch.allclose(ablated, original)
    # hooks are removed on exit
    assert torch.equal(neox(input_ids=ids, attention_mask=mask).logits, original)


def test_perfect_replacement_recovers_all_cross_entropy(neox, neox_trained, monkeypatch):
    monkeypatch.setattr(
        evaluation,
        "replacement_hooks",
        lambda transcoders: {layer: (lambda _x, out: out) for layer in transcoders},
    )
    m = replacement_metrics(neox, neox_trained[0], _greedy_prompts(neox), device=CPU)
    assert m["ce_removed"] > m["ce_original"]
    assert m["ce_replaced"] == pytest.approx(m["ce_original"], abs=1e-6)
    assert m["kl_replaced"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_removed"] > 0
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_replacement_metrics_fields(neox, neox_trained):
    batches = _greedy_prompts(neox) + _heldout(2)
    m = replacement_metrics(neox, neox_trained[0], batches, device=CPU)
    # next-token predictions inside each prompt, padding excluded
    n = sum(int((mask[:, 1:] * mask[:, :-1]).sum()) for _, mask in batches)
    assert m["n_tokens"] == n
    # the original model's cross-entropy, computed independently
    ce = 0.0
    for ids, mask in batches:
        logits = neox(input_ids=ids, attention_mask=mask).logits[:, :-1]
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        ce += float(F.cross_entropy(logits[valid], ids[:, 1:][valid], reduction="sum"))
    assert m["ce_original"] == pytest.approx(ce / n, rel=1e-5)
    assert m["kl_replaced"] >= 0
    assert m["kl_removed"] >= 0
    expected = (m["ce_removed"] - m["ce_replaced"]) / (m["ce_removed"] - m["ce_original"])
    assert m["ce_recovered"] == pytest.approx(expected)
