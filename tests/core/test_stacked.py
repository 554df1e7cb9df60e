"""Stacked training (all layers in one batched step) against the per-layer float32 path, on the
CPU: the kernels, a whole training run, checkpoints and the choice of path.

Tolerances are stated where they are used.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import random_prompts, tiny_neox

from sctranscoder.core.topk import sparse_decode, stacked_topk, topk_encode
from sctranscoder.core.training import TrainingConfig, train_transcoders
from sctranscoder.core.training import checkpoint as ckpt
from sctranscoder.core.training.stacked import StackedTranscoders, use_stacked
from sctranscoder.core.transcoder import Transcoder, TranscoderConfig

D = 64
LAYERS = [0, 1]
#: 20 steps, AuxK from the start (features dead after 512 tokens)
TRAIN = {"n_tokens": 5000, "batch_size": 256, "buffer_tokens": 2048, "dead_tokens": 512}
#: float32, stacked vs per layer: relative (Frobenius) error bound of outputs and gradients
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def _weights(L=3, n=200, d_in=24, d_out=20, n_features=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(L, n, d_in, generator=gen)
    W_enc = torch.randn(L, n_features, d_in, generator=gen) / d_in**0.5
    b_enc = 0.3 * torch.randn(L, n_features, generator=gen)
    W_dec = torch.randn(L, n_features, d_out, generator=gen)
    y = torch.randn(L, n, d_out, generator=gen)
    return x, W_enc, b_enc, W_dec, y


@pytest.mark.parametrize("with_dead", [False, True])
def test_stacked_kernels_match_the_per_layer_kernels(with_dead):
    x, W_enc, b_enc, W_dec, y = _weights()
    L, n_features = W_enc.shape[:2]
    k, k_aux = 12, 10
    dead = None
    if with_dead:  # layer 0: 3 dead features (fewer than k_aux); layer 1: none; layer 2: 40
        dead = torch.zeros(L, n_features, dtype=torch.bool)
        dead[0, [3, 50, 201]] = True
        dead[2, torch.arange(0, 200, 5)] = True
    leaves = [t.clone().requires_grad_() for t in (W_enc, b_enc, W_dec)]
    out = stacked_topk(x, *leaves, k, dead=dead, k_aux=k_aux)
    y_dec, values, indices, aux_y = out[:4]
    loss = (y_dec - y).pow(2).sum()
    if with_dead:  # AuxK only where features are dead (as the trainer scales it)
        has_dead = dead.any(1).to(y.dtype).view(L, 1, 1)
        loss = loss + 0.1 * (has_dead * (aux_y - (y - y_dec).detach()).pow(2)).sum()
    loss.backward()

    ref_loss = 0.0
    for layer in range(L):
        we, be, wd = (t[layer].clone().requires_grad_() for t in (W_enc, b_enc, W_dec))
        layer_dead = None if dead is None or not dead[layer].any() else dead[layer]
        if layer_dead is None:
            v, i = topk_encode(x[layer], we, be, k)
        else:
            v, i, av, ai = topk_encode(x[layer], we, be, k, dead=layer_dead, k_aux=k_aux)
        yd = sparse_decode(v, i, wd)
        ll = (yd - y[layer]).pow(2).sum()
        if layer_dead is not None:
            ll = ll + 0.1 * (sparse_decode(av, ai, wd) - (y[layer] - yd).detach()).pow(2).sum()
        ll.backward()
        ref_loss += float(ll.detach())
        # the same features per token, the same values and output
        assert torch.equal(indices[layer].sort(-1).values, i.sort(-1).values)
        assert _rel(values[layer].sort(-1).values, v.sort(-1).values) < RTOL
        assert _rel(y_dec[layer], yd) < RTOL
        for name, got, want in zip(("W_enc", "b_enc", "W_dec"), leaves, (we, be, wd), strict=True):
            assert _rel(got.grad[layer], want.grad) < RTOL, (layer, name)
    assert abs(float(loss.detach()) - ref_loss) < 1e-5 * ref_loss


def _train(
    model, *, checkpoint_dir=None, checkpoint_every=None, resume=False, callback=None, **overrides
):
    config = TrainingConfig(**{**TRAIN, **overrides})
    return train_transcoders(
        model, random_prompts(0), layers=LAYERS, config=config, d_in=D, d_out=D, progress=False,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
        callback=callback,
    )  # fmt: skip


@pytest.fixture(scope="module")
def neox():
    return tiny_neox(n_layers=2, d=D)


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_stacked_training_matches_per_layer_training(neox, kernels):
    stacked_tcs, stacked = _train(neox, stack_layers=True, kernels=kernels)
    layer_tcs, per_layer = _train(neox, stack_layers=False, kernels=kernels)
    assert (stacked.steps, stacked.tokens) == (per_layer.steps, per_layer.tokens) == (20, 5120)
    for layer in LAYERS:
        # same start, gradients equal to float rounding: the first steps agree closely (AuxK
        # included: features can be dead after 2 steps)...
        np.testing.assert_allclose(stacked.loss[layer][:5], per_layer.loss[layer][:5], rtol=1e-4)
        np.testing.assert_allclose(stacked.fvu[layer][:5], per_layer.fvu[layer][:5], rtol=1e-4)
        # ...and at the end (TopK choices may flip on rounding) the FVU within 2%
        s, p = np.mean(stacked.fvu[layer][-5:]), np.mean(per_layer.fvu[layer][-5:])
        assert abs(s - p) < 0.02 * p, (layer, s, p)
        assert stacked.dead_fraction[layer] == pytest.approx(
            per_layer.dead_fraction[layer], abs=0.05
        )
        # the stack comes back as ordinary frozen transcoders
        tc = stacked_tcs[layer]
        assert isinstance(tc, Transcoder)
        assert not tc.training
        assert not any(p.requires_grad for p in tc.parameters())
        assert tc.W_enc.shape == layer_tcs[layer].W_enc.shape


def test_stack_round_trips_per_layer_weights():
    config = TranscoderConfig(d_in=8, d_out=6, n_features=32, k=4, skip=True)
    gen = torch.Generator().manual_seed(1)
    tcs = {layer: Transcoder(config, generator=gen) for layer in (3, 5)}
    for tc in tcs.values():
        torch.nn.init.normal_(tc.W_dec)
        torch.nn.init.normal_(tc.W_skip)
    stack = StackedTranscoders(tcs, [3, 5])
    assert stack.W_enc.shape == (2, 32, 8)
    assert stack.W_skip.shape == (2, 6, 8)
    back = stack.transcoders()
    x = torch.randn(7, 8)
    for layer in (3, 5):
        for name, value in tcs[layer].state_dict().items():
            assert torch.equal(back[layer].state_dict()[name], value)
        torch.testing.assert_close(back[layer](x), tcs[layer](x))
    relu = TranscoderConfig(d_in=8, d_out=6, n_features=32, activation="relu")
    with pytest.raises(ValueError, match="TopK"):
        StackedTranscoders({0: Transcoder(relu)}, [0])


def test_stacked_checkpoint_resumes_bit_for_bit_and_is_refused_per_layer(neox, tmp_path):
    uninterrupted = _train(neox, stack_layers=True)

    def stop(log):
        if log.steps == 11:
            raise KeyboardInterrupt

    kwargs = {"checkpoint_dir": tmp_path, "checkpoint_every": 1000}
    with pytest.raises(KeyboardInterrupt):
        _train(neox, stack_layers=True, callback=stop, **kwargs)
    assert ckpt.read(ckpt.checkpoint_file(tmp_path))["stacked"] is True
    with pytest.raises(ValueError, match="stacked was True, is False"):
        _train(neox, stack_layers=False, resume=True, **kwargs)
    tcs, log = _train(neox, stack_layers=True, resume=True, **kwargs)
    for layer in LAYERS:
        for name, value in uninterrupted[0][layer].state_dict().items():
            assert torch.equal(tcs[layer].state_dict()[name], value), (layer, name)
    assert log.loss == uninterrupted[1].loss
    assert log.fvu == uninterrupted[1].fvu


def test_which_path_trains():
    cpu = torch.device("cpu")
    assert not use_stacked(TrainingConfig(), cpu)  # per layer: measured faster on the CPU
    assert use_stacked(TrainingConfig(stack_layers=True), cpu)
    assert not use_stacked(TrainingConfig(stack_layers=False), cpu)
    for bad in ({"activation": "relu"}, {"compile": True}):
        with pytest.raises(ValueError, match="stack_layers=True trains TopK"):
            TrainingConfig(stack_layers=True, **bad)
    with pytest.raises(ValueError, match="stack_layers must be"):
        TrainingConfig(stack_layers="yes")
    # stored configs keep the choice
    assert TrainingConfig.from_dict(TrainingConfig(stack_layers=True).to_dict()).stack_layers


@pytest.mark.parametrize(("n_dead", "k_aux"), [(0, 4), (3, 0)])
def test_stacked_auxk_with_nothing_to_select_decodes_zero(n_dead, k_aux):
    x, W_enc, b_enc, W_dec, _ = _weights(L=2, n=6, d_in=5, d_out=4, n_features=16)
    dead = torch.zeros(2, 16, dtype=torch.bool)
    dead[0, :n_dead] = True
    y, _values, _, aux_y, aux_values, _ = stacked_topk(
        x, W_enc, b_enc, W_dec, 2, dead=dead, k_aux=k_aux
    )
    assert aux_values.shape == (2, 6, 0)
    assert torch.equal(aux_y, torch.zeros(2, 6, 4))
    assert y.shape == (2, 6, 4)
