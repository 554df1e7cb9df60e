"""The user's workflow on the embedded default: sentences -> transcoders -> activations -> h5ad."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import sctranscoder as sct
from sctranscoder.core.hooks import capture_mlp_io, run_to_layers

N_TOKENS = 40_000
BATCH = 1024


@pytest.fixture(scope="module")
def model():
    return sct.datasets.tiny_c2s()


@pytest.fixture(scope="module")
def trained(model):
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, n_tokens=N_TOKENS, batch_size=BATCH, progress=False)
    sct.tl.feature_activations(adata, progress=False)
    return adata


def _direct_activations(model, adata, layer: int, cells: list[int]) -> tuple[np.ndarray, list]:
    """Per-token activations computed here from the model and the stored transcoder."""
    tc = sct.get.transcoders(adata, layers=[layer])[layer]
    genes = [adata.obs["cell_sentence"].iloc[i].split() for i in cells]
    batch = model.tokenize(genes)
    with capture_mlp_io(model.model, [layer]) as store:
        run_to_layers(model.model, batch.input_ids, batch.attention_mask)
        x = store[layer][0]
    return tc.encode(x).numpy(), batch


def test_uns_records_transcoders_model_and_metrics(trained, model):
    rec = trained.uns["sct"]
    assert sorted(rec["transcoders"]) == [f"layer_{i}" for i in range(model.n_layers)]
    assert rec["model"]["name"] == sct.datasets.TINY_C2S_NAME
    assert rec["model"]["fingerprint"] == model.fingerprint
    assert rec["model"]["n_genes"] == model.settings.n_genes
    assert rec["params"]["tokens_seen"] >= N_TOKENS
    layers, whole = sct.get.metrics(trained)
    assert len(layers) == model.n_layers
    assert np.isfinite(layers[["fvu", "l0", "dead_fraction"]].to_numpy()).all()
    assert (layers["l0"] <= 32 + 1e-9).all() and (layers["fvu"] < 1).all()
    for k in ("ce_original", "ce_replaced", "ce_removed", "kl_replaced", "kl_removed"):
        assert np.isfinite(whole[k]) and whole[k] >= 0
    gap = whole["ce_removed"] - whole["ce_original"]
    assert whole["ce_recovered"] == pytest.approx(
        (whole["ce_removed"] - whole["ce_replaced"]) / gap
    )
    assert 0 <= whole["prediction_agreement"] <= 1
    split = trained.obs["sct_split"]
    assert (split == "validation").sum() == 70 and (split == "train").sum() == 630


def test_activations_match_direct_computation(trained, model):
    layer, cells = 2, [0, 5, 123]
    X = trained.obsm["X_sct_L2"]
    assert sparse.isspmatrix_csr(X) and X.dtype == np.float32 and X.shape == (700, 1024)
    acts, batch = _direct_activations(model, trained, layer, cells)
    for row, cell in enumerate(cells):
        gene_tokens = batch.gene_index[row] >= 0
        expected = acts[row][gene_tokens.numpy()].max(0)
        np.testing.assert_allclose(X[cell].toarray().ravel(), expected, rtol=1e-5, atol=1e-6)
        assert np.count_nonzero(expected) > 0


def test_last_and_mean_aggregates(trained, model):
    cells = [3, 42]
    last = sct.tl.feature_activations(
        trained[cells].copy(),
        aggregate="last",
        layers=[1],
        gene_activations=False,
        progress=False,
        copy=True,
    )
    mean = sct.tl.feature_activations(
        trained[cells].copy(),
        aggregate="mean",
        layers=[1],
        gene_activations=False,
        progress=False,
        copy=True,
    )
    acts, batch = _direct_activations(model, trained, 1, cells)
    for row in range(len(cells)):
        n = int(batch.lengths[row])
        np.testing.assert_allclose(
            last.obsm["X_sct_L1"][row].toarray().ravel(), acts[row, n - 1], rtol=1e-5, atol=1e-6
        )
        g = (batch.gene_index[row] >= 0).numpy()
        np.testing.assert_allclose(
            mean.obsm["X_sct_L1"][row].toarray().ravel(), acts[row][g].mean(0), rtol=1e-4, atol=1e-6
        )
    assert last.uns["sct"]["activations"]["params"]["aggregate"] == "last"


def test_gene_activations_are_means_over_cells_with_the_gene(trained, model):
    varm = trained.varm["sct_genes_L2"]
    assert sparse.isspmatrix_csr(varm) and varm.shape == (trained.n_vars, 1024)
    gene = "CD74"
    cells = [i for i, s in enumerate(trained.obs["cell_sentence"]) if gene in s.split()][:40]
    gene_cells = trained.uns["sct"]["activations"]["gene_cells"]
    gi = list(trained.var_names).index(gene)
    n_with = sum(gene in s.split() for s in trained.obs["cell_sentence"])
    assert gene_cells[gi] == n_with
    # recompute on all cells that contain the gene
    cells = [i for i, s in enumerate(trained.obs["cell_sentence"]) if gene in s.split()]
    total = np.zeros(1024)
    for start in range(0, len(cells), 64):
        chunk = cells[start : start + 64]
        acts, batch = _direct_activations(model, trained, 2, chunk)
        for row, cell in enumerate(chunk):
            pos = trained.obs["cell_sentence"].iloc[cell].split().index(gene)
            toks = (batch.gene_index[row] == pos).numpy()
            total += acts[row][toks].max(0)
    np.testing.assert_allclose(varm[gi].toarray().ravel(), total / len(cells), rtol=1e-4, atol=1e-6)


def test_firing_rate(trained):
    fr = trained.uns["sct"]["activations"]["firing_rate"]["layer_0"]
    assert fr.shape == (1024,) and (fr >= 0).all() and (fr <= 1).all()
    # TopK: k features per token unless fewer are positive
    assert fr.sum() == pytest.approx(32, abs=1.0)


def test_get_activations_overlays_on_umap(trained, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    fa = sct.get.activations(trained, layer=2)
    assert fa.shape == (700, 1024)
    assert fa.var_names[17] == "L2F17"
    assert "X_umap" in fa.obsm and "bulk_labels" in fa.obs
    assert "X_sct_L0" not in fa.obsm
    np.testing.assert_allclose(fa.var["frac_cells"], (trained.obsm["X_sct_L2"] > 0).mean(0).A1)
    axes = sct.pl.activations(trained, 2, n_top=3, show=False)
    assert len(axes) == 3
    with pytest.raises(KeyError, match="available layers"):
        sct.get.activations(trained, layer=9)


def test_h5ad_round_trip(trained, tmp_path):
    path = tmp_path / "pbmc_sct.h5ad"
    trained.write_h5ad(path)
    back = ad.read_h5ad(path)
    for k in ("X_sct_L0", "X_sct_L3"):
        assert sparse.issparse(back.obsm[k])
        assert (back.obsm[k] != trained.obsm[k]).nnz == 0
    assert (back.varm["sct_genes_L1"] != trained.varm["sct_genes_L1"]).nnz == 0
    pd.testing.assert_frame_equal(
        sct.get.metrics(back)[0], sct.get.metrics(trained)[0], check_dtype=False
    )
    assert back.uns["sct"]["model"]["fingerprint"] == trained.uns["sct"]["model"]["fingerprint"]
    x = torch.randn(5, 128)
    for layer, tc in sct.get.transcoders(back).items():
        torch.testing.assert_close(tc(x), sct.get.transcoders(trained)[layer](x))
    # the reloaded object is usable: activations recomputed from it are identical
    sct.tl.feature_activations(back, layers=[3], progress=False)
    assert abs(back.obsm["X_sct_L3"] - trained.obsm["X_sct_L3"]).max() < 1e-6
    assert list(back.obs["sct_split"].cat.categories) == ["train", "validation"]


def test_h5mu_round_trip(trained, tmp_path):
    import mudata as md

    mdata = md.MuData({"rna": trained})
    path = tmp_path / "pbmc_sct.h5mu"
    mdata.write(path)
    back = md.read_h5mu(path)["rna"]
    assert (back.obsm["X_sct_L2"] != trained.obsm["X_sct_L2"]).nnz == 0
    assert sorted(back.uns["sct"]["transcoders"]) == sorted(trained.uns["sct"]["transcoders"])


def test_save_and_load_transcoders(trained, tmp_path):
    import scanpy as sc

    path = sct.save_transcoders(trained, tmp_path / "tc")
    assert (path / "config.json").exists() and (path / "layer_0.safetensors").exists()
    fresh = sc.datasets.pbmc68k_reduced()[:50].copy()
    sct.pp.cell_sentences(fresh, model=sct.datasets.tiny_c2s())
    sct.load_transcoders(path, fresh)
    sct.tl.feature_activations(fresh, layers=[2], progress=False)
    diff = fresh.obsm["X_sct_L2"] - trained.obsm["X_sct_L2"][:50]
    assert abs(diff).max() < 1e-6
    tcs, meta = sct.load_transcoders(path)
    assert sorted(tcs) == [0, 1, 2, 3] and meta["model"]["name"] == sct.datasets.TINY_C2S_NAME


def test_mismatched_model_is_refused(trained, model):
    other = sct.datasets.tiny_c2s()
    with torch.no_grad():
        next(other.model.parameters()).add_(0.01)
    other._fingerprint = None
    before = set(trained.obsm)
    small = trained[:10].copy()
    with pytest.raises(ValueError, match="fingerprint"):
        sct.tl.feature_activations(small, other, progress=False)
    assert set(small.obsm) == before
    with pytest.raises(ValueError, match="fingerprint"):
        sct.load_transcoders(sct.save_transcoders(trained, "/tmp/sct_tc_mismatch"), model=other)


def test_missing_layer_and_missing_results(trained, model):
    import scanpy as sc

    with pytest.raises(KeyError, match=r"trained layers: \[0, 1, 2, 3\]"):
        sct.tl.feature_activations(trained[:5].copy(), layers=[7], progress=False)
    raw = sc.datasets.pbmc68k_reduced()
    with pytest.raises(KeyError, match=r"sct\.tl\.train_transcoders"):
        sct.tl.feature_activations(raw, progress=False)
    with pytest.raises(KeyError, match=r"sct\.pp\.cell_sentences"):
        sct.tl.train_transcoders(raw, model, n_tokens=BATCH, batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match="do not exist"):
        sct.tl.train_transcoders(trained[:20].copy(), model, layers=[4], progress=False)


def test_longer_sentences_are_cut_to_what_the_model_reads(trained, model):
    # the workflow: sentences made without the model (C2S default, 200 genes)
    small = trained[:8].copy()
    sct.pp.cell_sentences(small)
    assert small.obs["cell_sentence_n_genes"].max() > model.settings.n_genes
    sct.tl.feature_activations(small, layers=[2], gene_activations=False, progress=False)
    assert abs(small.obsm["X_sct_L2"] - trained.obsm["X_sct_L2"][:8]).max() < 1e-6


def test_train_copy_seed_and_layers(model):
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()[:120].copy()
    sct.pp.cell_sentences(adata, model=model)
    kw = dict(layers=[1], n_tokens=2 * 512, batch_size=512, progress=False)
    out = sct.tl.train_transcoders(adata, model, copy=True, **kw)
    assert "sct" not in adata.uns and "sct_split" not in adata.obs
    again = sct.tl.train_transcoders(adata, model, copy=True, **kw)
    other = sct.tl.train_transcoders(adata, model, copy=True, seed=1, **kw)
    w = out.uns["sct"]["transcoders"]["layer_1"]["W_enc"]
    np.testing.assert_array_equal(w, again.uns["sct"]["transcoders"]["layer_1"]["W_enc"])
    assert not np.allclose(w, other.uns["sct"]["transcoders"]["layer_1"]["W_enc"])
    assert list(out.uns["sct"]["transcoders"]) == ["layer_1"]
    assert sct.tl.train_transcoders(adata, model, key_added="mine", **kw) is None
    assert "mine" in adata.uns and "mine_split" in adata.obs


def test_relu_transcoders(model):
    import scanpy as sc

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
    assert rec["config"]["activation"] == "relu" and "W_skip" in rec
    layers, _ = sct.get.metrics(adata)
    assert layers.loc["layer_0", "fvu"] < 1
