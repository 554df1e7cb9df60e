"""Gene sets from every source, and enrichment that agrees with scipy, decoupler and gseapy."""

from __future__ import annotations

import gzip
import socket

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from sctranscoder import _genesets
from sctranscoder._enrichment import (
    best_terms,
    enrich_gseapy,
    hypergeom_sf,
    ora,
    ora_decoupler,
    ora_many,
    prerank,
)
from sctranscoder._genesets import GeneSetsUnavailableError, gene_sets, read_gmt, write_gmt

BACKGROUND = [f"G{i}" for i in range(200)]


@pytest.fixture
def toy_sets() -> dict[str, list[str]]:
    """Hand-made sets over ``BACKGROUND``; some genes (``OUT*``) lie outside it."""
    rng = np.random.default_rng(0)
    sets = {f"random{j}": list(rng.choice(BACKGROUND, 15 + j, replace=False)) for j in range(8)}
    sets["hit"] = BACKGROUND[:20]
    sets["partly_outside"] = [*BACKGROUND[5:15], "OUT1", "OUT2", "OUT3"]
    sets["no_overlap"] = BACKGROUND[150:170]
    return sets


QUERY = [*BACKGROUND[:12], "G40", "G77", "G101", "G133"]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test at once instead of hanging."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- ora -------------------------------------------------------------------------------------


def test_ora_pvalues_are_the_hypergeometric_tail_and_fisher_greater(toy_sets):
    res = ora(QUERY, toy_sets, background=BACKGROUND).set_index("term")
    N, n = len(BACKGROUND), len(QUERY)
    assert res["pvalue"].is_monotonic_increasing
    for term, row in res.iterrows():
        K = len(set(toy_sets[term]) & set(BACKGROUND))
        k = len(set(toy_sets[term]) & set(QUERY))
        assert (row["size"], row["overlap"]) == (K, k)
        assert row["pvalue"] == pytest.approx(stats.hypergeom.sf(k - 1, N, K, n), rel=1e-12)
        table = [[k, n - k], [K - k, N - n - K + k]]
        fisher = stats.fisher_exact(table, alternative="greater").pvalue
        assert row["pvalue"] == pytest.approx(fisher, rel=1e-9)
        assert sorted(row["genes"].split(";")) == sorted(set(toy_sets[term]) & set(QUERY))
    assert res.index[0] == "hit"
    assert res.loc["hit", "fdr"] < 1e-6


def test_ora_fdr_counts_every_tested_set_including_unreported_ones(toy_sets):
    res = ora(QUERY, toy_sets, background=BACKGROUND)
    assert "no_overlap" not in set(res["term"])  # overlap 0 < min_overlap: not reported...
    N, n = len(BACKGROUND), len(QUERY)
    p_all = {
        t: stats.hypergeom.sf(len(set(g) & set(QUERY)) - 1, N, len(set(g) & set(BACKGROUND)), n)
        for t, g in toy_sets.items()
    }
    fdr_all = dict(zip(p_all, stats.false_discovery_control(list(p_all.values())), strict=True))
    for term, fdr in zip(res["term"], res["fdr"], strict=True):  # ...but tested
        assert fdr == pytest.approx(fdr_all[term], rel=1e-12)
    fewer = ora(QUERY, toy_sets, background=BACKGROUND, min_overlap=3)
    assert (fewer["overlap"] >= 3).all()
    assert fewer.set_index("term")["fdr"].to_dict() == pytest.approx(
        res.set_index("term")["fdr"][fewer["term"]].to_dict()
    )


def test_background_restriction_ignores_genes_outside_it(toy_sets):
    res = ora(QUERY, toy_sets, background=BACKGROUND).set_index("term")
    assert res.loc["partly_outside", "size"] == 10  # OUT1..3 are not in the background
    # Genes outside the background change nothing, in the query or in the sets.
    noisy = {t: [*g, "OUT4", "OUT5"] for t, g in toy_sets.items()}
    again = ora([*QUERY, "OUT4", "OUT9"], noisy, background=BACKGROUND).set_index("term")
    pd.testing.assert_frame_equal(res, again)
    # A smaller background shrinks the sets and changes the test.
    small = ora(QUERY, toy_sets, background=BACKGROUND[:100]).set_index("term")
    assert small.loc["hit", "size"] == 20 and small.loc["partly_outside", "size"] == 10
    assert "no_overlap" not in small.index
    N, n, K, k = 100, 14, 20, 12  # G133 and G101 left the query with the background
    assert small.loc["hit", "pvalue"] == pytest.approx(stats.hypergeom.sf(k - 1, N, K, n))
    # Symbols are compared upper-cased.
    lower = ora([g.lower() for g in QUERY], toy_sets, background=BACKGROUND).set_index("term")
    pd.testing.assert_frame_equal(res, lower)


