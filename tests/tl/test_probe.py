"""sct.tl.probe and sct.pl.probe: a planted problem, the session's features, round trips."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import sctranscoder as sct

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def planted():
    """240 cells in 3 groups; ``obsm["informative"]``: one column that encodes the group among
    19 noise columns; ``obsm["noise"]``: noise only (sparse).
    """
    rng = np.random.default_rng(0)
    n = 240
    labels = np.repeat(["a", "b", "c"], n // 3)
    code = pd.factorize(labels, sort=True)[0]
    informative = rng.standard_normal((n, 20))
    informative[:, 7] = 3.0 * code + 0.2 * rng.standard_normal(n)
    noise = sparse.random(n, 30, density=0.3, random_state=1, format="csr")
    adata = ad.AnnData(
        X=rng.standard_normal((n, 10)).astype(np.float32),
        obs=pd.DataFrame({"group": pd.Categorical(labels)}, index=[f"c{i}" for i in range(n)]),
    )
    adata.obsm["informative"] = informative
    adata.obsm["noise"] = noise
    return adata


def test_planted_column_is_found_and_noise_is_at_chance(planted):
    adata = planted.copy()
    sct.tl.probe(adata, groupby="group", use_rep=["informative", "noise"], C=1.0, progress=False)
    res = adata.uns["sct_probe"]
    summary = res["summary"]
    assert list(summary.index) == ["informative", "noise"]
    assert summary.loc["informative", "balanced_accuracy_mean"] > 0.95
    assert summary.loc["noise", "balanced_accuracy_mean"] < 0.5  # chance is 1/3
    assert res["params"]["chance_balanced_accuracy"] == pytest.approx(1 / 3)
    assert summary.loc["informative", "n_inputs"] == 20
    assert summary.loc["noise", "n_inputs"] == 30
    assert res["folds"]["accuracy"].shape == (2, 5)


def test_a_budget_of_one_input_keeps_the_informative_one(planted):
    adata = planted.copy()
    sct.tl.probe(adata, groupby="group", use_rep="informative", n_nonzero=1, progress=False)
    res = adata.uns["sct_probe"]
    assert np.all(res["folds"]["n_nonzero"] <= 1)
    assert res["summary"].loc["informative", "balanced_accuracy_mean"] > 0.9
    assert res["params"]["comparison"] == "n_nonzero"


def test_concatenated_and_named_representations(planted):
    adata = planted.copy()
    sct.tl.probe(
        adata,
        groupby="group",
        use_rep={"both": ["informative", "noise"], "expression": "X"},
        n_splits=3,
        progress=False,
    )
    summary = adata.uns["sct_probe"]["summary"]
    assert list(summary.index) == ["both", "expression"]
    assert summary.loc["both", "n_inputs"] == 50
    assert summary.loc["both", "keys"] == "informative+noise"


def test_probe_of_session_features_with_a_row_per_representation(trained_base, tmp_path):
    adata = trained_base.copy()
    counts = adata.obs["bulk_labels"].value_counts()
    adata = adata[adata.obs["bulk_labels"].isin(counts.index[counts >= 3])].copy()
    # default: every layer's features, and the expression
    sct.tl.probe(adata, groupby="bulk_labels", n_splits=3, progress=False)
    sct.tl.probe(
        adata,
        groupby="bulk_labels",
        use_rep={
            "features": list(adata.uns["sct_activations"]["obsm_keys"].values()),
            "pca": "X_pca",
            "raw": "raw",
        },
        n_splits=3,
        n_nonzero=20,
        key_added="probe_budget",
        progress=False,
    )
    default = adata.uns["sct_probe"]["summary"]
    assert list(default.index) == ["features", "X"]
    assert default.loc["features", "n_inputs"] == 4 * 1024
    budget = adata.uns["probe_budget"]["summary"]
    assert list(budget.index) == ["features", "pca", "raw"]
    assert (adata.uns["probe_budget"]["folds"]["n_nonzero"] <= 20).all()
    chance = adata.uns["sct_probe"]["params"]["chance_accuracy"]
    assert (default["accuracy_mean"] > chance).all()
    for path, write, read in (
        (tmp_path / "p.h5ad", ad.AnnData.write_h5ad, ad.read_h5ad),
        (tmp_path / "p.zarr", ad.AnnData.write_zarr, ad.read_zarr),
    ):
        write(adata, path)
        back = read(path)
        for key in ("sct_probe", "probe_budget"):
            pd.testing.assert_frame_equal(
                back.uns[key]["summary"], adata.uns[key]["summary"], check_dtype=False
            )
            for name, values in adata.uns[key]["folds"].items():
                np.testing.assert_array_equal(back.uns[key]["folds"][name], values)
        fig = sct.pl.probe(back, probe_key="probe_budget", return_fig=True, show=False)
        assert fig.axes[0].get_yticklabels()[0].get_text() == "features"
    ax = sct.pl.probe(adata, metric="accuracy", show=False)
    assert "C = 0.1" in ax.get_title(loc="left")
