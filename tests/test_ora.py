"""Over-representation (sctranscoder._ora) against scipy, decoupler and gseapy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _crosscheck import enrich_gseapy, forbid_network, ora_decoupler
from scipy import stats

from sctranscoder import _ora
from sctranscoder._genesets import background_index, restrict_sets
from sctranscoder._ora import best_terms, hypergeom_sf, ora, ora_many

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
    assert small.loc["hit", "size"] == 20
    assert small.loc["partly_outside", "size"] == 10
    assert "no_overlap" not in small.index
    N, n, K, k = 100, 14, 20, 12  # G133 and G101 left the query with the background
    assert small.loc["hit", "pvalue"] == pytest.approx(stats.hypergeom.sf(k - 1, N, K, n))
    # Symbols are compared upper-cased.
    lower = ora([g.lower() for g in QUERY], toy_sets, background=BACKGROUND).set_index("term")
    pd.testing.assert_frame_equal(res, lower)


def test_ora_rejects_queries_and_sets_outside_the_background(toy_sets):
    with pytest.raises(ValueError, match="none of the query genes"):
        ora(["OUT1", "OUT2"], toy_sets, background=BACKGROUND)
    with pytest.raises(ValueError, match=r"(?i)no gene set"):
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


def test_hypergeom_sf_matches_scipy_on_random_parameters():
    rng = np.random.default_rng(11)
    for N in rng.integers(1, 50_000, 25):
        m = 400
        K, n = (np.floor(np.exp(rng.uniform(0, np.log(N + 1), m))).astype(np.int64) for _ in "Kn")
        top = np.minimum(K, n) + 1  # one past the support
        # half anywhere in 0..top (mostly far tails), half within 4 sd of the mean
        mean = n * K / N
        sd = np.sqrt(mean * (N - K) / N * (N - n) / max(N - 1, 1))
        near = np.round(mean + rng.normal(0, 4, m) * sd).astype(np.int64)
        k = np.where(rng.random(m) < 0.5, rng.integers(0, top + 1), np.clip(near, 0, top))
        ours = hypergeom_sf(k, int(N), K, n)
        ref = stats.hypergeom.sf(k - 1, N, K, n)
        # atol only for tails below the smallest normal double (1e-308)
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-300)


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
    assert table["pvalue"].between(0, 1).all()
    assert (table["fdr"] >= table["pvalue"]).all()
    best = best_terms(table, queries=list(queries))
    assert list(best.index) == list(queries)
    assert list(best.columns) == [
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


def _bh_reference(queries, gene_sets, background, min_size):
    """Per query, BH over every tested set (p = 1 without overlap), from scipy alone."""
    bg = background_index(background)
    sets = restrict_sets(gene_sets, bg, min_size)
    N, out = len(bg), {}
    for name, genes in queries.items():
        query = set(genes) & set(bg)
        if not query:
            continue
        K = np.array([len(g) for g in sets.values()])
        k = np.array([len(query & set(g)) for g in sets.values()])
        p = np.where(k > 0, stats.hypergeom.sf(k - 1, N, K, len(query)), 1.0)
        out[name] = pd.DataFrame(
            {"pvalue": p, "fdr": stats.false_discovery_control(p)}, index=list(sets)
        )
    return out


@pytest.mark.parametrize("block_queries", [None, 3])
def test_ora_many_fdr_is_bh_over_all_tested_sets_per_query(block_queries, monkeypatch):
    rng = np.random.default_rng(5)
    background = [f"G{i}" for i in range(400)]
    sets = {
        f"s{j}": list(rng.choice(background, rng.integers(3, 40), replace=False)) for j in range(60)
    }
    queries = {
        f"q{i}": list(rng.choice(background, rng.integers(1, 50), replace=False)) for i in range(40)
    }
    queries["q7"] = ["OUT1"]  # no background gene: no rows, the next queries unaffected
    queries["q8"] = sets["s3"][:8] + queries["q8"][:4]  # one clear hit
    if block_queries:  # BH in blocks of 3 queries: the blocks' edges must not matter
        monkeypatch.setattr(_ora, "_BH_BLOCK_ENTRIES", block_queries * len(sets))
    many = ora_many(queries, sets, background=background, min_size=5)
    reference = _bh_reference(queries, sets, background, min_size=5)
    assert set(many["query"]) == set(reference) == set(queries) - {"q7"}
    for name, ref in reference.items():
        got = many[many["query"] == name].set_index("term")
        assert len(got) < len(ref)  # sets without overlap are tested but not listed
        np.testing.assert_allclose(got["pvalue"], ref.loc[got.index, "pvalue"], rtol=1e-9)
        np.testing.assert_allclose(got["fdr"], ref.loc[got.index, "fdr"], rtol=1e-9)
        one = ora(queries[name], sets, background=background, min_size=5).set_index("term")
        np.testing.assert_allclose(got["fdr"], one.loc[got.index, "fdr"], rtol=1e-9)
        assert set(got.index) == set(one.index)
    assert many.set_index(["query", "term"]).loc[("q8", "s3"), "fdr"] < 1e-3


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


def test_gseapy_enrich_gives_ora_pvalues_and_bh_over_overlapping_sets(toy_sets, monkeypatch):
    forbid_network(monkeypatch)
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
