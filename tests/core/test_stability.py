"""Hungarian matching of decoder directions (Claye et al. 2025, Figure 4) on planted dictionaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sctranscoder.core.stability import (
    covariance_baseline,
    init_baseline,
    match_dictionaries,
    random_dictionary,
    summarise,
    trained_vs_init,
)
from sctranscoder.core.transcoder import Transcoder, TranscoderConfig


def _planted(n=200, d=128, noise=0.3, seed=0):
    """A dictionary, and a noisy, rescaled, permuted copy of it."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, d))
    perm = rng.permutation(n)
    B = A[perm] + noise / np.sqrt(d) * np.linalg.norm(A[perm], axis=1, keepdims=True) * (
        rng.standard_normal((n, d))
    )
    B *= rng.uniform(0.1, 10, size=(n, 1))  # matching is by direction, not by length
    return A, B, perm


def test_matching_recovers_a_planted_permutation():
    A, B, perm = _planted()
    m = match_dictionaries(A, B)
    # row perm[j] of A became row j of B
    expected = np.argsort(perm)
    assert np.array_equal(m.index_a, np.arange(len(A)))
    assert np.array_equal(m.index_b, expected)
    assert m.cosine.min() > 0.9
    # the chance level at this shape is far below
    base = init_baseline(len(A), len(B), A.shape[1], n_repeats=2, seed=1)
    assert base.shape == (2, len(A))
    assert np.median(base) < 0.35
    assert np.median(m.cosine) - np.median(base) > 0.5


def test_matching_accepts_torch_and_rectangular_dictionaries():
    A, B, perm = _planted(n=60, d=64, noise=0.1)
    extra = np.random.default_rng(3).standard_normal((15, 64))
    m = match_dictionaries(torch.from_numpy(A).float(), np.vstack([B, extra]))
    assert len(m.cosine) == 60
    # every row of A finds its own copy, none of the 15 distractors
    assert np.array_equal(m.index_b, np.argsort(perm))
    # one-to-one: no row of B used twice
    assert len(set(m.index_b.tolist())) == 60


def test_opposite_directions_are_not_the_same_feature():
    A = np.eye(4)
    m = match_dictionaries(A, -A)
    assert np.all(m.cosine <= 0)


def test_random_dictionary_is_the_decoder_a_transcoder_is_built_with():
    config = TranscoderConfig(d_in=16, d_out=24, n_features=40)
    tc = Transcoder(config, generator=torch.Generator().manual_seed(7))
    W = random_dictionary(40, 24, torch.Generator().manual_seed(7))
    assert torch.equal(tc.W_dec.detach(), W)
    assert torch.allclose(W.norm(dim=1), torch.ones(40))


def test_trained_vs_init_and_summary():
    A, _, _ = _planted(n=50, d=32)
    out = trained_vs_init(A, 80, n_repeats=2, seed=0)
    assert out.shape == (2, 50)
    assert np.all(np.abs(out) <= 1 + 1e-6)
    s = summarise(np.array([0.1, 0.6, 0.8, 0.9]))
    assert s == {
        "median": pytest.approx(0.7),
        "mean": pytest.approx(0.6),
        "fraction_above_0.5": 0.75,
        "fraction_above_0.7": 0.5,
    }


@pytest.mark.parametrize(
    ("A", "B", "match"),
    [
        (np.ones((3, 4)), np.ones((3, 5)), "different widths"),
        (np.vstack([np.ones((2, 4)), np.zeros((1, 4))]), np.ones((3, 4)), "zero norm"),
        (np.ones(4), np.ones((3, 4)), "2-d"),
        (np.full((2, 4), np.nan), np.ones((3, 4)), "non-finite"),
    ],
)
def test_bad_dictionaries_are_refused(A, B, match):
    with pytest.raises(ValueError, match=match):
        match_dictionaries(A, B)


def test_too_many_features_are_refused_before_matching():
    A = np.random.default_rng(0).standard_normal((30, 8))
    with pytest.raises(ValueError, match="exceeds max_features=20"):
        match_dictionaries(A, A, max_features=20)


def test_covariance_baseline_sees_the_subspace_but_not_the_features():
    # a planted dictionary living in 8 of 64 dimensions, and a noisy permuted copy
    rng = np.random.default_rng(5)
    A = np.zeros((100, 64))
    A[:, :8] = rng.standard_normal((100, 8))
    B = A[rng.permutation(100)] + 0.05 * rng.standard_normal((100, 64))
    matched = np.median(match_dictionaries(A, B).cosine)
    cov = covariance_baseline(A, B, n_repeats=2, seed=0)
    iso = init_baseline(100, 100, 64, n_repeats=2, seed=0)
    assert cov.shape == (2, 100)
    assert np.median(iso) < np.median(cov) < matched - 0.1
