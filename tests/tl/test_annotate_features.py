"""sct.tl.annotate_features (ORA): feature -> genes, enrichment of every live feature, chance baseline."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from conftest import MARKERS
from scipy import sparse, stats

import sctranscoder as sct
from sctranscoder._genesets import clean_genes
from sctranscoder._genesets import gene_sets as load_gene_sets
from sctranscoder._records import sentences
from sctranscoder.core.hooks import capture_mlp_io, run_to_layers

matplotlib.use("Agg")


def _direct_counts(model, adata, layer: int, feature: int, cells: list[int]) -> pd.Series:
    """Cells in which ``feature`` fires on each gene, from the model and transcoder directly."""
    tc = sct.get.transcoders(adata, layers=[layer])[layer]
    genes = [sentences(adata, n_genes=model.settings.n_genes)[i] for i in cells]
    batch = model.tokenize(genes)
    with capture_mlp_io(model.model, [layer]) as store:
        run_to_layers(model.model, batch.input_ids, batch.attention_mask)
        acts = tc.encode(store[layer][0]).numpy()[..., feature]
    counts: dict[str, int] = {}
    for row, sentence in enumerate(genes):
        gidx = batch.gene_index[row].numpy()
        for pos, gene in enumerate(sentence):
            tokens = gidx == pos
            if tokens.any() and acts[row][tokens].max() > 0:
                counts[gene] = counts.get(gene, 0) + 1
    return pd.Series(counts, dtype=np.int64)


def test_feature_gene_counts_match_direct_computation(annotated_base, model):
    layer, cells = 1, [0, 7, 42, 99]
    sub = sct.tl.feature_activations(
        annotated_base[cells].copy(), layers=[layer], progress=False, copy=True
    )
    genes = sct.get.gene_activations(sub, layer)
    C, S = genes.layers["count"], genes.layers["sum"]
    assert sparse.isspmatrix_csr(C)
    assert C.dtype == np.int32
    assert S.dtype == np.float32
    assert C.shape[0] == genes.n_obs
    assert S.shape == C.shape
    feature = int(np.asarray(C.sum(0)).ravel().argmax())
    expected = _direct_counts(model, annotated_base, layer, feature, cells)
    got = pd.Series(C[:, feature].toarray().ravel(), index=genes.obs_names)
    got = got[got > 0]
    assert len(expected) > 0
    pd.testing.assert_series_equal(
        got.sort_index(), expected.sort_index(), check_names=False, check_dtype=False
    )
    table = sct.get.feature_table(sub, layer)
    assert table.loc[f"L1F{feature}", "n_genes"] == len(expected)
    top = table.loc[f"L1F{feature}", "top_genes"].split(";")
    counts = [int(c) for c in table.loc[f"L1F{feature}", "top_gene_counts"].split(";")]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == expected.max()
    assert set(top) <= set(expected.index)


def test_firing_rate_matches_feature_activations_and_live_threshold(annotated_base):
    # a second run without the gene tables, and with a stricter live threshold stored
    strict = sct.tl.feature_activations(
        annotated_base, genes=False, live_threshold=-1.5, progress=False, copy=True
    )
    rates = strict.uns["sct_activations"]["firing_rate"]
    assert strict.uns["sct_activations"]["params"]["live_threshold"] == -1.5
    for name, rate in rates.items():
        layer = int(name.split("_")[1])
        table = sct.get.feature_table(annotated_base, layer)
        np.testing.assert_allclose(table["firing_rate"], rate, rtol=1e-5)
        with np.errstate(divide="ignore"):
            np.testing.assert_array_equal(table["live"], np.log10(table["firing_rate"]) >= -3.0)
        t = sct.get.feature_table(strict, layer)
        np.testing.assert_array_equal(t["live"], t["log10_firing_rate"] >= -1.5)
        assert t["live"].sum() < table["live"].sum()
        # the threshold can also be given to the getter
        given = sct.get.feature_table(annotated_base, layer, live_threshold=-1.5)
        np.testing.assert_array_equal(given["live"], t["live"])


def test_best_pvalue_equals_direct_hypergeometric(annotated_base):
    names = annotated_base.uns["sct_activations"]["genes"]["names"]
    background = pd.Index(pd.unique(np.asarray(clean_genes(names), dtype=object)))
    assert annotated_base.uns["sct_annotation"]["params"]["n_background"] == len(background)
    sets = load_gene_sets(MARKERS, adata=annotated_base, min_size=1, max_size=10**9)
    table = sct.get.feature_table(annotated_base, 2)
    done = table[table["ora_term"] != ""].head(4)
    assert len(done) >= 2
    for _, row in done.iterrows():
        query = set(clean_genes(row["top_genes"].split(";"))[:20]) & set(background)
        members = set(sets[row["ora_term"]]) & set(background)
        k = len(query & members)
        p = stats.hypergeom.sf(k - 1, len(background), len(members), len(query))
        assert row["ora_pvalue"] == pytest.approx(p, rel=1e-6)
    dead = table[~table["live"]]
    assert (dead["ora_term"] == "").all()
    assert dead["ora_fdr"].isna().all()
    assert not dead["ora_interpretable"].any()


def test_summary_with_shuffled_baseline(annotated_base):
    summary = annotated_base.uns["sct_annotation"]["summary"]
    assert sorted(summary.columns) == sorted(
        [
            "layer",
            "total_live",
            "ora_interpretable",
            "ora_fraction",
            "ora_baseline_interpretable",
            "ora_baseline_fraction",
            "ora_seconds",
        ]
    )
    assert len(summary) == len(annotated_base.uns["sct"]["transcoders"])
    for _, row in summary.iterrows():
        table = sct.get.feature_table(annotated_base, int(row["layer"]))
        assert row["total_live"] == table["live"].sum()
        assert row["ora_interpretable"] == table["ora_interpretable"].sum()
        assert row["ora_fraction"] == pytest.approx(row["ora_interpretable"] / row["total_live"])
        assert row["ora_baseline_fraction"] == pytest.approx(
            row["ora_baseline_interpretable"] / row["total_live"]
        )
        assert 0 <= row["ora_baseline_fraction"] <= 1
        assert row["ora_seconds"] >= 0
    # the getter returns the same summary (no random-model baseline here)
    pd.testing.assert_frame_equal(sct.get.interpretability(annotated_base), summary)
    # the baseline is seeded: the same seed gives the same numbers
    again = sct.tl.annotate_features(annotated_base, gene_sets=MARKERS, n_top=20, seed=0, copy=True)
    pd.testing.assert_frame_equal(
        again.uns["sct_annotation"]["summary"].drop(columns="ora_seconds"),
        summary.drop(columns="ora_seconds"),
    )


@pytest.fixture
def figdir(tmp_path):
    """``sc.settings.figdir`` set to ``tmp_path`` for one test (scanpy's ``save`` writes there)."""
    before = sc.settings.figdir
    sc.settings.figdir = tmp_path
    try:
        yield tmp_path
    finally:
        sc.settings.figdir = before


def test_feature_table_and_plot(annotated_base, figdir):
    table = sct.get.feature_table(annotated_base, 0)
    assert table.index[0] == "L0F0"
    for col in ("firing_rate", "live", "top_genes", "ora_term", "ora_fdr", "ora_interpretable"):
        assert col in table
    ax = sct.pl.interpretability(annotated_base, show=False, save=True)
    path = figdir / f"interpretability.{sc.settings.file_format_figs}"
    assert ax is not None
    assert path.stat().st_size > 0
    sct.pl.interpretability(annotated_base, show=False, save="_markers.pdf")
    assert (figdir / "interpretability_markers.pdf").stat().st_size > 0
    with pytest.raises(KeyError, match="No activations for layer 99"):
        sct.get.feature_table(annotated_base, 99)


def test_h5ad_round_trip(annotated_base, tmp_path):
    path = tmp_path / "features.h5ad"
    annotated_base.write_h5ad(path)
    back = ad.read_h5ad(path)
    for layer in (0, 2):
        pd.testing.assert_frame_equal(
            sct.get.feature_table(back, layer),
            sct.get.feature_table(annotated_base, layer),
            check_dtype=False,
        )
        a, b = (
            sct.get.gene_activations(annotated_base, layer),
            sct.get.gene_activations(back, layer),
        )
        for part in ("count", "sum"):
            assert sparse.issparse(b.layers[part])
            assert (a.layers[part] != b.layers[part]).nnz == 0
        np.testing.assert_array_equal(b.obs_names, a.obs_names)
    pd.testing.assert_frame_equal(
        back.uns["sct_annotation"]["summary"],
        annotated_base.uns["sct_annotation"]["summary"],
        check_dtype=False,
    )


def test_clear_errors(annotated_base):
    fresh = annotated_base.copy()
    del fresh.uns["sct_activations"]
    with pytest.raises(KeyError, match=r"sct\.tl\.feature_activations"):
        sct.tl.annotate_features(fresh, gene_sets=MARKERS)
    with pytest.raises(KeyError, match=r"sct\.tl\.feature_activations"):
        sct.get.feature_table(fresh, 0)
    no_genes = annotated_base.copy()
    del no_genes.uns["sct_activations"]["genes"]
    with pytest.raises(KeyError, match=r"genes=True"):
        sct.tl.annotate_features(no_genes, gene_sets=MARKERS)
    with pytest.raises(ValueError, match="allow_network"):
        sct.tl.annotate_features(annotated_base, gene_sets="No_Such_Library_2099", copy=True)
    with pytest.raises(ValueError, match="n_top"):
        sct.tl.annotate_features(annotated_base, gene_sets=MARKERS, n_top=0, copy=True)
    with pytest.raises(ValueError, match="method"):
        sct.tl.annotate_features(annotated_base, gene_sets=MARKERS, method="gsea", copy=True)
    with pytest.raises(ValueError, match="key_added"):
        sct.tl.annotate_features(annotated_base, gene_sets=MARKERS, key_added="a/b", copy=True)