def test_ora_rejects_queries_and_sets_outside_the_background(toy_sets):
    with pytest.raises(ValueError, match="none of the query genes"):
        ora(["OUT1", "OUT2"], toy_sets, background=BACKGROUND)
    with pytest.raises(ValueError, match="no gene set"):
        ora(QUERY, {"x": ["OUT1", "OUT2"]}, background=BACKGROUND)
    with pytest.raises(TypeError, match="gene_sets"):
        ora(QUERY, "KEGG_2021_Human", background=BACKGROUND)


def test_vectorised_hypergeometric_tail_matches_scipy():
    rng = np.random.default_rng(1)
    for N in (30, 765, 20_000):
        K = rng.integers(1, min(N, 400) + 1, 3000)
        n = rng.integers(1, min(N, 300) + 1, 3000)
        k = rng.integers(0, np.minimum(K, n) + 2)  # includes k = 0 and k > min(K, n)
        ours = hypergeom_sf(k, N, K, n)
        ref = stats.hypergeom.sf(k - 1, N, K, n)
        np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-300)


# --- ora_many --------------------------------------------------------------------------------


def test_ora_many_agrees_with_ora_for_each_query(toy_sets):
    rng = np.random.default_rng(2)
    queries = {
        "enriched": QUERY,
        "random": list(rng.choice(BACKGROUND, 30, replace=False)),
        "small": ["G0", "G1", "G150"],
        "outside": ["OUT1"],  # no gene in the background: no rows
    }
    many = ora_many(queries, toy_sets, background=BACKGROUND)
    assert list(many.columns) == ["query", "term", "overlap", "size", "n_query", "pvalue", "fdr"]
    assert "outside" not in set(many["query"])
    for name in ("enriched", "random", "small"):
        one = ora(queries[name], toy_sets, background=BACKGROUND).set_index("term")
        got = many[many["query"] == name].set_index("term")
        assert set(got.index) == set(one.index)
        got = got.loc[one.index]
        np.testing.assert_array_equal(got["overlap"], one["overlap"])
        np.testing.assert_array_equal(got["size"], one["size"])
        assert (got["n_query"] == len(set(queries[name]) & set(BACKGROUND))).all()
        np.testing.assert_allclose(got["pvalue"], one["pvalue"], rtol=1e-8)
        np.testing.assert_allclose(got["fdr"], one["fdr"], rtol=1e-8)

    # A membership matrix over the background gives the same table.
    bg_index = pd.Index(BACKGROUND)
    names = ["enriched", "random", "small"]
    rows, cols = [], []
    for i, name in enumerate(names):
        idx = bg_index.get_indexer(queries[name])
        cols += list(idx[idx >= 0])
        rows += [i] * int((idx >= 0).sum())
    rows, cols = [*rows, 0], [*cols, 199]  # an explicit zero (G199) is not a member
    values = [*np.full(len(rows) - 1, 0.7), 0.0]
    Q = sp.csr_matrix((values, (rows, cols)), shape=(3, len(BACKGROUND)))
    stored = Q.nnz
    as_matrix = ora_many(Q, toy_sets, background=BACKGROUND, query_names=names)
    assert Q.nnz == stored  # the caller's matrix is left alone
    pd.testing.assert_frame_equal(
        as_matrix, many[many["query"] != "outside"].reset_index(drop=True)
    )

    # min_overlap hides rows but keeps the FDR of the full family.
    two = ora_many(queries, toy_sets, background=BACKGROUND, min_overlap=2)
    assert (two["overlap"] >= 2).all()
    merged = two.merge(many, on=["query", "term"], suffixes=("", "_all"))
    np.testing.assert_allclose(merged["fdr"], merged["fdr_all"])


def test_ora_many_thousands_of_queries_and_best_terms():
    rng = np.random.default_rng(3)
    background = [f"GENE{i}" for i in range(1500)]
    sets = {
        f"set{j}": list(rng.choice(background, rng.integers(5, 120), replace=False))
        for j in range(200)
    }
    queries = {
        f"f{i}": list(rng.choice(background, rng.integers(5, 60), replace=False))
        for i in range(2000)
    }
    # Plant a strong hit in a few queries.
    planted = {f"f{i}": f"set{i % 200}" for i in range(0, 2000, 400)}
    for q, s in planted.items():
        queries[q] = sets[s][:5] + queries[q][:5]
    table = ora_many(queries, sets, background=background)
    assert set(table["query"]) <= set(queries)
    assert table["pvalue"].between(0, 1).all() and (table["fdr"] >= table["pvalue"]).all()
    best = best_terms(table, queries=list(queries))
    assert list(best.index) == list(queries) and list(best.columns) == [
        "term",
        "overlap",
        "pvalue",
        "fdr",
    ]
    for q, s in planted.items():
        assert best.loc[q, "term"] == s
        assert best.loc[q, "fdr"] < 0.05
    for q in ("f1", "f777", "f1999"):  # spot checks against the one-query implementation
        one = ora(queries[q], sets, background=background)
        got = table[table["query"] == q].set_index("term").loc[one["term"]]
        np.testing.assert_allclose(got["pvalue"], one["pvalue"], rtol=1e-8)
        np.testing.assert_allclose(got["fdr"], one["fdr"], rtol=1e-8)
        assert best.loc[q, "pvalue"] == pytest.approx(one["pvalue"].min(), rel=1e-8)


