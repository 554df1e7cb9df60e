"""sct.tl.rank_features_groups: which features mark which cell populations."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import sctranscoder as sct

LAYER = 2
#: A group of bulk_labels whose name holds "/", which .h5ad and .zarr read as a path.
SLASHED = "CD4+/CD25 T Reg"


@pytest.fixture(scope="module")
def ranked(trained_base):
    a = trained_base.copy()
    sct.tl.rank_features_groups(a, groupby="bulk_labels", layers=[LAYER])
    return a


def _stored(adata, layer: int = LAYER) -> np.ndarray:
    return np.asarray(adata.obsm[f"X_sct_L{layer}"].todense())


def _group(name: str) -> str:
    """A group name as stored (``/`` replaced by its look-alike)."""
    return name.replace("/", "\u2215")


def test_rank_features_groups_structure(ranked):
    res = ranked.uns["rank_features_groups"]
    for field in ("names", "scores", "logfoldchanges", "pvals", "pvals_adj", "pts", "params"):
        assert field in res
    groups = set(res["names"].dtype.names)
    counts = ranked.obs["bulk_labels"].value_counts()
    # singleton groups left out
    assert groups == {_group(str(g)) for g in counts.index[counts >= 2]}
    assert len(res["names"]) == 1024
    assert all(n.startswith(f"L{LAYER}F") for n in res["names"][next(iter(groups))])
    spec = res["specificity"]
    assert list(spec.columns) == ["layer", "feature", "top_group", "top_mean", "specificity", "tau"]
    live = spec["top_mean"] > 0
    assert spec.loc[live, "specificity"].between(0, 1).all()
    assert spec.loc[live, "tau"].between(0, 1).all()
    assert spec.loc[~live, "specificity"].isna().all()
    assert res["params"]["layers"].tolist() == [LAYER]
    assert res["params"]["activations_key"] == "sct_activations"


def test_top_feature_of_a_group_is_more_active_there(ranked):
    res = ranked.uns["rank_features_groups"]
    X = _stored(ranked)
    labels = ranked.obs["bulk_labels"].astype(str).to_numpy()
    for group in ("CD19+ B", "CD14+ Monocyte", "Dendritic"):
        j = int(res["names"][group][0].split("F")[1])
        assert X[labels == group, j].mean() > X[labels != group, j].mean()


def test_rank_genes_groups_df_and_dotplot(ranked):
    df = sc.get.rank_genes_groups_df(ranked, "CD19+ B", key="rank_features_groups")
    assert {"names", "scores", "pvals_adj", "pct_nz_group"} <= set(df.columns)
    assert df["scores"].is_monotonic_decreasing
    fa = sct.get.activations(ranked, LAYER)
    # a ranking of this layer alone travels with the layer's feature AnnData
    assert "rank_features_groups" in fa.uns
    dp = sc.pl.rank_genes_groups_dotplot(
        fa, key="rank_features_groups", groupby="bulk_labels", n_genes=2, show=False
    )
    assert dp is not None


def test_group_means_match_a_direct_groupby(ranked):
    means = ranked.uns["rank_features_groups"]["group_means"]
    labels = ranked.obs["bulk_labels"].astype(str).map(_group).to_numpy()
    direct = pd.DataFrame(_stored(ranked), index=ranked.obs_names).groupby(labels).mean().T
    direct.index = [f"L{LAYER}F{j}" for j in direct.index]
    np.testing.assert_allclose(
        means[direct.columns].to_numpy(), direct.to_numpy(), rtol=1e-5, atol=1e-6
    )
    spec = ranked.uns["rank_features_groups"]["specificity"]
    assert (spec["top_group"][spec["top_mean"] > 0] == means.idxmax(1)[spec["top_mean"] > 0]).all()


def test_rank_features_groups_all_layers_and_errors(trained_base):
    out = sct.tl.rank_features_groups(
        trained_base, groupby="bulk_labels", n_top=5, key_added="rfg", copy=True
    )
    assert out is not None
    assert "rfg" not in trained_base.uns
    res = out.uns["rfg"]
    assert len(res["names"]) == 5
    assert res["group_means"].shape[0] == 4 * 1024
    bare = trained_base.copy()
    del bare.uns["sct_activations"]
    with pytest.raises(KeyError, match="feature_activations"):
        sct.tl.rank_features_groups(bare, groupby="bulk_labels")
    with pytest.raises(KeyError, match="not found"):
        sct.tl.rank_features_groups(trained_base, groupby="no_such_column")
    with pytest.raises(ValueError, match=r"not in adata\.obs"):
        sct.tl.rank_features_groups(trained_base, groupby="bulk_labels", groups=["no such"])


def test_rank_features_groups_h5ad_round_trip(ranked, tmp_path):
    path = tmp_path / "ranked.h5ad"
    ranked.write_h5ad(path)
    back = ad.read_h5ad(path)
    res, orig = back.uns["rank_features_groups"], ranked.uns["rank_features_groups"]
    pd.testing.assert_frame_equal(res["group_means"], orig["group_means"])
    pd.testing.assert_frame_equal(res["specificity"], orig["specificity"], check_dtype=False)
    df0 = sc.get.rank_genes_groups_df(ranked, "CD19+ B", key="rank_features_groups")
    df1 = sc.get.rank_genes_groups_df(back, "CD19+ B", key="rank_features_groups")
    pd.testing.assert_frame_equal(df0, df1, check_dtype=False)


def test_group_with_a_slash_writes_to_zarr_and_h5ad(ranked, tmp_path):
    assert SLASHED in set(ranked.obs["bulk_labels"].astype(str))
    res = ranked.uns["rank_features_groups"]
    assert _group(SLASHED) in res["names"].dtype.names
    assert _group(SLASHED) in res["group_means"].columns
    # groups= accepts the name as the user knows it
    one = sct.tl.rank_features_groups(
        ranked, groupby="bulk_labels", layers=[LAYER], groups=[SLASHED], copy=True
    )
    assert one.uns["rank_features_groups"]["names"].dtype.names == (_group(SLASHED),)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # zarr v2 format notices of anndata/zarr, unrelated to the stored names
        warnings.filterwarnings("ignore", message=".*[Zz]arr.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*[Zz]arr.*", category=UserWarning)
        ranked.write_h5ad(tmp_path / "slash.h5ad")
        ranked.write_zarr(tmp_path / "slash.zarr")
    for back in (ad.read_h5ad(tmp_path / "slash.h5ad"), ad.read_zarr(tmp_path / "slash.zarr")):
        got = back.uns["rank_features_groups"]
        assert got["names"].dtype.names == res["names"].dtype.names
        np.testing.assert_array_equal(got["names"][_group(SLASHED)], res["names"][_group(SLASHED)])
        np.testing.assert_allclose(got["scores"][_group(SLASHED)], res["scores"][_group(SLASHED)])
        pd.testing.assert_frame_equal(got["group_means"], res["group_means"])
        pd.testing.assert_frame_equal(got["pts"], res["pts"], check_dtype=False)
        df0 = sc.get.rank_genes_groups_df(ranked, _group(SLASHED), key="rank_features_groups")
        df1 = sc.get.rank_genes_groups_df(back, _group(SLASHED), key="rank_features_groups")
        pd.testing.assert_frame_equal(df0, df1, check_dtype=False)


def test_cells_without_a_group_are_left_out_with_a_warning(ranked, sct_logs):
    with_nan = ranked.copy()
    with_nan.obs["g"] = with_nan.obs["bulk_labels"].astype(object)
    with_nan.obs.loc[with_nan.obs_names[:5], "g"] = np.nan
    sct.tl.rank_features_groups(with_nan, groupby="g", layers=[LAYER], key_added="g")
    assert "5 cells have no group (NaN) in adata.obs['g']" in sct_logs.text
    # the same as ranking the other cells alone
    rest = ranked[5:].copy()
    rest.obs["g"] = rest.obs["bulk_labels"].astype(str)
    sct.tl.rank_features_groups(rest, groupby="g", layers=[LAYER], key_added="g")
    got, want = with_nan.uns["g"], rest.uns["g"]
    pd.testing.assert_frame_equal(got["group_means"], want["group_means"])
    assert got["names"].dtype.names == want["names"].dtype.names
    for group in want["names"].dtype.names:
        np.testing.assert_array_equal(got["names"][group], want["names"][group])
        np.testing.assert_allclose(got["scores"][group], want["scores"][group])
