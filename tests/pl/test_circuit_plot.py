"""A traced circuit as a graph (sct.get.circuit) and as figures (sct.pl.circuit, circuit_genes)."""

from __future__ import annotations

import re

import anndata as ad
import matplotlib
import numpy as np
import pytest
import scanpy as sc

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection, PathCollection

import sctranscoder as sct


@pytest.fixture(scope="module")
def traced(trained_base):
    """A copy of the shared transcoders with one small circuit traced."""
    adata = trained_base.copy()
    cell = adata.obs_names[0]
    sct.tl.trace_circuit(adata, cell=cell, max_feature_nodes=64)
    return adata, f"circuit_{cell}"


@pytest.fixture
def figdir(tmp_path):
    """Scanpy's figure directory, in a temporary folder for this test."""
    old = sc.settings.figdir
    sc.settings.figdir = tmp_path
    yield tmp_path
    sc.settings.figdir = old


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


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
    rec = adata.uns[key]
    g = sct.get.circuit(adata, key)
    assert isinstance(g, nx.DiGraph)
    _assert_graph_matches(g, rec)
    assert g.graph["key"] == key
    assert g.graph["params"]["cell"] == adata.obs_names[0]
    assert g.graph["scores"]["replacement_score"] == rec["scores"]["replacement_score"]
    # the target is a sink the graph's edges lead to
    assert g.nodes["target"]["type"] == "target"
    assert g.out_degree("target") == 0
    assert g.in_degree("target") > 0
    # the cell name works as a shorthand for its default key
    assert set(sct.get.circuit(adata, adata.obs_names[0]).nodes) == set(g.nodes)


def test_get_circuit_survives_h5ad_round_trip(traced, tmp_path):
    adata, key = traced
    path = tmp_path / "circuit.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    g = sct.get.circuit(back, key)
    _assert_graph_matches(g, adata.uns[key])


def test_unknown_circuit_is_a_key_error_naming_the_ones_there(traced):
    adata, key = traced
    with pytest.raises(KeyError, match=re.escape(key)):
        sct.get.circuit(adata, "circuit_nope")
    with pytest.raises(KeyError, match="circuit_nope"):
        sct.pl.circuit(adata, "circuit_nope", show=False)
    with pytest.raises(KeyError, match="circuit_nope"):
        sct.pl.circuit_genes(adata, "circuit_nope", show=False)
    with pytest.raises(KeyError, match="trace_circuit"):
        sct.get.circuit(ad.AnnData(np.zeros((2, 2))), key)


def test_plot_returns_axes_with_one_tick_per_position(traced):
    adata, key = traced
    nodes = adata.uns[key]["nodes"]
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
    assert _edges_drawn(ax) == len(adata.uns[key]["edges"])
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
    rec = adata.uns[key]
    ax = sct.pl.circuit(adata, key, max_nodes=10, show=False)
    drawn = _nodes_drawn(ax)
    assert sum(drawn.values()) == 10
    assert drawn["circuit-nodes-target"] == 1
    others = rec["nodes"][rec["nodes"]["type"] != "target"]
    kept = {"target", *others["influence"].abs().nlargest(9).index}
    e = rec["edges"]
    assert _edges_drawn(ax) == int((e["source"].isin(kept) & e["target"].isin(kept)).sum())


def test_plot_min_edge_weight_fraction_hides_weak_edges(traced):
    adata, key = traced
    rec = adata.uns[key]
    ax = sct.pl.circuit(
        adata, key, max_nodes=len(rec["nodes"]), min_edge_weight_fraction=0.25, show=False
    )
    w = rec["edges"]["weight"].abs()
    assert _edges_drawn(ax) == int((w >= 0.25 * w.max()).sum()) < len(w)


def test_plot_saves_png_and_svg_in_figdir(traced, figdir):
    adata, key = traced
    sct.pl.circuit(adata, key, show=False, save="_c.png")
    sct.pl.circuit(adata, key, show=False, save="_c.svg")
    assert (figdir / f"{key}_c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (figdir / f"{key}_c.svg").read_text()
    sct.pl.circuit_genes(adata, key, show=False, save="_g.png")
    assert (figdir / f"{key}_genes_g.png").stat().st_size > 0
    # as in scanpy: save=True uses the default format, an unknown extension is part of the name
    fmt = sc.settings.file_format_figs
    sct.pl.circuit(adata, key, show=False, save=True)
    assert (figdir / f"{key}.{fmt}").stat().st_size > 0
    sct.pl.circuit(adata, key, show=False, save="_c.nope")
    assert (figdir / f"{key}_c.nope.{fmt}").stat().st_size > 0


def test_plot_draws_into_given_axes_and_returns_figure(traced):
    adata, key = traced
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    assert sct.pl.circuit(adata, key, ax=left, show=False) is left
    assert sct.pl.circuit_genes(adata, key, ax=right, show=False) is right
    assert fig.axes == [left, right]
    assert _nodes_drawn(left)
    assert right.patches
    assert sct.pl.circuit(adata, key, ax=left, return_fig=True, show=False) is fig
    assert sct.pl.circuit_genes(adata, key, ax=right, return_fig=True, show=False) is fig


def test_circuit_genes_bars_are_the_top_genes(traced):
    adata, key = traced
    genes = adata.uns[key]["genes"].sort_values("influence", ascending=False).head(7)
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
