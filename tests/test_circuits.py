"""Circuits: exact attribution graphs, checked node by node, on three GPT-NeoX layouts."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import torch
from _models import c2s_410m_shrunk, tiny_neox, tiny_tokenizer
from conftest import PYTHIA_TOKENIZER

import sctranscoder as sct
from sctranscoder.core.attribution import FEATURE, Target, build_graph, prune
from sctranscoder.core.hooks import capture_mlp_io, run_to_layers
from sctranscoder.core.replacement import ReplacementModel
from sctranscoder.core.sentences import rank_genes
from sctranscoder.core.transcoder import Transcoder, TranscoderConfig


def _random_transcoders(model, *, expansion=2, k=8, seed=0):
    """Untrained transcoders: exactness must hold whatever the transcoders are."""
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    cfg = TranscoderConfig(d_in=d, d_out=d, n_features=expansion * d, k=k)
    out = {}
    for i in range(model.config.num_hidden_layers):
        tc = Transcoder(cfg, generator=gen)
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.1, generator=gen)
            tc.b_dec.normal_(0, 0.1, generator=gen)
        out[i] = tc.eval().requires_grad_(False)
    return out


def _assert_exact(graph, rtol=1e-4, atol=1e-4):
    """Every explored node: incoming edges (all sources) + bias == its value."""
    assert len(graph.rows) > 1
    for n, row in graph.rows.items():
        total = float(row.astype(np.float64).sum()) + graph.bias[n]
        assert total == pytest.approx(graph.value[n], rel=rtol, abs=atol), n
        if graph.node_type[n] == FEATURE:
            # an active feature's pre-activation is its activation
            assert graph.value[n] == pytest.approx(float(graph.activation[n]), rel=1e-4, abs=1e-5)


def _pbmc_genes(n_genes):
    pbmc = sc.datasets.pbmc68k_reduced()
    genes = [g.upper() for g in pbmc.raw.var_names]
    return rank_genes(pbmc.raw.X[:1], genes, n_genes=n_genes, seed=0)[0]


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_exact_on_both_residual_layouts(parallel):
    model = tiny_neox(n_layers=3, d=64, parallel_residual=parallel)
    tok = tiny_tokenizer()
    ids = torch.as_tensor(
        tok(" CD74 HLA-DRA LYZ S100A8 FTL", add_special_tokens=False)["input_ids"]
    )
    rm = ReplacementModel(model, _random_transcoders(model), ids)
    assert rm.check() < 1e-4  # our forward reproduces the Hugging Face forward
    graph = build_graph(rm, Target(kind="logit", token=5), max_feature_nodes=40, batch_size=16)
    _assert_exact(graph)
    pre = sum(1 for n in graph.rows if graph.node_type[n] == FEATURE)
    assert pre == 40


def test_exact_on_the_real_c2s_architecture(tmp_path):
    if not PYTHIA_TOKENIZER.exists():
        pytest.skip("shared/assets/pythia_20B_tokenizer.json not found (the real Pythia tokenizer)")
    path = c2s_410m_shrunk(tmp_path / "c2s", PYTHIA_TOKENIZER, n_layers=2)
    m = sct.load_model(path)
    assert m.d_model == 1024 and m.model.config.use_parallel_residual
    batch = m.tokenize([_pbmc_genes(12)])
    ids = batch.input_ids[0, : int(batch.lengths[0])]
    rm = ReplacementModel(m.model, _random_transcoders(m.model, expansion=1, k=8), ids)
    assert rm.check(atol=1e-3) < 1e-3
    token = m.tokenizer(" T", add_special_tokens=False)["input_ids"][0]
    graph = build_graph(rm, Target(kind="logit", token=token), max_feature_nodes=16, batch_size=8)
    _assert_exact(graph, rtol=1e-3, atol=1e-3)


def test_feature_target_is_its_pre_activation():
    model = tiny_neox(n_layers=3, d=64)
    tcs = _random_transcoders(model)
    ids = torch.as_tensor(
        tiny_tokenizer()(" GNLY NKG7 CCL5 GZMB", add_special_tokens=False)["input_ids"]
    )
    with capture_mlp_io(model, [2]) as store:
        run_to_layers(model, ids[None], torch.ones_like(ids)[None])
        x = store[2][0][0, -1]
    expected = float(tcs[2].pre_activations(x)[7])
    rm = ReplacementModel(model, tcs, ids)
    graph = build_graph(rm, Target(kind="feature", layer=2, feature=7), max_feature_nodes=30)
    assert graph.value[graph.target_node] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    _assert_exact(graph)
    # only features below the target's layer are explored
    assert all(graph.layer[n] < 2 for n in graph.rows if graph.node_type[n] == FEATURE)


def test_pruning_keeps_a_connected_subgraph():
    model = tiny_neox(n_layers=3, d=64)
    ids = torch.as_tensor(
        tiny_tokenizer()(" CD3D CD3E IL7R", add_special_tokens=False)["input_ids"]
    )
    graph = build_graph(
        ReplacementModel(model, _random_transcoders(model), ids),
        Target(kind="logit", token=3),
        max_feature_nodes=48,
    )
    p = prune(graph, node_threshold=0.5, edge_threshold=0.9)
    kept = set(p.nodes.tolist())
    assert graph.target_node in kept
    assert set(p.edges.ravel().tolist()) <= kept
    assert p.influence[graph.target_node] == 1.0
    assert 0 <= p.scores["replacement_score"] <= 1 and 0 <= p.scores["completeness_score"] <= 1
    looser = prune(graph, node_threshold=0.95, edge_threshold=0.99)
    assert looser.scores["n_kept_features"] >= p.scores["n_kept_features"]


# -- the AnnData tool on the embedded model ----------------------------------------------------


@pytest.fixture(scope="module")
def traced():
    model = sct.datasets.tiny_c2s()
    adata = sc.datasets.pbmc68k_reduced()[:80].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, n_tokens=8192, batch_size=1024, progress=False)
    cell = adata.obs_names[3]
    sct.tl.trace_circuit(adata, cell, target="CD14+ Monocyte", max_feature_nodes=96)
    return adata, model, cell


def test_trace_circuit_is_exact_and_labelled(traced):
    adata, model, cell = traced
    c = adata.uns["sct_circuits"][f"circuit_{cell}"]
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
    assert t["label"] == "CD14+ Monocyte" and t["answer_prefix"] == " CD" and t["token"] == "14"
    # nodes at gene tokens carry the gene; the gene table covers the sentence
    on_genes = nodes[nodes["gene"] != ""]
    assert set(on_genes["gene"]) <= set(genes)
    assert set(c["genes"].index) == set(genes)
    assert (c["edges"]["source"].isin(nodes.index) & c["edges"]["target"].isin(nodes.index)).all()


def test_circuit_round_trip_and_predicted_target(traced, tmp_path):
    adata, model, cell = traced
    other = adata.obs_names[10]
    sct.tl.trace_circuit(adata, other, max_feature_nodes=32, label_token="first")
    c = adata.uns["sct_circuits"][f"circuit_{other}"]
    assert (
        c["params"]["target"]["label"]
        == model.predict([adata.obs.loc[other, "cell_sentence"].split()[:100]])[0]
    )
    assert c["params"]["target"]["answer_prefix"] == ""
    path = tmp_path / "c.h5ad"
    adata.write_h5ad(path)
    back = sc.read_h5ad(path)
    for key in (f"circuit_{cell}", f"circuit_{other}"):
        a, b = adata.uns["sct_circuits"][key], back.uns["sct_circuits"][key]
        assert a["nodes"].shape == b["nodes"].shape and a["edges"].shape == b["edges"].shape
        np.testing.assert_allclose(a["edges"]["weight"], b["edges"]["weight"])
        assert a["scores"] == pytest.approx(b["scores"])


def test_trace_circuit_bad_input(traced):
    adata, model, cell = traced
    with pytest.raises(KeyError, match=r"not in adata\.obs_names"):
        sct.tl.trace_circuit(adata, "no-such-cell")
    with pytest.raises(ValueError, match="cannot encode the label"):
        sct.tl.trace_circuit(adata, cell, target="   ")
    partial = adata[:30].copy()
    sct.tl.train_transcoders(
        partial, model, layers=[0, 1], n_tokens=1024, batch_size=1024, progress=False
    )
    with pytest.raises(KeyError, match=r"missing layer\(s\) \[2, 3\]"):
        sct.tl.trace_circuit(partial, cell)
    untrained = sc.datasets.pbmc68k_reduced()[:5].copy()
    sct.pp.cell_sentences(untrained, model=model)
    with pytest.raises(KeyError, match="train_transcoders"):
        sct.tl.trace_circuit(untrained, untrained.obs_names[0])
    with pytest.raises(ValueError, match="does not exist"):
        sct.tl.trace_circuit(adata, cell, target="L9F1")
