"""sct.tl.gene_attribution: counterfactual removal (or move) of each gene of a cell's sentence."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sctranscoder as sct
from sctranscoder.core.hooks import capture_mlp_io, run_to_layers
from sctranscoder.core.tokens import tokenize_prompts

LAYER = 2


def _stored(adata, layer: int = LAYER) -> np.ndarray:
    return np.asarray(adata.obsm[f"X_sct_L{layer}"].todense())


@pytest.fixture(scope="module")
def fired(trained_base):
    """A (feature, cell) pair of LAYER where the feature fires strongly."""
    X = _stored(trained_base)
    live = np.flatnonzero((X > 0).sum(0) >= 3)
    feature = int(live[np.argmax(X[:, live].max(0))])
    cell = str(trained_base.obs_names[int(np.argmax(X[:, feature]))])
    return feature, cell


@pytest.mark.parametrize("keep_n_genes", [True, False])
def test_remove_effect_equals_direct_recomputation(trained, model, fired, keep_n_genes):
    feature, cell = fired
    name = f"L{LAYER}F{feature}"
    sct.tl.gene_attribution(
        trained,
        model,
        feature=name,
        cells=[cell],
        keep_n_genes=keep_n_genes,
        progress=False,
        batch_size=16,
    )
    res = trained.uns[f"gene_attribution_{name}"]
    eff = res["effects"]
    genes = trained.obs.loc[cell, "cell_sentence"].split()[: model.settings.n_genes]
    assert eff["gene"].tolist() == genes
    tc = sct.get.transcoders(trained, layers=[LAYER])[LAYER]

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
    assert res["params"]["feature"] == name
    assert (res["params"]["layer"], res["params"]["index"]) == (LAYER, feature)


def test_default_cells_move_to_end_and_agreement(trained, fired):
    feature, _ = fired
    sct.tl.gene_attribution(
        trained,
        feature=f"L{LAYER}F{feature}",
        n_cells=2,
        mode="move_to_end",
        key_added="mte",
        progress=False,
    )
    res = trained.uns["mte"]
    top = np.argsort(-_stored(trained)[:, feature], kind="stable")[:2]
    assert set(res["params"]["cells"]) <= set(trained.obs_names[top])
    eff = res["effects"]
    last = eff.groupby("cell")["position"].transform("max") == eff["position"]
    # moving the last gene to the end leaves the sentence unchanged
    np.testing.assert_allclose(eff.loc[last, "effect"], 0.0, atol=1e-5)
    agree = res["agreement"]
    assert -1 <= agree["spearman"] <= 1
    assert 0 <= agree["top10_overlap"] <= 1
    assert 0 <= agree["top20_overlap"] <= 1
    genes = res["genes"]
    assert {"gene", "mean_effect", "sd", "n_cells", "correlational_score"} <= set(genes.columns)
    assert genes["correlational_score"].notna().any()
    assert genes["n_cells"].between(1, 2).all()
    # the correlational score is the gene's mean activation (sct.get.gene_activations)
    ga = sct.get.gene_activations(trained, LAYER)
    mean = pd.Series(ga.X[:, feature].toarray().ravel(), index=ga.obs_names.str.upper())
    scored = genes.dropna(subset=["correlational_score"])
    np.testing.assert_allclose(
        scored["correlational_score"].to_numpy(),
        mean.groupby(level=0).first().reindex(scored["gene"].str.upper()).to_numpy(),
        rtol=1e-5,
        atol=1e-7,
    )


def test_gene_attribution_bad_inputs(trained_base, fired):
    feature, cell = fired
    n_features = trained_base.obsm[f"X_sct_L{LAYER}"].shape[1]
    partial = trained_base.copy()
    del partial.uns["sct"]["transcoders"]["layer_1"]
    with pytest.raises(ValueError, match="has no transcoder for layer 1"):
        sct.tl.gene_attribution(partial, feature="L1F0", cells=[cell], progress=False)
    with pytest.raises(ValueError, match=r"has 1024 features \(L2F0\.\.L2F1023\)"):
        sct.tl.gene_attribution(trained_base, feature=f"L{LAYER}F{n_features}", progress=False)
    with pytest.raises(ValueError, match="not a feature name"):
        sct.tl.gene_attribution(trained_base, feature="2:17", progress=False)
    with pytest.raises(KeyError, match=r"not in adata\.obs_names"):
        sct.tl.gene_attribution(
            trained_base, feature=f"L{LAYER}F{feature}", cells=["no-such-cell"], progress=False
        )
    with pytest.raises(ValueError, match="mode"):
        sct.tl.gene_attribution(
            trained_base, feature=f"L{LAYER}F{feature}", mode="shuffle", progress=False
        )
    X = _stored(trained_base)
    silent = int(np.flatnonzero(X[trained_base.obs_names.get_loc(cell)] == 0)[0])
    if (X[:, silent] > 0).any():
        with pytest.raises(ValueError, match="fires in none"):
            sct.tl.gene_attribution(
                trained_base, feature=f"L{LAYER}F{silent}", cells=[cell], progress=False
            )
    dead = np.flatnonzero((X > 0).sum(0) == 0)
    if dead.size:
        with pytest.raises(ValueError, match="fires in no cell"):
            sct.tl.gene_attribution(
                trained_base, feature=f"L{LAYER}F{int(dead[0])}", progress=False
            )


def test_attribution_gsea_and_h5ad(trained, fired, tmp_path):
    feature, cell = fired
    sentence = trained.obs.loc[cell, "cell_sentence"].split()
    sets = {"first": sentence[:10], "last": sentence[90:100], "middle": sentence[40:55]}
    sct.tl.gene_attribution(
        trained,
        feature=f"L{LAYER}F{feature}",
        cells=[cell],
        progress=False,
        key_added="ga",
        gene_sets=sets,
        permutations=20,
        batch_size=128,
    )
    gsea = trained.uns["ga"]["gsea"]
    assert set(gsea["term"]) == set(sets)
    assert gsea["pvalue"].between(0, 1).all()
    path = tmp_path / "ga.h5ad"
    trained.write_h5ad(path)
    back = ad.read_h5ad(path).uns["ga"]
    pd.testing.assert_frame_equal(back["genes"], trained.uns["ga"]["genes"], check_dtype=False)
    pd.testing.assert_frame_equal(back["gsea"], gsea, check_dtype=False)
    assert back["params"]["feature"] == f"L{LAYER}F{feature}"
    assert back["agreement"]["n_genes"] == trained.uns["ga"]["agreement"]["n_genes"]
