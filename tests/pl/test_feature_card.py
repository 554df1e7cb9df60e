"""Feature card: sct.pl.feature (pl/_feature.py)."""

from __future__ import annotations

import matplotlib
import pytest
import scanpy as sc

import sctranscoder as sct

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.collections import PathCollection


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def figdir(tmp_path):
    """Scanpy's figure directory, in a temporary folder for this test."""
    old = sc.settings.figdir
    sc.settings.figdir = tmp_path
    yield tmp_path
    sc.settings.figdir = old


def _busiest(adata, layer):
    table = sct.get.feature_table(adata, layer)
    return int(table["n_genes"].to_numpy().argmax())


def test_card_returns_axes_with_gene_bars(annotated_base):
    adata = annotated_base
    j = _busiest(adata, 2)
    axes = sct.pl.feature(adata, f"L2F{j}", n_top=10, groupby="bulk_labels", show=False)
    assert isinstance(axes, list)
    assert len(axes) == 4
    header, genes, emb, cells = axes
    assert len(header.figure.axes) >= 4  # and the embedding's colour bar
    top = sct.get.feature_table(adata, 2).iloc[j]["top_genes"].split(";")[:10]
    assert [t.get_text() for t in genes.get_yticklabels()] == top
    assert f"L2F{j}" in [t.get_text() for t in header.texts]
    labels = [t.get_text() for t in cells.get_yticklabels()]
    assert len(labels) == 10
    assert all("(" in lab for lab in labels)
    # the embedding panel is scanpy's: every cell, coloured by the feature
    dots = [c for c in emb.collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in dots) == adata.n_obs
    assert emb.get_title() == f"L2F{j} activation on umap"


def test_card_saves_png_and_accepts_name(annotated_base, figdir):
    fig = sct.pl.feature(annotated_base, "L2F5", show=False, save="_card.png", return_fig=True)
    assert (figdir / "feature_L2F5_card.png").stat().st_size > 0
    assert "L2F5" in [t.get_text() for t in fig.axes[0].texts]


def test_card_without_activations_says_so(annotated_base):
    fresh = annotated_base.copy()
    for k in [k for k in fresh.obsm if k.startswith("X_sct_L")]:
        del fresh.obsm[k]
    with pytest.raises(KeyError, match=r"sct\.tl\.feature_activations"):
        sct.pl.feature(fresh, "L1F0", show=False)


def test_card_without_gene_tables_says_so(annotated_base):
    # activations computed with genes=False: the card's gene panel has nothing to draw
    fresh = annotated_base.copy()
    del fresh.uns["sct_activations"]["genes"]
    fresh.uns["sct_activations"]["params"]["genes"] = False
    with pytest.raises(KeyError, match=r"genes=True"):
        sct.pl.feature(fresh, "L2F0", show=False)


def test_card_errors(annotated_base):
    adata = annotated_base
    with pytest.raises(KeyError, match=r"No activations for layer 9"):
        sct.pl.feature(adata, "L9F5", show=False)
    with pytest.raises(ValueError, match="not a feature name"):
        sct.pl.feature(adata, "F5", show=False)
    n = len(sct.get.feature_table(adata, 2))
    with pytest.raises(ValueError, match=rf"does not exist: layer 2 has {n} features"):
        sct.pl.feature(adata, f"L2F{n}", show=False)
    with pytest.raises(ValueError, match="not a feature name"):
        sct.pl.feature(adata, "L2F-1", show=False)
    fresh = adata.copy()
    del fresh.uns["sct_activations"]
    with pytest.raises(KeyError, match=r"sct\.tl\.feature_activations"):
        sct.pl.feature(fresh, "L2F0", show=False)


def test_card_basis_must_exist_or_be_none(annotated_base):
    with pytest.raises(KeyError, match="basis=None"):
        sct.pl.feature(annotated_base, "L2F5", basis="tsne", show=False)
    axes = sct.pl.feature(annotated_base, "L2F5", basis=None, show=False)
    assert [t.get_text() for t in axes[2].texts] == ["no embedding (basis=None)"]
    assert not axes[2].collections
