"""Records in an AnnData: they survive .h5ad and .zarr, files of 0.1 upgrade, sets are cached,
and weights linked in a directory are checked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from conftest import MARKERS
from scipy import sparse

import sctranscoder as sct

LEGACY = Path(__file__).parent / "data" / "legacy_0.1.0.dev0.h5ad"
LAYER = 2


# -- every record survives write_h5ad/read_h5ad and write_zarr/read_zarr ---------------------------


def _assert_same(a, b, where: str = "uns") -> None:
    """Equal nested records, up to the types a file gives back (arrays for lists, ...)."""
    if isinstance(a, dict):
        assert isinstance(b, dict), where
        assert set(a) == set(b), f"{where}: {sorted(set(a) ^ set(b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(b, a, check_dtype=False, obj=where)
    elif sparse.issparse(a):
        assert sparse.issparse(b), where
        assert a.shape == b.shape, where
        assert (a != b).nnz == 0, where
    elif isinstance(a, np.ndarray) and a.dtype.names:  # scanpy's record arrays
        assert a.dtype.names == b.dtype.names, where
        for name in a.dtype.names:
            np.testing.assert_array_equal(np.asarray(b[name]), np.asarray(a[name]), err_msg=where)
    elif isinstance(a, np.ndarray | list | tuple):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind in "OUST":  # zarr gives numpy's StringDType back
            a, b = _strings(a), _strings(b)
        np.testing.assert_array_equal(b, a, err_msg=where)
    elif isinstance(a, float | np.floating):
        assert (np.isnan(a) and np.isnan(b)) or a == b, where
    else:
        assert a == b, where


def _strings(values: np.ndarray) -> np.ndarray:
    return np.asarray([str(v) for v in values.ravel()], dtype=object).reshape(values.shape)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_every_record_survives_a_file(everything, tmp_path, fmt):
    adata, cell = everything
    path = tmp_path / f"all.{fmt}"
    if fmt == "h5ad":
        adata.write_h5ad(path)
        back = ad.read_h5ad(path)
    else:
        adata.write_zarr(path)
        back = ad.read_zarr(path)
    records = [
        "sct",
        "sct_activations",
        "sct_annotation",
        f"circuit_{cell}",
        f"circuit_{cell}_enrichment",
        f"circuit_{cell}_score",
        "rank_features_groups",
        "ga",
    ]
    for key in records:
        _assert_same(adata.uns[key], back.uns[key], key)
    for key in ("sct_split", f"circuit_{cell}_score", f"circuit_{cell}_score_genes"):
        pd.testing.assert_series_equal(back.obs[key], adata.obs[key], check_dtype=False)
    for layer in range(4):
        key = f"X_sct_L{layer}"
        assert sparse.issparse(back.obsm[key])
        assert (back.obsm[key] != adata.obsm[key]).nnz == 0
    # and every getter reads the file's records as it read the originals
    for layer in (0, 3):
        pd.testing.assert_frame_equal(
            sct.get.feature_table(back, layer),
            sct.get.feature_table(adata, layer),
            check_dtype=False,
        )
    pd.testing.assert_frame_equal(
        sct.get.interpretability(back), sct.get.interpretability(adata), check_dtype=False
    )
    g0, g1 = sct.get.circuit(adata, cell), sct.get.circuit(back, cell)
    assert set(g0.edges) == set(g1.edges)
    assert set(g0.nodes) == set(g1.nodes)
    pd.testing.assert_frame_equal(
        *(sct.get.metrics(x)[0] for x in (back, adata)), check_dtype=False
    )
    x = torch.randn(5, adata.uns["sct"]["model"]["d_model"])
    t0, t1 = sct.get.transcoders(adata), sct.get.transcoders(back)
    for layer in t0:
        torch.testing.assert_close(t1[layer](x), t0[layer](x))


def test_reloaded_transcoders_recompute_the_same_activations(trained, tmp_path):
    path = tmp_path / "pbmc_sct.h5ad"
    trained.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.uns["sct"]["model"]["fingerprint"] == trained.uns["sct"]["model"]["fingerprint"]
    sct.tl.feature_activations(back, layers=[3], genes=False, progress=False)
    assert abs(back.obsm["X_sct_L3"] - trained.obsm["X_sct_L3"]).max() < 1e-6
    assert list(back.obs["sct_split"].cat.categories) == ["train", "validation"]


# -- the file written by sctranscoder 0.1.0.dev0 ---------------------------------------------------


@pytest.fixture
def legacy():
    return ad.read_h5ad(LEGACY)


def test_legacy_file_is_upgraded_by_the_first_tool_call(legacy, sct_logs):
    old = ad.read_h5ad(LEGACY).uns
    expected = legacy.uns["legacy_expected"]
    cell = str(expected["cell"])
    verbosity = sc.settings.verbosity
    sc.settings.verbosity = "info"
    try:
        tset = sct.get.transcoders(legacy)
    finally:
        sc.settings.verbosity = verbosity
    assert "upgraded results written by sctranscoder 0.1" in sct_logs.text
    # the transcoders are usable, with the config they were trained with
    assert isinstance(tset, sct.TranscoderSet)
    assert tset.layers == [0, 1, 2, 3]
    assert tset.config.k == 8
    assert tset.config.expansion_factor == 1
    assert tset.model["fingerprint"] == str(old["sct"]["model"]["fingerprint"])
    # every record is in its place now
    assert "sct_circuits" not in legacy.uns
    assert {"sct_activations", "sct_annotation", f"circuit_{cell}"} <= set(legacy.uns)
    assert not {"activations", "features", "interpretability"} & set(legacy.uns["sct"])
    assert legacy.uns["sct"]["params"]["config"]["k"] == 8
    np.testing.assert_allclose(sct.get.metrics(legacy)[0]["fvu"], expected["fvu"])
    assert legacy.uns["rank_features_groups"]["params"]["activations_key"] == "sct_activations"
    score = legacy.uns[f"circuit_{cell}_score"]
    np.testing.assert_array_equal(
        score["influence"], old["sct_circuits"][f"circuit_{cell}"]["cell_scores"]["weights"]
    )


def test_legacy_tables_and_circuit(legacy):
    old = ad.read_h5ad(LEGACY).uns["sct"]
    cell = str(legacy.uns["legacy_expected"]["cell"])
    for layer in range(4):
        table = sct.get.feature_table(legacy, layer)
        before = old["features"][f"layer_{layer}"]
        for new, was in [("ora_term", "best_term"), ("ora_fdr", "best_fdr")]:
            np.testing.assert_array_equal(table[new], before[was])
        np.testing.assert_array_equal(table["ora_interpretable"], before["interpretable"])
        np.testing.assert_array_equal(table["live"], before["live"])
        np.testing.assert_allclose(table["firing_rate"], before["firing_rate"])
        assert table["top_genes"].tolist() == before["top_genes"].tolist()
    summary = sct.get.interpretability(legacy)
    np.testing.assert_allclose(summary["ora_fraction"], old["interpretability"]["fraction"])
    np.testing.assert_allclose(
        summary["ora_baseline_fraction"], old["interpretability"]["baseline_fraction"]
    )
    # found by its cell's name, as before
    graph = sct.get.circuit(legacy, cell)
    assert graph.number_of_edges() == 108
    assert graph.number_of_nodes() == 97
    ga = sct.get.gene_activations(legacy, 1)
    assert (ga.layers["count"] != old["features"]["layer_1_gene_counts"]).nnz == 0


def test_legacy_activations_are_reproduced(legacy):
    expected = legacy.uns["legacy_expected"]
    sct.tl.feature_activations(legacy, key_added="new", progress=False)
    for layer in range(4):
        new, old = legacy.obsm[f"X_new_L{layer}"], legacy.obsm[f"X_sct_L{layer}"]
        assert new.shape == old.shape
        # the same features fire; values agree to float32 rounding (BLAS kernels differ by CPU)
        assert ((new != 0) != (old != 0)).nnz == 0
        np.testing.assert_allclose(new.toarray(), old.toarray(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(  # 0.1 stored them in float32
            legacy.uns["new"]["firing_rate"][f"layer_{layer}"],
            legacy.uns["sct_activations"]["firing_rate"][f"layer_{layer}"],
            rtol=1e-6,
        )
    assert float(legacy.obsm["X_new_L1"].sum()) == pytest.approx(
        float(expected["X_sct_L1_sum"]), rel=1e-6
    )


# -- the transcoder cache -------------------------------------------------------------------------


def test_transcoder_set_is_built_once_per_record(trained, tmp_path):
    first = sct.get.transcoders(trained)
    assert sct.get.transcoders(trained) is first
    # tools use the cached set: weights in adata.uns are wrapped, not copied
    w = trained.uns["sct"]["transcoders"]["layer_0"]["W_enc"]
    assert np.shares_memory(first[0].W_enc.detach().numpy(), w)
    path = tmp_path / "cache.h5ad"
    trained.write_h5ad(path)
    back = ad.read_h5ad(path)
    other = sct.get.transcoders(back)
    assert other is not first
    assert sct.get.transcoders(back) is other
    torch.testing.assert_close(other[0].W_enc, first[0].W_enc)


# -- transcoder directories: save, load, link -----------------------------------------------------


def test_save_and_load_transcoders(trained_base, model, tmp_path):
    path = sct.save_transcoders(trained_base, tmp_path / "tc")
    for name in ("config.json", "manifest.json", "layer_0.safetensors"):
        assert (path / name).exists()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sct.save_transcoders(trained_base, path)
    assert sct.save_transcoders(trained_base, path, overwrite=True) == path
    fresh = sc.datasets.pbmc68k_reduced()[:50].copy()
    sct.pp.cell_sentences(fresh, model=model)
    assert sct.load_transcoders(path, fresh) is None
    assert "transcoders" in fresh.uns["sct"]  # small: copied into the file
    sct.tl.feature_activations(fresh, layers=[2], progress=False)
    diff = fresh.obsm["X_sct_L2"] - trained_base.obsm["X_sct_L2"][:50]
    assert abs(diff).max() < 1e-6
    tset = sct.TranscoderSet.load(path)
    assert tset.layers == [0, 1, 2, 3]
    assert tset.model["name"] == sct.datasets.TINY_C2S_NAME
    pd.testing.assert_frame_equal(
        sct.get.metrics(fresh)[0], sct.get.metrics(trained_base)[0], check_dtype=False
    )


def test_load_transcoders_takes_the_model_as_a_directory(trained_base, tmp_path):
    from _models import TINY_TOKENIZER_DIR, tiny_neox

    path = sct.save_transcoders(trained_base, tmp_path / "tc")
    fresh = trained_base[:5].copy()
    del fresh.uns["sct"]
    sct.load_transcoders(path, fresh, model=str(TINY_TOKENIZER_DIR))  # the tiny_c2s directory
    assert "sct" in fresh.uns
    tiny_neox(tmp_path / "other", n_layers=4)  # a model directory with other weights
    with pytest.raises(ValueError, match="fingerprint"):
        sct.load_transcoders(path, fresh, model=str(tmp_path / "other"), key_added="again")
    assert "again" not in fresh.uns


@pytest.fixture
def linked(trained_base, tmp_path):
    """A small AnnData whose transcoders are linked in ``tmp_path / "w"``."""
    adata = trained_base[:8].copy()
    sct.save_transcoders(adata, tmp_path / "w", link=True)
    assert "transcoders" not in adata.uns["sct"]
    return adata, tmp_path / "w"


def test_moved_weights_directory_says_how_to_relink(linked, tmp_path):
    adata, path = linked
    moved = shutil.move(path, tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=r"does not exist") as err:
        sct.get.transcoders(adata)
    assert "sct.load_transcoders(new_path, adata" in str(err.value)
    assert "link=True" in str(err.value)
    sct.load_transcoders(moved, adata, link=True)
    assert str(adata.uns["sct"]["weights"]["path"]) == str(Path(moved).resolve())
    sct.tl.feature_activations(adata, layers=[1], genes=False, key_added="again", progress=False)
    np.testing.assert_allclose(  # float32 rounding of another batch composition
        adata.obsm["X_again_L1"].toarray(), adata.obsm["X_sct_L1"].toarray(), rtol=1e-5, atol=1e-5
    )


def test_changed_weights_directory_is_refused(linked, trained_base, tmp_path):
    adata, path = linked
    # another set saved in its place: the manifest differs from the linked one
    other = sct.get.transcoders(trained_base, layers=[0])
    other.save(path, overwrite=True)
    with pytest.raises(ValueError, match="has changed since it was linked") as err:
        sct.get.transcoders(adata)
    assert "link=True" in str(err.value)


def test_damaged_weights_file_is_refused(linked):
    adata, path = linked
    layer = path / "layer_1.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    layer.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        sct.get.transcoders(adata)


def test_a_record_written_again_is_not_served_from_the_cache(trained):
    first = sct.get.transcoders(trained, layers=[1])
    assert first.layers == [1]
    # the same weights stored again (as retraining does): a new record, a new set
    from sctranscoder._records import write_transcoders

    rec = trained.uns["sct"]
    write_transcoders(trained, "sct", sct.get.transcoders(trained), params=dict(rec["params"]))
    assert trained.uns["sct"]["weights_id"] != rec["weights_id"]
    again = sct.get.transcoders(trained, layers=[1])
    assert again is not first
    torch.testing.assert_close(again[1].W_enc, first[1].W_enc)


def test_linked_layers_are_read_one_by_one(linked, monkeypatch):
    adata, _ = linked
    import safetensors.torch

    read = []
    real = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda f: read.append(f) or real(f))
    assert sct.get.transcoders(adata, layers=[2]).layers == [2]
    assert [Path(f).name for f in read] == ["layer_2.safetensors"]


def test_load_transcoders_with_link_reads_no_weight(trained_base, tmp_path, monkeypatch):
    path = sct.save_transcoders(trained_base, tmp_path / "tc")
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda f: pytest.fail(f"read {f}"))
    fresh = trained_base[:5].copy()
    sct.load_transcoders(path, fresh, link=True)
    assert "weights" in fresh.uns["sct"]
    assert fresh.uns["sct"]["weights"]["n_bytes"] > 0


def test_key_added_never_replaces_a_record_of_another_kind(trained):
    before = dict(trained.uns)
    with pytest.raises(ValueError, match=r"holds transcoders"):
        sct.tl.feature_activations(trained, key_added="sct", progress=False)
    trained.uns["neighbors"] = {"params": {"method": "umap"}}
    with pytest.raises(ValueError, match="neighbors"):
        sct.tl.annotate_features(trained, gene_sets=MARKERS, key_added="neighbors")
    assert set(trained.uns) == set(before) | {"neighbors"}
    assert "transcoders" in trained.uns["sct"]


def test_legacy_circuit_enrichment_moves_beside_it_and_taken_names_stay(legacy):
    cell = legacy.uns["legacy_expected"]["cell"]
    name = f"circuit_{cell}"
    circuit = legacy.uns["sct_circuits"][name]
    circuit["enrichment"] = pd.DataFrame({"term": ["a"], "pvalue": [0.5], "gseapy_fdr": [0.6]})
    circuit["enrichment_params"] = {"gene_sets": "dict", "n_sets": 1}
    legacy.uns[f"{name}_score"] = {"taken": np.arange(2)}  # a name already in use
    sct.get.circuit(legacy, cell)  # the first reader upgrades
    moved = legacy.uns[f"{name}_enrichment"]
    assert list(moved["table"]["term"]) == ["a"]
    assert moved["params"]["circuit"] == name
    assert "enrichment" not in legacy.uns[name]
    assert "cell_scores" in legacy.uns[name]  # its destination was taken: kept where it was
    assert set(legacy.uns[f"{name}_score"]) == {"taken"}


def test_cells_without_sentences_are_refused_not_read_as_nan(trained_base, model):
    """After concatenating an AnnData without sentences, the new cells' NaN must not become a
    gene called "nan" (issue 12, item 1): every tool that reads sentences refuses, and writes
    nothing.
    """
    extra = sc.datasets.pbmc68k_reduced()[150:153].copy()
    mixed = ad.concat([trained_base[:5], extra], join="outer", merge="first", uns_merge="first")
    assert mixed.obs["cell_sentence"].isna().sum() == 3
    before = (set(mixed.uns), set(mixed.obsm), set(mixed.varm), set(mixed.obs))
    with pytest.raises(ValueError, match=r"3 of 8 cells have no sentence.*notna\(\)"):
        sct.tl.feature_activations(mixed, progress=False)
    with pytest.raises(ValueError, match="no sentence"):
        sct.tl.train_transcoders(mixed, model, n_tokens=256, batch_size=256, progress=False)
    with pytest.raises(ValueError, match="no sentence"):
        sct.tl.trace_circuit(mixed, cell=mixed.obs_names[-1], progress=False)
    assert (set(mixed.uns), set(mixed.obsm), set(mixed.varm), set(mixed.obs)) == before
    # the cells that have one still work
    sct.tl.feature_activations(
        mixed[mixed.obs["cell_sentence"].notna()].copy(), layers=[1], genes=False, progress=False
    )


def test_results_of_transcoders_trained_again_under_the_same_key_are_refused(trained, tmp_path):
    adata = trained
    sct.tl.annotate_features(adata, gene_sets=MARKERS, n_top=20, seed=0)
    cell = str(adata.obs_names[0])
    sct.tl.trace_circuit(adata, cell=cell, max_feature_nodes=8, progress=False)
    # relinking the same weights keeps what was made with them
    sct.save_transcoders(adata, tmp_path / "tc", link=True)
    sct.get.feature_table(adata, LAYER, annotation_key="sct_annotation")
    sct.tl.score_circuit(adata, circuit=cell, gene_score=False)

    sct.tl.train_transcoders(adata, n_tokens=1024, batch_size=512, seed=5, progress=False)
    for stale in (
        lambda: sct.get.activations(adata, LAYER),
        lambda: sct.get.feature_table(adata, LAYER, annotation_key="sct_annotation"),
        lambda: sct.get.circuit(adata, cell),
        lambda: sct.tl.score_circuit(adata, circuit=cell, key_added="again"),
    ):
        with pytest.raises(ValueError, match=r"made with other transcoders .* adata.uns\['sct'\]"):
            stale()
    sct.tl.feature_activations(adata, progress=False)  # computed again: current
    assert sct.get.activations(adata, LAYER).n_vars > 0
