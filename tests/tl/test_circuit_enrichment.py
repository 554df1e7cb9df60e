"""From a circuit to biology: enrichment of its genes, and every cell scored by it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from _crosscheck import enrich_gseapy, ora_decoupler
from conftest import MARKERS
from scipy import stats

import sctranscoder as sct


@pytest.fixture(scope="module")
def circuit(trained_base):
    """A copy of the shared transcoders (and activations) with one circuit traced."""
    adata = trained_base.copy()
    cell = adata.obs_names[0]
    sct.tl.trace_circuit(adata, cell=cell, max_feature_nodes=64)
    return adata, f"circuit_{cell}"


def test_enrichment_against_a_dict_is_a_hypergeometric_test(circuit):
    adata, key = circuit
    rec = adata.uns[key]
    top = list(rec["genes"].index[:25])
    background = sorted({g for s in adata.obs["cell_sentence"] for g in s.split()[:100]})
    others = [g for g in background if g not in top]
    sets = {"circuit-like": top[:10] + others[:5], "unrelated": others[5:40]}
    sct.tl.circuit_enrichment(adata, circuit=key, gene_sets=sets)
    result = adata.uns[f"{key}_enrichment"]
    table = result["table"].set_index("term")
    assert list(table.index[:1]) == ["circuit-like"]
    row = table.loc["circuit-like"]
    assert row["overlap"] == 10
    assert row["size"] == 15
    expected = stats.hypergeom.sf(10 - 1, len(background), 15, 25)
    assert row["pvalue"] == pytest.approx(expected, rel=1e-9)
    assert result["params"]["n_background"] == len(background)
    # gseapy's offline enrichment gives the same p-values; decoupler's ORA agrees on the hit
    query = list(result["params"]["query"])
    gp = enrich_gseapy(query, sets, background=background).set_index("term")
    dc_ = ora_decoupler(query, sets, background=background).set_index("term")
    assert gp.loc["circuit-like", "pvalue"] == pytest.approx(row["pvalue"], rel=1e-6)
    assert row["fdr"] <= 0.05
    assert gp.loc["circuit-like", "fdr"] <= row["fdr"] + 1e-12
    assert dc_.loc["circuit-like", "pvalue"] == pytest.approx(expected, rel=1e-3)


def test_enrichment_with_data_derived_markers(circuit):
    adata, key = circuit
    sct.tl.circuit_enrichment(adata, circuit=key, gene_sets=MARKERS)
    table = adata.uns[f"{key}_enrichment"]["table"]
    assert table["term"].str.startswith("bulk_labels:").all()
    assert ((table["fdr"] >= 0) & (table["fdr"] <= 1)).all()
    assert table["pvalue"].is_monotonic_increasing
    # the old cross-check columns are gone: one implementation, one table
    assert not {"gseapy_fdr", "decoupler_pvalue", "decoupler_fdr"} & set(table.columns)


def test_enrichment_offline_library_fails_clearly(circuit, tmp_path, monkeypatch):
    adata, key = circuit
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = set(adata.uns.keys())
    circuit_before = set(adata.uns[key].keys())
    with pytest.raises(ValueError, match="allow_network"):
        sct.tl.circuit_enrichment(adata, circuit=key, gene_sets="NoSuchLibrary_2099")
    assert set(adata.uns.keys()) == before
    assert set(adata.uns[key].keys()) == circuit_before


def test_score_circuit_features_and_genes(circuit, tmp_path):
    adata, key = circuit
    sct.tl.score_circuit(adata, circuit=key)
    score = adata.obs[f"{key}_score"].to_numpy()
    rec = adata.uns[f"{key}_score"]
    # the feature score is the influence-weighted mean of the circuit's features
    manual = np.zeros(adata.n_obs)
    for layer, feature, w in zip(rec["layers"], rec["features"], rec["influence"], strict=True):
        manual += w * adata.obsm[f"X_sct_L{layer}"][:, feature].toarray().ravel()
    np.testing.assert_allclose(score, manual / rec["influence"].sum())
    cell = adata.uns[key]["params"]["cell"]
    # the traced cell carries its own circuit more than the median cell
    assert score[adata.obs_names.get_loc(cell)] > np.median(score)
    gene_score = adata.obs[f"{key}_score_genes"]
    assert gene_score.between(0, 1).all()
    assert gene_score.std() > 0
    path = tmp_path / "scored.h5ad"
    adata.write_h5ad(path)
    back = sc.read_h5ad(path)
    pd.testing.assert_series_equal(back.obs[f"{key}_score"], adata.obs[f"{key}_score"])
    np.testing.assert_allclose(back.uns[f"{key}_score"]["influence"], rec["influence"])


def test_score_circuit_needs_activations(circuit):
    adata, key = circuit
    bare = adata.copy()
    del bare.uns["sct_activations"]
    with pytest.raises(KeyError, match="feature_activations"):
        sct.tl.score_circuit(bare, circuit=key)
    with pytest.raises(KeyError, match=r"circuits: \['circuit_"):
        sct.tl.score_circuit(adata, circuit="circuit_nope")


def test_score_circuit_refuses_activations_of_other_transcoders(circuit):
    adata, key = circuit
    other = adata.copy()
    other.uns["sct2"] = other.uns["sct"]
    sct.tl.feature_activations(other, key="sct2", layers=[0], genes=False, progress=False)
    with pytest.raises(ValueError, match=r"not of adata\.uns\['sct'\]"):
        sct.tl.score_circuit(other, circuit=key, activations_key="sct2_activations")
