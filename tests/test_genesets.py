"""Gene sets from every source (sctranscoder._genesets): dicts, GMT, nets, markers, libraries."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _crosscheck import forbid_network

from sctranscoder import _genesets
from sctranscoder._genesets import (
    GeneSets,
    GeneSetsUnavailableError,
    gene_sets,
    read_gmt,
    write_gmt,
)
from sctranscoder._ora import ora


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test at once instead of hanging."""
    forbid_network(monkeypatch)


def test_gene_sets_from_a_dict_are_cleaned_and_filtered_by_size():
    sets = gene_sets(
        {"a": ["cd3d", "CD3D ", "CD3E", "LCK", "CD2", "IL7R"], "tiny": ["X"], "b": {"A", "B"}},
        min_size=2,
        max_size=5,
    )
    assert sets == {"a": ["CD3D", "CD3E", "LCK", "CD2", "IL7R"], "b": sets["b"]}
    assert sorted(sets["b"]) == ["A", "B"]
    with pytest.raises(TypeError, match="single gene"):
        gene_sets({"a": "CD3D"})


def test_gene_sets_remember_their_source(tmp_path):
    genes = ["CD3D", "CD3E", "CD2", "LCK", "IL7R"]
    from_dict = gene_sets({"T": genes})
    assert isinstance(from_dict, GeneSets)
    assert isinstance(from_dict, dict)
    assert from_dict.source == "dict"
    write_gmt({"T": genes}, tmp_path / "t.gmt")
    assert gene_sets(str(tmp_path / "t.gmt")).source == str(tmp_path / "t.gmt")
    from_path = gene_sets(tmp_path / "t.gmt")
    assert from_path.source == str(tmp_path / "t.gmt")
    net = pd.DataFrame({"source": ["T"] * 5, "target": genes})
    assert gene_sets(net).source == "DataFrame"
    # loaded sets given again keep their origin (a tool records it), and are filtered again
    again = gene_sets(from_path, min_size=1)
    assert again == from_path
    assert again.source == from_path.source
    assert _genesets.source_name(from_path) == str(tmp_path / "t.gmt")
    with pytest.raises(ValueError, match=re.escape(f"the sets from {tmp_path / 't.gmt'}")):
        gene_sets(from_path, min_size=6)


def test_gene_sets_from_gmt_files(tmp_path):
    text = (
        "T cell\thttp://example.org\tCD3D\tCD3E\tcd2\tLCK\tIL7R\n"
        "Enrichr style\t\tLYZ,1.0\tS100A8,1.0\tS100A9,0.5\tCD14,1.0\tFCN1,1.0\n"
        "too small\tdesc\tA\tB\n"
        "\n"
    )
    path = tmp_path / "sets.gmt"
    path.write_text(text)
    expected = {
        "T cell": ["CD3D", "CD3E", "CD2", "LCK", "IL7R"],
        "Enrichr style": ["LYZ", "S100A8", "S100A9", "CD14", "FCN1"],
    }
    assert gene_sets(str(path)) == expected
    assert gene_sets(path) == expected
    other = tmp_path / "sets.txt"  # any existing file is read as GMT
    other.write_text(text)
    assert gene_sets(str(other)) == expected
    gz = tmp_path / "sets.gmt.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    assert gene_sets(gz) == expected
    write_gmt(expected, tmp_path / "out.gmt")
    assert read_gmt(tmp_path / "out.gmt") == expected
    with pytest.raises(FileNotFoundError):
        gene_sets(str(tmp_path / "missing.gmt"))
    bad = tmp_path / "bad.gmt"
    bad.write_text("no tabs here\n")
    with pytest.raises(ValueError, match="not a GMT"):
        gene_sets(bad)


def test_gene_sets_from_a_decoupler_net():
    net = pd.DataFrame(
        {
            "source": ["T"] * 5 + ["B"] * 5 + ["small"] * 2,
            "target": [
                "CD3D",
                "CD3E",
                "CD2",
                "LCK",
                "IL7R",
                "CD79A",
                "CD79B",
                "MS4A1",
                "CD19",
                "CD19",
                "X",
                "Y",
            ],
            "weight": np.arange(12.0),
        }
    )
    assert gene_sets(net, min_size=4) == {
        "T": ["CD3D", "CD3E", "CD2", "LCK", "IL7R"],
        "B": ["CD79A", "CD79B", "MS4A1", "CD19"],
    }
    with pytest.raises(ValueError, match="'source'"):
        gene_sets(net.rename(columns={"source": "set"}))