# --- decoupler and gseapy --------------------------------------------------------------------


def test_decoupler_ora_is_the_two_sided_fisher_test_on_the_same_table(toy_sets):
    ours = ora(QUERY, toy_sets, background=BACKGROUND, min_overlap=0).set_index("term")
    dc = ora_decoupler(QUERY, toy_sets, background=BACKGROUND).set_index("term")
    assert set(dc.index) == set(ours.index)  # same family of tested sets
    N, n = len(BACKGROUND), len(QUERY)
    for term, row in dc.iterrows():
        K, k = ours.loc[term, "size"], ours.loc[term, "overlap"]
        two_sided = stats.fisher_exact([[k, n - k], [K - k, N - n - K + k]]).pvalue
        assert row["pvalue"] == pytest.approx(two_sided, rel=1e-6)
        if k > n * K / N:  # over-represented: the two-sided p is never below the one-sided p
            assert row["pvalue"] >= ours.loc[term, "pvalue"] * (1 - 1e-9)
        assert row["score"] == pytest.approx(np.log(ours.loc[term, "odds_ratio"]), rel=1e-9)
    # For the clearly over-represented set the lower tail is negligible: same p-value.
    assert dc.loc["hit", "pvalue"] == pytest.approx(ours.loc["hit", "pvalue"], rel=1e-4)
    np.testing.assert_allclose(
        dc["fdr"], stats.false_discovery_control(dc["pvalue"].to_numpy()), rtol=1e-5
    )


def test_gseapy_enrich_gives_ora_pvalues_and_bh_over_overlapping_sets(toy_sets, no_network):
    ours = ora(QUERY, toy_sets, background=BACKGROUND).set_index("term")
    gp = enrich_gseapy(QUERY, toy_sets, background=BACKGROUND).set_index("term")
    # gseapy reports (and corrects over) only the sets that overlap the query.
    assert set(gp.index) == set(ours.index)
    gp = gp.loc[ours.index]
    np.testing.assert_array_equal(gp["overlap"], ours["overlap"])
    np.testing.assert_array_equal(gp["size"], ours["size"])
    np.testing.assert_allclose(gp["pvalue"], ours["pvalue"], rtol=1e-12)
    np.testing.assert_allclose(gp["odds_ratio"], ours["odds_ratio"], rtol=1e-12)
    np.testing.assert_allclose(
        gp["fdr"], stats.false_discovery_control(ours["pvalue"].to_numpy()), rtol=1e-9
    )
    assert (gp["fdr"] <= ours["fdr"] + 1e-15).all()


# --- gene set sources ------------------------------------------------------------------------


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
    assert "CellMarker_2024" in message and "allow_network=True" in message
    assert str(tmp_path) in message  # says where it looked
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, ValueError)


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


# --- prerank ---------------------------------------------------------------------------------


def test_prerank_puts_the_set_at_the_top_of_the_ranking_first():
    rng = np.random.default_rng(4)
    genes = [f"G{i}" for i in range(400)]
    ranking = pd.Series(np.sort(rng.normal(size=400))[::-1], index=genes)
    sets = {"top": genes[:25], "bottom": genes[-25:]}
    sets |= {f"random{j}": list(rng.choice(genes, 25, replace=False)) for j in range(10)}
    res = prerank(ranking, sets, permutations=100, seed=0)
    assert list(res.columns) == ["term", "es", "nes", "pvalue", "fdr", "lead_genes"]
    top = res.set_index("term").loc["top"]
    assert res["term"].iloc[0] in {"top", "bottom"}
    assert top["nes"] > 0 and top["fdr"] == res["fdr"].min()
    assert top["fdr"] < 0.05
    assert res.set_index("term").loc["bottom", "nes"] < 0
    assert set(top["lead_genes"].split(";")) <= set(genes[:25])
    with pytest.raises(ValueError, match="duplicated"):
        prerank(pd.Series([1.0, 2.0], index=["a", "A"]), sets)
