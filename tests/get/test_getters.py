"""sct.get: activations, gene tables, metrics, transcoders and MuData from the stored records."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import N_CELLS
from scipy import sparse

import sctranscoder as sct

matplotlib.use("Agg")


def test_get_activations_overlays_on_umap(trained_base):
    fa = sct.get.activations(trained_base, layer=2)
    assert fa.shape == (N_CELLS, 1024)
    assert fa.var_names[17] == "L2F17"
    assert "X_umap" in fa.obsm
    assert "bulk_labels" in fa.obs
    assert "X_sct_L0" not in fa.obsm
    X = trained_base.obsm["X_sct_L2"]
    assert (fa.X != X).nnz == 0
    np.testing.assert_allclose(fa.var["frac_cells"], (X > 0).mean(0).A1)
    np.testing.assert_allclose(
        fa.var["firing_rate"], trained_base.uns["sct_activations"]["firing_rate"]["layer_2"]
    )
    axes = sct.pl.activations(trained_base, 2, n_top=3, show=False)
    assert len(axes) == 3
    with pytest.raises(KeyError, match="available layers"):
        sct.get.activations(trained_base, layer=9)


def test_get_gene_activations(trained_base):
    ga = sct.get.gene_activations(trained_base, 1)
    rec = trained_base.uns["sct_activations"]["genes"]
    assert list(ga.obs_names) == list(rec["names"])
    assert ga.var_names[5] == "L1F5"
    assert ga.shape == (len(rec["names"]), 1024)
    np.testing.assert_array_equal(ga.obs["n_cells"], rec["n_cells"])
    C, S = ga.layers["count"], ga.layers["sum"]
    assert C.dtype == np.int32
    assert S.dtype == np.float32
    assert (C != rec["counts"]["layer_1"]).nnz == 0
    assert (S != rec["sums"]["layer_1"]).nnz == 0
    mean = S.toarray() / ga.obs["n_cells"].to_numpy()[:, None]
    np.testing.assert_allclose(ga.X.toarray(), mean, rtol=1e-6)
    # a feature fires on a gene in at most the cells that contain it
    assert (C.toarray() <= ga.obs["n_cells"].to_numpy()[:, None]).all()
    no_genes = sct.tl.feature_activations(
        trained_base[:3].copy(), layers=[1], genes=False, progress=False, copy=True
    )
    with pytest.raises(KeyError, match="genes=True"):
        sct.get.gene_activations(no_genes, 1)


def test_get_metrics(trained_base, model):
    layers, whole = sct.get.metrics(trained_base)
    assert isinstance(layers, pd.DataFrame)
    assert list(layers.index) == [f"layer_{i}" for i in range(model.n_layers)]
    assert {"fvu", "l0", "dead_fraction", "train_dead_fraction", "n_tokens"} <= set(layers)
    pd.testing.assert_frame_equal(layers, trained_base.uns["sct"]["metrics"]["layers"])
    assert isinstance(whole["ce_recovered"], float)
    with pytest.raises(KeyError, match="train_transcoders"):
        sct.get.metrics(trained_base, key="no_such_key")


def test_get_transcoders_returns_a_transcoder_set(trained_base, model):
    tset = sct.get.transcoders(trained_base)
    assert isinstance(tset, sct.TranscoderSet)
    assert tset.layers == [0, 1, 2, 3]
    assert len(tset) == 4
    assert tset.model["fingerprint"] == model.fingerprint
    assert tset.config == sct.TrainingConfig.from_dict(
        dict(trained_base.uns["sct"]["params"]["config"])
    )
    tset.check_model(model.fingerprint)
    with pytest.raises(ValueError, match="fingerprint"):
        tset.check_model("0" * 16, "other")
    # the weights are those of the record
    w = trained_base.uns["sct"]["transcoders"]["layer_2"]["W_enc"]
    np.testing.assert_array_equal(tset[2].W_enc.detach().numpy(), w)
    sub = sct.get.transcoders(trained_base, layers=[2])
    assert sub.layers == [2]
    # only the layer asked for, its weights wrapped (not copied) from adata.uns like the full set's
    assert np.shares_memory(sub[2].W_enc.detach().numpy(), tset[2].W_enc.detach().numpy())
    assert sct.get.transcoders(trained_base, layers=[2]) is sub  # built once
    x = torch.randn(3, model.d_model)
    torch.testing.assert_close(sub[2](x), tset[2](x))
    with pytest.raises(KeyError, match="layers"):
        sct.get.transcoders(trained_base, layers=[7])


def test_h5mu_round_trip(trained_base, tmp_path):
    import mudata as md

    mdata = sct.get.mudata(trained_base, layers=[0, 2])
    assert set(mdata.mod) == {"rna", "L0", "L2"}
    assert mdata.mod["L2"].shape == (N_CELLS, 1024)
    path = tmp_path / "pbmc_sct.h5mu"
    mdata.write(path)
    back = md.read_h5mu(path)
    rna = back["rna"]
    assert (rna.obsm["X_sct_L2"] != trained_base.obsm["X_sct_L2"]).nnz == 0
    assert sorted(rna.uns["sct"]["transcoders"]) == sorted(trained_base.uns["sct"]["transcoders"])
    X = back["L2"].X
    assert sparse.issparse(X)
    assert (X != trained_base.obsm["X_sct_L2"]).nnz == 0
    assert list(back["L0"].var_names[:2]) == ["L0F0", "L0F1"]
    # the expression modality round-trips as a working sctranscoder AnnData
    pd.testing.assert_frame_equal(
        sct.get.feature_table(rna, 1), sct.get.feature_table(trained_base, 1), check_dtype=False
    )


def test_one_feature_or_layer_need_not_be_a_list(trained_base):
    # a name is one feature, not its characters; an int is one layer
    ax = sct.pl.activations(trained_base, 2, features="L2F3", show=False)
    assert ax.get_title() == "L2F3"
    assert sct.pl.activations(trained_base, 2, features=3, show=False).get_title() == "L2F3"
    assert list(sct.get.mudata(trained_base, layers=2).mod) == ["rna", "L2"]
    assert sct.get.transcoders(trained_base, layers=1).layers == [1]
