"""sct.tl.feature_stability and sct.pl.feature_stability on two transcoder sets of the embedded
model (the session's, and one more trained with another seed on the same cells).
"""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pytest
from conftest import BATCH, N_TOKENS

import sctranscoder as sct
from sctranscoder.get._features import live_mask

matplotlib.use("Agg")
LAYERS = [1, 2]


@pytest.fixture(scope="module")
def two_sets(trained_base, model):
    """``trained_base`` plus a second set ``"sct_b"`` (layers 1 and 2, seed 1) and its
    activations.
    """
    adata = trained_base.copy()
    sct.tl.train_transcoders(
        adata,
        model,
        layers=LAYERS,
        n_tokens=N_TOKENS,
        batch_size=BATCH,
        seed=1,
        key_added="sct_b",
        progress=False,
    )
    sct.tl.feature_activations(adata, model, key="sct_b", genes=False, progress=False)
    return adata


def _unit(W):
    return W / np.linalg.norm(W, axis=1, keepdims=True)


def test_two_trained_sets_match_above_chance(two_sets):
    adata = two_sets.copy()
    sct.tl.feature_stability(adata, other_key="sct_b", n_baseline=2, progress=False)
    res = adata.uns["sct_stability"]
    summary = res["summary"]
    assert list(summary["layer"]) == LAYERS  # the layers both sets have
    assert res["params"]["live_only"]  # both activation records are there
    for layer in LAYERS:
        row, entry = summary.loc[f"layer_{layer}"], res["layers"][f"layer_{layer}"]
        assert row["median"] > row["baseline_median"] + 0.1
        assert row["fraction_above_0.5"] > row["baseline_fraction_above_0.5"]
        # the stored cosines are those of the stored pairs of decoder rows
        Wa = adata.uns["sct"]["transcoders"][f"layer_{layer}"]["W_dec"]
        Wb = adata.uns["sct_b"]["transcoders"][f"layer_{layer}"]["W_dec"]
        cos = np.sum(_unit(Wa[entry["index"]]) * _unit(Wb[entry["other_index"]]), axis=1)
        np.testing.assert_allclose(entry["cosine"], cos, atol=1e-5)
        # live features only, each used once
        live = live_mask(adata.uns["sct_activations"], layer)
        assert row["n_compared"] == live.sum()
        assert live[entry["index"]].all()
        assert len(set(entry["other_index"].tolist())) == row["n_matched"]
        assert entry["baseline"].shape == (2, row["n_matched"])
        assert entry["trained_vs_init"].shape == (2, row["n_matched"])
        assert entry["covariance_baseline"].shape == (2, row["n_matched"])
        # chance within the trained sets' subspace sits above isotropic chance
        assert row["covariance_baseline_median"] > row["baseline_median"]


def test_all_features_when_asked(two_sets):
    out = sct.tl.feature_stability(
        two_sets,
        other_key="sct_b",
        layers=2,
        live_only=False,
        n_baseline=1,
        copy=True,
        progress=False,
    )
    row = out.uns["sct_stability"]["summary"].loc["layer_2"]
    W = two_sets.uns["sct"]["transcoders"]["layer_2"]["W_dec"]
    assert row["n_compared"] == (np.linalg.norm(W, axis=1) > 0).sum()
    assert not out.uns["sct_stability"]["params"]["live_only"]
    assert "sct_stability" not in two_sets.uns  # copy=True leaves adata alone


def test_a_set_matched_to_its_copy_in_another_anndata(trained_base, sct_logs):
    adata = trained_base.copy()
    other = trained_base.copy()
    sct.tl.feature_stability(adata, other, layers=[0], n_baseline=1, progress=False)
    entry = adata.uns["sct_stability"]["layers"]["layer_0"]
    np.testing.assert_allclose(entry["cosine"], 1.0, atol=1e-5)
    np.testing.assert_array_equal(entry["index"], entry["other_index"])
    assert adata.uns["sct_stability"]["params"]["other"] == "other AnnData"
    assert "same encoder" in sct_logs.text  # both trained with seed 0: the shared start is named


def test_result_survives_h5ad_and_zarr_and_plots(two_sets, tmp_path):
    adata = two_sets.copy()
    sct.tl.feature_stability(adata, other_key="sct_b", n_baseline=1, progress=False)
    res = adata.uns["sct_stability"]
    for path, write, read in (
        (tmp_path / "a.h5ad", ad.AnnData.write_h5ad, ad.read_h5ad),
        (tmp_path / "a.zarr", ad.AnnData.write_zarr, ad.read_zarr),
    ):
        write(adata, path)
        back = read(path).uns["sct_stability"]
        assert list(back["summary"].columns) == list(res["summary"].columns)
        np.testing.assert_allclose(
            back["summary"].to_numpy(dtype=float), res["summary"].to_numpy(dtype=float)
        )
        for name, entry in res["layers"].items():
            for field, values in entry.items():
                np.testing.assert_array_equal(np.asarray(back["layers"][name][field]), values)
        assert bool(back["params"]["live_only"]) == bool(res["params"]["live_only"])
    # the plot: one panel per layer, four histograms each
    fig = sct.pl.feature_stability(adata, return_fig=True, show=False)
    assert len(fig.axes) == len(LAYERS)
    assert all(len(ax.patches) == 4 for ax in fig.axes)
    fig.savefig(tmp_path / "stability.png")
    ax = sct.pl.feature_stability(adata, layers=[2], show=False)
    assert "layer 2" in ax.get_title()
