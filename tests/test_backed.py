"""Large AnnData: the workflow on a file opened with ``read_h5ad(path, backed="r")``.

The backed run must give exactly the in-memory results, never read more than ``chunk_size``
cells of the matrix at a time, and leave the object backed; its results persist with
``write_h5ad(new_path)``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from anndata._core.sparse_dataset import BaseCompressedSparseDataset

import sctranscoder as sct

N_CELLS = 120
N_TOKENS = 2048
BATCH = 512
CHUNK = 32


@pytest.fixture(scope="module")
def model():
    return sct.datasets.tiny_c2s()


def _workflow(adata, model, **cs_kwargs):
    sct.pp.cell_sentences(adata, model=model, **cs_kwargs)
    sct.tl.train_transcoders(
        adata, model, n_tokens=N_TOKENS, batch_size=BATCH, device="cpu", progress=False
    )
    sct.tl.feature_activations(adata, model, progress=False)


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    """The same cells in memory and backed (``.X`` scaled and dense, ``.raw`` sparse)."""
    import scanpy as sc

    memory = sc.datasets.pbmc68k_reduced()[:N_CELLS].copy()
    path = tmp_path_factory.mktemp("backed") / "pbmc.h5ad"
    memory.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")

    reads: list[int] = []
    original = BaseCompressedSparseDataset.__getitem__

    def counting(self, index):  # rows per read of the backed .raw.X
        out = original(self, index)
        reads.append(out.shape[0])
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is faster on a shared machine
    BaseCompressedSparseDataset.__getitem__ = counting
    try:
        _workflow(backed, model, chunk_size=CHUNK)
    finally:
        BaseCompressedSparseDataset.__getitem__ = original
    try:
        _workflow(memory, model)
    finally:
        torch.set_num_threads(threads)
    return memory, backed, reads, path


def test_backed_object_stays_backed_and_is_read_in_chunks(runs):
    _, backed, reads, path = runs
    assert backed.isbacked and str(backed.filename) == str(path)
    assert reads, "the backed .raw.X was never read"
    assert max(reads) <= CHUNK
    # every cell read for the sentences (plus the value check and data-kind sample)
    assert sum(reads) >= N_CELLS


def test_backed_results_equal_in_memory(runs):
    memory, backed, _, _ = runs
    for col in ("cell_sentence", "cell_sentence_n_genes", "sct_split"):
        pd.testing.assert_series_equal(backed.obs[col], memory.obs[col])
    assert backed.uns["cell_sentence"]["params"] == memory.uns["cell_sentence"]["params"]
    tb, tm = backed.uns["sct"]["transcoders"], memory.uns["sct"]["transcoders"]
    assert sorted(tb) == sorted(tm)
    for layer in tm:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            np.testing.assert_allclose(tb[layer][name], tm[layer][name], rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(
        backed.uns["sct"]["metrics"]["layers"], memory.uns["sct"]["metrics"]["layers"]
    )
    for key in memory.uns["sct"]["activations"]["obsm_keys"].values():
        diff = backed.obsm[key] - memory.obsm[key]
        assert abs(diff).max() <= 1e-5
    for key in memory.uns["sct"]["activations"]["varm_keys"].values():
        diff = backed.varm[key] - memory.varm[key]
        assert abs(diff).max() <= 1e-5


def test_backed_results_persist_with_write_h5ad(runs, tmp_path):
    _, backed, _, _ = runs
    out = tmp_path / "with_results.h5ad"
    backed.write_h5ad(out)  # anndata re-points the backed object at the new file
    back = ad.read_h5ad(out)
    assert back.obs["cell_sentence"].tolist() == backed.obs["cell_sentence"].tolist()
    assert "X_sct_L0" in back.obsm and "sct_genes_L0" in back.varm
    assert back.raw is not None and back.raw.X.shape == backed.raw.X.shape


def test_copy_of_backed_is_refused(runs, model):
    _, backed, _, _ = runs
    with pytest.raises(ValueError, match="to_memory"):
        sct.tl.train_transcoders(backed, model, n_tokens=N_TOKENS, batch_size=BATCH, copy=True)
    with pytest.raises(ValueError, match="to_memory"):
        sct.tl.feature_activations(backed, model, copy=True, progress=False)
