"""Feature card: sct.pl.feature (pl/_feature.py)."""

from __future__ import annotations

import matplotlib
import pytest

import sctranscoder as sct
from sctranscoder.get._features import feature_table
from sctranscoder.pl._feature import feature
from sctranscoder.tl._annotate_features import annotate_features
from sctranscoder.tl._feature_genes import feature_genes

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def carded():
    import scanpy as sc

    model = sct.datasets.tiny_c2s()
    adata = sc.datasets.pbmc68k_reduced()[:150].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, n_tokens=4096, batch_size=1024, progress=False)
    feature_genes(adata, model, n_top=50, progress=False)
    annotate_features(adata, "markers:bulk_labels", n_top_genes=20, seed=0)
    sct.tl.feature_activations(adata, gene_activations=False, progress=False)
    return adata


def _busiest(adata, layer):
    table = feature_table(adata, layer)
    return int(table["n_genes"].to_numpy().argmax())


def test_card_returns_figure_with_gene_bars(carded):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    j = _busiest(carded, 2)
    fig = feature(carded, 2, j, n_genes=10, groupby="bulk_labels", show=False)
    assert isinstance(fig, Figure) and len(fig.axes) >= 4
    header, genes, _emb, cells = fig.axes[:4]
    top = feature_table(carded, 2).iloc[j]["top_genes"].split(";")[:10]
    assert [t.get_text() for t in genes.get_yticklabels()] == top
    assert f"L2F{j}" in [t.get_text() for t in header.texts]
    labels = [t.get_text() for t in cells.get_yticklabels()]
    assert len(labels) == 10 and all("(" in lab for lab in labels)
    plt.close(fig)


def test_card_saves_png_and_accepts_name(carded, tmp_path):
    import matplotlib.pyplot as plt

    path = tmp_path / "card.png"
    fig = feature(carded, 2, "L2F5", show=False, save=path)
    assert path.stat().st_size > 0
    assert "L2F5" in [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)


def test_card_without_activations_says_so(carded):
    import matplotlib.pyplot as plt

    fresh = carded.copy()
    for k in [k for k in fresh.obsm if k.startswith("X_sct_L")]:
        del fresh.obsm[k]
    fig = feature(fresh, 1, 0, show=False)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("sct.tl.feature_activations" in t for t in texts)
    plt.close(fig)


def test_card_errors(carded):
    with pytest.raises(ValueError, match="layer 1"):
        feature(carded, 2, "L1F5", show=False)
    with pytest.raises(ValueError, match="not an index"):
        feature(carded, 2, "F5", show=False)
    n = len(feature_table(carded, 2))
    with pytest.raises(IndexError, match="out of range"):
        feature(carded, 2, n, show=False)
    with pytest.raises(IndexError, match="out of range"):
        feature(carded, 2, -1, show=False)
    fresh = carded.copy()
    del fresh.uns["sct"]["features"]
    with pytest.raises(KeyError, match=r"sct\.tl\.feature_genes"):
        feature(fresh, 2, 0, show=False)
