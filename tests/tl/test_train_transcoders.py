"""sct.tl.train_transcoders: the transcoder record, its checks, and the training settings."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import torch

import sctranscoder as sct

#: The full workflow run: every cell of pbmc68k_reduced (700), 40k tokens per layer.
FULL_TOKENS = 40_000
BATCH = 1024


@pytest.fixture(scope="module")
def trained_full(model):
    """Transcoders trained on all 700 cells: the validation split is 10% of the whole data."""
    adata = sc.datasets.pbmc68k_reduced()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, n_tokens=FULL_TOKENS, batch_size=BATCH, progress=False)
    return adata


def test_uns_records_transcoders_model_and_metrics(trained_full, model):
    rec = trained_full.uns["sct"]
    assert sorted(rec["transcoders"]) == [f"layer_{i}" for i in range(model.n_layers)]
    assert rec["model"]["name"] == sct.datasets.TINY_C2S_NAME
    assert rec["model"]["fingerprint"] == model.fingerprint
    assert rec["model"]["n_genes"] == model.settings.n_genes
    assert rec["params"]["tokens_seen"] >= FULL_TOKENS
    assert rec["params"]["config"]["n_tokens"] == FULL_TOKENS
    assert rec["params"]["layers"].tolist() == list(range(model.n_layers))
    layers, whole = sct.get.metrics(trained_full)
    assert len(layers) == model.n_layers
    assert np.isfinite(layers[["fvu", "l0", "dead_fraction"]].to_numpy()).all()
    assert (layers["l0"] <= 32 + 1e-9).all()
    assert (layers["fvu"] < 1).all()
    for k in ("ce_original", "ce_replaced", "ce_removed", "kl_replaced", "kl_removed"):
        assert np.isfinite(whole[k])
        assert whole[k] >= 0
    gap = whole["ce_removed"] - whole["ce_original"]
    assert whole["ce_recovered"] == pytest.approx(
        (whole["ce_removed"] - whole["ce_replaced"]) / gap
    )
    assert 0 <= whole["prediction_agreement"] <= 1
    # teacher-forced agreement at every answer position is the greedy answer's agreement
    assert whole["answer_agreement"] == pytest.approx(whole["prediction_agreement"])
    assert 0 <= whole["answer_token_agreement"] <= 1
    assert whole["answer_kl_replaced"] >= 0
    assert whole["answer_n_tokens"] >= 70  # at least one answer token per validation cell
    assert rec["params"]["config"]["answer_tokens"]
    split = trained_full.obs["sct_split"]
    assert (split == "validation").sum() == 70
    assert (split == "train").sum() == 630
    assert list(split.cat.categories) == ["train", "validation"]


def test_mismatched_model_is_refused(trained_base, tmp_path):
    other = sct.datasets.tiny_c2s()
    with torch.no_grad():
        next(other.model.parameters()).add_(0.01)
    other._fingerprint = None
    small = trained_base[:10].copy()
    before = set(small.obsm)
    with pytest.raises(ValueError, match="fingerprint"):
        sct.tl.feature_activations(small, other, progress=False)
    assert set(small.obsm) == before
    path = sct.save_transcoders(trained_base, tmp_path / "tc")
    fresh = trained_base[:10].copy()
    del fresh.uns["sct"]
    with pytest.raises(ValueError, match="fingerprint"):
        sct.load_transcoders(path, fresh, model=other)
    assert "sct" not in fresh.uns


def test_missing_layer_and_missing_results(trained_base, model):
    with pytest.raises(KeyError, match=r"trained layers: \[0, 1, 2, 3\]"):
        sct.tl.feature_activations(trained_base[:5].copy(), layers=[7], progress=False)
    raw = sc.datasets.pbmc68k_reduced()
    with pytest.raises(KeyError, match=r"sct\.tl\.train_transcoders"):
        sct.tl.feature_activations(raw, progress=False)
    with pytest.raises(KeyError, match=r"sct\.pp\.cell_sentences"):
        sct.tl.train_transcoders(raw, model, n_tokens=BATCH, batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match="do not exist"):
        sct.tl.train_transcoders(trained_base[:20].copy(), model, layers=[4], progress=False)


def test_longer_sentences_are_cut_to_what_the_model_reads(trained_base, model):
    # the workflow: sentences made without the model (C2S default, 200 genes)
    small = trained_base[:8].copy()
    sct.pp.cell_sentences(small)
    assert small.obs["cell_sentence_n_genes"].max() > model.settings.n_genes
    sct.tl.feature_activations(small, layers=[2], genes=False, progress=False)
    np.testing.assert_allclose(  # float32 rounding of another batch composition
        small.obsm["X_sct_L2"].toarray(),
        trained_base.obsm["X_sct_L2"][:8].toarray(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_train_copy_seed_and_layers(model):
    adata = sc.datasets.pbmc68k_reduced()[:120].copy()
    sct.pp.cell_sentences(adata, model=model)
    kw = {"layers": [1], "n_tokens": 2 * 512, "batch_size": 512, "progress": False}
    out = sct.tl.train_transcoders(adata, model, copy=True, **kw)
    assert "sct" not in adata.uns
    assert "sct_split" not in adata.obs
    again = sct.tl.train_transcoders(adata, model, copy=True, **kw)
    other = sct.tl.train_transcoders(adata, model, copy=True, seed=1, **kw)
    w = out.uns["sct"]["transcoders"]["layer_1"]["W_enc"]
    np.testing.assert_array_equal(w, again.uns["sct"]["transcoders"]["layer_1"]["W_enc"])
    assert not np.allclose(w, other.uns["sct"]["transcoders"]["layer_1"]["W_enc"])
    assert other.uns["sct"]["params"]["config"]["seed"] == 1
    assert list(out.uns["sct"]["transcoders"]) == ["layer_1"]
    assert sct.tl.train_transcoders(adata, model, key_added="mine", **kw) is None
    assert "mine" in adata.uns
    assert "mine_split" in adata.obs


def test_config_and_overrides_are_the_same_settings(model):
    adata = sc.datasets.pbmc68k_reduced()[:120].copy()
    sct.pp.cell_sentences(adata, model=model)
    config = sct.TrainingConfig(n_tokens=512, batch_size=512, k=16)
    by_config = sct.tl.train_transcoders(
        adata, model, config=config, layers=[0], progress=False, copy=True
    )
    # a keyword overrides the same field of config=
    by_kwargs = sct.tl.train_transcoders(
        adata, model, config=config.replace(k=8), k=16, layers=[0], progress=False, copy=True
    )
    # config= may also be a dict of TrainingConfig fields (as stored in params["config"])
    by_dict = sct.tl.train_transcoders(
        adata, model, config=config.to_dict(), layers=[0], progress=False, copy=True
    )
    for out in (by_config, by_kwargs, by_dict):
        assert out.uns["sct"]["params"]["config"]["k"] == 16
        assert out.uns["sct"]["transcoders"]["layer_0"]["config"]["k"] == 16
        np.testing.assert_array_equal(
            by_config.uns["sct"]["transcoders"]["layer_0"]["W_enc"],
            out.uns["sct"]["transcoders"]["layer_0"]["W_enc"],
        )


def test_relu_transcoders(model):
    adata = sc.datasets.pbmc68k_reduced()[:120].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(
        adata,
        model,
        layers=[0],
        activation="relu",
        skip=True,
        n_tokens=4 * 512,
        batch_size=512,
        lr=1e-3,
        progress=False,
    )
    rec = adata.uns["sct"]["transcoders"]["layer_0"]
    assert rec["config"]["activation"] == "relu"
    assert "W_skip" in rec
    params = adata.uns["sct"]["params"]
    assert params["config"]["activation"] == "relu"
    assert params["config"]["skip"]
    assert params["lr"] == pytest.approx(1e-3)
    layers, _ = sct.get.metrics(adata)
    assert layers.loc["layer_0", "fvu"] < 1
