"""The ORA of sctranscoder._ora asked through decoupler and gseapy (offline), for the tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sctranscoder._genesets import GeneSetsLike, background_index, restrict_sets
from sctranscoder._ora import _odds_ratio, _query

if TYPE_CHECKING:
    from collections.abc import Iterable

COLUMNS_GSEAPY = ("term", "overlap", "size", "pvalue", "fdr", "odds_ratio", "genes")


def ora_decoupler(
    genes: Iterable[str],
    gene_sets: GeneSetsLike,
    *,
    background: Iterable[str],
    min_size: int = 1,
) -> pd.DataFrame:
    """:func:`~sctranscoder._ora.ora`'s table through decoupler's ORA (``dc.mt.ora``).

    The query is one sample over the background (1 on query genes); ``n_up`` keeps exactly the
    query. decoupler's p-value is a two-sided Fisher test, and ``dc.mt.ora`` returns only BH
    adjusted values, so the raw ones come from ``dc.mt.ora.func`` on the same inputs.

    Returns one row per tested set, sorted by p-value: ``term``, ``score`` (log odds ratio),
    ``pvalue`` (two-sided), ``fdr`` (decoupler's BH, float32 precision).
    """
    import decoupler as dc

    bg = background_index(background)
    sets = restrict_sets(gene_sets, bg, min_size)
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
    # decoupler's score is the log odds ratio of the table it tested: if it differs from the
    # query's, decoupler selected other genes than the query (the meaning of n_up changed).
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
    """:func:`~sctranscoder._ora.ora`'s test through gseapy's offline ``enrich`` (no network).

    Same p-values; gseapy's BH family is only the sets that overlap the query.

    Returns one row per set overlapping the query, sorted by p-value: ``term``, ``overlap``,
    ``size``, ``pvalue``, ``fdr`` (gseapy's "Adjusted P-value"), ``odds_ratio``, ``genes``.
    """
    import gseapy

    bg = background_index(background)
    sets = restrict_sets(gene_sets, bg, min_size)
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
    res = enr.res2d
    if res is None or len(res) == 0:
        return pd.DataFrame(
            {
                c: pd.Series(dtype=object if c in ("term", "genes") else float)
                for c in COLUMNS_GSEAPY
            }
        )
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


def forbid_network(monkeypatch) -> None:
    """Make any attempt to open a connection fail at once (instead of hanging) in this test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
