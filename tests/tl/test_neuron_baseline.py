"""sct.tl.neuron_baseline: the interpretability pipeline on the MLP's own neurons."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _models import random_prompts, tiny_gemma2, tiny_gpt2, tiny_llama, tiny_neox
from conftest import MARKERS
from scipy import sparse

import sctranscoder as sct
from sctranscoder._genesets import gene_sets
from sctranscoder._records import record_kind, sentences
from sctranscoder.core.architectures import architecture
from sctranscoder.core.hooks import capture_mlp_io, run_to_layers
from sctranscoder.core.model import mlp_modules
from sctranscoder.core.neurons import NeuronBasis, neuron_bases

matplotlib.use("Agg")

KEY = "sct_neurons"


def _down(family: str, mlp, hidden: torch.Tensor) -> torch.Tensor:
    """The MLP's down projection (+ bias) written out from its weights, not its module."""
    if family == "gpt_neox":
        return F.linear(hidden, mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias)
    if family == "gpt2":  # Conv1D stores (in, out)
        return hidden @ mlp.c_proj.weight + mlp.c_proj.bias
    return F.linear(hidden, mlp.down_proj.weight)


def _check_reproduces_mlp(hf, family: str, ids, mask) -> dict[int, NeuronBasis]:
    """Decoding the basis' signed units with the down projection (and Gemma-2's post-MLP norm)
    gives the MLP output that the hooks capture; ``encode_sparse`` is their positive part.
    """
    layers = list(range(len(mlp_modules(hf))))
    bases = neuron_bases(hf, layers)
    blocks = architecture(hf).blocks
    with capture_mlp_io(hf, layers) as store:
        run_to_layers(hf, ids, mask)
    for la in layers:
        x, y = store[la]
        basis = bases[la]
        h = basis.hidden(x)
        assert h.shape == (*x.shape[:-1], basis.config.n_features)
        width = getattr(hf.config, "intermediate_size", None) or 4 * hf.config.hidden_size
        assert basis.config.n_features == width
        out = _down(family, blocks[la].mlp, h)
        if blocks[la].mlp_out_norm is not None:  # Gemma-2: the norm after the MLP
            out = blocks[la].mlp_out_norm(out)
        torch.testing.assert_close(out, y.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(basis(x), y.float(), atol=1e-5, rtol=1e-4)
        values, indices = basis.encode_sparse(x)
        torch.testing.assert_close(values, h.clamp_min(0))
        assert torch.equal(indices[0, 0], torch.arange(basis.config.n_features))
        assert (h < 0).any()
        assert (h > 0).any()
    return bases


def test_basis_reproduces_the_mlp_of_the_embedded_model(model):
    batch = model.tokenize([["CD3D", "CD3E", "LYZ", "MALAT1", "CD74"], ["HLA-DRA", "S100A9"]])
    bases = _check_reproduces_mlp(model.model, "gpt_neox", batch.input_ids, batch.attention_mask)
    assert sorted(bases) == [0, 1, 2, 3]
    assert {b.config.n_features for b in bases.values()} == {512}


@pytest.mark.parametrize(
    ("build", "family"),
    [
        (tiny_gemma2, "gemma2"),
        (tiny_llama, "llama"),
        (tiny_gpt2, "gpt2"),
        (lambda: tiny_neox(parallel_residual=False), "gpt_neox"),
    ],
    ids=["gemma2", "llama", "gpt2", "neox-sequential"],
)
def test_basis_reproduces_the_mlp_of_other_families(build, family):
    hf = build()
    ids, mask = next(random_prompts(0, batch=4, seq=24))
    _check_reproduces_mlp(hf, family, ids, mask)


def test_basis_refuses_unknown_layers(model):
    with pytest.raises(ValueError, match=r"MLP layers 0..3"):
        neuron_bases(model.model, [4])


@pytest.fixture(scope="module")
def with_neurons(annotated_base, model):
    return sct.tl.neuron_baseline(
        annotated_base, model, keep_activations=True, progress=False, copy=True
    )


def test_summary_has_one_sane_row_per_annotated_layer(annotated_base, with_neurons):
    rec = with_neurons.uns[KEY]
    assert record_kind(rec) == "neuron baseline"
    summary = rec["summary"]
    ann = annotated_base.uns["sct_annotation"]["summary"]
    assert list(summary["layer"]) == list(ann["layer"])
    assert list(summary.columns) == list(ann.columns)
    params = rec["params"]
    n_neurons = np.asarray(params["n_neurons"])
    assert (n_neurons == 512).all()
    live = summary["total_live"].to_numpy()
    assert ((live >= 0) & (live <= n_neurons)).all()
    for column in ("ora_fraction", "ora_baseline_fraction"):
        values = summary[column].to_numpy(dtype=float)
        assert np.isfinite(values).all()
        assert ((values >= 0) & (values <= 1)).all()
    np.testing.assert_allclose(summary["ora_fraction"], summary["ora_interpretable"] / live)
    # the recorded settings were used again
    acts = annotated_base.uns["sct_activations"]["params"]
    for name in ("aggregate", "n_top", "live_threshold"):
        assert params[name] == acts[name]
    assert params["gene_sets"] == MARKERS
    assert params["model_fingerprint"] == annotated_base.uns["sct"]["model"]["fingerprint"]
    assert rec["model"]["fingerprint"] == params["model_fingerprint"]
    assert params["n_cells"] == annotated_base.n_obs
    # the per-neuron tables agree with the summary
    for la, n_live, n_int in zip(
        summary["layer"], summary["total_live"], summary["ora_interpretable"], strict=True
    ):
        table = rec["features"][f"layer_{la}"]
        assert list(table.index[:3]) == [f"L{la}N0", f"L{la}N1", f"L{la}N2"]
        assert len(table) == 512
        assert int(table["live"].sum()) == n_live
        assert int(table["ora_interpretable"].sum()) == n_int
        assert ((table["firing_rate"] >= 0) & (table["firing_rate"] <= 1)).all()
        assert set(table.columns) >= {"top_genes", "ora_term", "ora_fdr"}
    # adata's own results are untouched
    pd.testing.assert_frame_equal(with_neurons.uns["sct_annotation"]["summary"], ann)
    assert KEY not in annotated_base.uns


def test_kept_activations_are_the_neurons_maximum_over_gene_tokens(with_neurons, model):
    rec = with_neurons.uns[KEY]
    layer = 2
    key = rec["params"]["obsm_keys"][f"layer_{layer}"]
    assert key == "X_sct_neurons_L2"
    X = with_neurons.obsm[key]
    assert sparse.issparse(X)
    assert X.format == "csr"
    assert X.dtype == np.float32
    assert X.shape == (with_neurons.n_obs, 512)
    # recomputed from the model for three cells, outside the tool's code path
    cells = sentences(with_neurons, "cell_sentence", n_genes=model.settings.n_genes)[:3]
    batch = model.tokenize(cells)
    with capture_mlp_io(model.model, [layer]) as store:
        run_to_layers(model.model, batch.input_ids, batch.attention_mask)
    mlp = mlp_modules(model.model)[layer]
    h = mlp.act(mlp.dense_h_to_4h(store[layer][0])).clamp_min(0)
    h = h.masked_fill(~(batch.gene_index >= 0)[..., None], 0.0)
    np.testing.assert_allclose(X[:3].toarray(), h.amax(1).numpy(), atol=1e-5)


def test_interpretability_joins_the_neuron_columns(annotated_base, with_neurons):
    table = sct.get.interpretability(with_neurons)
    summary = with_neurons.uns[KEY]["summary"]
    for column in ("total_live", "ora_interpretable", "ora_fraction", "ora_baseline_fraction"):
        np.testing.assert_allclose(table[f"neurons_{column}"], summary[column].to_numpy(float))
    assert "neurons_ora_seconds" not in table
    real = sct.get.interpretability(annotated_base)
    pd.testing.assert_frame_equal(table[real.columns], real)
    assert not any(c.startswith("neurons_") for c in real.columns)
    again = sct.get.interpretability(with_neurons, neurons_key=KEY)
    pd.testing.assert_frame_equal(again, table)


def test_plot_shows_the_neuron_bars(with_neurons, tmp_path):
    ax = sct.pl.interpretability(with_neurons, show=False)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "features",
        "shuffled gene labels",
        "MLP neurons",
        "MLP neurons, shuffled labels",
    ]
    n_layers = len(sct.get.interpretability(with_neurons))
    assert len(ax.patches) == 4 * n_layers
    live = with_neurons.uns[KEY]["summary"]["total_live"]
    assert ax.texts[0].get_text().endswith(f"|{int(live.iloc[0])}")


