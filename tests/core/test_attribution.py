"""Exact attribution graphs of the local replacement model, checked node by node, on three
GPT-NeoX layouts (parallel and sequential residual, and the real C2S-Pythia-410m shape).
"""

from __future__ import annotations

import pytest
import torch
from _graphs import assert_exact, random_transcoders
from _models import c2s_410m_shrunk, tiny_neox, tiny_tokenizer
from conftest import PYTHIA_TOKENIZER

import sctranscoder as sct
from sctranscoder._constants import NodeType
from sctranscoder.core.attribution import Target, build_graph, prune
from sctranscoder.core.hooks import capture_mlp_io, run_to_layers
from sctranscoder.core.replacement import ReplacementModel
from sctranscoder.core.sentences import rank_genes


def _pbmc_genes(pbmc, n_genes):
    genes = [g.upper() for g in pbmc.raw.var_names]
    return rank_genes(pbmc.raw.X[:1], genes, n_genes=n_genes, seed=0)[0]


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_exact_on_both_residual_layouts(parallel):
    model = tiny_neox(n_layers=3, d=64, parallel_residual=parallel)
    tok = tiny_tokenizer()
    ids = torch.as_tensor(
        tok(" CD74 HLA-DRA LYZ S100A8 FTL", add_special_tokens=False)["input_ids"]
    )
    rm = ReplacementModel(model, random_transcoders(model), ids)
    assert rm.check() < 1e-4  # our forward reproduces the Hugging Face forward
    graph = build_graph(rm, Target(kind="logit", token=5), max_feature_nodes=40, batch_size=16)
    assert_exact(graph)
    pre = sum(1 for n in graph.rows if graph.node_type[n] == NodeType.FEATURE)
    assert pre == 40


def test_exact_on_the_real_c2s_architecture(tmp_path, pbmc):
    if not PYTHIA_TOKENIZER.exists():
        pytest.skip("shared/assets/pythia_20B_tokenizer.json not found (the real Pythia tokenizer)")
    path = c2s_410m_shrunk(tmp_path / "c2s", PYTHIA_TOKENIZER, n_layers=2)
    m = sct.load_model(path)
    assert m.d_model == 1024
    assert m.model.config.use_parallel_residual
    batch = m.tokenize([_pbmc_genes(pbmc, 12)])
    ids = batch.input_ids[0, : int(batch.lengths[0])]
    rm = ReplacementModel(m.model, random_transcoders(m.model, expansion=1, k=8), ids)
    assert rm.check(atol=1e-3) < 1e-3
    token = m.tokenizer(" T", add_special_tokens=False)["input_ids"][0]
    graph = build_graph(rm, Target(kind="logit", token=token), max_feature_nodes=16, batch_size=8)
    assert_exact(graph, rtol=1e-3, atol=1e-3)


def test_feature_target_is_its_pre_activation():
    model = tiny_neox(n_layers=3, d=64)
    tcs = random_transcoders(model)
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
    assert graph.node_type[graph.target_node] == NodeType.TARGET
    assert_exact(graph)
    # only features below the target's layer are explored
    assert all(graph.layer[n] < 2 for n in graph.rows if graph.node_type[n] == NodeType.FEATURE)


def test_pruning_keeps_a_connected_subgraph():
    model = tiny_neox(n_layers=3, d=64)
    ids = torch.as_tensor(
        tiny_tokenizer()(" CD3D CD3E IL7R", add_special_tokens=False)["input_ids"]
    )
    graph = build_graph(
        ReplacementModel(model, random_transcoders(model), ids),
        Target(kind="logit", token=3),
        max_feature_nodes=48,
    )
    p = prune(graph, node_threshold=0.5, edge_threshold=0.9)
    kept = set(p.nodes.tolist())
    assert graph.target_node in kept
    assert set(p.edges.ravel().tolist()) <= kept
    assert p.influence[graph.target_node] == 1.0
    assert 0 <= p.scores["replacement_score"] <= 1
    assert 0 <= p.scores["completeness_score"] <= 1
    looser = prune(graph, node_threshold=0.95, edge_threshold=0.99)
    assert looser.scores["n_kept_features"] >= p.scores["n_kept_features"]


def test_node_type_aliases_are_the_enum():
    from sctranscoder.core import attribution

    assert (attribution.EMBEDDING, attribution.ERROR, attribution.FEATURE, attribution.TARGET) == (
        NodeType.EMBEDDING,
        NodeType.ERROR,
        NodeType.FEATURE,
        NodeType.TARGET,
    )
