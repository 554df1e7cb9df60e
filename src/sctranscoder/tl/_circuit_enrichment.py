"""Which gene sets a circuit's genes are enriched in (over-representation, BH FDR)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg

from .._constants import Key
from .._genesets import MARKERS_PREFIX, gene_sets_in_background, source_name
from .._ora import ora
from .._records import check_key, circuit_record, sentences
from .._validate import (
    check_bool,
    check_copy_backed,
    check_in_memory,
    check_positive_int,
    check_set_sizes,
)

if TYPE_CHECKING:
    from anndata import AnnData


def circuit_genes(rec: dict, n_top: int) -> list[str]:
    """The circuit's top genes: positive influence on the target, most influential first."""
    genes = pd.DataFrame(rec["genes"])
    genes = genes[genes["influence"] > 0].sort_values("influence", ascending=False)
    return [str(g) for g in genes.index[:n_top]]


def circuit_enrichment(
    adata: AnnData,
    *,
    circuit: str,
    gene_sets,
    n_top: int = 25,
    min_size: int = 5,
    max_size: int = 500,
    allow_network: bool = False,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Test a circuit's top genes against gene sets (over-representation, BH FDR).

    The query is the circuit's ``n_top`` genes by influence; the background is every gene that
    occurs in a cell sentence of ``adata`` (the genes the model could have seen). The test is a
    one-sided hypergeometric test with BH over every tested set
    (:func:`~sctranscoder._ora.ora`); the tests check it against gseapy's ``enrich`` and
    decoupler's ORA.

    Parameters
    ----------
    adata
        Annotated data with a traced circuit.
    circuit
        The circuit's key in ``adata.uns`` (or its cell's name).
    gene_sets
        A dict, a GMT path, a decoupler net, ``"markers:<obs column>"`` (top markers per group,
        from this data; not from a backed ``adata``) or a named library (offline from a cache
        or ``pyenrichr``; online only with ``allow_network=True``).
    n_top
        Size of the query.
    min_size, max_size
        Gene set sizes kept (within the background; integers, ``1 <= min_size <=
        max_size``).
    allow_network
        Allow downloading a named library.
    key_added
        ``adata.uns`` key of the result (default: the circuit's key followed by
        ``"_enrichment"``, e.g. ``"circuit_<cell>_enrichment"``).
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``adata.uns[key_added]``, a dict:

    ``table`` : :class:`pandas.DataFrame`
        One row per tested set, by p-value: ``term``, ``size`` (genes in the background),
        ``overlap``, ``pvalue``, ``fdr``, ``odds_ratio``, ``genes`` (the overlap, ``;``-joined).
    ``params`` : dict
        ``circuit``, ``gene_sets`` (name or path, or the type of object given), ``query`` (the
        genes tested), ``n_background``, ``n_sets``, ``min_size``, ``max_size``.
    """
    name, rec = circuit_record(adata, circuit)
    check_positive_int(n_top, "n_top")
    min_size, max_size = check_set_sizes(min_size, max_size)
    allow_network = check_bool(allow_network, "allow_network")
    copy = check_bool(copy, "copy")
    if isinstance(gene_sets, str) and gene_sets.startswith(MARKERS_PREFIX):
        check_in_memory(
            adata, f"gene_sets={gene_sets!r}", otherwise="pass gene sets as a dict or a GMT path"
        )
    check_copy_backed(adata, copy)
    record_key = check_key(
        key_added if key_added is not None else Key.circuit_enrichment(name),
        adata=adata,
        kind="circuit enrichment",
    )
    result = enrich_circuit(
        adata,
        name,
        rec,
        gene_sets,
        n_top=n_top,
        min_size=min_size,
        max_size=max_size,
        allow_network=allow_network,
    )
    if copy:
        adata = adata.copy()
    adata.uns[record_key] = result
    best = result["table"].iloc[0]
    logg.info(
        f"circuit {name}: best term {best['term']} (overlap {int(best['overlap'])}, "
        f"FDR {best['fdr']:.2g}) among {result['params']['n_sets']} sets",
        deep=f"added\n    {record_key!r}, enrichment of the circuit's genes (adata.uns)",
    )
    return adata if copy else None


def enrich_circuit(
    adata: AnnData,
    name: str,
    rec: dict,
    gene_sets,
    *,
    n_top: int,
    min_size: int = 5,
    max_size: int = 500,
    allow_network: bool = False,
) -> dict:
    """The enrichment record of circuit ``rec`` (named ``name``; written or not yet)."""
    background = circuit_background(adata, rec)
    sets = gene_sets_in_background(
        gene_sets,
        background,
        adata=adata,
        min_size=min_size,
        max_size=max_size,
        allow_network=allow_network,
    )
    result = enrichment(rec, sets, background, n_top=n_top, source=source_name(gene_sets))
    result["params"].update(circuit=name, min_size=int(min_size), max_size=int(max_size))
    return result


def circuit_background(adata: AnnData, rec: dict) -> list[str]:
    """Every gene of the sentences the circuit's transcoders read: what the model could see."""
    sentence_key = str(rec["params"].get("sentence_key", Key.sentence))
    return sorted({g for s in sentences(adata, sentence_key) for g in s})


def enrichment(
    rec: dict, sets: dict[str, list[str]], background: list[str], *, n_top: int, source: str
) -> dict:
    """``{"table", "params"}`` of the circuit's top ``n_top`` genes against ``sets``."""
    query = circuit_genes(rec, n_top)
    if not query:
        raise ValueError("The circuit has no gene with positive influence to test.")
    table = ora(query, sets, background=background, min_overlap=0)
    return {
        "table": table,
        "params": {
            "gene_sets": source,
            "query": np.asarray(query, dtype=str),
            "n_background": len(background),
            "n_sets": len(sets),
        },
    }
