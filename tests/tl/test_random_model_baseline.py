"""sct.tl.random_model_baseline: the random-initialised-model baseline of interpretability."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MARKERS, N_TOKENS

import sctranscoder as sct
from sctranscoder.core.model import random_like

matplotlib.use("Agg")

RANDOM_COLUMNS = ("random_model_total_live", "random_model_ora_interpretable")


@pytest.fixture(scope="module")
def with_baseline(annotated_base, model):
    return sct.tl.random_model_baseline(annotated_base, model, seed=3, progress=False, copy=True)


def test_random_like_is_a_fresh_model_of_the_same_architecture(model):
    before = torch.random.get_rng_state()
    a, b = random_like(model, seed=1), random_like(model, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    assert a.model.config.to_dict() == model.model.config.to_dict()
    assert a.tokenizer is model.tokenizer
    assert a.settings == model.settings
    assert a.fingerprint == b.fingerprint != model.fingerprint
    assert random_like(model, seed=2).fingerprint != a.fingerprint
    trained = dict(model.model.named_parameters())
    for name, p in a.model.named_parameters():
        assert p.shape == trained[name].shape
        assert not p.requires_grad
    w = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert not torch.allclose(dict(a.model.named_parameters())[w], trained[w])


def test_baseline_adds_columns_and_leaves_the_real_results(annotated_base, with_baseline, model):
    table = sct.get.interpretability(with_baseline)
    for col in (*RANDOM_COLUMNS, "random_model_ora_fraction"):
        assert col in table.columns
    # the real columns are untouched, and so are the real records
    real = sct.get.interpretability(annotated_base)
    pd.testing.assert_frame_equal(table[real.columns], real)
    pd.testing.assert_frame_equal(
        with_baseline.uns["sct_annotation"]["summary"],
        annotated_base.uns["sct_annotation"]["summary"],
    )
    pd.testing.assert_frame_equal(
        sct.get.feature_table(with_baseline, 1), sct.get.feature_table(annotated_base, 1)
    )
    assert "sct_random_model" not in annotated_base.uns
    assert not any(c.startswith("random_model") for c in real.columns)
    frac = table["random_model_ora_fraction"].to_numpy(dtype=float)
    live = table["random_model_total_live"].to_numpy(dtype=float)
    n_int = table["random_model_ora_interpretable"].to_numpy(dtype=float)
    assert ((frac >= 0) & (frac <= 1)).all()
    np.testing.assert_allclose(frac, n_int / live)

    rec = with_baseline.uns["sct_random_model"]
    assert rec["params"]["seed"] == 3
    assert rec["params"]["gene_sets"] == MARKERS
    assert rec["params"]["n_tokens"] == N_TOKENS
    assert rec["params"]["annotation_key"] == "sct_annotation"
    # the transcoders of the baseline were trained on the random model, not the real one
    assert rec["model"]["fingerprint"] == random_like(model, seed=3).fingerprint
    assert rec["model"]["fingerprint"] != annotated_base.uns["sct"]["model"]["fingerprint"]
    assert list(rec["metrics"]["layer"]) == list(table["layer"])
    # its own summary agrees with the columns joined into ours
    np.testing.assert_allclose(rec["summary"]["ora_fraction"].to_numpy(dtype=float), frac)


def test_baseline_survives_h5ad(with_baseline, tmp_path):
    path = tmp_path / "baseline.h5ad"
    with_baseline.write_h5ad(path)
    back = ad.read_h5ad(path)
    t0 = sct.get.interpretability(with_baseline)
    t1 = sct.get.interpretability(back)
    np.testing.assert_allclose(
        t1["random_model_ora_fraction"].to_numpy(dtype=float),
        t0["random_model_ora_fraction"].to_numpy(dtype=float),
    )
    rec = back.uns["sct_random_model"]
    assert rec["params"]["model_name"].endswith("(random init, seed 3)")
    assert set(rec["metrics"].columns) >= {"fvu", "l0", "dead_fraction"}


def test_plot_shows_the_random_model_bars(with_baseline):
    ax = sct.pl.interpretability(with_baseline, show=False)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["features", "shuffled gene labels", "random-init model"]
    n_layers = len(sct.get.interpretability(with_baseline))
    assert len(ax.patches) == 3 * n_layers


def test_baseline_errors_before_writing(annotated_base, model):
    bare = annotated_base.copy()
    del bare.uns["sct_annotation"]
    with pytest.raises(KeyError, match="annotate_features"):
        sct.tl.random_model_baseline(bare, model, progress=False)

    from_dict = annotated_base.copy()
    sets = {"T": ["CD3D", "CD3E", "IL7R", "LCK", "CD2", "LDHB"]}
    sct.tl.annotate_features(from_dict, gene_sets=sets, n_top=20, min_size=3)
    before = from_dict.uns["sct_annotation"]["summary"].copy()
    with pytest.raises(ValueError, match="pass the same gene_sets"):
        sct.tl.random_model_baseline(from_dict, model, progress=False)
    with pytest.raises(ValueError, match="n_tokens must be a positive integer"):
        sct.tl.random_model_baseline(annotated_base, model, n_tokens=0, progress=False)
    pd.testing.assert_frame_equal(from_dict.uns["sct_annotation"]["summary"], before)
    assert "sct_random_model" not in from_dict.uns
    with pytest.raises(KeyError, match="random_model_baseline"):
        sct.get.interpretability(annotated_base, random_model_key="no_such_key")
