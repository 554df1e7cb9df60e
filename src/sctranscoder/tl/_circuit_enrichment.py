from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from .._enrichment import enrich_gseapy, ora, ora_decoupler
from .._genesets import gene_sets_in_background
from .._store import circuit_record, gene_lists

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


def circuit_genes(record: dict, n_top: int) -> list[str]:
    """The circuit's top genes: positive influence on the target, most influential first."""
    genes = pd.DataFrame(record["genes"])
    genes = genes[genes["influence"] > 0].sort_values("influence", ascending=False)
    return [str(g) for g in genes.index[:n_top]]


def circuit_enrichment(
    adata: AnnData,
    key: str,
    gene_sets,
    *,
    n_top_genes: int = 25,
    min_size: int = 5,
    max_size: int = 500,
    allow_network: bool = False,
    circuits_key: str = Key.circuits,
    _source: str | None = None,
) -> None:
    """Test a circuit's top genes against gene sets (over-representation, BH FDR).

    The query is the circuit's ``n_top_genes`` genes by influence; the background is every gene
    that occurs in a cell sentence of ``adata`` (the genes the model could have seen). Three
    implementations run on the same table: a one-sided hypergeometric test (``pvalue``/``fdr``,
    BH over every tested set), gseapy's offline ``enrich`` (same p-values; ``gseapy_fdr``, BH over
    sets that overlap the query) and decoupler's ORA (``decoupler_pvalue``/``decoupler_fdr``, a
    two-sided Fisher test).

    Parameters
    ----------
    adata
        Annotated data with a traced circuit.
    key
        The circuit's key in ``adata.uns[circuits_key]``.
    gene_sets
        A dict, a GMT path, a decoupler net, ``"markers:<obs column>"`` (top markers per group,
        from this data) or a named library (offline from a cache or ``pyenrichr``; online only
        with ``allow_network=True``).
    n_top_genes
        Size of the query.
    min_size, max_size
        Gene set sizes kept (within the background).
    allow_network
        Allow downloading a named library.
    circuits_key
        ``adata.uns`` key holding circuits.

    Returns
    -------
    ``None``. Sets ``adata.uns[circuits_key][key]["enrichment"]``, a :class:`pandas.DataFrame`
    with ``term``, ``size``, ``overlap``, ``genes``, ``pvalue``, ``fdr``, ``odds_ratio``,
    ``gseapy_fdr``, ``decoupler_pvalue``, ``decoupler_fdr``, sorted by ``pvalue``; and
    ``["enrichment_params"]``.
    """
    record = circuit_record(adata, key, circuits_key)
    query = circuit_genes(record, n_top_genes)
    if not query:
        raise ValueError(f"Circuit {key!r} has no gene with positive influence to test.")
    sentence_key = str(record["params"].get("sentence_key", Key.sentence))
    background = sorted({g for s in gene_lists(adata, sentence_key) for g in s})
    sets = gene_sets_in_background(
        gene_sets,
        background,
        adata=adata,
        min_size=min_size,
        max_size=max_size,
        allow_network=allow_network,
    )
    table = ora(query, sets, background=background, min_overlap=0)
    table = table.set_index("term")
    gp = enrich_gseapy(query, sets, background=background).set_index("term")
    dc_ = ora_decoupler(query, sets, background=background).set_index("term")
    table["gseapy_fdr"] = gp["fdr"].reindex(table.index).astype(float)
    table["decoupler_pvalue"] = dc_["pvalue"].reindex(table.index).astype(float)
    table["decoupler_fdr"] = dc_["fdr"].reindex(table.index).astype(float)
    table = table.reset_index().sort_values("pvalue", kind="stable").reset_index(drop=True)
    record["enrichment"] = table
    record["enrichment_params"] = {
        "gene_sets": _source
        or (gene_sets if isinstance(gene_sets, str) else type(gene_sets).__name__),
        "query": np.asarray(query, dtype=object).astype(str),
        "n_background": len(background),
        "n_sets": len(sets),
        "min_size": int(min_size),
        "max_size": int(max_size),
    }
    best = table.iloc[0]
    logger.info(
        "circuit %s: best term %s (overlap %d, FDR %.2g) among %d sets\n"
        "    added 'enrichment' (adata.uns[%r][%r])",
        key,
        best["term"],
        int(best["overlap"]),
        best["fdr"],
        len(sets),
        circuits_key,
        key,
    )
