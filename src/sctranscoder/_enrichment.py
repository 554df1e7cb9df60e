"""Gene set enrichment of gene lists: over-representation (one list or thousands) and GSEA.

Every test here takes an explicit ``background``: the genes the model could have seen. Gene
sets are restricted to it before testing (a gene the model cannot see cannot be found), and the
family for the Benjamini-Hochberg FDR is every set with at least ``min_size`` genes in the
background, whether or not it overlaps the query.

- :func:`ora`: one query, hypergeometric test (one-sided, over-representation), BH FDR.
- :func:`ora_many`: the same test for thousands of queries at once, with sparse matrices.
- :func:`ora_decoupler` / :func:`enrich_gseapy`: the same question asked through decoupler's
  ORA and gseapy's offline ``enrich``, to cross-check and to report their numbers.
- :func:`prerank`: preranked GSEA (gseapy) of a gene ranking, e.g. by attribution.
- :func:`prerank_many`: gseapy's preranked GSEA statistics for thousands of rankings at once
  (vectorised with torch, nulls shared across sets of one size), and :func:`best_prerank_terms`.

Symbols are compared upper-cased, like the sets from :func:`~sctranscoder._genesets.gene_sets`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special, stats

from ._genesets import clean_genes

__all__ = [
    "best_prerank_terms",
    "best_terms",
    "enrich_gseapy",
    "ora",
    "ora_decoupler",
    "ora_many",
    "prerank",
    "prerank_many",
]

GeneSetsLike = Mapping[str, Iterable[str]]


# --- shared preparation ----------------------------------------------------------------------


def _background(background: Iterable[str]) -> pd.Index:
    bg = pd.Index(clean_genes(background))
    if bg.empty:
        raise ValueError("the background is empty: pass the genes the model could have seen")
    return bg


def _restricted_sets(gene_sets: GeneSetsLike, bg: pd.Index, min_size: int) -> dict[str, list[str]]:
    """Each set restricted to the background (in set order); sets below ``min_size`` dropped."""
    if not isinstance(gene_sets, Mapping):
        raise TypeError(
            f"gene_sets must be a dict name -> genes, got {type(gene_sets).__name__}: build one "
            "from a GMT path, a decoupler net, 'markers:<obs column>' or a library name with "
            "sctranscoder's gene_sets()"
        )
    in_bg = set(bg)
    min_size = max(int(min_size), 1)
    out = {}
    for name, genes in gene_sets.items():
        kept = [g for g in clean_genes(genes) if g in in_bg]
        if len(kept) >= min_size:
            out[str(name)] = kept
    if not out:
        raise ValueError(
            f"no gene set has >= {min_size} genes in the background of {len(bg)} genes: check "
            "that sets and background use the same identifiers (gene symbols), or lower min_size"
        )
    return out


def _query(genes: Iterable[str], bg: pd.Index) -> list[str]:
    in_bg = set(bg)
    query = [g for g in clean_genes(genes) if g in in_bg]
    if not query:
        raise ValueError(
            "none of the query genes is in the background: check identifiers (gene symbols)"
        )
    return query


def _empty(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype=object if c in ("term", "genes") else float) for c in columns}
    )


# --- one query -------------------------------------------------------------------------------


def ora(
    genes: Iterable[str],
    gene_sets: GeneSetsLike,
    *,
    background: Iterable[str],
    min_overlap: int = 1,
    min_size: int = 1,
) -> pd.DataFrame:
    """Over-representation of one gene list in gene sets (hypergeometric test, BH FDR).

    For a set with ``K`` genes in a background of ``N`` and a query of ``n`` background genes
    sharing ``k`` with it, ``pvalue = P(X >= k)`` for ``X ~ Hypergeom(N, K, n)``, i.e.
    ``scipy.stats.hypergeom.sf(k - 1, N, K, n)`` (= one-sided Fisher exact test, "greater").

    Parameters
    ----------
    genes
        The query genes (e.g. a circuit's genes). Genes outside the background are ignored.
    gene_sets
        ``{name: genes}``, e.g. from :func:`~sctranscoder._genesets.gene_sets`.
    background
        All genes that could have been in the query; sets are restricted to it.
    min_overlap
        Report sets sharing at least this many genes with the query (0: every tested set).
        Sets below it still count in the FDR.
    min_size
        Test sets with at least this many genes in the background (decoupler's ``tmin``).

    Returns
    -------
    One row per reported set, sorted by p-value: ``term``, ``size`` (genes in the background),
    ``overlap``, ``pvalue``, ``fdr`` (BH over all tested sets), ``odds_ratio`` (with
    Haldane-Anscombe correction, as gseapy and decoupler), ``genes`` (the overlap, ``;``-joined,
    in query order).
    """
    bg = _background(background)
    sets = _restricted_sets(gene_sets, bg, min_size)
    query = _query(genes, bg)
    N, n = len(bg), len(query)
    terms = list(sets)
    size = np.array([len(sets[t]) for t in terms])
    members = [set(sets[t]) for t in terms]
    hits = [[g for g in query if g in m] for m in members]
    k = np.array([len(h) for h in hits])
    pvalue = stats.hypergeom.sf(k - 1, N, size, n)
    fdr = stats.false_discovery_control(pvalue, method="bh")
    odds = _odds_ratio(k, size, n, N)
    table = pd.DataFrame(
        {
            "term": terms,
            "size": size,
            "overlap": k,
            "pvalue": pvalue,
            "fdr": fdr,
            "odds_ratio": odds,
            "genes": [";".join(h) for h in hits],
        }
    )
    table = table[table["overlap"] >= min_overlap]
    return table.sort_values(["pvalue", "term"], kind="stable").reset_index(drop=True)


def _odds_ratio(k: np.ndarray, size: np.ndarray, n: np.ndarray | int, N: int) -> np.ndarray:
    """Odds ratio of the 2x2 table with Haldane-Anscombe correction (finite for empty cells)."""
    a, b, c = k + 0.5, (n - k) + 0.5, (size - k) + 0.5
    d = (N - n - size + k) + 0.5
    return (a * d) / (b * c)


# --- many queries ----------------------------------------------------------------------------


def ora_many(
    queries: Mapping[object, Iterable[str]] | sp.spmatrix | sp.sparray | np.ndarray,
    gene_sets: GeneSetsLike,
    *,
    background: Iterable[str],
    min_overlap: int = 1,
    min_size: int = 1,
    query_names: Sequence[object] | None = None,
) -> pd.DataFrame:
    """:func:`ora` for many queries at once, vectorised (thousands of features in seconds).

    Overlaps come from one sparse product ``Q @ S`` (queries x background genes times
    background genes x sets); the hypergeometric tail is summed for the non-zero overlaps only
    (a zero overlap has p = 1), and BH FDR is applied per query over all tested sets. Same
    numbers as calling :func:`ora` on each query.

    Parameters
    ----------
    queries
        ``{query name: genes}``; or a (queries x background genes) membership matrix, sparse or
        dense, whose non-zero entries mark members, with columns in the order of ``background``.
    gene_sets
        ``{name: genes}``.
    background
        All genes any query could contain; sets are restricted to it. For a matrix ``queries``,
        its column labels.
    min_overlap
        Report pairs sharing at least this many genes; values below 1 act as 1 (zero overlaps,
        p = 1, are never listed). All tested sets count in the FDR.
    min_size
        Test sets with at least this many genes in the background.
    query_names
        Labels of the rows of a matrix ``queries`` (default ``0..n-1``).

    Returns
    -------
    Long table, one row per (query, set) with ``overlap >= min_overlap``, sorted by query (input
    order) then p-value: ``query``, ``term``, ``overlap``, ``size`` (set genes in the background),
    ``n_query`` (query genes in the background), ``pvalue``, ``fdr``. Queries without any such
    set have no rows; see :func:`best_terms`.
    """
    background = list(background)
    bg = _background(background)
    sets = _restricted_sets(gene_sets, bg, min_size)
    terms = np.array(list(sets), dtype=object)
    S = _membership(list(sets.values()), bg).T.tocsc()  # genes x sets
    if isinstance(queries, Mapping):
        names = np.array(list(queries), dtype=object)
        Q = _membership([clean_genes(q) for q in queries.values()], bg)
    else:
        Q = sp.csr_matrix(queries, copy=True)  # eliminate_zeros below works in place
        if Q.shape[1] != len(bg) or len(bg) != len(background):
            raise ValueError(
                f"a membership matrix needs one column per background gene, in order: matrix has "
                f"{Q.shape[1]} columns, background {len(bg)} unique genes "
                f"({len(background)} given)"
            )
        Q.data = (Q.data != 0).astype(np.int32)
        Q.eliminate_zeros()
        names = (
            np.arange(Q.shape[0]) if query_names is None else np.asarray(query_names, dtype=object)
        )
        if len(names) != Q.shape[0]:
            raise ValueError(f"{len(names)} query_names for {Q.shape[0]} queries")

    N = len(bg)
    n_query = np.asarray(Q.sum(axis=1)).ravel().astype(np.int64)
    size = np.asarray(S.sum(axis=0)).ravel().astype(np.int64)
    overlaps = (Q @ S).tocoo()
    rows, cols = overlaps.row.astype(np.int64), overlaps.col.astype(np.int64)
    k = np.asarray(overlaps.data).astype(np.int64)
    keep = k > 0
    rows, cols, k = rows[keep], cols[keep], k[keep]
    pvalue = hypergeom_sf(k, N, size[cols], n_query[rows])
    fdr = _bh_grouped(pvalue, rows, n_tests=len(terms))

    report = np.flatnonzero(k >= max(min_overlap, 1))
    # by query (in input order), then p-value, then set (in input order); integer keys only
    report = report[np.lexsort((cols[report], pvalue[report], rows[report]))]
    r, c = rows[report], cols[report]
    table = pd.DataFrame(
        {
            "query": names[r],
            "term": terms[c],
            "overlap": k[report],
            "size": size[c],
            "n_query": n_query[r],
            "pvalue": pvalue[report],
            "fdr": fdr[report],
        }
    )
    return table


def best_terms(table: pd.DataFrame, queries: Sequence[object] | None = None) -> pd.DataFrame:
    """The most significant set of each query in an :func:`ora_many` table.

    Parameters
    ----------
    table
        Output of :func:`ora_many`.
    queries
        Index the result by these queries (those without any set get NaN); default: the
        queries present in ``table``, in its order.

    Returns
    -------
    DataFrame indexed by query with ``term``, ``overlap``, ``pvalue`` and ``fdr`` of the set
    with the smallest p-value (ties: smallest FDR, then term name).
    """
    best = (
        table.sort_values(["pvalue", "fdr", "term"], kind="stable")
        .drop_duplicates("query")
        .set_index("query")[["term", "overlap", "pvalue", "fdr"]]
    )
    order = pd.unique(table["query"]) if queries is None else queries
    return best.reindex(pd.Index(order, name="query"))


def _membership(members: Sequence[Sequence[str]], bg: pd.Index) -> sp.csr_matrix:
    """Binary (len(members) x len(bg)) CSR matrix; genes outside ``bg`` are dropped."""
    lengths = np.fromiter((len(m) for m in members), dtype=np.int64, count=len(members))
    flat = [g for m in members for g in m]
    cols = bg.get_indexer(flat) if flat else np.empty(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(members)), lengths)
    keep = cols >= 0
    M = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.int32), (rows[keep], cols[keep])),
        shape=(len(members), len(bg)),
    )
    M.sum_duplicates()
    M.data[:] = 1
    return M


def _bh_grouped(pvalue: np.ndarray, group: np.ndarray, n_tests: int) -> np.ndarray:
    """Benjamini-Hochberg within each group, each a family of ``n_tests`` tests.

    Only the non-zero overlaps are given; the family's other tests (zero overlap) have p = 1,
    rank after all of them, and so enter only through the family size ``n_tests``.
    """
    if pvalue.size == 0:
        return pvalue.astype(float)
    order = np.lexsort((pvalue, group))
    p_sorted, g_sorted = pvalue[order], group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g_sorted)) + 1]
    rank = np.arange(p_sorted.size) - np.repeat(starts, np.diff(np.r_[starts, p_sorted.size])) + 1
    scaled = np.minimum(p_sorted * n_tests / rank, 1.0)
    # cumulative minimum from the largest p down, within each group
    reversed_min = pd.Series(scaled[::-1]).groupby(g_sorted[::-1], sort=False).cummin().to_numpy()
    out = np.empty_like(scaled)
    out[order] = reversed_min[::-1]
    return out


def hypergeom_sf(k: np.ndarray, N: int, K: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``P(X >= k)`` for ``X ~ Hypergeom(N, K, n)``, vectorised (= ``stats.hypergeom.sf(k-1, ...)``).

    ``scipy.stats.hypergeom.sf`` costs tens of microseconds per element when its parameters vary,
    too slow for millions of (feature, set) pairs. Here the probability mass at ``k`` comes from
    log-gamma functions and the tail is summed with the pmf ratio recursion, walking away from
    the mode so that terms shrink: upward from ``k`` when ``k`` is above the mode, otherwise
    ``1 - P(X <= k - 1)`` summed downward. Relative error is ~1e-10 or better.
    """
    k, K, n = np.broadcast_arrays(
        np.asarray(k, dtype=np.int64), np.asarray(K, dtype=np.int64), np.asarray(n, dtype=np.int64)
    )
    k, K, n = k.ravel(), K.ravel(), n.ravel()
    lo = np.maximum(0, n + K - N)
    hi = np.minimum(K, n)
    out = np.empty(k.shape, dtype=float)
    out[k <= lo] = 1.0
    out[k > hi] = 0.0
    inside = (k > lo) & (k <= hi)
    mode = ((n + 1) * (K + 1)) // (N + 2)
    up = np.flatnonzero(inside & (k > mode))
    down = np.flatnonzero(inside & (k <= mode))
    if up.size:
        out[up] = np.exp(_log_pmf(k[up], N, K[up], n[up])) * _tail_sum(
            k[up], N, K[up], n[up], hi[up], +1
        )
    if down.size:
        j = k[down] - 1
        lower = np.exp(_log_pmf(j, N, K[down], n[down])) * _tail_sum(
            j, N, K[down], n[down], lo[down], -1
        )
        out[down] = 1.0 - lower
    return np.clip(out, 0.0, 1.0)


def _log_choose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return -np.log1p(a) - special.betaln(a - b + 1, b + 1)


def _log_pmf(k: np.ndarray, N: int, K: np.ndarray, n: np.ndarray) -> np.ndarray:
    return _log_choose(K, k) + _log_choose(N - K, n - k) - _log_choose(np.full_like(n, N), n)


def _tail_sum(
    start: np.ndarray, N: int, K: np.ndarray, n: np.ndarray, stop: np.ndarray, step: int
) -> np.ndarray:
    """``sum_i pmf(i) / pmf(start)`` for ``i`` from ``start`` to ``stop`` by ``step``.

    Terms decrease monotonically in that direction (we walk away from the mode), so a pair
    stops once its term no longer changes its sum.
    """
    total = np.ones(start.shape, dtype=float)
    term = np.ones(start.shape, dtype=float)
    i = start.astype(float)
    Kf, nf, stopf = K.astype(float), n.astype(float), stop.astype(float)
    active = np.flatnonzero(i != stopf)
    while active.size:
        ia = i[active]
        Ka, na = Kf[active], nf[active]
        if step > 0:  # pmf(i+1)/pmf(i)
            ratio = (Ka - ia) * (na - ia) / ((ia + 1) * (N - Ka - na + ia + 1))
        else:  # pmf(i-1)/pmf(i)
            ratio = ia * (N - Ka - na + ia) / ((Ka - ia + 1) * (na - ia + 1))
        term[active] *= ratio
        total[active] += term[active]
        i[active] = ia + step
        done = (i[active] == stopf[active]) | (term[active] <= total[active] * 1e-17)
        active = active[~done]
    return total


# --- cross-checks through decoupler and gseapy -------------------------------------------------


def ora_decoupler(
    genes: Iterable[str],
    gene_sets: GeneSetsLike,
    *,
    background: Iterable[str],
    min_size: int = 1,
) -> pd.DataFrame:
    """The over-representation test of :func:`ora`, run through decoupler's ORA (``dc.mt.ora``).

    The query is one "sample": a 1 x background matrix with 1 on query genes and 0 elsewhere.
    decoupler 2.x ranks each sample's values (``rankdata(..., "ordinal")``, ascending) and keeps
    the features ranked above ``n_up``, so ``n_up = len(background) - len(query)`` keeps exactly
    the query; ``n_bg=None`` makes the background exactly these columns, and ``empty=False``
    keeps the all-zero columns. A check on decoupler's odds ratios confirms that it tested this
    table.

    decoupler's p-value is a **two-sided** Fisher exact test (``fisher_exact(...,
    alternative="two-sided")``): for an over-represented set (overlap above its expectation) it
    is never smaller than :func:`ora`'s one-sided p-value, and practically equal to it once the
    enrichment is clear; a depleted set can be significant here but never in :func:`ora`. ``dc.mt.ora`` itself returns BH-adjusted p-values only; the raw p-values come
    from the same decoupler function (``dc.mt.ora.func``) on the same inputs.

    Parameters
    ----------
    genes, gene_sets, background, min_size
        As in :func:`ora` (``min_size`` is decoupler's ``tmin``, applied after restricting sets
        to the background).

    Returns
    -------
    One row per tested set, sorted by p-value: ``term``, ``score`` (decoupler's log odds ratio),
    ``pvalue`` (two-sided), ``fdr`` (decoupler's BH over the same sets, float32 precision).
    """
    import decoupler as dc

    bg = _background(background)
    sets = _restricted_sets(gene_sets, bg, min_size)
    query = _query(genes, bg)
    if len(query) == len(bg):
        raise ValueError("the query is the whole background: nothing can be over-represented")
    features = bg.to_numpy(dtype=str)
    mat = np.isin(features, query).astype(float)[None, :]
    data = pd.DataFrame(mat, index=["query"], columns=features)
    net = pd.DataFrame(
        {
            "source": np.repeat(list(sets), [len(g) for g in sets.values()]),
            "target": [g for genes_ in sets.values() for g in genes_],
        }
    )
    n_up = len(bg) - len(query)
    score, padj = dc.mt.ora(
        data, net, tmin=max(min_size, 1), n_up=n_up, n_bg=None, empty=False, verbose=False
    )
    sources, cnct, starts, offsets = dc.pp.idxmat(features=features, net=net.copy())
    _, raw = dc.mt.ora.func(mat, cnct, starts, offsets, n_up=n_up, n_bg=None)
    raw = pd.Series(np.asarray(raw)[0], index=sources)

    table = pd.DataFrame(
        {
            "term": score.columns.astype(str),
            "score": score.iloc[0].to_numpy(dtype=float),
            "pvalue": raw.reindex(score.columns).to_numpy(dtype=float),
            "fdr": padj.iloc[0].to_numpy(dtype=float),
        }
    )
    # decoupler's score is log((a+.5)(d+.5)/((b+.5)(c+.5))) of the table it tested: if it does
    # not match ours, decoupler selected other genes than the query (its n_up meaning changed).
    in_query = set(query)
    size = np.array([len(sets[t]) for t in table["term"]])
    k = np.array([sum(g in in_query for g in sets[t]) for t in table["term"]])
    expected = np.log(_odds_ratio(k, size, len(query), len(bg)))
    if not np.allclose(table["score"].to_numpy(), expected, rtol=1e-6, atol=1e-8):
        raise RuntimeError(
            "decoupler's ORA did not test the query genes (its odds ratios differ from the "
            "query's contingency tables): the meaning of its n_up argument may have changed in "
            f"decoupler {getattr(dc, '__version__', '?')}"
        )
    return table.sort_values(["pvalue", "term"], kind="stable").reset_index(drop=True)


def enrich_gseapy(
    genes: Iterable[str],
    gene_sets: GeneSetsLike,
    *,
    background: Iterable[str],
    min_size: int = 1,
) -> pd.DataFrame:
    """The over-representation test of :func:`ora`, run through gseapy's offline ``enrich``.

    ``gseapy.enrich(gene_list, gene_sets=dict, background=list, outdir=None)`` restricts the
    query and every set to the background and computes ``hypergeom.sf(k - 1, N, K, n)``: the
    same p-values as :func:`ora`. Its FDR ("Adjusted P-value") differs: gseapy drops sets with
    no overlap before the BH correction, so its family is only the overlapping sets and its FDR
    is never larger than :func:`ora`'s. No network is used: gene sets are passed as a dict.

    Parameters
    ----------
    genes, gene_sets, background, min_size
        As in :func:`ora`; sets are restricted to the background and filtered by ``min_size``
        before they are given to gseapy.

    Returns
    -------
    One row per set overlapping the query, sorted by p-value: ``term``, ``overlap``, ``size``,
    ``pvalue``, ``fdr`` (gseapy's "Adjusted P-value"), ``odds_ratio``, ``genes``.
    """
    import gseapy

    bg = _background(background)
    sets = _restricted_sets(gene_sets, bg, min_size)
    query = _query(genes, bg)
    enr = gseapy.enrich(
        gene_list=query,
        gene_sets=sets,
        background=list(bg),
        outdir=None,
        no_plot=True,
        verbose=False,
    )
    close = getattr(enr, "close", None)
    if close is not None:  # gseapy attaches a logger handler per call
        close()
    columns = ("term", "overlap", "size", "pvalue", "fdr", "odds_ratio", "genes")
    res = enr.res2d
    if res is None or len(res) == 0:
        return _empty(columns)
    counts = res["Overlap"].str.split("/", expand=True).astype(int)
    table = pd.DataFrame(
        {
            "term": res["Term"].astype(str).to_numpy(),
            "overlap": counts[0].to_numpy(),
            "size": counts[1].to_numpy(),
            "pvalue": res["P-value"].to_numpy(dtype=float),
            "fdr": res["Adjusted P-value"].to_numpy(dtype=float),
            "odds_ratio": res["Odds Ratio"].to_numpy(dtype=float),
            "genes": res["Genes"].astype(str).to_numpy(),
        }
    )
    return table.sort_values(["pvalue", "term"], kind="stable").reset_index(drop=True)


# --- preranked GSEA --------------------------------------------------------------------------


def prerank(
    ranking: pd.Series,
    gene_sets: GeneSetsLike,
    *,
    permutations: int = 1000,
    seed: int = 0,
    min_size: int = 5,
    max_size: int = 500,
    threads: int = 1,
) -> pd.DataFrame:
    """Preranked GSEA of a gene ranking (:func:`gseapy.prerank`, gene-set permutations).

    Parameters
    ----------
    ranking
        Gene -> score (e.g. mean activation or attribution); higher is more associated. Missing
        scores are dropped; gene names must be unique after upper-casing.
    gene_sets
        ``{name: genes}``; gseapy keeps sets with ``min_size`` to ``max_size`` ranked genes.
    permutations
        Gene-set permutations for the null; the smallest nominal p-value is about
        ``1 / permutations``.
    seed
        Random seed (results are reproducible for a given seed and ``threads``).
    min_size, max_size
        Size limits, counted on the genes present in the ranking.
    threads
        gseapy worker threads.

    Returns
    -------
    One row per tested set, sorted by p-value then by ``|nes|``: ``term``, ``es``, ``nes``,
    ``pvalue`` (nominal), ``fdr`` (gseapy's FDR q-value), ``lead_genes`` (leading edge,
    ``;``-joined).
    """
    import gseapy

    if not isinstance(ranking, pd.Series):
        raise TypeError(
            f"ranking must be a pandas Series gene -> score, got {type(ranking).__name__}"
        )
    rnk = ranking.dropna().astype(float)
    rnk.index = pd.Index([str(g).strip().upper() for g in rnk.index])
    if rnk.index.has_duplicates:
        dups = rnk.index[rnk.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"ranking has duplicated genes (after upper-casing), e.g. {dups}")
    if not isinstance(gene_sets, Mapping):
        _restricted_sets(gene_sets, pd.Index([]), 1)  # raises the TypeError with its hint
    sets = {str(t): clean_genes(g) for t, g in gene_sets.items()}
    ranked = set(rnk.index)
    testable = {
        t: g for t, g in sets.items() if min_size <= sum(x in ranked for x in g) <= max_size
    }
    if not testable:
        raise ValueError(
            f"no gene set has between min_size={min_size} and max_size={max_size} genes in the "
            f"ranking of {len(rnk)} genes"
        )
    pre = gseapy.prerank(
        rnk=rnk.sort_values(ascending=False),
        gene_sets=testable,
        outdir=None,
        no_plot=True,
        permutation_num=permutations,
        seed=seed,
        min_size=min_size,
        max_size=max_size,
        threads=threads,
        verbose=False,
    )
    res = pre.res2d
    table = pd.DataFrame(
        {
            "term": res["Term"].astype(str).to_numpy(),
            "es": res["ES"].to_numpy(dtype=float),
            "nes": res["NES"].to_numpy(dtype=float),
            "pvalue": res["NOM p-val"].to_numpy(dtype=float),
            "fdr": res["FDR q-val"].to_numpy(dtype=float),
            "lead_genes": res["Lead_genes"].astype(str).to_numpy(),
        }
    )
    order = np.lexsort(
        (
            table["term"].to_numpy(dtype=str),
            -table["nes"].abs().to_numpy(),
            table["pvalue"].to_numpy(),
        )
    )
    return table.iloc[order].reset_index(drop=True)


# --- preranked GSEA of many rankings -----------------------------------------------------------

#: Bytes of working memory aimed at per chunk of queries (the null walks dominate).
_CHUNK_BYTES = 256 * 2**20
PRERANK_COLUMNS = ("query", "term", "size", "es", "nes", "pvalue", "fdr")


def prerank_many(
    scores: np.ndarray | sp.spmatrix | sp.sparray,
    genes: Sequence[str],
    gene_sets: GeneSetsLike,
    *,
    permutations: int = 1000,
    seed: int = 0,
    min_size: int = 5,
    max_size: int = 500,
    weight: float = 1.0,
    query_names: Sequence[object] | None = None,
    chunk_size: int | None = None,
    report: Literal["all", "best"] = "all",
    threads: int | None = None,
) -> pd.DataFrame:
    """Preranked GSEA of many gene rankings at once (gseapy's prerank statistics, vectorised).

    Each row of ``scores`` is one ranking of ``genes`` (e.g. a feature's mean activation per
    gene; higher is more associated). For every ranking and gene set, as in
    :func:`gseapy.prerank` (Subramanian et al. 2005):

    - genes are sorted by decreasing score and weighted ``|score| ** weight``; the running sum
      steps up by ``w / sum(w of the set's genes)`` on a set gene and down by ``1 / (N - k)``
      on any other gene (``N`` genes, ``k`` in the set); ``es`` is its largest deviation from
      zero (positive when the positive extreme is at least as large as the negative one);
    - the null comes from gene-set permutations (gseapy's default for prerank): ``k`` positions
      drawn at random from the ``N``; the ES of a set depends on its genes only through their
      positions, so every set of the same size shares one null, and the same random positions
      (the first ``k`` of ``permutations`` seeded random orders of the positions, nested
      across sizes like gseapy's shared gene permutations) serve every ranking. Results depend
      on ``seed`` and ``permutations`` only, not on ``chunk_size``;
    - ``nes = es / mean(null ES of the same sign)`` (``>= 0`` counts as positive);
    - ``pvalue`` is nominal: the fraction of same-sign null ES at least as extreme as ``es``
      (no pseudo-count, as in gseapy: it can be 0; its resolution is about
      ``1 / permutations``);
    - ``fdr`` is gseapy's FDR q-value (GSEA's NES-normalised null), per ranking over all its
      tested sets: for ``nes >= 0``, the fraction of normalised null NES (every set's null
      divided by its own same-sign mean, pooled over sets) that are ``>= nes`` among those
      ``>= 0``, divided by the same fraction among the observed NES, capped at 1; mirrored for
      negative NES. It is not made monotone (gseapy does not either).

    Ties and zeros. Tied scores form blocks and the running sum is read only at block ends, so
    results do not depend on the (arbitrary) order of tied genes; without ties this is exactly
    gseapy's ES. The typical sparse ranking, a feature that fired on few genes, has one large
    block of zeros at the bottom: its set genes add nothing to the positive side, and only the
    scored genes can make a set positively enriched. When all of a set's genes score 0 (its
    weights sum to 0, where gseapy would return NaN), the set's genes get equal weights: the
    set then sits at the bottom and its ES is ``<= 0``. An all-zero ranking gives ``es = 0``,
    ``nes = 0``, ``pvalue = 1`` and ``fdr = 1`` for every set. When no null ES has the sign of
    ``es``, ``nes`` is ``sign(es)`` (gseapy's fallback) and the p-value 1.

    Sparse rankings and ``weight``. With ``weight=1`` and most scores 0, the walk collects all
    of a set's weight within the few scored genes, so any set with one scored gene near the top
    reaches an ES close to 1: the ES then tells little more than how early the set's last scored
    gene comes, and even a set made of exactly the scored genes can stay above FDR 0.05.
    ``weight=0`` (every hit steps up by ``1 / k``: the ES becomes about the fraction of the set
    among the scored genes) keeps its power there.

    Nulls are shared across sets of one size and across rankings, so the p-values of different
    sets or rankings are not independent (neither are gseapy's, whose sets share permutations).
    Cost: about ``queries x permutations x (sum of the distinct set sizes)`` steps, in chunks
    of queries whose memory stays near 256 MiB; large libraries with hundreds of distinct sizes
    are correspondingly slower.

    Parameters
    ----------
    scores
        (queries x genes) matrix, dense or sparse (missing entries are 0), finite values.
    genes
        Column labels of ``scores``: gene symbols, unique after upper-casing.
    gene_sets
        ``{name: genes}``; each set is restricted to ``genes`` and tested when it keeps
        ``min_size`` to ``max_size`` genes (and fewer than all of them).
    permutations
        Random gene-set permutations of the null.
    seed
        Seed of the permutations.
    min_size, max_size
        Set sizes tested, counted among ``genes``.
    weight
        Exponent of the scores in the running sum (gseapy's ``weight``; 0: classic KS).
    query_names
        Labels of the rows of ``scores`` (default ``0..n-1``).
    chunk_size
        Rankings processed together (default: as many as fit in about 256 MiB).
    report
        ``"all"``: every (query, set) pair. ``"best"``: one row per query, its most enriched
        set with ``nes > 0`` (see :func:`best_prerank_terms`), computed chunk by chunk so the
        full table is never held.
    threads
        torch CPU threads for the computation, restored afterwards (default: torch's current
        setting). On a busy machine 1 thread can be much faster than several.

    Returns
    -------
    With ``report="all"``, a long table with one row per (query, tested set), sorted by query
    (input order), then p-value, then decreasing ``|nes|``, then set (input order): ``query``,
    ``term``, ``size`` (set genes among ``genes``), ``es``, ``nes``, ``pvalue``, ``fdr``. With
    ``report="best"``, :func:`best_prerank_terms` of that table.
    """
    import torch

    if report not in ("all", "best"):
        raise ValueError(f"report must be 'all' or 'best', got {report!r}")
    permutations = int(permutations)
    if permutations < 1:
        raise ValueError(f"permutations must be positive, got {permutations}")
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite non-negative number, got {weight}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be positive, got {threads}")
    labels = [str(g).strip().upper() for g in genes]
    bg = pd.Index(labels)
    if bg.empty:
        raise ValueError("genes is empty")
    if bg.has_duplicates:
        dups = bg[bg.duplicated()].unique()[:5].tolist()
        raise ValueError(f"genes has duplicated symbols (after upper-casing), e.g. {dups}")
    X = scores if sp.issparse(scores) else np.asarray(scores, dtype=float)
    if X.ndim != 2 or X.shape[1] != len(bg):
        raise ValueError(
            f"scores must be a (queries x genes) matrix with {len(bg)} columns, got shape {X.shape}"
        )
    X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else X
    values = X.data if sp.issparse(X) else X
    if not np.isfinite(values).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    n_queries, N = X.shape
    names = np.arange(n_queries) if query_names is None else np.asarray(query_names, dtype=object)
    if len(names) != n_queries:
        raise ValueError(f"{len(names)} query_names for {n_queries} queries")
    sets = _restricted_sets(gene_sets, bg, min_size)
    sets = {t: g for t, g in sets.items() if len(g) <= max_size and len(g) < N}
    if not sets:
        raise ValueError(
            f"no gene set has between min_size={min_size} and max_size={max_size} genes (and "
            f"fewer than all) among the {N} ranked genes"
        )
    terms = np.array(list(sets), dtype=object)
    size = np.array([len(g) for g in sets.values()], dtype=np.int64)
    members = [bg.get_indexer(g) for g in sets.values()]
    sizes = np.unique(size)
    groups = [np.flatnonzero(size == k) for k in sizes]  # set indices of each size
    members_by_size = [torch.from_numpy(np.stack([members[t] for t in g])) for g in groups]
    multiplicity = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    null_positions = _null_positions(N, sizes, permutations, seed)

    k_max = int(sizes.max())
    per_query = 8 * 8 * permutations * k_max + 8 * 8 * (N + len(sizes) * permutations)
    chunk = int(chunk_size) if chunk_size else max(1, min(n_queries, _CHUNK_BYTES // per_query))
    # rankings with similar numbers of non-zero scores together: the walks of a chunk are cut
    # after its longest non-zero part (see _walk_fast), whatever the chunking, same results
    if sp.issparse(X):
        nonzero = np.asarray((X != 0).sum(axis=1)).ravel()
    else:
        nonzero = np.count_nonzero(X, axis=1)
    by_nonzero = np.argsort(nonzero, kind="stable")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    tables = []
    try:
        for lo in range(0, n_queries, chunk):
            which = by_nonzero[lo : lo + chunk]
            rows = X[which]
            dense = rows.toarray() if sp.issparse(rows) else np.array(rows, dtype=np.float64)
            es, nes, pvalue, fdr = _prerank_chunk(
                torch.from_numpy(dense),
                members_by_size,
                groups,
                len(terms),
                null_positions,
                multiplicity,
                float(weight),
            )
            part = _prerank_table(names[which], terms, size, es, nes, pvalue, fdr)
            if report == "best":
                part = best_prerank_terms(part)
            tables.append(part.assign(_position=np.repeat(which, len(part) // len(which))))
    finally:
        torch.set_num_threads(previous)
    if not tables:
        table = _empty(PRERANK_COLUMNS)
        return best_prerank_terms(table) if report == "best" else table
    out = pd.concat(tables)
    out = out.iloc[np.argsort(out["_position"].to_numpy(), kind="stable")].drop(columns="_position")
    return out if report == "best" else out.reset_index(drop=True)


def best_prerank_terms(
    table: pd.DataFrame, queries: Sequence[object] | None = None, *, positive: bool = True
) -> pd.DataFrame:
    """The most significant set of each query in a :func:`prerank_many` table.

    Parameters
    ----------
    table
        Output of :func:`prerank_many` (``report="all"``).
    queries
        Index the result by these queries (those without any such set get NaN); default: the
        queries present in ``table``, in its order.
    positive
        Only positively enriched sets (``nes > 0``: the ranking's top genes are in the set),
        the ones that say what a feature responds to; ``False``: either direction.

    Returns
    -------
    DataFrame indexed by query with ``term``, ``size``, ``es``, ``nes``, ``pvalue`` and ``fdr``
    of the set with the largest ``|nes|`` (ties: smaller p-value, then smaller FDR, then term
    name). The NES orders the sets (gseapy's FDR q-value is not monotone in it, so the smallest
    q can belong to a set with a lower NES); the best set's own ``fdr`` is reported.
    """
    cols = ["term", "size", "es", "nes", "pvalue", "fdr"]
    kept = table[table["nes"] > 0] if positive else table
    best = (
        kept.assign(_abs=-kept["nes"].abs())
        .sort_values(["_abs", "pvalue", "fdr", "term"], kind="stable")
        .drop_duplicates("query")
        .set_index("query")[cols]
    )
    order = pd.unique(table["query"]) if queries is None else queries
    return best.reindex(pd.Index(order, name="query"))


def _prerank_table(names, terms, size, es, nes, pvalue, fdr) -> pd.DataFrame:
    B, T = es.shape
    q = np.repeat(np.arange(B), T)
    t = np.tile(np.arange(T), B)
    es, nes, pvalue, fdr = (a.reshape(-1) for a in (es, nes, pvalue, fdr))
    order = np.lexsort((t, -np.abs(nes), pvalue, q))
    q, t = q[order], t[order]
    return pd.DataFrame(
        {
            "query": names[q],
            "term": terms[t],
            "size": size[t],
            "es": es[order],
            "nes": nes[order],
            "pvalue": pvalue[order],
            "fdr": fdr[order],
        }
    )


def _null_positions(N: int, sizes: np.ndarray, permutations: int, seed: int) -> list:
    """For each size ``k``: (permutations x k) random positions in ``0..N-1``, sorted per row.

    Row ``i`` holds the first ``k`` entries of the ``i``-th seeded random order of the
    positions, so the draws are nested across sizes and do not depend on the queries.
    """
    import torch

    rng = np.random.default_rng(seed)
    k_max = int(sizes.max())
    prefix = np.empty((permutations, k_max), dtype=np.int64)
    step = max(1, 2**22 // N)
    for lo in range(0, permutations, step):
        keys = rng.random((min(step, permutations - lo), N))
        if k_max < N:
            part = np.argpartition(keys, k_max - 1, axis=1)[:, :k_max]
            order = np.argsort(np.take_along_axis(keys, part, axis=1), axis=1)
            prefix[lo : lo + len(keys)] = np.take_along_axis(part, order, axis=1)
        else:
            prefix[lo : lo + len(keys)] = np.argsort(keys, axis=1)
    return [torch.from_numpy(np.sort(prefix[:, :k], axis=1)) for k in sizes]


def _prerank_chunk(X, members_by_size, groups, n_sets, null_positions, multiplicity, weight):
    """ES, NES, nominal p and FDR q (each queries x sets, numpy) of one chunk of rankings."""
    import torch

    B, N = X.shape
    order = torch.argsort(-X, dim=1, stable=True)
    v = torch.gather(X, 1, order)  # sorted scores, decreasing
    w = v.abs() ** weight
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N).expand(B, N).contiguous())
    # tie blocks in the sorted order: first and last position of each position's block
    idx = torch.arange(N).expand(B, N)
    new = torch.ones(B, N, dtype=torch.bool)
    new[:, 1:] = v[:, 1:] != v[:, :-1]
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=1).values
    last = torch.ones(B, N, dtype=torch.bool)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, idx, torch.full_like(idx, N)).flip(1).cummin(dim=1).values.flip(1)
    # Rankings without ties among non-zero scores take the fast walk (zero-weight hits cannot
    # change the ES there); the others, and every ranking when weight == 0, the block walk.
    tied = ((~new[:, 1:]) & (v[:, 1:] != 0)).any(dim=1)
    if weight == 0:
        tied[:] = True
    fast = torch.nonzero(~tied).flatten()
    slow = torch.nonzero(tied).flatten()
    zero_start = (v > 0).sum(1)  # the block of zeros, if any: [zero_start, zero_end]
    zero_end = (v >= 0).sum(1) - 1
    cut = torch.where(v[:, -1] == 0, zero_start, N)  # trailing zeros start here (else N)
    walk_fast = (w[fast], cut[fast], zero_start[fast], zero_end[fast])
    walk_slow = (w[slow], start[slow], end[slow])

    def enrichment(pos):  # (B, R, k) per ranking, or (R, k) shared by all
        out = torch.empty((B, pos.shape[-2]), dtype=torch.float64)
        if fast.numel():
            p = pos if pos.dim() == 2 else pos[fast]
            out[fast] = _walk_fast(*walk_fast, p, N)
        if slow.numel():
            p = pos.expand(len(slow), *pos.shape) if pos.dim() == 2 else pos[slow]
            out[slow] = _walk(*walk_slow, p, N)
        return out

    es = torch.empty(B, n_sets, dtype=torch.float64)
    nes = torch.empty_like(es)
    pvalue = torch.empty_like(es)
    pooled, pooled_weight = [], []
    for g, (members, nulls) in enumerate(zip(members_by_size, null_positions, strict=True)):
        T_g, k = members.shape
        pos = rank[:, members.reshape(-1)].reshape(B, T_g, k).sort(dim=-1).values
        es_obs = enrichment(pos)  # (B, T_g)
        null = enrichment(nulls)  # (B, P)
        P = null.shape[1]
        nonneg = null >= 0
        n_pos = nonneg.sum(1, keepdim=True).to(torch.float64)
        n_neg = P - n_pos
        pos_mean = torch.where(nonneg, null, 0).sum(1, keepdim=True) / n_pos.clamp(min=1)
        neg_mean = -torch.where(nonneg, 0, null).sum(1, keepdim=True) / n_neg.clamp(min=1)
        # NES: ES over the same-sign null mean; sign(ES) without a usable mean (gseapy)
        pos_ok, neg_ok = (n_pos > 0) & (pos_mean > 0), (n_neg > 0) & (neg_mean > 0)
        nes_g = torch.where(
            es_obs >= 0,
            torch.where(pos_ok, es_obs / pos_mean.clamp(min=1e-300), torch.sign(es_obs)),
            torch.where(neg_ok, es_obs / neg_mean.clamp(min=1e-300), torch.sign(es_obs)),
        )
        # nominal p from the same-sign null
        if T_g <= 32:
            below = (null.unsqueeze(1) < es_obs.unsqueeze(2)).sum(-1).to(torch.float64)
            at_most = (null.unsqueeze(1) <= es_obs.unsqueeze(2)).sum(-1).to(torch.float64)
        else:
            sorted_null = null.sort(dim=1).values
            below = torch.searchsorted(sorted_null, es_obs, right=False).to(torch.float64)
            at_most = torch.searchsorted(sorted_null, es_obs, right=True).to(torch.float64)
        p_pos = torch.where(n_pos > 0, (P - below) / n_pos.clamp(min=1), 1.0)
        p_neg = torch.where(n_neg > 0, at_most / n_neg.clamp(min=1), 1.0)
        p_g = torch.where(es_obs >= 0, p_pos, p_neg)
        cols = torch.from_numpy(groups[g])
        es[:, cols], nes[:, cols], pvalue[:, cols] = es_obs, nes_g, p_g.clamp(max=1.0)
        # the null normalised by its own same-sign means, for the FDR
        pooled.append(
            torch.where(
                nonneg,
                null / torch.where(pos_ok, pos_mean, 1.0),
                null / torch.where(neg_ok, neg_mean, 1.0),
            )
        )
        pooled_weight.append(multiplicity[g].expand(P))
    fdr = _fdr_q(nes, torch.cat(pooled, dim=1), torch.cat(pooled_weight))
    return es.numpy(), nes.numpy(), pvalue.numpy(), fdr.numpy()


def _walk_fast(w, cut, zero_start, zero_end, pos, N: int):
    """:func:`_walk` for rankings whose only tied scores are zeros, and ``weight > 0``.

    Then the order inside the block of zeros cannot change the ES: its genes add nothing to the
    running sum, which only falls through it towards 0, so its hits are neither the highest
    point nor below the lowest one, and gseapy's walk over the hits in sorted order gives the
    block-read ES. Hits from ``cut`` on (the trailing zeros) can therefore be left out: the hit
    dimension is cut to the most hits any ranking has before its ``cut``. ``pos`` is (B, R, k),
    or (R, k) shared by all rankings. When no hit has weight (all among the zeros), they get
    equal weights and the ES is read at the ends of the zero block.
    """
    import torch

    k = pos.shape[-1]
    miss = 1.0 / (N - k)
    if pos.dim() == 2:  # shared: the count before the largest cut bounds every ranking's
        kept = int(torch.searchsorted(pos, cut.max().expand(len(pos), 1).contiguous()).max())
    else:
        bound = cut.view(-1, 1, 1).expand(*pos.shape[:2], 1).contiguous()
        kept = int(torch.searchsorted(pos, bound).max())
    if kept:
        p = pos[..., :kept]
        flat = p.reshape(1, -1).expand(len(w), -1) if p.dim() == 2 else p.reshape(len(w), -1)
        wh = torch.gather(w, 1, flat).view(len(w), *p.shape[-2:])
        cw = wh.cumsum(-1)
        total = cw[..., -1:]
        norm = torch.where(total > 0, total, 1.0)
        drop = (p - torch.arange(kept)) * miss  # misses before each hit
        hi = (cw / norm - drop).amax(-1)
        lo = ((cw - wh) / norm - drop).amin(-1)
        es = torch.where(hi >= -lo, hi, lo)
        total = total[..., 0]
    else:
        shape = (len(w), pos.shape[-2])
        es, total = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    # all hits among the zeros (no weight): equal weights, read at the zero block's ends
    hi0 = (1.0 - (zero_end + 1 - k) * miss).to(torch.float64).unsqueeze(1)
    lo0 = (-zero_start * miss).to(torch.float64).unsqueeze(1)
    es0 = torch.where(hi0 >= -lo0, hi0, lo0)
    return torch.where(total > 0, es, es0)


def _walk(w, start, end, pos, N: int):
    """Enrichment score of hit positions ``pos`` (..., k; sorted) in each ranking of a chunk.

    ``w`` (B x N) are the weights in sorted order, ``start``/``end`` the first/last position
    of each position's tie block; ``pos`` has the chunk's B rankings as its first dimension.
    The running sum is read at the end of each block holding a hit (the maxima) and just
    before each such block (the minima).
    """
    import torch

    B = w.shape[0]
    shape = pos.shape
    k = shape[-1]
    flat = pos.reshape(B, -1)
    wh = torch.gather(w, 1, flat).reshape(shape)
    s = torch.gather(start, 1, flat).reshape(shape)
    e = torch.gather(end, 1, flat).reshape(shape)
    total = wh.sum(-1, keepdim=True)
    wh = torch.where(total > 0, wh, 1.0)  # all weights zero: equal weights
    cw = torch.nn.functional.pad(wh.cumsum(-1), (1, 0))
    cw = cw / cw[..., -1:]
    i = torch.arange(k).expand(shape)
    first = torch.ones(shape, dtype=torch.bool)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    lastb = torch.ones(shape, dtype=torch.bool)
    lastb[..., :-1] = first[..., 1:]
    before = torch.where(first, i, torch.zeros_like(i)).cummax(dim=-1).values  # hits before block
    upto = torch.where(lastb, i + 1, torch.full_like(i, k)).flip(-1).cummin(dim=-1).values.flip(-1)
    miss = 1.0 / (N - k)
    top = torch.gather(cw, -1, upto) - (e + 1 - upto) * miss
    bottom = torch.gather(cw, -1, before) - (s - before) * miss
    hi = top.max(dim=-1).values
    lo = bottom.min(dim=-1).values
    return torch.where(hi >= -lo, hi, lo)


def _fdr_q(nes, pooled, pooled_weight):
    """gseapy's FDR q-value of every set of each ranking (rows), from the pooled normalised null."""
    import torch

    B, T = nes.shape
    null, idx = pooled.sort(dim=1)
    cw = torch.nn.functional.pad(pooled_weight[idx].cumsum(1), (1, 0))  # weight of the first i
    total = cw[:, -1:]

    def weight_below(x, right):  # weighted count of null < x (or <= x with right)
        return torch.gather(cw, 1, torch.searchsorted(null, x, right=right))

    zero = torch.zeros(B, 1, dtype=nes.dtype)
    null_neg = weight_below(zero, False)  # null < 0
    null_pos = total - null_neg
    obs = nes.sort(dim=1).values
    obs_neg = torch.searchsorted(obs, zero, right=False).to(nes.dtype)
    obs_pos = T - obs_neg
    obs_below = torch.searchsorted(obs, nes, right=False).to(nes.dtype)
    obs_at_most = torch.searchsorted(obs, nes, right=True).to(nes.dtype)
    up = nes >= 0
    phi_null = torch.where(
        up,
        (total - weight_below(nes, False)) / null_pos.clamp(min=1e-300),
        weight_below(nes, True) / null_neg.clamp(min=1e-300),
    )
    phi_null = torch.where(torch.where(up, null_pos, null_neg) > 0, phi_null, 0.0)
    phi_obs = torch.where(
        up,
        (T - obs_below) / obs_pos.clamp(min=1),
        obs_at_most / obs_neg.clamp(min=1),
    )
    return (phi_null / phi_obs).clamp(max=1.0)
