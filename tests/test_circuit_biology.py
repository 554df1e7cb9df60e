"""From a circuit to biology: enrichment of its genes, and every cell scored by it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import stats

import sctranscoder as sct


@pytest.fixture(scope="module")
def circuit():
    model = sct.datasets.tiny_c2s()
    adata = sc.datasets.pbmc68k_reduced()[:120].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, n_tokens=8192, batch_size=1024, progress=False)
    sct.tl.feature_activations(adata, gene_activations=False, progress=False)
    cell = adata.obs_names[0]
    sct.tl.trace_circuit(adata, cell, max_feature_nodes=64)
    return adata, f"circuit_{cell}"


def test_enrichment_against_a_dict_is_a_hypergeometric_test(circuit):
    adata, key = circuit
    rec = adata.uns["sct_circuits"][key]
    top = [g for g in rec["genes"].index[:25]]
    background = sorted({g for s in adata.obs["cell_sentence"] for g in s.split()[:100]})
    others = [g for g in background if g not in top]
    sets = {"circuit-like": top[:10] + others[:5], "unrelated": others[5:40]}
    sct.tl.circuit_enrichment(adata, key, sets)
    table = rec["enrichment"].set_index("term")
    assert list(table.index[:1]) == ["circuit-like"]
    row = table.loc["circuit-like"]
    assert row["overlap"] == 10 and row["size"] == 15
    expected = stats.hypergeom.sf(10 - 1, len(background), 15, 25)
    assert row["pvalue"] == pytest.approx(expected, rel=1e-9)
    # gseapy's offline enrichment gives the same p-values; decoupler's ORA agrees on the hit
    assert row["fdr"] <= 0.05 and row["gseapy_fdr"] <= row["fdr"] + 1e-12
    assert row["decoupler_pvalue"] == pytest.approx(expected, rel=1e-3)
    assert rec["enrichment_params"]["n_background"] == len(background)


def test_enrichment_with_data_derived_markers(circuit):
    adata, key = circuit
    sct.tl.circuit_enrichment(adata, key, "markers:bulk_labels")
    table = adata.uns["sct_circuits"][key]["enrichment"]
    assert table["term"].str.startswith("bulk_labels:").all()
    assert ((table["fdr"] >= 0) & (table["fdr"] <= 1)).all()
    assert table["pvalue"].is_monotonic_increasing


def test_enrichment_offline_library_fails_clearly(circuit, tmp_path, monkeypatch):
    adata, key = circuit
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = dict(adata.uns["sct_circuits"][key])
    with pytest.raises(ValueError, match="allow_network"):
        sct.tl.circuit_enrichment(adata, key, "NoSuchLibrary_2099")
    assert adata.uns["sct_circuits"][key].keys() == before.keys()


def test_score_circuit_features_and_genes(circuit, tmp_path):
    adata, key = circuit
    sct.tl.score_circuit(adata, key)
    score = adata.obs[f"{key}_score"].to_numpy()
    rec = adata.uns["sct_circuits"][key]["cell_scores"]
    # the feature score is the influence-weighted mean of the circuit's features
    manual = np.zeros(adata.n_obs)
    for layer, feature, w in zip(rec["layers"], rec["features"], rec["weights"], strict=True):
        manual += w * adata.obsm[f"X_sct_L{layer}"][:, feature].toarray().ravel()
    np.testing.assert_allclose(score, manual / rec["weights"].sum())
    cell = adata.uns["sct_circuits"][key]["params"]["cell"]
    # the traced cell carries its own circuit more than the median cell
    assert score[adata.obs_names.get_loc(cell)] > np.median(score)
    gene_score = adata.obs[f"{key}_gene_score"]
    assert gene_score.between(0, 1).all() and gene_score.std() > 0
    path = tmp_path / "scored.h5ad"
    adata.write_h5ad(path)
    back = sc.read_h5ad(path)
    pd.testing.assert_series_equal(back.obs[f"{key}_score"], adata.obs[f"{key}_score"])


def test_score_circuit_needs_activations(circuit):
    adata, key = circuit
    bare = adata.copy()
    del bare.uns["sct"]["activations"]
    with pytest.raises(KeyError, match="feature_activations"):
        sct.tl.score_circuit(bare, key)
    with pytest.raises(KeyError, match=r"available: \['circuit_"):
        sct.tl.score_circuit(adata, "circuit_nope")