def test_neurons_survive_h5ad_and_zarr(with_neurons, tmp_path):
    with_neurons.write_h5ad(tmp_path / "n.h5ad")
    with_neurons.write_zarr(tmp_path / "n.zarr")
    before = sct.get.interpretability(with_neurons)
    rec = with_neurons.uns[KEY]
    for back in (ad.read_h5ad(tmp_path / "n.h5ad"), ad.read_zarr(tmp_path / "n.zarr")):
        after = sct.get.interpretability(back)
        pd.testing.assert_frame_equal(after, before, check_dtype=False)
        theirs = back.uns[KEY]
        assert record_kind(theirs) == "neuron baseline"
        pd.testing.assert_frame_equal(
            theirs["features"]["layer_1"], rec["features"]["layer_1"], check_dtype=False
        )
        assert dict(theirs["params"]["obsm_keys"]) == dict(rec["params"]["obsm_keys"])
        np.testing.assert_array_equal(theirs["params"]["n_neurons"], rec["params"]["n_neurons"])
        X = back.obsm["X_sct_neurons_L1"]
        assert (X != with_neurons.obsm["X_sct_neurons_L1"]).nnz == 0


def test_a_rerun_without_activations_drops_the_matrices_it_wrote(with_neurons, model):
    sets = gene_sets(MARKERS, adata=with_neurons)  # markers of all cells, passed again
    adata = with_neurons[:24].copy()  # fewer cells: a fast rerun
    assert "X_sct_neurons_L2" in adata.obsm
    sct.tl.neuron_baseline(adata, model, gene_sets=sets, progress=False)
    assert not any(k.startswith("X_sct_neurons_") for k in adata.obsm)
    assert dict(adata.uns[KEY]["params"]["obsm_keys"]) == {}
    assert adata.uns[KEY]["params"]["n_cells"] == 24
    assert "X_sct_L2" in adata.obsm  # the transcoders' activations are kept


def test_kept_activations_never_replace_what_another_tool_wrote(annotated_base, model):
    adata = annotated_base.copy()
    adata.obsm["X_sct_neurons_L1"] = np.zeros((adata.n_obs, 2))
    with pytest.raises(ValueError, match=r"did not write: choose another key_added"):
        sct.tl.neuron_baseline(adata, model, keep_activations=True, progress=False)
    assert KEY not in adata.uns
    assert adata.obsm["X_sct_neurons_L1"].shape == (adata.n_obs, 2)
