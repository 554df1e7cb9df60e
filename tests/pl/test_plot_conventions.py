"""Every sct.pl function follows scanpy: return_fig, save (a suffix, into figdir), ax, show."""

from __future__ import annotations

import matplotlib
import pytest
import scanpy as sc

import sctranscoder as sct

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure


@pytest.fixture(scope="module")
def adata(annotated_base):
    """Annotated features and one small traced circuit: what every plot needs."""
    adata = annotated_base.copy()
    sct.tl.trace_circuit(adata, cell=adata.obs_names[0], max_feature_nodes=16)
    return adata


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


def _circuit(adata, **kw):
    return sct.pl.circuit(adata, adata.obs_names[0], **kw)


def _circuit_genes(adata, **kw):
    return sct.pl.circuit_genes(adata, adata.obs_names[0], **kw)


def _feature(adata, **kw):
    return sct.pl.feature(adata, "L2F5", **kw)


def _interpretability(adata, **kw):
    return sct.pl.interpretability(adata, **kw)


def _activations(adata, **kw):
    return sct.pl.activations(adata, 2, n_top=1, **kw)


#: (plot, the file name scanpy's save gives it before the suffix, whether it takes ax=)
PLOTS = {
    "circuit": (_circuit, "circuit_{cell}", True),
    "circuit_genes": (_circuit_genes, "circuit_{cell}_genes", True),
    "feature": (_feature, "feature_L2F5", False),
    "interpretability": (_interpretability, "interpretability", True),
    "activations": (_activations, "umap", True),
}


@pytest.mark.parametrize("name", PLOTS)
def test_return_fig_returns_the_figure(adata, name):
    plot, _, _ = PLOTS[name]
    fig = plot(adata, show=False, return_fig=True)
    assert isinstance(fig, Figure)
    assert fig.axes


@pytest.mark.parametrize("name", PLOTS)
def test_save_suffix_writes_into_figdir(adata, name, figdir):
    plot, writekey, _ = PLOTS[name]
    plot(adata, show=False, save="_x.png")
    path = figdir / f"{writekey.format(cell=adata.obs_names[0])}_x.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", [n for n, (_, _, takes_ax) in PLOTS.items() if takes_ax])
def test_ax_draws_into_the_given_axes(adata, name):
    plot, _, _ = PLOTS[name]
    fig, (ax, other) = plt.subplots(1, 2)
    result = plot(adata, ax=ax, show=False)
    assert result is ax
    assert ax.collections or ax.patches
    assert not other.collections
    assert not other.patches
    assert not other.lines
    assert fig.axes[:2] == [ax, other]


@pytest.fixture
def autoshow():
    """Set ``sc.settings.autoshow`` in a test (restored after it)."""
    old = sc.settings.autoshow
    yield lambda value: setattr(sc.settings, "autoshow", value)
    sc.settings.autoshow = old


@pytest.mark.parametrize("name", PLOTS)
def test_show_defaults_to_autoshow(adata, name, autoshow, monkeypatch):
    plot, _, _ = PLOTS[name]
    autoshow(False)
    drawn = plot(adata)
    assert isinstance(drawn, Axes) or (isinstance(drawn, list) and len(drawn) == 4)
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    autoshow(True)
    assert plot(adata) is None


@pytest.mark.parametrize("name", PLOTS)
def test_save_extension_sets_any_matplotlib_format(adata, name, figdir):
    # scanpy's rule (the extension at the end of the suffix sets the format), for every format
    # matplotlib writes, not only png/pdf/svg: '.jpg' writes '<key>.jpg', a JPEG
    plot, writekey, _ = PLOTS[name]
    plot(adata, show=False, save=".jpg")
    key = writekey.format(cell=adata.obs_names[0])
    assert (figdir / f"{key}.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    plot(adata, show=False, save="_x.tiff")
    assert (figdir / f"{key}_x.tiff").read_bytes()[:4] == b"II*\x00"
    assert sorted(p.name for p in figdir.iterdir()) == [f"{key}.jpg", f"{key}_x.tiff"]


@pytest.mark.parametrize("name", PLOTS)
def test_save_with_a_path_is_refused_before_drawing(adata, name, figdir):
    plot, _, _ = PLOTS[name]
    n_figures = len(plt.get_fignums())
    with pytest.raises(ValueError, match=r"path separator.*fig\.savefig"):
        plot(adata, show=False, save="/tmp/x.png")
    assert len(plt.get_fignums()) == n_figures
    assert not list(figdir.iterdir())
