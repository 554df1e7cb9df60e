"""sct.tl.trace_circuit on the embedded model: exact, labelled, stored in adata.uns."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch

import sctranscoder as sct


@pytest.fixture(scope="module")
def traced(trained_base, model):
    """The shared transcoders, with one circuit traced towards a given label."""
    adata = trained_base.copy()
    cell = adata.obs_names[3]
    sct.tl.trace_circuit(adata, cell=cell, target="CD14+ Monocyte", max_feature_nodes=96)
    return adata, model, cell


def test_trace_circuit_is_exact_and_labelled(traced):
    adata, model, cell = traced
    assert "sct_circuits" not in adata.uns  # one record per circuit, at the top of uns
    c = adata.uns[f"circuit_{cell}"]
    nodes = c["nodes"]
    explored = nodes.dropna(subset=["value"])
    assert len(explored) > 1
    np.testing.assert_allclose(
        explored["input_sum"] + explored["bias"], explored["value"], rtol=1e-4, atol=1e-4
    )
    # the target's value is the real model's logit (minus the mean), after the shared label prefix
    t = c["params"]["target"]
    genes = adata.obs.loc[cell, "cell_sentence"].split()[: model.settings.n_genes]
    prompt = model.tokenize([genes]).input_ids[0]
    prefix = model.tokenizer(t["answer_prefix"], add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt, torch.as_tensor(prefix, dtype=torch.long)])[None]
    logits = model.model(input_ids=ids).logits[0, -1]
    expected = float(logits[t["token_id"]] - logits.mean())
    assert c["scores"]["target_value"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # labels: CD14+ Monocyte shares " CD" with other labels, so the target is "14" after " CD"
    assert t["label"] == "CD14+ Monocyte"
    assert t["answer_prefix"] == " CD"
    assert t["token"] == "14"
    # nodes at gene tokens carry the gene; the gene table covers the sentence
    on_genes = nodes[nodes["gene"] != ""]
    assert set(on_genes["gene"]) <= set(genes)
    assert set(c["genes"].index) == set(genes)
    assert (c["edges"]["source"].isin(nodes.index) & c["edges"]["target"].isin(nodes.index)).all()


def test_circuit_round_trip_and_predicted_target(traced, tmp_path):
    adata, model, cell = traced
    other = adata.obs_names[10]
    sct.tl.trace_circuit(adata, cell=other, max_feature_nodes=32, label_token="first")
    c = adata.uns[f"circuit_{other}"]
    assert (
        c["params"]["target"]["label"]
        == model.predict([adata.obs.loc[other, "cell_sentence"].split()[:100]])[0]
    )
    assert c["params"]["target"]["answer_prefix"] == ""
    path = tmp_path / "c.h5ad"
    adata.write_h5ad(path)
    back = sc.read_h5ad(path)
    for key in (f"circuit_{cell}", f"circuit_{other}"):
        a, b = adata.uns[key], back.uns[key]
        assert a["nodes"].shape == b["nodes"].shape
        assert a["edges"].shape == b["edges"].shape
        np.testing.assert_allclose(a["edges"]["weight"], b["edges"]["weight"])
        assert a["scores"] == pytest.approx(b["scores"])


def test_trace_circuit_key_added(traced):
    adata, model, cell = traced
    copy = sct.tl.trace_circuit(
        adata, model, cell=cell, max_feature_nodes=8, key_added="mine", copy=True
    )
    assert copy.uns["mine"]["params"]["cell"] == cell
    assert "mine" not in adata.uns
    with pytest.raises(ValueError, match="contains '/'"):
        sct.tl.trace_circuit(adata, model, cell=cell, key_added="a/b")


def test_trace_circuit_bad_input(traced):
    adata, model, cell = traced
    with pytest.raises(KeyError, match=r"not in adata\.obs_names"):
        sct.tl.trace_circuit(adata, cell="no-such-cell")
    with pytest.raises(ValueError, match="not a label the model answers"):
        sct.tl.trace_circuit(adata, cell=cell, target="   ", key_added="t")
    with pytest.raises(ValueError, match="cannot encode the label"):
        sct.tl.trace_circuit(adata, cell=cell, target="   ", label_token="first", key_added="t")
    # transcoders on some layers only: trained here, since the shared ones cover every layer
    partial = adata[:30].copy()
    sct.tl.train_transcoders(
        partial, model, layers=[0, 1], n_tokens=1024, batch_size=1024, progress=False
    )
    with pytest.raises(KeyError, match=r"missing layer\(s\) \[2, 3\]"):
        sct.tl.trace_circuit(partial, cell=cell, key_added="t")
    untrained = sc.datasets.pbmc68k_reduced()[:5].copy()
    sct.pp.cell_sentences(untrained, model=model)
    with pytest.raises(KeyError, match="train_transcoders"):
        sct.tl.trace_circuit(untrained, cell=untrained.obs_names[0])
    with pytest.raises(ValueError, match="does not exist"):
        sct.tl.trace_circuit(adata, cell=cell, target="L9F1", key_added="t")


def test_trace_circuit_writes_nothing_when_its_enrichment_fails(traced):
    adata, model, cell = traced
    before = set(adata.uns)
    tiny_sets = {"only_two": ["CD74", "LYZ"]}  # below the 5 genes a set must keep
    with pytest.raises(ValueError, match="min_size=5"):
        sct.tl.trace_circuit(
            adata, model, cell=cell, max_feature_nodes=8, gene_sets=tiny_sets, key_added="t"
        )
    assert set(adata.uns) == before


def _keys(adata):
    return set(adata.uns), set(adata.obs.columns), set(adata.obsm)


def test_a_circuit_is_never_replaced_silently(traced, model):
    adata, _, cell = traced
    sub = adata[:40].copy()  # carries the traced circuit
    key = f"circuit_{cell}"
    sct.tl.feature_activations(sub, progress=False)
    sct.tl.score_circuit(sub, circuit=key, gene_score=False)
    sets = {
        "a": list(sub.uns[key]["genes"].index[:6]),
        "b": list(sub.uns[key]["genes"].index[6:12]),
    }
    sct.tl.circuit_enrichment(sub, circuit=key, gene_sets=sets, n_top=5, min_size=1)
    before, first = _keys(sub), sub.uns[key]
    with pytest.raises(ValueError, match="overwrite=True") as err:
        sct.tl.trace_circuit(sub, cell=cell, max_feature_nodes=8)
    for derived in (f"uns['{key}_score']", f"obs['{key}_score']", f"uns['{key}_enrichment']"):
        assert derived in str(err.value)
    assert _keys(sub) == before
    assert sub.uns[key] is first

    # (gene_sets=None: no new enrichment, so the old one's removal shows)
    sct.tl.trace_circuit(sub, cell=cell, max_feature_nodes=8, overwrite=True, gene_sets=None)
    assert sub.uns[key] is not first
    assert sub.uns[key]["params"]["max_feature_nodes"] == 8
    # what described the old circuit is gone with it
    assert f"{key}_score" not in sub.uns
    assert f"{key}_score" not in sub.obs
    assert f"{key}_enrichment" not in sub.uns


def test_cells_differing_by_slash_and_underscore_keep_their_own_circuits(traced, tmp_path):
    adata = traced[0][:20].copy()
    for key in [k for k in adata.uns if k.startswith("circuit_")]:
        del adata.uns[key]
    adata.obs_names = ["a/b", "a_b", *adata.obs_names[2:]]
    for cell in ("a/b", "a_b"):
        sct.tl.trace_circuit(adata, cell=cell, max_feature_nodes=4)
    assert {"circuit_a%2Fb", "circuit_a_b"} <= set(adata.uns)
    for cell in ("a/b", "a_b"):  # found by cell name, each its own
        assert sct.get.circuit(adata, cell).graph["params"]["cell"] == cell
    adata.write_h5ad(tmp_path / "c.h5ad")
    adata.write_zarr(tmp_path / "c.zarr")
    for back in (sc.read_h5ad(tmp_path / "c.h5ad"), ad.read_zarr(tmp_path / "c.zarr")):
        assert back.uns["circuit_a%2Fb"]["params"]["cell"] == "a/b"
        assert back.uns["circuit_a_b"]["params"]["cell"] == "a_b"


@pytest.mark.parametrize(
    ("target", "kwargs", "error", "match"),
    [
        ("l2f17", {}, ValueError, r"looks like a feature name: write it exactly as 'L2F17'"),
        ("L2 F17", {}, ValueError, "'L2F17'"),
        ("CD14 Monocyte", {}, ValueError, r"did you mean \['CD14\+ Monocyte'\]"),
        ("L1F999999", {}, ValueError, r"layer 1 has \d+ features"),
        ("L7F0", {}, ValueError, "no transcoder for layer 7"),
        (17, {}, TypeError, "a str"),
    ],
)
def test_trace_targets_are_checked_before_anything_is_written(traced, target, kwargs, error, match):
    adata, _, cell = traced
    before = _keys(adata)
    with pytest.raises(error, match=match):
        sct.tl.trace_circuit(adata, cell=cell, target=target, key_added="t", **kwargs)
    assert _keys(adata) == before


def test_a_label_the_model_never_answers_is_traced_only_when_asked_with_a_warning(traced, sct_logs):
    adata, _, cell = traced
    sub = adata[:20].copy()
    sct.tl.trace_circuit(
        sub,
        cell=cell,
        target="Macrophage",
        label_token="first",
        max_feature_nodes=4,
        key_added="t",
    )
    assert sub.uns["t"]["params"]["target"]["label"] == "Macrophage"
    assert "not a label the model answers" in sct_logs.text
