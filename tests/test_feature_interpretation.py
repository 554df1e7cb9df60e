"""Feature interpretation: feature -> genes, enrichment of every live feature, chance baseline."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import sparse, stats

import sctranscoder as sct
from sctranscoder._genesets import clean_genes
from sctranscoder._genesets import gene_sets as load_gene_sets
from sctranscoder._store import gene_lists
from sctranscoder.core.hooks import capture_mlp_io, run_to_layers
from sctranscoder.get._features import feature_table
from sctranscoder.pl._interpretability import interpretability
from sctranscoder.tl._annotate_features import annotate_features
from sctranscoder.tl._feature_genes import feature_genes

matplotlib.use("Agg")

MARKERS = "markers:bulk_labels"


@pytest.fixture(scope="module")
def model():
    return sct.datasets.tiny_c2s()


@pytest.fixture(scope="module")
def annotated(model):
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()[:150].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, n_tokens=8192, batch_size=1024, progress=False)
    feature_genes(adata, model, n_top=50, progress=False)
    annotate_features(adata, MARKERS, n_top_genes=20, seed=0)
    return adata


def _direct_counts(model, adata, layer: int, feature: int, cells: list[int]) -> pd.Series:
    """Cells in which ``feature`` fires on each gene, from the model and transcoder directly."""
    tc = sct.get.transcoders(adata, layers=[layer])[layer]
    sentences = gene_lists(adata, n_genes=model.settings.n_genes)
    genes = [sentences[i] for i in cells]
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


def test_feature_gene_counts_match_direct_computation(annotated, model):
    layer, cells = 1, [0, 7, 42, 99]
    sub = feature_genes(annotated[cells].copy(), model, layers=[layer], progress=False, copy=True)
    rec = sub.uns["sct"]["features"]
    C = rec["layer_1_gene_counts"]
    S = rec["layer_1_gene_sums"]
    assert sparse.isspmatrix_csr(C) and C.dtype == np.int32 and S.dtype == np.float32
    assert C.shape[0] == len(rec["genes"]) and S.shape == C.shape
    feature = int(np.asarray(C.sum(0)).ravel().argmax())
    expected = _direct_counts(model, annotated, layer, feature, cells)
    got = pd.Series(C[:, feature].toarray().ravel(), index=rec["genes"])
    got = got[got > 0]
    assert len(expected) > 0
    pd.testing.assert_series_equal(
        got.sort_index(), expected.sort_index(), check_names=False, check_dtype=False
    )
    table = rec["layer_1"]
    assert table.loc[f"L1F{feature}", "n_genes"] == len(expected)
    top = table.loc[f"L1F{feature}", "top_genes"].split(";")
    counts = [int(c) for c in table.loc[f"L1F{feature}", "top_gene_counts"].split(";")]
    assert counts == sorted(counts, reverse=True) and counts[0] == expected.max()
    assert set(top) <= set(expected.index)


def test_firing_rate_matches_feature_activations_and_live_threshold(annotated):
    acts = sct.tl.feature_activations(annotated, gene_activations=False, progress=False, copy=True)
    for name, rate in acts.uns["sct"]["activations"]["firing_rate"].items():
        table = feature_table(annotated, int(name.split("_")[1]))
        np.testing.assert_allclose(table["firing_rate"], rate, rtol=1e-5)
        with np.errstate(divide="ignore"):
            np.testing.assert_array_equal(table["live"], np.log10(table["firing_rate"]) >= -3.0)
    strict = feature_genes(annotated, live_threshold=-1.5, layers=[0], progress=False, copy=True)
    t = strict.uns["sct"]["features"]["layer_0"]
    np.testing.assert_array_equal(t["live"], t["log10_firing_rate"] >= -1.5)
    assert t["live"].sum() < feature_table(annotated, 0)["live"].sum()


def test_best_pvalue_equals_direct_hypergeometric(annotated):
    rec = annotated.uns["sct"]["features"]
    background = pd.Index(pd.unique(np.asarray(clean_genes(rec["genes"]), dtype=object)))
    sets = load_gene_sets(MARKERS, adata=annotated, min_size=1, max_size=10**9)
    table = feature_table(annotated, 2)
    done = table[table["best_term"] != ""].head(4)
    assert len(done) >= 2
    for _, row in done.iterrows():
        query = set(clean_genes(row["top_genes"].split(";"))[:20]) & set(background)
        members = set(sets[row["best_term"]]) & set(background)
        k = len(query & members)
        p = stats.hypergeom.sf(k - 1, len(background), len(members), len(query))
        assert row["best_pvalue"] == pytest.approx(p, rel=1e-6)
    dead = table[~table["live"]]
    assert (dead["best_term"] == "").all() and dead["best_fdr"].isna().all()
    assert not dead["interpretable"].any()


def test_summary_with_shuffled_baseline(annotated):
    summary = annotated.uns["sct"]["interpretability"]
    assert list(summary.columns) == [
        "layer",
        "total_live",
        "interpretable",
        "fraction",
        "baseline_interpretable",
        "baseline_fraction",
        "seconds",
    ]
    assert len(summary) == len(annotated.uns["sct"]["transcoders"])
    for _, row in summary.iterrows():
        table = feature_table(annotated, int(row["layer"]))
        assert row["total_live"] == table["live"].sum()
        assert row["interpretable"] == table["interpretable"].sum()
        assert row["fraction"] == pytest.approx(row["interpretable"] / row["total_live"])
        assert row["baseline_fraction"] == pytest.approx(
            row["baseline_interpretable"] / row["total_live"]
        )
        assert 0 <= row["baseline_fraction"] <= 1 and row["seconds"] >= 0
    # the baseline is seeded: the same seed gives the same numbers
    again = annotate_features(annotated, MARKERS, n_top_genes=20, seed=0, copy=True)
    pd.testing.assert_frame_equal(
        again.uns["sct"]["interpretability"].drop(columns="seconds"),
        summary.drop(columns="seconds"),
    )


def test_feature_table_and_plot(annotated, tmp_path):
    table = feature_table(annotated, 0)
    assert table.index[0] == "L0F0"
    for col in ("firing_rate", "live", "top_genes", "best_term", "best_fdr", "interpretable"):
        assert col in table
    path = tmp_path / "interpretability.png"
    ax = interpretability(annotated, show=False, save=path)
    assert ax is not None and path.stat().st_size > 0
    with pytest.raises(KeyError, match="No feature genes for layer 99"):
        feature_table(annotated, 99)


def test_h5ad_round_trip(annotated, tmp_path):
    path = tmp_path / "features.h5ad"
    annotated.write_h5ad(path)
    back = ad.read_h5ad(path)
    rec, rec2 = annotated.uns["sct"]["features"], back.uns["sct"]["features"]
    for layer in (0, 2):
        pd.testing.assert_frame_equal(
            feature_table(back, layer), feature_table(annotated, layer), check_dtype=False
        )
        for part in ("gene_counts", "gene_sums"):
            a, b = rec[f"layer_{layer}_{part}"], rec2[f"layer_{layer}_{part}"]
            assert sparse.issparse(b) and (a != b).nnz == 0
    np.testing.assert_array_equal(rec2["genes"].astype(str), rec["genes"])
    pd.testing.assert_frame_equal(
        back.uns["sct"]["interpretability"],
        annotated.uns["sct"]["interpretability"],
        check_dtype=False,
    )


def test_clear_errors(annotated):
    fresh = annotated.copy()
    del fresh.uns["sct"]["features"]
    with pytest.raises(KeyError, match=r"sct\.tl\.feature_genes"):
        annotate_features(fresh, MARKERS)
    with pytest.raises(KeyError, match=r"sct\.tl\.feature_genes"):
        feature_table(fresh, 0)
    with pytest.raises(ValueError, match="allow_network"):
        annotate_features(annotated, "No_Such_Library_2099", copy=True)
    with pytest.raises(ValueError, match="n_top_genes"):
        annotate_features(annotated, MARKERS, n_top_genes=51, copy=True)
