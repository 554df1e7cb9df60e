"""Features of cell populations (rank_features_groups) and counterfactual gene attribution."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import sctranscoder as sct
from sctranscoder.tl._gene_attribution import gene_attribution
from sctranscoder.tl._rank_features_groups import rank_features_groups

LAYER = 2


@pytest.fixture(scope="module")
def model():
    return sct.datasets.tiny_c2s()


@pytest.fixture(scope="module")
def adata(model):
    a = sc.datasets.pbmc68k_reduced()[:150].copy()
    sct.pp.cell_sentences(a, model=model)
    sct.tl.train_transcoders(a, model, n_tokens=8192, batch_size=1024, progress=False)
    sct.tl.feature_activations(a, progress=False)
    return a


@pytest.fixture(scope="module")
def ranked(adata):
    a = adata.copy()
    rank_features_groups(a, "bulk_labels", layers=[LAYER])
    return a


def _stored(adata, layer: int = LAYER) -> np.ndarray:
    return np.asarray(adata.obsm[f"X_sct_L{layer}"].todense())


# --- rank_features_groups --------------------------------------------------------------------


def test_rank_features_groups_structure(ranked):
    res = ranked.uns["rank_features_groups"]
    for field in ("names", "scores", "logfoldchanges", "pvals", "pvals_adj", "pts", "params"):
        assert field in res
    groups = set(res["names"].dtype.names)
    counts = ranked.obs["bulk_labels"].value_counts()
    assert groups == {str(g) for g in counts.index[counts >= 2]}  # singleton groups left out
    assert len(res["names"]) == 1024
    assert all(n.startswith(f"L{LAYER}F") for n in res["names"][next(iter(groups))])
    spec = res["specificity"]
    assert list(spec.columns) == ["layer", "feature", "top_group", "top_mean", "specificity", "tau"]
    live = spec["top_mean"] > 0
    assert spec.loc[live, "specificity"].between(0, 1).all()
    assert spec.loc[live, "tau"].between(0, 1).all()
    assert spec.loc[~live, "specificity"].isna().all()
    assert res["params"]["layers"].tolist() == [LAYER]


def test_top_feature_of_a_group_is_more_active_there(ranked):
    res = ranked.uns["rank_features_groups"]
    X = _stored(ranked)
    labels = ranked.obs["bulk_labels"].astype(str).to_numpy()
    for group in ("CD19+ B", "CD14+ Monocyte", "Dendritic"):
        j = int(res["names"][group][0].split("F")[1])
        assert X[labels == group, j].mean() > X[labels != group, j].mean()


def test_rank_genes_groups_df_and_dotplot(ranked):
    df = sc.get.rank_genes_groups_df(ranked, "CD19+ B", key="rank_features_groups")
    assert {"names", "scores", "pvals_adj", "pct_nz_group"} <= set(df.columns)
    assert df["scores"].is_monotonic_decreasing
    fa = sct.get.activations(ranked, LAYER)
    # a ranking of this layer alone travels with the layer's feature AnnData
    assert "rank_features_groups" in fa.uns
    dp = sc.pl.rank_genes_groups_dotplot(
        fa, key="rank_features_groups", groupby="bulk_labels", n_genes=2, show=False
    )
    assert dp is not None


def test_group_means_match_a_direct_groupby(ranked):
    means = ranked.uns["rank_features_groups"]["group_means"]
    direct = (
        pd.DataFrame(_stored(ranked), index=ranked.obs_names)
        .groupby(ranked.obs["bulk_labels"].astype(str).to_numpy())
        .mean()
        .T
    )
    direct.index = [f"L{LAYER}F{j}" for j in direct.index]
    np.testing.assert_allclose(
        means[direct.columns].to_numpy(), direct.to_numpy(), rtol=1e-5, atol=1e-6
    )
    spec = ranked.uns["rank_features_groups"]["specificity"]
    assert (spec["top_group"][spec["top_mean"] > 0] == means.idxmax(1)[spec["top_mean"] > 0]).all()


def test_rank_features_groups_all_layers_and_errors(adata):
    out = rank_features_groups(adata, "bulk_labels", n_features=5, key_added="rfg", copy=True)
    assert out is not None and "rfg" not in adata.uns
    res = out.uns["rfg"]
    assert len(res["names"]) == 5
    assert res["group_means"].shape[0] == 4 * 1024
    with pytest.raises(KeyError, match="feature_activations"):
        bare = adata.copy()
        del bare.uns["sct"]["activations"]
        rank_features_groups(bare, "bulk_labels")
    with pytest.raises(KeyError, match="not found"):
        rank_features_groups(adata, "no_such_column")


def test_rank_features_groups_h5ad_round_trip(ranked, tmp_path):
    path = tmp_path / "ranked.h5ad"
    ranked.write_h5ad(path)
    back = ad.read_h5ad(path)
    res, orig = back.uns["rank_features_groups"], ranked.uns["rank_features_groups"]
    pd.testing.assert_frame_equal(res["group_means"], orig["group_means"])
    pd.testing.assert_frame_equal(res["specificity"], orig["specificity"], check_dtype=False)
    df0 = sc.get.rank_genes_groups_df(ranked, "CD19+ B", key="rank_features_groups")
    df1 = sc.get.rank_genes_groups_df(back, "CD19+ B", key="rank_features_groups")
    pd.testing.assert_frame_equal(df0, df1, check_dtype=False)


# --- gene_attribution ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fired(adata):
    """A (feature, cell) pair of LAYER where the feature fires strongly."""
    X = _stored(adata)
    live = np.flatnonzero((X > 0).sum(0) >= 3)
    feature = int(live[np.argmax(X[:, live].max(0))])
    cell = str(adata.obs_names[int(np.argmax(X[:, feature]))])
    return feature, cell


@pytest.mark.parametrize("keep_n_genes", [True, False])
def test_remove_effect_equals_direct_recomputation(adata, model, fired, keep_n_genes):
    from sctranscoder.core.hooks import capture_mlp_io, run_to_layers
    from sctranscoder.core.tokens import tokenize_prompts

    feature, cell = fired
    a = adata.copy()
    gene_attribution(
        a,
        LAYER,
        feature,
        cells=[cell],
        keep_n_genes=keep_n_genes,
        progress=False,
        batch_size=16,
    )
    res = a.uns[f"gene_attribution_L{LAYER}F{feature}"]
    eff = res["effects"]
    genes = a.obs.loc[cell, "cell_sentence"].split()[: model.settings.n_genes]
    assert eff["gene"].tolist() == genes
    tc = sct.get.transcoders(a, layers=[LAYER])[LAYER]

    def direct(sentence: list[str]) -> float:
        if keep_n_genes:  # the prompt still states the original number of genes
            template = model.settings.template.replace("{n_genes}", str(len(genes)))
            settings = dataclasses.replace(model.settings, template=template)
            batch = tokenize_prompts(model.tokenizer, [sentence], settings)
            assert f" {len(genes)} gene" in batch.prompts[0]
        else:
            batch = model.tokenize([sentence])
        with capture_mlp_io(model.model, [LAYER]) as store:
            run_to_layers(model.model, batch.input_ids, batch.attention_mask)
            acts = tc.encode(store[LAYER][0].float())[0, :, feature]
        return float(acts[batch.gene_index[0] >= 0].max())

    original = direct(genes)
    assert eff["original"].iloc[0] == pytest.approx(original, rel=1e-4, abs=1e-5)
    for p in (0, 1, len(genes) // 2, len(genes) - 1):
        cf = direct(genes[:p] + genes[p + 1 :])
        assert eff["effect"].iloc[p] == pytest.approx(original - cf, rel=1e-3, abs=1e-4)
    table = res["genes"]
    assert table["mean_effect"].is_monotonic_decreasing
    assert (table["n_cells"] == 1).all()
    assert res["params"]["cells"].tolist() == [cell]
    assert res["params"]["keep_n_genes"] == keep_n_genes


def test_default_cells_move_to_end_and_agreement(adata, fired):
    feature, _ = fired
    a = adata.copy()
    gene_attribution(
        a, LAYER, feature, n_cells=2, mode="move_to_end", key_added="mte", progress=False
    )
    res = a.uns["mte"]
    top = np.argsort(-_stored(a)[:, feature], kind="stable")[:2]
    assert set(res["params"]["cells"]) <= set(a.obs_names[top])
    eff = res["effects"]
    last = eff.groupby("cell")["position"].transform("max") == eff["position"]
    # moving the last gene to the end leaves the sentence unchanged
    np.testing.assert_allclose(eff.loc[last, "effect"], 0.0, atol=1e-5)
    agree = res["agreement"]
    assert -1 <= agree["spearman"] <= 1
    assert 0 <= agree["top10_overlap"] <= 1 and 0 <= agree["top20_overlap"] <= 1
    genes = res["genes"]
    assert {"gene", "mean_effect", "sd", "n_cells", "correlational_score"} <= set(genes.columns)
    assert genes["correlational_score"].notna().any()
    assert genes["n_cells"].between(1, 2).all()


def test_gene_attribution_bad_inputs(adata, fired):
    feature, cell = fired
    n_features = adata.obsm[f"X_sct_L{LAYER}"].shape[1]
    partial = adata.copy()
    del partial.uns["sct"]["transcoders"]["layer_1"]
    with pytest.raises(KeyError, match="No transcoder for layer"):
        gene_attribution(partial, 1, 0, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        gene_attribution(adata, LAYER, n_features, progress=False)
    with pytest.raises(KeyError, match=r"not in adata\.obs_names"):
        gene_attribution(adata, LAYER, feature, cells=["no-such-cell"], progress=False)
    with pytest.raises(ValueError, match="mode"):
        gene_attribution(adata, LAYER, feature, mode="shuffle", progress=False)
    X = _stored(adata)
    silent = int(np.flatnonzero(X[adata.obs_names.get_loc(cell)] == 0)[0])
    if (X[:, silent] > 0).any():
        with pytest.raises(ValueError, match="fires in none"):
            gene_attribution(adata, LAYER, silent, cells=[cell], progress=False)
    dead = np.flatnonzero((X > 0).sum(0) == 0)
    if dead.size:
        with pytest.raises(ValueError, match="fires in no cell"):
            gene_attribution(adata, LAYER, int(dead[0]), progress=False)


def test_attribution_gsea_and_h5ad(adata, fired, tmp_path):
    feature, cell = fired
    a = adata.copy()
    sentence = a.obs.loc[cell, "cell_sentence"].split()
    sets = {"first": sentence[:10], "last": sentence[90:100], "middle": sentence[40:55]}
    gene_attribution(
        a,
        LAYER,
        feature,
        cells=[cell],
        progress=False,
        key_added="ga",
        gene_sets=sets,
        permutations=20,
        batch_size=128,
    )
    gsea = a.uns["ga"]["gsea"]
    assert set(gsea["term"]) == set(sets)
    assert gsea["pvalue"].between(0, 1).all()
    path = tmp_path / "ga.h5ad"
    a.write_h5ad(path)
    back = ad.read_h5ad(path).uns["ga"]
    pd.testing.assert_frame_equal(back["genes"], a.uns["ga"]["genes"], check_dtype=False)
    pd.testing.assert_frame_equal(back["gsea"], gsea, check_dtype=False)
    assert back["params"]["feature"] == feature
    assert back["agreement"]["n_genes"] == a.uns["ga"]["agreement"]["n_genes"]