def test_marker_gene_sets_from_the_data_leave_adata_unchanged(pbmc):
    before = pbmc.copy()
    rgg_before = pbmc.uns["rank_genes_groups"]["names"].copy()
    sets = gene_sets("markers:bulk_labels", adata=pbmc, n_markers=50)
    assert all(name.startswith("bulk_labels:") for name in sets)
    assert all(5 <= len(genes) <= 50 for genes in sets.values())
    mono, b = sets["bulk_labels:CD14+ Monocyte"], sets["bulk_labels:CD19+ B"]
    assert {"LYZ", "S100A8", "S100A9", "CD14", "FCN1", "FCGR3A"} & set(mono)
    assert {"CD79A", "CD79B", "MS4A1"} <= set(b)
    assert {"NKG7", "GNLY"} <= set(sets["bulk_labels:CD56+ NK"])
    # Nothing was written to the caller's AnnData (it already holds a rank_genes_groups result).
    np.testing.assert_array_equal(pbmc.X, before.X)
    np.testing.assert_array_equal(
        pbmc.raw.X.toarray() if sp.issparse(pbmc.raw.X) else pbmc.raw.X,
        before.raw.X.toarray() if sp.issparse(before.raw.X) else before.raw.X,
    )
    pd.testing.assert_frame_equal(pbmc.obs, before.obs)
    assert list(pbmc.uns) == list(before.uns)
    np.testing.assert_array_equal(pbmc.uns["rank_genes_groups"]["names"], rgg_before)
    # Marker sets feed straight into enrichment against the data's genes.
    res = ora(
        ["LYZ", "S100A8", "S100A9", "CD14", "FCN1", "CST3", "TYROBP"],
        sets,
        background=pbmc.raw.var_names,
    )
    assert res["term"].iloc[0] in {"bulk_labels:CD14+ Monocyte", "bulk_labels:Dendritic"}


def test_marker_gene_sets_need_adata_and_a_column(pbmc):
    with pytest.raises(ValueError, match="adata="):
        gene_sets("markers:bulk_labels")
    with pytest.raises(KeyError, match="not_a_column"):
        gene_sets("markers:not_a_column", adata=pbmc)


def test_gene_sets_validation():
    with pytest.raises(ValueError, match="min_size=5 and max_size=500"):
        gene_sets({"a": ["A", "B"], "b": ["C"]})
    with pytest.raises(TypeError, match="cannot be read from a int"):
        gene_sets(42)
    with pytest.raises(TypeError, match="list"):
        gene_sets([["A", "B"]])


# --- named libraries -------------------------------------------------------------------------


def test_named_library_offline_without_cache_fails_clearly_without_network(tmp_path, no_network):
    with pytest.raises(GeneSetsUnavailableError) as info:
        gene_sets("CellMarker_2024", cache_dir=tmp_path)
    message = str(info.value)
    assert "CellMarker_2024" in message
    assert "allow_network=True" in message
    assert str(tmp_path) in message  # says where it looked
    assert isinstance(info.value, ConnectionError)
    assert isinstance(info.value, ValueError)


def test_named_library_from_the_cache_dir(tmp_path, no_network):
    write_gmt(
        {"Glycolysis": ["HK1", "PFKP", "ALDOA", "GAPDH", "PKM", "ENO1"]},
        tmp_path / "KEGG_2021_Human.gmt",
    )
    assert gene_sets("KEGG_2021_Human", cache_dir=tmp_path) == {
        "Glycolysis": ["HK1", "PFKP", "ALDOA", "GAPDH", "PKM", "ENO1"]
    }


def test_named_library_from_an_installed_pyenrichr(tmp_path, monkeypatch, no_network):
    # The layout of pyenrichr 1.0.2: pyenrichr/data/<library name>, Enrichr GMT without suffix.
    data = tmp_path / "site" / "pyenrichr" / "data"
    data.mkdir(parents=True)
    (data.parent / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (data / "KEGG_2021_Human").write_text(
        "ABC transporters\t\tABCA2\tABCC4\tABCG8\tABCA3\tABCC5\t\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sets = gene_sets("KEGG_2021_Human", cache_dir=tmp_path / "cache")
    assert sets == {"ABC transporters": ["ABCA2", "ABCC4", "ABCG8", "ABCA3", "ABCC5"]}
    with pytest.raises(GeneSetsUnavailableError, match="does not ship"):
        gene_sets("CellMarker_2024", cache_dir=tmp_path / "cache")


def test_named_library_download_is_explicit_and_cached(tmp_path, monkeypatch):
    import gseapy

    calls = []

    def fake_get_library(name, **kwargs):
        calls.append(name)
        return {"Monocyte": ["LYZ", "CD14", "S100A8", "S100A9", "FCN1"]}

    monkeypatch.setattr(gseapy, "get_library", fake_get_library)
    sets = gene_sets("CellMarker_2024", cache_dir=tmp_path, allow_network=True)
    assert sets == {"Monocyte": ["LYZ", "CD14", "S100A8", "S100A9", "FCN1"]}
    assert (tmp_path / "CellMarker_2024.gmt").is_file()
    assert gene_sets("CellMarker_2024", cache_dir=tmp_path) == sets  # offline, from the cache
    assert calls == ["CellMarker_2024"]
    monkeypatch.setattr(_genesets, "_pyenrichr_file", lambda name: None)
    with pytest.raises(GeneSetsUnavailableError):
        gene_sets("GO_Biological_Process_2023", cache_dir=tmp_path)
    assert calls == ["CellMarker_2024"]
