"""sct.tl.feature_activations: per-cell activations, firing rates and the genes x features tables."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import N_CELLS
from scipy import sparse

import sctranscoder as sct
from sctranscoder.core.hooks import capture_mlp_io, run_to_layers


def _direct_activations(model, adata, layer: int, cells: list[int]) -> tuple[np.ndarray, object]:
    """Per-token activations computed here from the model and the stored transcoder."""
    tc = sct.get.transcoders(adata, layers=[layer])[layer]
    genes = [adata.obs["cell_sentence"].iloc[i].split() for i in cells]
    batch = model.tokenize(genes)
    with capture_mlp_io(model.model, [layer]) as store:
        run_to_layers(model.model, batch.input_ids, batch.attention_mask)
        x = store[layer][0]
    return tc.encode(x).numpy(), batch


def test_activations_match_direct_computation(trained_base, model):
    layer, cells = 2, [0, 5, 123]
    X = trained_base.obsm["X_sct_L2"]
    assert sparse.isspmatrix_csr(X)
    assert X.dtype == np.float32
    assert X.shape == (N_CELLS, 1024)
    acts, batch = _direct_activations(model, trained_base, layer, cells)
    for row, cell in enumerate(cells):
        gene_tokens = batch.gene_index[row] >= 0
        expected = acts[row][gene_tokens.numpy()].max(0)
        np.testing.assert_allclose(X[cell].toarray().ravel(), expected, rtol=1e-5, atol=1e-6)
        assert np.count_nonzero(expected) > 0


def test_record_points_to_what_was_written(trained_base):
    rec = trained_base.uns["sct_activations"]
    assert {k: str(v) for k, v in rec["obsm_keys"].items()} == {
        f"layer_{i}": f"X_sct_L{i}" for i in range(4)
    }
    params = rec["params"]
    assert params["transcoders_key"] == "sct"
    assert params["aggregate"] == "max"
    assert params["n_cells"] == N_CELLS
    assert params["genes"]
    assert params["layers"].tolist() == [0, 1, 2, 3]


def test_last_and_mean_aggregates(trained_base, model):
    cells = [3, 42]
    kw = {"layers": [1], "genes": False, "progress": False, "copy": True}
    last = sct.tl.feature_activations(trained_base[cells].copy(), aggregate="last", **kw)
    mean = sct.tl.feature_activations(trained_base[cells].copy(), aggregate="mean", **kw)
    acts, batch = _direct_activations(model, trained_base, 1, cells)
    for row in range(len(cells)):
        n = int(batch.lengths[row])
        np.testing.assert_allclose(
            last.obsm["X_sct_L1"][row].toarray().ravel(), acts[row, n - 1], rtol=1e-5, atol=1e-6
        )
        g = (batch.gene_index[row] >= 0).numpy()
        np.testing.assert_allclose(
            mean.obsm["X_sct_L1"][row].toarray().ravel(), acts[row][g].mean(0), rtol=1e-4, atol=1e-6
        )
    assert last.uns["sct_activations"]["params"]["aggregate"] == "last"
    assert "genes" not in last.uns["sct_activations"]


def test_key_added_keeps_two_runs_side_by_side(trained_base):
    small = trained_base[:6].copy()
    sct.tl.feature_activations(
        small, layers=[1], aggregate="last", genes=False, key_added="last", progress=False
    )
    assert "X_last_L1" in small.obsm
    assert "last" in small.uns
    # the default run is untouched
    assert (small.obsm["X_sct_L1"] != trained_base.obsm["X_sct_L1"][:6]).nnz == 0
    assert small.uns["sct_activations"]["params"]["aggregate"] == "max"
    fa = sct.get.activations(small, 1, activations_key="last")
    assert (fa.X != small.obsm["X_last_L1"]).nnz == 0


def test_gene_activations_are_means_over_cells_with_the_gene(trained_base, model):
    ga = sct.get.gene_activations(trained_base, 2)
    assert sparse.isspmatrix_csr(ga.X)
    assert ga.shape[1] == 1024
    sentences = [s.split() for s in trained_base.obs["cell_sentence"]]
    # rows are the genes of the sentences (their union), not var_names
    assert set(ga.obs_names) == {g for s in sentences for g in s}
    gene = "CD74"
    cells = [i for i, s in enumerate(sentences) if gene in s]
    assert ga.obs.loc[gene, "n_cells"] == len(cells) > 0
    # recompute on all cells that contain the gene
    total, fired = np.zeros(1024), np.zeros(1024)
    for start in range(0, len(cells), 64):
        chunk = cells[start : start + 64]
        acts, batch = _direct_activations(model, trained_base, 2, chunk)
        for row, cell in enumerate(chunk):
            toks = (batch.gene_index[row] == sentences[cell].index(gene)).numpy()
            on_gene = acts[row][toks].max(0)
            total += on_gene
            fired += on_gene > 0
    gi = ga.obs_names.get_loc(gene)
    np.testing.assert_allclose(ga.X[gi].toarray().ravel(), total / len(cells), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(ga.layers["count"][gi].toarray().ravel(), fired)
    np.testing.assert_allclose(ga.layers["sum"][gi].toarray().ravel(), total, rtol=1e-4, atol=1e-5)


def test_firing_rate(trained_base):
    fr = trained_base.uns["sct_activations"]["firing_rate"]["layer_0"]
    assert fr.shape == (1024,)
    assert (fr >= 0).all()
    assert (fr <= 1).all()
    # TopK: k features per token unless fewer are positive
    assert fr.sum() == pytest.approx(32, abs=1.0)


def test_copy_leaves_the_input_alone(trained_base):
    small = trained_base[:4].copy()
    del small.uns["sct_activations"]
    for key in [k for k in small.obsm if k.startswith("X_sct_")]:
        del small.obsm[key]
    out = sct.tl.feature_activations(small, layers=[0], genes=False, progress=False, copy=True)
    assert "sct_activations" not in small.uns
    assert "X_sct_L0" not in small.obsm
    assert (out.obsm["X_sct_L0"] != trained_base.obsm["X_sct_L0"][:4]).nnz == 0


def test_a_run_again_under_the_same_key_replaces_the_old_matrices(trained_base):
    small = trained_base[:6].copy()
    sct.tl.feature_activations(small, layers=[0, 1], genes=False, key_added="x", progress=False)
    assert {"X_x_L0", "X_x_L1"} <= set(small.obsm)
    sct.tl.feature_activations(small, layers=[1], genes=False, key_added="x", progress=False)
    assert "X_x_L1" in small.obsm
    assert "X_x_L0" not in small.obsm  # no orphan left from the first run
    # the default record's matrices are untouched, and naming the default record by its own
    # name writes the default matrices, not X_sct_activations_L<i>
    sct.tl.feature_activations(
        small, layers=[1], genes=False, key_added="sct_activations", progress=False
    )
    assert not any(k.startswith("X_sct_activations") for k in small.obsm)


def test_sentences_naming_a_gene_twice_are_refused(trained_base):
    # issue 12: a gene named twice in a sentence counted its cell twice in the gene tables
    small = trained_base[:6].copy()
    genes = small.obs["cell_sentence"].iloc[2].split()
    small.obs.loc[small.obs_names[2], "cell_sentence"] = " ".join([genes[1], *genes[1:]])
    before_obsm, before_uns = set(small.obsm), dict(small.uns["sct_activations"])
    with pytest.raises(ValueError, match=r"1 cells of .* name a gene more than once") as err:
        sct.tl.feature_activations(small, layers=[0], key_added="dup", progress=False)
    assert small.obs_names[2] in str(err.value)
    assert f"{genes[1]!r} x2" in str(err.value)
    assert "sct.pp.cell_sentences" in str(err.value)
    assert set(small.obsm) == before_obsm
    assert "dup" not in small.uns
    assert small.uns["sct_activations"].keys() == before_uns.keys()
    # without gene tables nothing is counted per gene, and a gene's two places are two genes
    sct.tl.feature_activations(small, layers=[0], genes=False, key_added="dup", progress=False)


def test_longer_sentences_are_cut_with_a_warning(trained_base, model, sct_logs):
    small = trained_base[:4].copy()
    sct.tl.feature_activations(small, layers=[0], genes=False, key_added="a", progress=False)
    assert "genes, but the model reads" not in sct_logs.text  # made for this model: no cut
    sct.pp.cell_sentences(small)  # the C2S default of 200 genes, the model reads 100
    longest = int(small.obs["cell_sentence_n_genes"].max())
    assert longest > model.settings.n_genes
    sct.tl.feature_activations(small, layers=[0], genes=False, key_added="b", progress=False)
    assert (
        f"hold up to {longest} genes, but the model reads {model.settings.n_genes}: the top "
        f"{model.settings.n_genes} genes of each sentence are used"
    ) in sct_logs.text
    assert (small.obsm["X_a_L0"] != small.obsm["X_b_L0"]).nnz == 0


def test_prompts_name_the_organism_of_the_sentences(trained_base, model, sct_logs):
    # issue 12: `organism=` of cell_sentences was recorded, but prompts said "Homo sapiens"
    from dataclasses import replace

    cells = [0, 7]
    small = trained_base[cells].copy()
    params = dict(small.uns["cell_sentence"]["params"])
    small.uns["cell_sentence"] = {"params": {**params, "organism": "Mus musculus"}}
    sct.tl.feature_activations(small, layers=[1], aggregate="last", genes=False, progress=False)

    assert "prompts name 'Mus musculus'" in sct_logs.text
    # the transcoders were trained on human prompts: said, not refused
    assert "trained on prompts naming 'Homo sapiens' cells" in sct_logs.text
    mouse = replace(model, settings=replace(model.settings, organism="Mus musculus"))
    got = small.obsm["X_sct_L1"].toarray()
    for m, same in ((mouse, True), (model, False)):
        acts, batch = _direct_activations(m, trained_base, 1, cells)
        assert f"in a {m.settings.organism} cell" in batch.prompts[0]
        last = np.stack([acts[r, int(batch.lengths[r]) - 1] for r in range(len(cells))])
        assert np.allclose(got, last, rtol=1e-5, atol=1e-6) == same
    assert model.settings.organism == "Homo sapiens"  # the caller's model is left as it was
