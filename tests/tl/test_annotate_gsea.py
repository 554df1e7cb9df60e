"""annotate_features with method="prerank" and "both": planted features, records, round trips."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sctranscoder as sct
from sctranscoder._genesets import gene_sets as load_gene_sets
from sctranscoder.get import feature_table

ACTIVATIONS, ANNOTATION = "sct_activations", "sct_annotation"
ORA_COLUMNS = ["ora_term", "ora_pvalue", "ora_fdr", "ora_interpretable"]
GSEA_COLUMNS = ["gsea_term", "gsea_nes", "gsea_pvalue", "gsea_fdr", "gsea_interpretable"]
#: Summary columns per method, in the documented order (interpretable, fraction, baseline, time).
ORA_SUMMARY = [
    "ora_interpretable",
    "ora_fraction",
    "ora_baseline_interpretable",
    "ora_baseline_fraction",
    "ora_seconds",
]
GSEA_SUMMARY = [s.replace("ora_", "gsea_") for s in ORA_SUMMARY]
LAYER = ["layer", "total_live"]


def _synthetic(n_features: int = 12) -> tuple[ad.AnnData, dict[str, list[str]]]:
    """An AnnData with a hand-made activation record: feature j < 6 fires on set j's genes.

    Features 0-5 fire (high mean activation) on exactly the genes of set ``P<j>``, features 6-9
    on random genes, 10-11 are dead.
    """
    rng = np.random.default_rng(8)
    n_genes, n_cells = 400, 3
    genes = np.array([f"Gene{i}" for i in range(n_genes)])
    sets = {f"P{j}": list(rng.choice(genes, 20, replace=False)) for j in range(10)}
    upper = [g.upper() for g in genes]
    sets = {k: [g.upper() for g in v] for k, v in sets.items()}
    cells = rng.integers(1, 50, size=n_genes).astype(np.int64)
    sums = np.zeros((n_genes, n_features), dtype=np.float32)
    for j in range(10):
        idx = (
            [upper.index(g) for g in sets[f"P{j}"]]
            if j < 6
            else rng.choice(n_genes, 20, replace=False)
        )
        sums[idx, j] = (cells[idx] * (1.0 + rng.random(len(idx)))).astype(np.float32)
    counts = (sums > 0).astype(np.int32)
    rate = np.r_[np.full(10, 0.01), np.zeros(n_features - 10)]
    adata = ad.AnnData(np.zeros((n_cells, 2), dtype=np.float32))
    adata.obsm["X_sct_L0"] = sp.csr_matrix((n_cells, n_features), dtype=np.float32)
    adata.uns[ACTIVATIONS] = {
        "params": {
            "transcoders_key": "sct",
            "layers": np.array([0]),
            "aggregate": "max",
            "sentence_key": "cell_sentence",
            "live_threshold": -3.0,
            "n_top": 50,
            "genes": True,
            "n_tokens": 100,
            "n_cells": n_cells,
        },
        "obsm_keys": {"layer_0": "X_sct_L0"},
        "firing_rate": {"layer_0": rate},
        "genes": {
            "names": genes,
            "n_cells": cells,
            "counts": {"layer_0": sp.csr_matrix(counts)},
            "sums": {"layer_0": sp.csr_matrix(sums)},
        },
    }
    return adata, sets


# --- planted features ---------------------------------------------------------------------------


def test_annotate_prerank_finds_planted_features_and_round_trips(tmp_path):
    adata, sets = _synthetic()
    sct.tl.annotate_features(
        adata, gene_sets=sets, method="both", n_top=20, permutations=500, gsea_weight=0.0, seed=0
    )
    table = feature_table(adata, 0)
    for col in ORA_COLUMNS + GSEA_COLUMNS:
        assert col in table
    planted = table.iloc[:6]
    assert list(planted["gsea_term"]) == [f"P{j}" for j in range(6)]
    assert planted["gsea_interpretable"].all()
    assert (planted["gsea_nes"] > 1).all()
    assert (planted["gsea_pvalue"] < 0.05).all()
    assert list(planted["ora_term"]) == [f"P{j}" for j in range(6)]  # ORA agrees
    dead = table.iloc[10:]
    assert (dead["gsea_term"] == "").all()
    assert dead["gsea_fdr"].isna().all()
    assert dead["gsea_nes"].isna().all()
    assert dead["gsea_pvalue"].isna().all()
    assert not dead["gsea_interpretable"].any()
    np.testing.assert_array_equal(table["gsea_interpretable"], table["gsea_fdr"].to_numpy() < 0.05)

    record = adata.uns[ANNOTATION]
    summary = record["summary"]
    assert list(summary.columns) == LAYER + ORA_SUMMARY + GSEA_SUMMARY
    row = summary.iloc[0]
    assert row["total_live"] == 10
    assert row["gsea_interpretable"] == table["gsea_interpretable"].sum() >= 6
    assert row["gsea_fraction"] == pytest.approx(row["gsea_interpretable"] / 10)
    assert row["gsea_baseline_fraction"] == pytest.approx(row["gsea_baseline_interpretable"] / 10)
    assert row["gsea_baseline_fraction"] < row["gsea_fraction"]
    # each method is timed on its own (0.1 had one "seconds" for both)
    assert row["ora_seconds"] >= 0
    assert row["gsea_seconds"] >= 0
    params = record["params"]
    assert params["method"] == "both"
    assert params["permutations"] == 500
    assert params["gsea_weight"] == 0.0
    assert params["activations_key"] == ACTIVATIONS

    path = tmp_path / "prerank.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(feature_table(back, 0), table, check_dtype=False)
    pd.testing.assert_frame_equal(back.uns[ANNOTATION]["summary"], summary, check_dtype=False)
    assert back.uns[ANNOTATION]["params"]["method"] == "both"
    assert feature_table(back, 0)["gsea_interpretable"].dtype == bool


def test_annotate_prerank_alone_writes_only_gsea_and_ora_after_it_replaces_the_record():
    adata, sets = _synthetic()
    kwargs = {"gene_sets": sets, "permutations": 300, "gsea_weight": 0.0, "seed": 1}
    sct.tl.annotate_features(adata, method="prerank", **kwargs)
    table = feature_table(adata, 0)
    summary = adata.uns[ANNOTATION]["summary"]
    # only what was run: the GSEA columns and summary, no ORA ones (0.1 copied GSEA into them)
    assert list(adata.uns[ANNOTATION]["features"]["layer_0"].columns) == GSEA_COLUMNS
    assert not any(c.startswith("ora_") for c in table.columns)
    assert list(summary.columns) == LAYER + GSEA_SUMMARY
    assert table.loc["L0F0", "gsea_term"] == "P0"
    assert table.loc["L0F0", "gsea_pvalue"] < 0.05
    # the same seed gives the same numbers
    again = sct.tl.annotate_features(adata, method="prerank", copy=True, **kwargs)
    pd.testing.assert_frame_equal(
        again.uns[ANNOTATION]["summary"].drop(columns="gsea_seconds"),
        summary.drop(columns="gsea_seconds"),
    )
    pd.testing.assert_frame_equal(feature_table(again, 0), table)
    # ORA alone afterwards, same key_added: the record is replaced, no stale GSEA columns
    sct.tl.annotate_features(adata, gene_sets=sets, method="ora", baseline=None)
    table = feature_table(adata, 0)
    assert not any(c.startswith("gsea_") for c in table.columns)
    assert list(table.columns[-4:]) == ORA_COLUMNS
    assert list(adata.uns[ANNOTATION]["summary"].columns) == LAYER + ORA_SUMMARY
    assert adata.uns[ANNOTATION]["params"]["method"] == "ora"


def test_annotate_prerank_validates_before_writing():
    adata, sets = _synthetic()
    before = feature_table(adata, 0)
    with pytest.raises(ValueError, match="method"):
        sct.tl.annotate_features(adata, gene_sets=sets, method="gsea")
    with pytest.raises(ValueError, match="permutations"):
        sct.tl.annotate_features(adata, gene_sets=sets, method="prerank", permutations=0)
    with pytest.raises(ValueError, match="gsea_weight"):
        sct.tl.annotate_features(adata, gene_sets=sets, method="prerank", gsea_weight=-1)
    assert ANNOTATION not in adata.uns
    # without the genes x features tables neither method can run; the error says how to fix it
    genes = adata.uns[ACTIVATIONS].pop("genes")
    for method in ("both", "ora"):
        with pytest.raises(KeyError, match=r"feature_activations\(adata, genes=True\)"):
            sct.tl.annotate_features(adata, gene_sets=sets, method=method)
    assert ANNOTATION not in adata.uns
    adata.uns[ACTIVATIONS]["genes"] = genes
    sct.tl.annotate_features(adata, gene_sets=sets, method="ora")
    pd.testing.assert_frame_equal(
        feature_table(adata, 0)[before.columns], before, check_dtype=False
    )
    assert "summary" in adata.uns[ANNOTATION]


# --- on trained transcoders ---------------------------------------------------------------------


def test_annotate_both_on_trained_transcoders(trained, tmp_path):
    sets = load_gene_sets("markers:bulk_labels", adata=trained, min_size=1, max_size=10**9)
    common = {"gene_sets": sets, "layers": [0], "n_top": 20, "baseline": None, "copy": True}
    ora = sct.tl.annotate_features(trained, **common)
    both = sct.tl.annotate_features(trained, method="both", permutations=100, **common)
    # the ORA results are those of method="ora", bit for bit
    a, b = ora.uns[ANNOTATION]["summary"], both.uns[ANNOTATION]["summary"]
    pd.testing.assert_frame_equal(
        b[a.columns].drop(columns="ora_seconds"), a.drop(columns="ora_seconds"), check_exact=True
    )
    ta, tb = feature_table(ora, 0), feature_table(both, 0)
    pd.testing.assert_frame_equal(tb[ta.columns], ta, check_exact=True)
    assert list(both.uns[ANNOTATION]["features"]) == ["layer_0"]
    assert both.uns[ANNOTATION]["params"]["gene_sets"] == "markers:bulk_labels"
    live = tb[tb["live"]]
    assert len(live) > 0
    assert (tb.loc[~tb["live"], "gsea_term"] == "").all()
    assert live["gsea_fdr"].dropna().between(0, 1).all()
    assert (live["gsea_nes"].dropna() > 0).all()
    assert b["gsea_interpretable"].iloc[0] == tb["gsea_interpretable"].sum()
    path = tmp_path / "trained.h5ad"
    both.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(feature_table(back, 0), tb, check_dtype=False)
    pd.testing.assert_frame_equal(back.uns[ANNOTATION]["summary"], b, check_dtype=False)
    # the plot reads the GSEA columns under annotate_features' own name for the method too
    import matplotlib.pyplot as plt

    gsea_ax = sct.pl.interpretability(both, method="prerank", show=False)
    assert "GSEA" in gsea_ax.get_title()
    heights = [p.get_height() for p in gsea_ax.patches]
    assert heights[0] == pytest.approx(b["gsea_fraction"].iloc[0])
    plt.close("all")
