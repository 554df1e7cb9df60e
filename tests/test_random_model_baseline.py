"""The random-initialised-model baseline of interpretability (issue 4, part 7)."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

import sctranscoder as sct
from sctranscoder.core.model import random_like

matplotlib.use("Agg")

MARKERS = "markers:bulk_labels"


@pytest.fixture(scope="module")
def model():
    return sct.datasets.tiny_c2s()


@pytest.fixture(scope="module")
def annotated(model):
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()[:150].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, n_tokens=8192, batch_size=1024, progress=False)
    sct.tl.feature_genes(adata, model, n_top=50, progress=False)
    sct.tl.annotate_features(adata, MARKERS, n_top_genes=20, seed=0)
    return adata


@pytest.fixture(scope="module")
def with_baseline(annotated, model):
    return sct.tl.random_model_baseline(annotated, model=model, seed=3, progress=False, copy=True)


def test_random_like_is_a_fresh_model_of_the_same_architecture(model):
    before = torch.random.get_rng_state()
    a, b = random_like(model, seed=1), random_like(model, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    assert a.model.config.to_dict() == model.model.config.to_dict()
    assert a.tokenizer is model.tokenizer and a.settings == model.settings
    assert a.fingerprint == b.fingerprint != model.fingerprint
    assert random_like(model, seed=2).fingerprint != a.fingerprint
    trained = dict(model.model.named_parameters())
    for name, p in a.model.named_parameters():
        assert p.shape == trained[name].shape
        assert not p.requires_grad
    w = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert not torch.allclose(dict(a.model.named_parameters())[w], trained[w])


def test_baseline_adds_columns_and_leaves_the_real_results(annotated, with_baseline, model):
    table = with_baseline.uns["sct"]["interpretability"]
    for col in ("random_model_live", "random_model_interpretable", "random_model_fraction"):
        assert col in table.columns
    # the real columns are untouched, and so are the real feature tables
    real = annotated.uns["sct"]["interpretability"]
    pd.testing.assert_frame_equal(table[real.columns], real)
    pd.testing.assert_frame_equal(
        with_baseline.uns["sct"]["features"]["layer_1"], annotated.uns["sct"]["features"]["layer_1"]
    )
    assert "random_model_fraction" not in annotated.uns["sct"]["interpretability"]
    frac = table["random_model_fraction"].to_numpy(dtype=float)
    live = table["random_model_live"].to_numpy(dtype=float)
    n_int = table["random_model_interpretable"].to_numpy(dtype=float)
    assert ((frac >= 0) & (frac <= 1)).all()
    np.testing.assert_allclose(frac, n_int / live)

    rec = with_baseline.uns["sct"]["random_model_baseline"]
    assert rec["params"]["seed"] == 3 and rec["params"]["gene_sets"] == MARKERS
    assert rec["params"]["n_tokens"] == 8192
    # the transcoders of the baseline were trained on the random model, not the real one
    assert rec["model"]["fingerprint"] == random_like(model, seed=3).fingerprint
    assert rec["model"]["fingerprint"] != annotated.uns["sct"]["model"]["fingerprint"]
    assert list(rec["metrics"]["layer"]) == list(table["layer"])
    # its own summary agrees with the columns copied into ours
    np.testing.assert_allclose(rec["summary"]["fraction"].to_numpy(dtype=float), frac)


def test_baseline_survives_h5ad(with_baseline, tmp_path):
    path = tmp_path / "baseline.h5ad"
    with_baseline.write_h5ad(path)
    back = ad.read_h5ad(path)
    t0 = with_baseline.uns["sct"]["interpretability"]
    t1 = back.uns["sct"]["interpretability"]
    np.testing.assert_allclose(
        t1["random_model_fraction"].to_numpy(dtype=float),
        t0["random_model_fraction"].to_numpy(dtype=float),
    )
    rec = back.uns["sct"]["random_model_baseline"]
    assert rec["params"]["model_name"].endswith("(random init, seed 3)")
    assert set(rec["metrics"].columns) >= {"fvu", "l0", "dead_fraction"}


def test_plot_shows_the_random_model_bars(with_baseline):
    ax = sct.pl.interpretability(with_baseline, show=False)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["features", "shuffled gene labels", "random-init model"]
    n_layers = len(with_baseline.uns["sct"]["interpretability"])
    assert len(ax.patches) == 3 * n_layers


def test_baseline_errors_before_writing(annotated, model):
    bare = annotated.copy()
    del bare.uns["sct"]["interpretability"]
    with pytest.raises(KeyError, match="annotate_features"):
        sct.tl.random_model_baseline(bare, model=model, progress=False)

    from_dict = annotated.copy()
    sets = {"T": ["CD3D", "CD3E", "IL7R", "LCK", "CD2", "LDHB"]}
    sct.tl.annotate_features(from_dict, sets, n_top_genes=20, min_size=3)
    before = from_dict.uns["sct"]["interpretability"].copy()
    with pytest.raises(ValueError, match="pass the same gene_sets"):
        sct.tl.random_model_baseline(from_dict, model=model, progress=False)
    with pytest.raises(ValueError, match="n_tokens must be positive"):
        sct.tl.random_model_baseline(annotated, model=model, n_tokens=0, progress=False)
    pd.testing.assert_frame_equal(from_dict.uns["sct"]["interpretability"], before)
    assert "random_model_baseline" not in from_dict.uns["sct"]
