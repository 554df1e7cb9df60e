"""Feature activations are ordinary obsm matrices: squidpy's spatial statistics read them."""

from __future__ import annotations

import numpy as np
import pytest


def test_moran_i_of_feature_activations(trained):
    sq = pytest.importorskip(
        "squidpy", reason="squidpy is the `spatial` extra (installed by make setup)"
    )
    adata = trained
    # a pseudo-tissue: cells laid out by their UMAP, so neighbours share a cell type
    adata.obsm["spatial"] = adata.obsm["X_umap"].copy()
    sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=8)
    X = adata.obsm["X_sct_L2"]
    top = np.argsort(-np.asarray((X > 0).mean(0)).ravel())[:20]
    sq.gr.spatial_autocorr(
        adata, attr="obsm", layer="X_sct_L2", genes=top.tolist(), mode="moran", n_perms=None
    )
    moran = adata.uns["moranI"]
    assert len(moran) == 20
    assert np.isfinite(moran["I"]).all()
    # features that mark cell populations are spatially clustered on this layout
    assert moran["I"].max() > 0.3
