"""A traced circuit as a graph (sct.get.circuit) and as figures (sct.pl.circuit, circuit_genes)."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection, PathCollection

import sctranscoder as sct


@pytest.fixture(scope="module")
def traced():
    """A small circuit on the embedded model: 60 cells, briefly trained transcoders."""
    import scanpy as sc

    model = sct.datasets.tiny_c2s()
    adata = sc.datasets.pbmc68k_reduced()[:60].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, n_tokens=4096, batch_size=1024, progress=False)
    cell = adata.obs_names[0]
    sct.tl.trace_circuit(adata, cell, max_feature_nodes=64)
    return adata, f"circuit_{cell}"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _record(adata, key):
    return adata.uns["sct_circuits"][key]


def _nodes_drawn(ax) -> dict[str, int]:
    return {
        c.get_gid(): len(c.get_offsets())
        for c in ax.collections
        if isinstance(c, PathCollection) and (c.get_gid() or "").startswith("circuit-nodes-")
    }


def _edges_drawn(ax) -> int:
    lcs = [c for c in ax.collections if isinstance(c, LineCollection)]
    return sum(len(c.get_segments()) for c in lcs)


def _assert_graph_matches(g, rec):
    nodes, edges = rec["nodes"], rec["edges"]
    assert set(g.nodes) == set(nodes.index)
    assert g.number_of_edges() == len(edges)
    for name, row in nodes.iterrows():
        attrs = g.nodes[name]
        assert set(attrs) == set(nodes.columns)
        for col, value in row.items():
            if isinstance(value, float) and np.isnan(value):
                assert np.isnan(attrs[col])
            else:
                assert attrs[col] == value, (name, col)
    for s, t, w in edges[["source", "target", "weight"]].itertuples(index=False):
        assert g.edges[s, t]["weight"] == pytest.approx(w)


def test_get_circuit_is_the_stored_graph(traced):
    import networkx as nx

    adata, key = traced
    rec = _record(adata, key)
    g = sct.get.circuit(adata, key)
    assert isinstance(g, nx.DiGraph)
    _assert_graph_matches(g, rec)
    assert g.graph["key"] == key
    assert g.graph["params"]["cell"] == adata.obs_names[0]
    assert g.graph["scores"]["replacement_score"] == rec["scores"]["replacement_score"]
    # the target is a sink the graph's edges lead to
    assert g.nodes["target"]["type"] == "target" and g.out_degree("target") == 0
    assert g.in_degree("target") > 0
    # the cell name works as a shorthand for its default key
    assert set(sct.get.circuit(adata, adata.obs_names[0]).nodes) == set(g.nodes)


def test_get_circuit_survives_h5ad_round_trip(traced, tmp_path):
    adata, key = traced
    path = tmp_path / "circuit.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    g = sct.get.circuit(back, key)
    _assert_graph_matches(g, _record(adata, key))


def test_unknown_circuit_is_a_key_error_naming_the_ones_there(traced):
    adata, key = traced
    with pytest.raises(KeyError, match=key):
        sct.get.circuit(adata, "circuit_nope")
    with pytest.raises(KeyError, match="circuit_nope"):
        sct.pl.circuit(adata, "circuit_nope", show=False)
    with pytest.raises(KeyError, match="circuit_nope"):
        sct.pl.circuit_genes(adata, "circuit_nope", show=False)
    with pytest.raises(KeyError, match="trace_circuit"):
        sct.get.circuit(ad.AnnData(np.zeros((2, 2))), key)


def test_plot_returns_axes_with_one_tick_per_position(traced):
    adata, key = traced
    nodes = _record(adata, key)["nodes"]
    ax = sct.pl.circuit(adata, key, max_nodes=len(nodes), show=False)
    assert isinstance(ax, Axes)
    positions = np.sort(nodes["position"].unique())
    ticks = ax.get_xticks()
    assert len(ticks) == len(positions)
    assert np.all(np.diff(ticks) > 0)  # positions left to right
    first = nodes.sort_values("layer").groupby("position").first()
    expected = [
        g if g else (t.strip() or repr(t))
        for g, t in first.loc[positions, ["gene", "token"]].itertuples(index=False)
    ]
    assert [t.get_text() for t in ax.get_xticklabels()] == expected
    assert sum(_nodes_drawn(ax).values()) == len(nodes)
    assert _edges_drawn(ax) == len(_record(adata, key)["edges"])
    # the target sits on the top row, embeddings on the bottom one
    pcs = {c.get_gid(): c for c in ax.collections if isinstance(c, PathCollection)}
    y_target = pcs["circuit-nodes-target"].get_offsets()[:, 1].min()
    y_all = np.concatenate([c.get_offsets()[:, 1] for c in pcs.values()])
    assert y_target == y_all.max()
    assert pcs["circuit-nodes-embedding"].get_offsets()[:, 1].max() == pytest.approx(-1)
    assert adata.obs_names[0] in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"target", "transcoder feature", "positive edge", "negative edge"} <= set(legend)


def test_plot_max_nodes_keeps_the_most_influential_and_the_target(traced):
    adata, key = traced
    rec = _record(adata, key)
    ax = sct.pl.circuit(adata, key, max_nodes=10, show=False)
    drawn = _nodes_drawn(ax)
    assert sum(drawn.values()) == 10 and drawn["circuit-nodes-target"] == 1
    others = rec["nodes"][rec["nodes"]["type"] != "target"]
    kept = {"target", *others["influence"].abs().nlargest(9).index}
    e = rec["edges"]
    assert _edges_drawn(ax) == int((e["source"].isin(kept) & e["target"].isin(kept)).sum())


def test_plot_min_edge_weight_fraction_hides_weak_edges(traced):
    adata, key = traced
    rec = _record(adata, key)
    ax = sct.pl.circuit(
        adata, key, max_nodes=len(rec["nodes"]), min_edge_weight_fraction=0.25, show=False
    )
    w = rec["edges"]["weight"].abs()
    assert _edges_drawn(ax) == int((w >= 0.25 * w.max()).sum()) < len(w)


def test_plot_saves_png_and_svg(traced, tmp_path):
    adata, key = traced
    png, svg = tmp_path / "c.png", tmp_path / "c.svg"
    sct.pl.circuit(adata, key, show=False, save=png)
    sct.pl.circuit(adata, key, show=False, save=str(svg))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in svg.read_text()
    genes_png = tmp_path / "g.png"
    sct.pl.circuit_genes(adata, key, show=False, save=genes_png)
    assert genes_png.stat().st_size > 0
    with pytest.raises(ValueError, match="png"):
        sct.pl.circuit(adata, key, show=False, save=tmp_path / "c.nope")


def test_circuit_genes_bars_are_the_top_genes(traced):
    adata, key = traced
    genes = _record(adata, key)["genes"].sort_values("influence", ascending=False).head(7)
    ax = sct.pl.circuit_genes(adata, key, n_top=7, show=False)
    assert isinstance(ax, Axes)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(genes.index)
    emb = [p for p in ax.patches if p.get_gid() == "genes-embedding"]
    feat = [p for p in ax.patches if p.get_gid() == "genes-feature"]
    assert len(emb) == len(feat) == 7
    np.testing.assert_allclose([p.get_width() for p in emb], genes["embedding_influence"])
    np.testing.assert_allclose([p.get_width() for p in feat], genes["feature_influence"])
    np.testing.assert_allclose(
        [p.get_x() + p.get_width() for p in feat], genes["influence"], rtol=1e-6, atol=1e-12
    )
