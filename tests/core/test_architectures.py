"""Every family of circuits (GPT-NeoX, Llama/Mistral/Qwen2, Gemma-2, GPT-2): the replacement
forward against Hugging Face, exact edges, the exact split by attention head, and the residual
part of feature-to-feature edges; at the real widths of C2S-Pythia-410m and C2S-Scale-Gemma-2-2B.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _graphs import FAMILIES, assert_exact, random_transcoders
from _models import (
    c2s_410m_shrunk,
    c2s_scale_gemma2_shrunk,
    gene_sentencepiece_tokenizer,
    tiny_gemma2,
    tiny_neox,
)
from conftest import PYTHIA_TOKENIZER

import sctranscoder as sct
from sctranscoder._constants import NodeType
from sctranscoder.core.architectures import architecture
from sctranscoder.core.attribution import Attributor, Target, build_graph
from sctranscoder.core.connections import edge_split
from sctranscoder.core.replacement import ReplacementModel
from sctranscoder.core.sentences import rank_genes


def assert_heads_sum_to_the_edges(at, node, tol):
    """The direct part plus every head's part equals each incoming edge of ``node``."""
    heads, parts = at.head_rows(node)
    full, _, _ = at.rows([node])
    assert parts.shape == (len(heads), full.shape[1])
    assert heads[0].tolist() == [-1, -1]  # the direct part first
    scale = max(float(np.abs(full).max()), 1e-6)
    assert np.abs(parts.astype(np.float64).sum(0) - full[0]).max() <= tol * scale
    return heads, parts


def _prompt(n=14, seed=0):
    return torch.randint(2, 600, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILIES)
def test_replacement_is_exact_on_every_family(name):
    model = FAMILIES[name]()
    rm = ReplacementModel(model, random_transcoders(model), _prompt())
    assert rm.check(atol=1e-4) < 1e-4  # our forward reproduces the Hugging Face logits
    target = Target(kind="logit", token=5)
    graph = build_graph(rm, target, max_feature_nodes=24, batch_size=16)
    assert_exact(graph)
    at = Attributor(rm, target, batch_size=16)
    heads, _ = assert_heads_sum_to_the_edges(at, at.target_node, tol=1e-5)
    n_heads = sum(blk.attention.n_heads for blk in rm.layers)
    assert len(heads) == 1 + n_heads  # a logit target reads every layer's heads
    feature = next(n for n in graph.rows if graph.node_type[n] == NodeType.FEATURE)
    assert_heads_sum_to_the_edges(at, feature, tol=1e-5)


def test_gemma2_settings_are_read_and_matter():
    model = tiny_gemma2(n_layers=2, sliding_window=3)
    arch = architecture(model)
    att = [blk.attention for blk in arch.blocks]
    assert [a.sliding_window for a in att] == [3, None]  # even layers slide
    assert att[0].softcap == 50.0
    assert arch.final_softcap == 30.0
    assert (att[0].n_heads, att[0].n_kv_heads, att[0].head_dim) == (4, 2, 32)
    # (1 + w) norms
    torch.testing.assert_close(
        arch.blocks[0].attn_norm.weight, 1 + model.model.layers[0].input_layernorm.weight
    )
    # the transcoder's target is what the MLP adds: after the post-feedforward norm
    assert arch.blocks[0].mlp_write is model.model.layers[0].post_feedforward_layernorm
    rm = ReplacementModel(model, random_transcoders(model), _prompt(12))
    assert rm.check() < 1e-4
    # leaving out the window changes the logits: it is really applied
    object.__setattr__(rm.arch.blocks[0].attention, "sliding_window", None)
    rm.frozen = rm._record()
    with pytest.raises(RuntimeError, match="differs"):
        rm.check()


def test_feature_edges_split_into_residual_and_attention():
    """``residual_part = activation * frozen scale * connection`` is the edge with every
    attention path cut, for LayerNorm (mean removed) and RMSNorm models.
    """
    for model in (tiny_neox(n_layers=3), tiny_gemma2(n_layers=3)):
        rm = ReplacementModel(model, random_transcoders(model), _prompt(10))
        target = Target(kind="logit", token=7)
        graph = build_graph(rm, target, max_feature_nodes=40, batch_size=20)
        at = Attributor(rm, target, batch_size=20)
        checked = 0
        features = [n for n in graph.rows if graph.node_type[n] == NodeType.FEATURE]
        for node in [*features[:4], graph.target_node]:
            _, parts = at.head_rows(node)
            direct = parts[0]
            sources = np.flatnonzero(
                (graph.node_type == NodeType.FEATURE) & (graph.rows[node] != 0)
            )
            edges = np.stack([sources, np.full(sources.size, node)], 1)
            split = edge_split(rm, graph, edges, target)
            same = graph.position[sources] == graph.position[node]
            np.testing.assert_allclose(
                split["residual_part"][same], direct[sources[same]], rtol=1e-4, atol=1e-6
            )
            assert (split["residual_part"][~same] == 0).all()
            checked += int(same.sum())
        assert checked > 0


def _pbmc_genes(pbmc, n_genes):
    genes = [g.upper() for g in pbmc.raw.var_names]
    return rank_genes(pbmc.raw.X[:1], genes, n_genes=n_genes, seed=0)[0]


def test_exact_at_the_real_c2s_pythia_410m_widths(tmp_path, pbmc):
    if not PYTHIA_TOKENIZER.exists():
        pytest.skip("shared/assets/pythia_20B_tokenizer.json not found (the real Pythia tokenizer)")
    m = sct.load_model(c2s_410m_shrunk(tmp_path / "c2s", PYTHIA_TOKENIZER, n_layers=2))
    batch = m.tokenize([_pbmc_genes(pbmc, 8)])
    ids = batch.input_ids[0, : int(batch.lengths[0])]
    rm = ReplacementModel(m.model, random_transcoders(m.model, expansion=1, k=8), ids)
    assert rm.check(atol=1e-3) < 1e-3
    target = Target(kind="logit", token=m.tokenizer(" T", add_special_tokens=False)["input_ids"][0])
    at = Attributor(rm, target, batch_size=16)
    heads, _ = assert_heads_sum_to_the_edges(at, at.target_node, tol=1e-4)
    assert len(heads) == 1 + 2 * 16


def test_exact_at_the_real_c2s_scale_gemma2_2b_widths(tmp_path, pbmc):
    genes = [g.upper() for g in pbmc.raw.var_names]
    tok = gene_sentencepiece_tokenizer(genes)
    m = sct.load_model(c2s_scale_gemma2_shrunk(tmp_path / "gemma", tok, n_layers=2))
    cfg = m.model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (2304, 9216, 256)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 4)
    batch = m.tokenize([_pbmc_genes(pbmc, 8)])
    ids = batch.input_ids[0, : int(batch.lengths[0])]
    rm = ReplacementModel(m.model, random_transcoders(m.model, expansion=1, k=8), ids)
    assert rm.check(atol=1e-3) < 1e-3
    target = Target(kind="logit", token=5)
    graph = build_graph(rm, target, max_feature_nodes=8, batch_size=8)
    assert_exact(graph, rtol=1e-3, atol=1e-3)
    at = Attributor(rm, target, batch_size=16)
    heads, _ = assert_heads_sum_to_the_edges(at, at.target_node, tol=1e-4)
    assert len(heads) == 1 + 2 * 8


def test_unsupported_architecture_is_refused_with_the_families():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match="gemma2"):
        architecture(model)
