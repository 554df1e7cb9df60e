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

Symbols are compared upper-cased, like the sets from :func:`~sctranscoder._genesets.gene_sets`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special, stats

from ._genesets import clean_genes

__all__ = ["best_terms", "enrich_gseapy", "ora", "ora_decoupler", "ora_many", "prerank"]

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
