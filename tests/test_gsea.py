"""Preranked GSEA (sctranscoder._gsea): gseapy's prerank, and prerank_many checked against it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sctranscoder._gsea import best_prerank_terms, prerank, prerank_many

N_GENES = 300
GENES = [f"G{i}" for i in range(N_GENES)]


@pytest.fixture(scope="module")
def toy_sets() -> dict[str, list[str]]:
    """12 random sets of four sizes over ``GENES`` (no "__" in names: gseapy splits on it)."""
    rng = np.random.default_rng(1)
    return {f"S{j}": list(rng.choice(GENES, 10 + 5 * (j % 4), replace=False)) for j in range(12)}


def _rankings(sets: dict[str, list[str]]) -> np.ndarray:
    """Three tie-free rankings: one with S0 pushed up, one with S3 pushed down, one plain."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(3, N_GENES))
    X[0, [GENES.index(g) for g in sets["S0"]]] += 1.5
    X[1, [GENES.index(g) for g in sets["S3"]]] -= 1.5
    return X


# --- prerank (gseapy) -----------------------------------------------------------------------


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
    assert top["nes"] > 0
    assert top["fdr"] == res["fdr"].min()
    assert top["fdr"] < 0.05
    assert res.set_index("term").loc["bottom", "nes"] < 0
    assert set(top["lead_genes"].split(";")) <= set(genes[:25])
    with pytest.raises(ValueError, match="duplicated"):
        prerank(pd.Series([1.0, 2.0], index=["a", "A"]), sets)


# --- prerank_many against gseapy ----------------------------------------------------------------


