"""sct.tl.trace_circuit on Gemma-2 and Llama models as on GPT-NeoX; attention heads, edge splits,
feature connections and their plot, end to end through AnnData.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from _models import tiny_gemma2, tiny_llama

import sctranscoder as sct
from sctranscoder.core.architectures import architecture
from sctranscoder.core.sentences import PromptSettings

BUILDERS = {"gemma2": tiny_gemma2, "llama": tiny_llama}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family_circuit(request, tmp_path_factory):
    """A random model of the family, transcoders trained on 30 PBMCs, one circuit traced."""
    path = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](path, n_layers=2)
    model = sct.load_model(path, settings=PromptSettings(n_genes=24))
    adata = sc.datasets.pbmc68k_reduced()[:30].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(
        adata, model, n_tokens=4096, batch_size=512, expansion_factor=4, k=8, progress=False
    )
    cell = adata.obs_names[0]
    sct.tl.trace_circuit(
        adata, model, cell=cell, target="B cell", max_feature_nodes=24, progress=False
    )
    return request.param, adata, model, f"circuit_{cell}"


def test_trace_circuit_is_exact_on_gemma2_and_llama(family_circuit):
    family, adata, _, key = family_circuit
    c = adata.uns[key]
    assert c["params"]["family"] == family
    explored = c["nodes"].dropna(subset=["value"])
    assert len(explored) > 1
    np.testing.assert_allclose(
        explored["input_sum"] + explored["bias"], explored["value"], rtol=1e-4, atol=1e-4
    )


def test_heads_table_sums_to_the_target_input(family_circuit):
    _, adata, model, key = family_circuit
    c = adata.uns[key]
    heads = c["heads"]
    target = heads[heads["node"] == "target"]
    arch = architecture(model.model)
    n_heads = sum(blk.attention.n_heads for blk in arch.blocks)
    assert len(target) == 1 + n_heads  # the direct part and every head
    assert (target["head"] == -1).sum() == 1
    input_sum = c["nodes"].loc["target", "input_sum"]
    assert target["attribution"].sum() == pytest.approx(input_sum, rel=1e-4, abs=1e-4)
    assert target["fraction"].sum() == pytest.approx(1.0)
    top = target.sort_values("abs_attribution").iloc[-1]
    assert top["top_source"] in set(c["nodes"].index) | {""} or "@" in top["top_source"]


def test_edges_carry_connection_and_residual_part(family_circuit):
    _, adata, _, key = family_circuit
    edges = adata.uns[key]["edges"]
    nodes = adata.uns[key]["nodes"]
    from_features = edges["source"].map(nodes["type"]) == "feature"
    assert from_features.any()
    assert edges.loc[from_features, "connection"].notna().all()
    assert edges.loc[~from_features, "connection"].isna().all()
    same = edges["source"].map(nodes["position"]) == edges["target"].map(nodes["position"])
    off = from_features & ~same
    assert (edges.loc[off, "residual_part"] == 0).all()
    on = from_features & same
    np.testing.assert_allclose(
        edges.loc[on, "residual_part"],
        edges.loc[on, "source_activation"]
        * edges.loc[on, "norm_scale"]
        * edges.loc[on, "connection"],
    )


def test_circuit_with_heads_survives_h5ad(family_circuit, tmp_path):
    _, adata, _, key = family_circuit
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = sc.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_frame_equal(
        back.uns[key]["heads"], adata.uns[key]["heads"], check_dtype=False
    )
    assert back.uns[key]["params"]["head_nodes"] == ["target"]


def test_heads_of_a_chosen_feature_node_and_bad_names(trained_base):
    adata = trained_base[:10].copy()
    cell = adata.obs_names[2]
    sct.tl.trace_circuit(adata, cell=cell, max_feature_nodes=16, progress=False)
    nodes = adata.uns[f"circuit_{cell}"]["nodes"]
    feature = nodes[(nodes["type"] == "feature") & nodes["value"].notna()].index[0]
    sct.tl.trace_circuit(
        adata,
        cell=cell,
        max_feature_nodes=16,
        head_nodes=["target", feature],
        overwrite=True,
        progress=False,
    )
    heads = adata.uns[f"circuit_{cell}"]["heads"]
    assert set(heads["node"]) == {"target", feature}
    mine = heads[heads["node"] == feature]
    expected = nodes.loc[feature, "input_sum"]
    assert mine["attribution"].sum() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    before = dict(adata.uns)
    with pytest.raises(ValueError, match="head_nodes"):
        sct.tl.trace_circuit(adata, cell=cell, head_nodes=["L9"], key_added="t", progress=False)
    with pytest.raises(ValueError, match="not explored"):
        sct.tl.trace_circuit(
            adata,
            cell=cell,
            max_feature_nodes=4,
            head_nodes=["L0F99999@0"],
            key_added="t",
            progress=False,
        )
    assert set(adata.uns) == set(before)


def test_circuit_heads_plot(family_circuit, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    _, adata, _, key = family_circuit
    sc.settings.figdir = tmp_path
    ax = sct.pl.circuit_heads(adata, key, show=False, save="_test.png")
    assert ax.get_xlabel() == "head"
    assert (tmp_path / f"{key}_heads_test.png").stat().st_size > 1000
    fig = sct.pl.circuit_heads(adata, key, value="fraction", return_fig=True)
    assert fig.axes
    with pytest.raises(KeyError, match="head_nodes"):
        sct.pl.circuit_heads(adata, key, node="L0F1@3", show=False)


def test_feature_connections_match_the_weights(trained_base, model):
    adata = trained_base[:5].copy()
    sct.tl.feature_connections(adata, ["L1F3", "L2F10"], n_top=5, chunk_size=100)
    table = adata.uns["feature_connections"]["connections"]
    assert set(table["direction"]) == {"upstream", "downstream"}
    assert (table.groupby(["feature", "direction"]).size() == 5).all()
    tset = sct.get.transcoders(adata)
    ln = model.model.gpt_neox.layers[2].post_attention_layernorm
    # L2F10's upstream partners: brute force over layers 0 and 1
    w_enc = tset[2].W_enc[10].detach().numpy().astype(np.float64)
    best = []
    for layer in (0, 1):
        dec = tset[layer].W_dec.detach().numpy().astype(np.float64)
        dec = dec - dec.mean(1, keepdims=True)  # LayerNorm removes the mean
        conn = dec * ln.weight.detach().numpy() @ w_enc
        best += [(abs(v), layer, j, v) for j, v in enumerate(conn)]
    best = sorted(best, reverse=True)[:5]
    mine = table[(table["feature"] == "L2F10") & (table["direction"] == "upstream")]
    assert list(zip(mine["partner_layer"], mine["partner_feature"], strict=True)) == [
        (b[1], b[2]) for b in best
    ]
    np.testing.assert_allclose(mine["connection"], [b[3] for b in best], rtol=1e-4, atol=1e-6)
    assert mine["rank"].tolist() == [1, 2, 3, 4, 5]
    # layer 3 has no later layer
    sct.tl.feature_connections(adata, "L3F0", key_added="fc3")
    assert set(adata.uns["fc3"]["connections"]["direction"]) == {"upstream"}
    with pytest.raises(ValueError, match="feature name"):
        sct.tl.feature_connections(adata, ["3"])
    with pytest.raises(ValueError, match=r"L1F999999 does not exist: layer 1 has \d+ features"):
        sct.tl.feature_connections(adata, ["L1F999999"])


def test_feature_connections_say_when_they_replace_a_result(trained_base, sct_logs):
    adata = trained_base[:5].copy()
    sct.tl.feature_connections(adata, "L1F3", n_top=2)
    assert "replaced" not in sct_logs.text
    sct.tl.feature_connections(adata, "L2F5", n_top=2)
    assert "replaced adata.uns['feature_connections'], the connections of ['L1F3']" in (
        sct_logs.text
    )
    assert adata.uns["feature_connections"]["params"]["features"] == ["L2F5"]


def test_no_head_nodes_gives_an_empty_table(trained_base):
    adata = trained_base[:4].copy()
    cell = adata.obs_names[1]
    sct.tl.trace_circuit(adata, cell=cell, max_feature_nodes=8, head_nodes=(), progress=False)
    heads = adata.uns[f"circuit_{cell}"]["heads"]
    assert heads.empty
    assert "attribution" in heads.columns
