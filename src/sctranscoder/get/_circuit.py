"""A traced circuit as a networkx graph."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._records import circuit_record

if TYPE_CHECKING:
    import networkx as nx
    from anndata import AnnData


def _python(value):
    """Numpy scalars as Python ones, so graph attributes serialise (GraphML, JSON) cleanly."""
    return value.item() if isinstance(value, np.generic) else value


def circuit(adata: AnnData, circuit: str) -> nx.DiGraph:
    """A traced circuit as a :class:`networkx.DiGraph`, for graph analysis.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.trace_circuit`.
    circuit
        The circuit's key in ``adata.uns`` (``"circuit_<cell>"`` by default; the cell name alone
        also works).

    Returns
    -------
    A directed graph with one node per row of the circuit's node table (id such as ``"emb@12"``,
    ``"err L1@12"``, ``"L2F17@12"`` or ``"target"``), carrying every column as an attribute
    (``type``, ``layer``, ``position``, ``feature``, ``token``, ``gene``, ``activation``,
    ``influence``, ``value``, ``input_sum``, ``bias``), and one edge per kept edge, from source to
    target, with its direct effect as ``weight``. ``graph.graph`` holds ``key``, ``params`` and
    ``scores``.
    """
    import networkx as nx

    name, rec = circuit_record(adata, circuit)
    nodes, edges = rec["nodes"], rec["edges"]
    g = nx.DiGraph(key=name, params=dict(rec.get("params", {})), scores=dict(rec.get("scores", {})))
    for node, attrs in zip(nodes.index, nodes.to_dict("records"), strict=True):
        g.add_node(str(node), **{k: _python(v) for k, v in attrs.items()})
    unknown = sorted(set(edges["source"]).union(edges["target"]) - set(g.nodes))
    if unknown:
        raise ValueError(
            f"Circuit {name!r} has edges to nodes missing from its node table: {unknown[:5]}."
        )
    g.add_weighted_edges_from(
        zip(
            edges["source"].astype(str),
            edges["target"].astype(str),
            edges["weight"].astype(float),
            strict=True,
        )
    )
    return g
