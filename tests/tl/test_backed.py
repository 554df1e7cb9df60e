"""Large AnnData: the workflow on a file opened with ``read_h5ad(path, backed="r")``.

The backed run must give exactly the in-memory results, never read more than ``chunk_size``
cells of the matrix at a time, and leave the object backed; its results persist with
``write_h5ad(new_path)``. With the weights linked in a directory, a backed file holds no weights.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from anndata._core.sparse_dataset import BaseCompressedSparseDataset

import sctranscoder as sct

N_CELLS = 120
N_TOKENS = 2048
BATCH = 512
CHUNK = 32
WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _leaves(value):
    """Every value inside nested dicts."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def _workflow(adata, model, **cs_kwargs):
    sct.pp.cell_sentences(adata, model=model, **cs_kwargs)
    sct.tl.train_transcoders(
        adata, model, n_tokens=N_TOKENS, batch_size=BATCH, device="cpu", progress=False
    )
    sct.tl.feature_activations(adata, model, progress=False)


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    """The same cells in memory and backed (``.X`` scaled and dense, ``.raw`` sparse)."""
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
    assert backed.isbacked
    assert str(backed.filename) == str(path)
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
        for name in WEIGHTS:
            np.testing.assert_allclose(tb[layer][name], tm[layer][name], rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(
        backed.uns["sct"]["metrics"]["layers"], memory.uns["sct"]["metrics"]["layers"]
    )
    rec_b, rec_m = backed.uns["sct_activations"], memory.uns["sct_activations"]
    for key in rec_m["obsm_keys"].values():
        diff = backed.obsm[key] - memory.obsm[key]
        assert abs(diff).max() <= 1e-5
    # the genes x features tables (the old per-gene varm means) agree too
    np.testing.assert_array_equal(rec_b["genes"]["names"], rec_m["genes"]["names"])
    for layer in rec_m["obsm_keys"]:
        ga_b = sct.get.gene_activations(backed, int(layer.split("_")[1]))
        ga_m = sct.get.gene_activations(memory, int(layer.split("_")[1]))
        assert abs(ga_b.X - ga_m.X).max() <= 1e-5
        np.testing.assert_allclose(
            rec_b["firing_rate"][layer], rec_m["firing_rate"][layer], rtol=1e-5, atol=1e-7
        )


def test_backed_results_persist_with_write_h5ad(runs, tmp_path):
    _, backed, _, _ = runs
    out = tmp_path / "with_results.h5ad"
    backed.write_h5ad(out)  # anndata re-points the backed object at the new file
    back = ad.read_h5ad(out)
    assert back.obs["cell_sentence"].tolist() == backed.obs["cell_sentence"].tolist()
    assert "X_sct_L0" in back.obsm
    assert sct.get.gene_activations(back, 0).shape == sct.get.gene_activations(backed, 0).shape
    assert back.raw is not None
    assert back.raw.X.shape == backed.raw.X.shape


def test_copy_of_backed_is_refused(runs, model):
    _, backed, _, _ = runs
    with pytest.raises(ValueError, match="to_memory"):
        sct.tl.train_transcoders(backed, model, n_tokens=N_TOKENS, batch_size=BATCH, copy=True)
    with pytest.raises(ValueError, match="to_memory"):
        sct.tl.feature_activations(backed, model, copy=True, progress=False)


@pytest.mark.parametrize("how", ["weights_dir", "save_transcoders"])
def test_linked_weights_stay_out_of_a_backed_file(runs, model, tmp_path, how):
    memory = runs[0]
    adata = memory[:16].copy()
    if how == "weights_dir":
        sct.tl.train_transcoders(
            adata,
            model,
            layers=[1, 2],
            n_tokens=BATCH,
            batch_size=BATCH,
            weights_dir=tmp_path / "w",
            progress=False,
        )
        sct.tl.feature_activations(adata, model, progress=False)
    else:
        sct.save_transcoders(adata, tmp_path / "w", link=True)
    path = tmp_path / "linked.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    rec = backed.uns["sct"]
    assert "transcoders" not in rec
    assert set(rec["weights"]) == {"path", "manifest_sha256", "n_bytes"}
    assert str(rec["weights"]["path"]) == str((tmp_path / "w").resolve())
    # no weight matrix anywhere in the record
    assert not [v for v in _leaves(rec) if isinstance(v, np.ndarray) and v.ndim == 2]
    keys = [str(k) for k in backed.uns["sct_activations"]["obsm_keys"].values()]
    expected = {k: backed.obsm[k].copy() for k in keys}
    for k in expected:
        del backed.obsm[k]
    sct.tl.feature_activations(backed, model, progress=False)
    assert backed.isbacked
    for k, X in expected.items():
        assert abs(backed.obsm[k] - X).max() < 1e-6
