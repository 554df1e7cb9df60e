"""Sparse autoencoders on cell embeddings (issue 13, part 4): C2S's cell embedding, train_sae on
the transcoders' trainer, concept attribution through the model or an encoder, the tools that
read activation records, the expansion-factor sweep and the storage round trip.
"""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from conftest import MARKERS
from scipy import sparse

import sctranscoder as sct
from sctranscoder._sae import sae_module
from sctranscoder.core.embeddings import pool_hidden
from sctranscoder.core.sae import encode, fit_sae
from sctranscoder.core.training import Trainer, TrainingConfig

matplotlib.use("Agg")

#: Small SAEs: a few hundred steps are enough for these tests.
SMALL = {"expansion_factor": 2, "k": 4, "n_steps": 150, "batch_size": 64, "progress": False}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread is as fast, and far faster on a machine shared by many jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _planted(n_cells=2000, d=16, n_atoms=32, active=2, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.normal(size=(n_atoms, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    codes = np.zeros((n_cells, n_atoms))
    for i in range(n_cells):
        codes[i, rng.choice(n_atoms, active, replace=False)] = rng.uniform(1, 3, active)
    # an offset and a scale as an embedding in its own units would have
    return ((codes @ D + 5.0) * 7.0).astype(np.float32), D


def test_sae_reconstructs_a_planted_sparse_dictionary():
    X, D = _planted()
    is_val = np.random.default_rng(1).random(len(X)) < 0.1
    cfg = TrainingConfig(expansion_factor=4, k=4, batch_size=128, n_tokens=1000 * 128, seed=0)
    fit = fit_sae(X, is_val, cfg, progress=False)
    assert fit.metrics["validation_r2"] > 0.9
    assert fit.metrics["validation_r2"] == pytest.approx(1 - fit.metrics["validation_fvu"])
    assert fit.metrics["validation_l0"] <= 4
    W = fit.sae.W_dec.detach().numpy()
    W = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    recovered = (D @ W.T).max(1) > 0.9  # an atom is recovered by some decoder direction
    assert recovered.mean() >= 0.75


def test_train_sae_runs_on_the_shared_trainer(monkeypatch):
    adata = sc.datasets.pbmc68k_reduced()[:300].copy()
    steps = []
    step = Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda self, *a: (steps.append(1), step(self, *a))[1])
    sct.tl.train_sae(adata, use_rep="X_pca", **SMALL)
    assert len(steps) == SMALL["n_steps"]

    rec = adata.uns["sae"]
    X = adata.obsm["X_sae"]
    assert sparse.isspmatrix_csr(X)
    assert X.dtype == np.float32
    assert X.shape == (adata.n_obs, 2 * 50)
    assert (np.diff(X.indptr) <= SMALL["k"]).all()
    assert X.data.min() > 0
    # the stored weights and scale give the stored activations
    sae, scale = sae_module(rec)
    np.testing.assert_allclose(encode(sae, adata.obsm["X_pca"], scale).toarray(), X.toarray())
    assert scale == pytest.approx(rec["params"]["scale"])
    m = rec["metrics"]
    assert m["validation_r2"] == pytest.approx(1 - m["validation_fvu"])
    assert 0 < m["train_r2"] <= 1
    assert 0 <= m["dead_fraction"] < 1
    assert rec["params"]["config"]["batch_size"] == SMALL["batch_size"]
    assert adata.obs["sae_split"].value_counts()["validation"] == 30
    act = adata.uns["sae_activations"]
    assert dict(act["obsm_keys"]) == {"layer_0": "X_sae"}
    np.testing.assert_allclose(act["firing_rate"]["layer_0"], (X > 0).mean(0).A1)
    assert act["params"]["sae_id"] == rec["weights_id"]
    assert not act["params"]["genes"]
    # the same seed gives the same SAE
    again = adata.copy()
    sct.tl.train_sae(again, use_rep="X_pca", **SMALL)
    np.testing.assert_array_equal(again.obsm["X_sae"].toarray(), X.toarray())


def test_cell_embeddings_pool_the_residual_stream(model):
    adata = sc.datasets.pbmc68k_reduced()[:2].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.cell_embeddings(adata, model, layer=1, progress=False)
    sct.tl.cell_embeddings(adata, model, layer=1, pool="last", key_added="c2s_last", progress=False)
    sct.tl.cell_embeddings(adata, model, key_added="c2s_top", progress=False)
    batch = model.tokenize([s.split() for s in adata.obs["cell_sentence"]])
    with torch.no_grad():
        out = model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        )
    h = out.hidden_states[2].numpy()  # after block 1 (index 0: the token embeddings)
    for i in range(2):
        n = int(batch.lengths[i])
        genes = batch.gene_index[i, :n].numpy() >= 0
        np.testing.assert_allclose(adata.obsm["X_c2s"][i], h[i, :n][genes].mean(0), atol=1e-5)
        np.testing.assert_allclose(adata.obsm["X_c2s_last"][i], h[i, n - 1], atol=1e-5)
    assert adata.uns["c2s"]["params"]["layer"] == 1
    assert adata.uns["c2s_top"]["params"]["layer"] == model.n_layers - 1
    assert adata.uns["c2s"]["model"]["fingerprint"] == model.fingerprint
    assert adata.obsm["X_c2s"].dtype == np.float32
    # the module helper pools the same way
    pooled = pool_hidden(torch.as_tensor(h), batch, "mean").numpy()
    np.testing.assert_allclose(pooled, adata.obsm["X_c2s"], atol=1e-5)


@pytest.fixture(scope="module")
def planted_gene():
    """300 cells x 40 genes; gene PLANT (5 in half the cells) dominates a PCA encoder's PC1."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    X = rng.random((300, 40)) * (rng.random((300, 40)) < 0.5)
    X[:, 7] = np.where(rng.random(300) < 0.5, 5.0, 0.0)
    names = [f"G{j}" for j in range(40)]
    names[7] = "PLANT"
    adata = ad.AnnData(X.astype(np.float32), var=pd.DataFrame(index=names))
    adata.obs_names = [f"c{i}" for i in range(300)]
    pca = PCA(n_components=8, random_state=0).fit(X)
    adata.obsm["X_pca"] = pca.transform(X).astype(np.float32)
    return adata, lambda a: pca.transform(np.asarray(a.X))


def test_attribution_through_an_encoder_finds_a_planted_gene(planted_gene, sct_logs):
    adata, encoder = planted_gene
    adata = adata.copy()
    sct.tl.train_sae(adata, use_rep="X_pca", **{**SMALL, "n_steps": 300})
    sct.tl.concept_attribution(adata, encoder=encoder, n_top_genes=3, progress=False)
    assert "embed" not in sct_logs.text  # the encoder reproduces X_pca: no warning
    attr = sct.get.concept_attribution(adata)
    assert attr.shape[1] == adata.obsm["X_sae"].shape[1]
    expressing = adata.X[:, 7] > 0
    # PLANT is removed exactly from the cells that express it (always among their top 3)
    assert attr.obs.loc["PLANT", "n_cells"] == expressing.sum()
    # the concept most tied to PLANT's expression is, above all, caused by PLANT
    acts = adata.obsm["X_sae"].toarray()
    corr = [
        np.corrcoef(acts[:, j], expressing)[0, 1] if acts[:, j].std() else 0
        for j in range(acts.shape[1])
    ]
    concept = int(np.nanargmax(corr))
    mean = attr.X.toarray()[:, concept]
    assert attr.obs_names[mean.argmax()] == "PLANT"
    assert mean[attr.obs_names.get_loc("PLANT")] > 0
    # the tables that annotate_features reads agree: PLANT lowers it in the most cells
    table = sct.get.feature_table(adata, 0, activations_key="sae_activations", n_top=1)
    assert table["top_genes"].iloc[concept] == "PLANT"
    # an encoder that does not reproduce the stored embedding is named in a warning
    sct.tl.concept_attribution(
        adata,
        encoder=lambda a: encoder(a) + 1.0,
        cells=["c0", "c1"],
        n_top_genes=1,
        key_added="off",
        progress=False,
    )
    assert "embed" in sct_logs.text
    assert "away from adata.obsm['X_pca']" in sct_logs.text


def test_concepts_work_in_every_feature_tool(planted_gene):
    adata = sc.datasets.pbmc68k_reduced()
    sc.pp.pca(adata, n_comps=20)
    X = np.asarray(adata.X)
    mean, comps = X.mean(0), adata.varm["PCs"]

    def encoder(a):
        return (np.asarray(a.X) - mean) @ comps

    sct.tl.train_sae(adata, use_rep="X_pca", **SMALL)
    cells = list(adata.obs_names[::10])
    sct.tl.concept_attribution(adata, encoder=encoder, cells=cells, n_top_genes=10, progress=False)
    sct.tl.rank_features_groups(adata, groupby="bulk_labels", activations_key="sae_activations")
    ranked = sc.get.rank_genes_groups_df(adata, "CD14+ Monocyte", key="rank_features_groups")
    assert ranked["names"].str.fullmatch(r"L0F\d+").all()
    sct.tl.annotate_features(
        adata, gene_sets=MARKERS, activations_key="sae_activations", min_size=3
    )
    summary = adata.uns["sae_annotation"]["summary"]
    assert summary.loc["layer_0", "total_live"] > 0
    table = sct.get.feature_table(adata, 0, activations_key="sae_activations")
    assert "ora_interpretable" in table
    assert table["top_genes"].str.len().gt(0).any()
    genes = sct.get.gene_activations(adata, 0, activations_key="sae_activations")
    assert genes.shape[1] == adata.obsm["X_sae"].shape[1]
    fa = sct.get.activations(adata, 0, activations_key="sae_activations")
    assert "X_umap" in fa.obsm
    assert "X_sae" not in fa.obsm
    concept = str(table.index[table["live"].to_numpy() & table["top_genes"].str.len().gt(0)][0])
    fig = sct.pl.feature(
        adata,
        concept,
        activations_key="sae_activations",
        groupby="bulk_labels",
        show=False,
        return_fig=True,
    )
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [fig.axes[1].get_xlabel()]
    assert any("per cell" in t for t in texts)
    assert any("removing the gene" in t for t in texts)
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.fixture(scope="module")
def c2s_sae(model):
    adata = sc.datasets.pbmc68k_reduced()[:60].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.cell_embeddings(adata, model, layer=1, progress=False)
    sct.tl.train_sae(adata, use_rep="X_c2s", **SMALL)
    cells = list(adata.obs_names[:6])
    sct.tl.concept_attribution(adata, model, cells=cells, n_top_genes=2, progress=False)
    kw = {k: v for k, v in SMALL.items() if k != "expansion_factor"}
    sct.tl.sae_sweep(adata, use_rep="X_c2s", expansion_factors=(1,), **kw)
    return adata


def test_attribution_through_the_model_is_the_drop_of_a_recomputed_sentence(c2s_sae, model):
    from sctranscoder.core.embeddings import embed_sentences
    from sctranscoder.core.sae import encode_dense

    adata = c2s_sae
    act = adata.uns["sae_activations"]
    assert act["params"]["genes"]
    assert act["attribution"]["params"]["route"] == "c2s"
    sentences = [s.split()[: model.settings.n_genes] for s in adata.obs["cell_sentence"][:6]]
    tops = [g for s in sentences for g in s[:2]]
    attr = sct.get.concept_attribution(adata)
    assert attr.obs["n_cells"].sum() == len(tops)
    assert dict(attr.obs["n_cells"]) == pd.Series(tops).value_counts().to_dict()
    # one gene removed from one cell only: its row is that cell's drop, recomputed here
    gene = next(g for g in tops if tops.count(g) == 1)
    i = next(i for i, s in enumerate(sentences) if gene in s[:2])
    sae, scale = sae_module(adata.uns["sae"])
    cut = [x for x in sentences[i] if x != gene]
    e = embed_sentences(model, [sentences[i], cut], layer=1, stated_n_genes=[len(sentences[i])] * 2)
    a = encode_dense(sae, e, scale)
    np.testing.assert_allclose(attr[gene].X.toarray().ravel(), a[0] - a[1], atol=1e-4)


def test_sweep_table_and_plot(tmp_path):
    adata = sc.datasets.pbmc68k_reduced()[:300].copy()
    kw = {k: v for k, v in SMALL.items() if k != "expansion_factor"}
    sct.tl.sae_sweep(adata, use_rep="X_pca", expansion_factors=(1, 2), **kw)
    sct.tl.sae_sweep(
        adata,
        use_rep="X_umap",
        expansion_factors=(1, 2),
        key_added="sweep_umap",
        **{**kw, "k": 1},
    )
    t = adata.uns["sae_sweep"]["sweep"]
    assert list(t["expansion_factor"]) == [1, 2]
    assert list(t["n_concepts"]) == [50, 100]
    np.testing.assert_allclose(t["validation_r2"], 1 - t["validation_fvu"])
    fig = sct.pl.sae_sweep(adata, ["sae_sweep", "sweep_umap"], show=False, return_fig=True)
    assert next(line.get_label() for line in fig.axes[0].lines).startswith("X_pca")
    fig.savefig(tmp_path / "sweep.png")


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_records_survive_h5ad_and_zarr(c2s_sae, tmp_path, fmt):
    adata = c2s_sae
    path = tmp_path / f"a.{fmt}"
    if fmt == "h5ad":
        adata.write_h5ad(path)
        back = ad.read_h5ad(path)
    else:
        adata.write_zarr(path)
        back = ad.read_zarr(path)
    for key in ("c2s", "sae", "sae_activations", "sae_sweep"):
        assert sct._records.record_kind(back.uns[key]) == sct._records.record_kind(adata.uns[key])
    np.testing.assert_array_equal(back.obsm["X_c2s"], adata.obsm["X_c2s"])
    np.testing.assert_array_equal(back.obsm["X_sae"].toarray(), adata.obsm["X_sae"].toarray())
    sae, scale = sae_module(back.uns["sae"])
    np.testing.assert_allclose(
        encode(sae, back.obsm["X_c2s"], scale).toarray(), adata.obsm["X_sae"].toarray()
    )
    a, b = sct.get.concept_attribution(adata), sct.get.concept_attribution(back)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert list(a.obs_names) == list(b.obs_names)
    pd.testing.assert_frame_equal(back.uns["sae_sweep"]["sweep"], adata.uns["sae_sweep"]["sweep"])
    # the tools run on what was read back: attribution through the recorded model again
    sct.tl.concept_attribution(back, cells=[back.obs_names[0]], n_top_genes=1, progress=False)