def test_prerank_many_matches_gseapy(toy_sets):
    """ES equal to 1e-6; NES, p and FDR within Monte Carlo error of two 2000-permutation nulls.

    Tolerances: NES relative 8% (the same-sign null mean from ~1000 draws has a relative
    standard error of ~1.5% on each side); nominal p ``4 * sqrt(2 p (1 - p) / 1000) + 0.01``
    (4 standard errors of a difference of two binomial fractions from ~1000 same-sign draws);
    FDR q absolute 0.15 (a ratio of two such fractions over only 12 sets).
    """
    X = _rankings(toy_sets)
    ours = prerank_many(X, GENES, toy_sets, permutations=2000, seed=0)
    assert list(ours.columns) == ["query", "term", "size", "es", "nes", "pvalue", "fdr"]
    assert len(ours) == 3 * len(toy_sets)
    for q in range(3):
        ref = prerank(pd.Series(X[q], index=GENES), toy_sets, permutations=2000, seed=1)
        ref = ref.set_index("term")
        mine = ours[ours["query"] == q].set_index("term").loc[ref.index]
        np.testing.assert_allclose(mine["es"], ref["es"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(mine["nes"], ref["nes"], rtol=0.08)
        p = ref["pvalue"].to_numpy()
        tol = 4 * np.sqrt(2 * p * (1 - p) / 1000) + 0.01
        assert (np.abs(mine["pvalue"].to_numpy() - p) <= tol).all()
        np.testing.assert_allclose(mine["fdr"], ref["fdr"], atol=0.15)
        assert set(mine.index) == set(toy_sets)
        assert (mine["size"] == [len(toy_sets[t]) for t in mine.index]).all()
    # the planted sets are found, in the right direction
    s0 = ours[(ours["query"] == 0) & (ours["term"] == "S0")].iloc[0]
    s3 = ours[(ours["query"] == 1) & (ours["term"] == "S3")].iloc[0]
    assert s0["nes"] > 1.5
    assert s0["fdr"] < 0.05
    assert s3["nes"] < -1.5
    assert s3["fdr"] < 0.05


def test_zero_tail_matches_gseapy_es(toy_sets):
    """A feature that fired on few genes: most scores 0; the ES does not depend on their order.

    gseapy orders the tied zeros arbitrarily; for every set with a scored gene its ES is still
    ours (the walk only falls through the zeros). NES and p agree for positive sets.
    """
    rng = np.random.default_rng(3)
    x = np.zeros(N_GENES)
    fired = rng.choice(N_GENES, 40, replace=False)
    x[fired] = rng.random(40) + 0.1
    scored = {t: g for t, g in toy_sets.items() if any(x[GENES.index(s)] > 0 for s in g)}
    ours = prerank_many(x[None, :], GENES, scored, permutations=2000, seed=0).set_index("term")
    ref = prerank(pd.Series(x, index=GENES), scored, permutations=2000, seed=5).set_index("term")
    mine = ours.loc[ref.index]
    np.testing.assert_allclose(mine["es"], ref["es"], atol=1e-6, rtol=0)
    pos = ref["es"] > 0
    assert pos.any()
    np.testing.assert_allclose(mine.loc[pos, "nes"], ref.loc[pos, "nes"], rtol=0.08)
    p = ref.loc[pos, "pvalue"].to_numpy()
    tol = 4 * np.sqrt(2 * p * (1 - p) / 1000) + 0.01
    assert (np.abs(mine.loc[pos, "pvalue"].to_numpy() - p) <= tol).all()


def test_unweighted_block_walk_matches_gseapy(toy_sets):
    """weight=0 (classic KS) takes the tie-block walk; without ties it is gseapy's ES."""
    import gseapy

    X = _rankings(toy_sets)
    ours = prerank_many(X[:1], GENES, toy_sets, permutations=50, weight=0.0).set_index("term")
    rnk = pd.Series(X[0], index=GENES).sort_values(ascending=False)
    res = gseapy.prerank(
        rnk=rnk,
        gene_sets=toy_sets,
        outdir=None,
        no_plot=True,
        permutation_num=50,
        weight=0,
        min_size=5,
        max_size=500,
        seed=0,
        verbose=False,
    ).res2d.set_index("Term")
    np.testing.assert_allclose(
        ours.loc[res.index, "es"], res["ES"].to_numpy(dtype=float), atol=1e-6, rtol=0
    )


# --- ties, zeros, determinism ------------------------------------------------------------------


def test_ties_do_not_depend_on_gene_order(toy_sets):
    rng = np.random.default_rng(4)
    X = np.round(rng.random((4, N_GENES)), 1)  # 11 distinct values: many ties
    X[1, rng.random(N_GENES) < 0.8] = 0.0
    X[2] = 0.0  # never fired
    for weight in (1.0, 0.0):
        a = prerank_many(X, GENES, toy_sets, permutations=200, seed=0, weight=weight)
        order = rng.permutation(N_GENES)
        b = prerank_many(
            X[:, order],
            [GENES[i] for i in order],
            toy_sets,
            permutations=200,
            seed=0,
            weight=weight,
        )
        pd.testing.assert_frame_equal(a, b, rtol=1e-12)
    # an all-zero ranking: ES 0, NES 0, p 1, FDR 1 for every set
    zero = a[a["query"] == 2]
    assert (zero["es"] == 0).all()
    assert (zero["nes"] == 0).all()
    assert (zero["pvalue"] == 1).all()
    assert (zero["fdr"] == 1).all()
    assert best_prerank_terms(a, [0, 1, 2, 3]).loc[2].isna().all()
    # a set whose genes all scored 0: equal weights, at the bottom, ES <= 0
    sparse_row = a[a["query"] == 1].set_index("term")
    unscored = [t for t, g in toy_sets.items() if all(X[1, GENES.index(s)] == 0 for s in g)]
    assert (sparse_row.loc[unscored, "es"] <= 0).all()


def test_seed_chunking_and_input_types(toy_sets):
    rng = np.random.default_rng(6)
    X = np.where(rng.random((7, N_GENES)) < 0.3, rng.random((7, N_GENES)), 0.0)
    X[3] = rng.normal(size=N_GENES)  # dense, with negative scores
    names = [f"F{i}" for i in range(7)]
    base = prerank_many(X, GENES, toy_sets, permutations=300, seed=3, query_names=names)
    again = prerank_many(X, GENES, toy_sets, permutations=300, seed=3, query_names=names)
    pd.testing.assert_frame_equal(base, again)
    for chunk in (1, 2, 5):
        chunked = prerank_many(
            sp.csr_matrix(X), GENES, toy_sets, permutations=300, seed=3, query_names=names,
            chunk_size=chunk,
        )  # fmt: skip
        pd.testing.assert_frame_equal(chunked, base, rtol=1e-12)
    assert list(pd.unique(base["query"])) == names
    other = prerank_many(X, GENES, toy_sets, permutations=300, seed=4, query_names=names)
    other, same = (t.set_index(["query", "term"]).sort_index() for t in (other, base))
    np.testing.assert_array_equal(other["es"], same["es"])  # the ES does not use the null
    assert not np.array_equal(other["pvalue"].to_numpy(), same["pvalue"].to_numpy())
    best = prerank_many(
        X, GENES, toy_sets, permutations=300, seed=3, query_names=names, report="best"
    )
    pd.testing.assert_frame_equal(best, best_prerank_terms(base, names))
    assert list(best.columns) == ["term", "size", "es", "nes", "pvalue", "fdr"]
    assert (best["nes"].dropna() > 0).all()


@pytest.mark.parametrize("sparse_ranking", [False, True])
def test_planted_sets_are_found_and_shuffled_ones_are_not(sparse_ranking):
    """Query q's top genes are exactly set T_q: T_q is its best term at FDR < 0.05.

    Dense rankings (every other gene a small score) use gseapy's weight 1; sparse ones (every
    other gene 0, like a feature that fired on few genes) weight 0, since with weight 1 the
    walk saturates there (see prerank_many).
    """
    rng = np.random.default_rng(7)
    n, genes = 500, [f"G{i}" for i in range(500)]
    sets = {f"T{j}": list(rng.choice(genes, 25, replace=False)) for j in range(20)}
    X = np.zeros((8, n)) if sparse_ranking else rng.random((8, n)) * 0.5
    for q in range(8):
        idx = [genes.index(g) for g in sets[f"T{q}"]]
        X[q, idx] = 1.0 + rng.random(25)  # the set's genes on top
    kwargs = {"permutations": 1000, "seed": 0, "report": "best"}
    kwargs["weight"] = 0.0 if sparse_ranking else 1.0
    best = prerank_many(X, genes, sets, **kwargs)
    assert list(best["term"]) == [f"T{q}" for q in range(8)]
    assert (best["fdr"] < 0.05).all()
    assert (best["nes"] > 1).all()
    shuffled = X[:, rng.permutation(n)]
    best = prerank_many(shuffled, genes, sets, **kwargs)
    assert not (best["fdr"] < 0.05).any()


def test_prerank_many_errors(toy_sets):
    X = np.zeros((2, N_GENES))
    with pytest.raises(ValueError, match="columns"):
        prerank_many(X[:, :-1], GENES, toy_sets)
    with pytest.raises(ValueError, match="finite"):
        prerank_many(np.full((1, N_GENES), np.nan), GENES, toy_sets)
    with pytest.raises(ValueError, match="duplicated"):
        prerank_many(X, ["g0", *GENES[:-2], "G0"], toy_sets)
    with pytest.raises(ValueError, match="permutations"):
        prerank_many(X, GENES, toy_sets, permutations=0)
    with pytest.raises(ValueError, match="min_size"):
        prerank_many(X, GENES, toy_sets, min_size=100)
    with pytest.raises(ValueError, match="query_names"):
        prerank_many(X, GENES, toy_sets, query_names=["a"])
