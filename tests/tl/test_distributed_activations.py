"""``feature_activations`` under ``torchrun``: 2 CPU processes (gloo) on a backed ``.h5ad``
against one process, on the same cells and transcoders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch.distributed as dist

HELPER = Path(__file__).parents[1] / "_distributed_activations.py"
N_CELLS = 61  # odd, so the two ranks get different numbers of cells

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _run(args: list[str], path: Path, out: Path, batch_size: int) -> None:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [*args, str(HELPER), str(path), str(out), "--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="module")
def runs(trained_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_activations")
    adata = trained_base[:N_CELLS].copy()
    for key in [k for k in adata.obsm if k.startswith("X_sct_L")]:
        del adata.obsm[key]
    del adata.uns["sct_activations"]
    path = root / "cells.h5ad"
    adata.write_h5ad(path)
    # different batch sizes too: the result must not depend on how cells are batched
    _run([sys.executable], path, root / "single", batch_size=16)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _run([*torchrun, "--nproc-per-node", "2"], path, root / "ddp", batch_size=8)
    return root, adata


def test_two_ranks_give_the_one_process_result_in_cell_order(runs):
    root, adata = runs
    one = ad.read_h5ad(root / "single" / "result.h5ad")
    two = ad.read_h5ad(root / "ddp" / "result.h5ad")
    assert list(two.obs_names) == list(adata.obs_names) == list(one.obs_names)
    rec1, rec2 = one.uns["sct_activations"], two.uns["sct_activations"]
    assert rec2["params"]["n_cells"] == N_CELLS
    assert rec2["params"]["n_tokens"] == rec1["params"]["n_tokens"]
    assert sorted(rec2["obsm_keys"].values()) == sorted(rec1["obsm_keys"].values())
    for layer, key in rec1["obsm_keys"].items():
        X1, X2 = one.obsm[key].toarray(), two.obsm[key].toarray()
        assert X1.shape == (N_CELLS, X1.shape[1])
        assert X1.any()
        np.testing.assert_allclose(X2, X1, rtol=1e-4, atol=1e-5, err_msg=f"{layer}: cell rows")
        np.testing.assert_allclose(
            rec2["firing_rate"][layer], rec1["firing_rate"][layer], rtol=1e-9, atol=1e-12
        )
        g1, g2 = rec1["genes"], rec2["genes"]
        np.testing.assert_array_equal(g2["names"], g1["names"])
        np.testing.assert_array_equal(g2["n_cells"], g1["n_cells"])
        np.testing.assert_array_equal(g2["counts"][layer].toarray(), g1["counts"][layer].toarray())
        np.testing.assert_allclose(
            g2["sums"][layer].toarray(), g1["sums"][layer].toarray(), rtol=1e-4, atol=1e-4
        )


def test_only_rank_zero_writes_and_the_file_stays_backed(runs):
    root, _ = runs
    r0 = json.loads((root / "ddp" / "rank0.json").read_text())
    r1 = json.loads((root / "ddp" / "rank1.json").read_text())
    assert r0["backed"]
    assert r1["backed"]
    assert r0["has_record"]
    assert any(k.startswith("X_sct_L") for k in r0["obsm"])
    assert not r1["has_record"]
    assert not any(k.startswith("X_sct_L") for k in r1["obsm"])


def test_tables_of_the_shards_add_up_without_a_process_group(trained_base, model):
    """The core pieces on their own: two shards' tables, put together, equal one pass."""
    from sctranscoder.core import activations as core_acts
    from sctranscoder.core import distributed

    sentences = [s.split() for s in trained_base.obs["cell_sentence"][:20]]
    names = list(dict.fromkeys(g for s in sentences for g in s))
    tset = __import__("sctranscoder").get.transcoders(trained_base)
    whole = core_acts.collect_activations(model, tset, sentences, batch_size=8, progress=False)
    half = core_acts.collect_activations(
        model, tset, sentences[::2], batch_size=8, progress=False, gene_names=names
    )
    assert half.genes == names
    assert half.gene_counts[0].shape[0] == len(names)
    assert core_acts.gather_tables(half, np.arange(10), 20) is half  # no process group
    assert not distributed.is_distributed()
    np.testing.assert_allclose(
        half.cells[0].toarray(), whole.cells[0][::2].toarray(), rtol=1e-4, atol=1e-5
    )
