"""A pruned attribution graph as tables: nodes, edges and the prompt's genes. numpy/pandas only.

Node ids read ``"emb@<pos>"`` (token embedding), ``"err L<l>@<pos>"`` (error term of layer l),
``"L<l>F<j>@<pos>"`` (feature j of layer l at a position) and ``"target"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import NodeType, feature_name

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .attribution import Graph, Pruned


def node_names(graph: Graph) -> np.ndarray:
    """The id of every node of ``graph`` (see the module docstring)."""
    names = np.empty(graph.n_nodes, dtype=object)
    for n in range(graph.n_nodes):
        kind, layer, p = (
            NodeType(int(graph.node_type[n])),
            int(graph.layer[n]),
            int(graph.position[n]),
        )
        if kind is NodeType.TARGET:
            names[n] = "target"
        elif kind is NodeType.EMBEDDING:
            names[n] = f"emb@{p}"
        elif kind is NodeType.ERROR:
            names[n] = f"err L{layer}@{p}"
        else:
            names[n] = f"{feature_name(layer, int(graph.feature[n]))}@{p}"
    return names


def circuit_tables(
    graph: Graph,
    pruned: Pruned,
    tokens: Sequence[str],
    genes: Sequence[str],
    gene_index: np.ndarray,
    names: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(nodes, edges, genes)`` tables of a pruned graph.

    ``tokens``: the decoded token at each position; ``genes``: the prompt's gene list;
    ``gene_index``: per position, the gene's index in ``genes`` (-1 for prompt text).
    ``names``: the node ids, when already made (:func:`node_names`).
    """
    names = node_names(graph) if names is None else names
    kept = pruned.nodes
    gene_of = np.array([genes[g] if g >= 0 else "" for g in gene_index], dtype=object)
    pos = graph.position[kept]
    nodes = pd.DataFrame(
        {
            "type": [NodeType(int(t)).label for t in graph.node_type[kept]],
            "layer": graph.layer[kept].astype(np.int64),
            "position": pos.astype(np.int64),
            "feature": graph.feature[kept].astype(np.int64),
            "token": [tokens[p] for p in pos],
            "gene": gene_of[pos].astype(str),
            "activation": graph.activation[kept].astype(np.float64),
            "influence": pruned.influence[kept],
            "value": [graph.value.get(int(k), np.nan) for k in kept],
            "input_sum": [
                float(graph.rows[int(k)].astype(np.float64).sum())
                if int(k) in graph.rows
                else np.nan
                for k in kept
            ],
            "bias": [graph.bias.get(int(k), np.nan) for k in kept],
        },
        index=[names[k] for k in kept],
    )
    edges = pd.DataFrame(
        {
            "source": [names[s] for s in pruned.edges[:, 0]],
            "target": [names[t] for t in pruned.edges[:, 1]],
            "weight": pruned.weights.astype(np.float64),
        }
    )
    return nodes, edges, gene_table(graph, pruned, gene_index, list(genes))


def gene_table(
    graph: Graph, pruned: Pruned, gene_index: np.ndarray, genes: list[str]
) -> pd.DataFrame:
    """Per gene: influence of its embedding and explored feature nodes, and kept features."""
    inf = pruned.influence
    g_of_node = gene_index[graph.position]
    on_gene = g_of_node >= 0
    explored = np.zeros(graph.n_nodes, dtype=bool)
    explored[list(graph.rows)] = True
    kept = np.zeros(graph.n_nodes, dtype=bool)
    kept[pruned.nodes] = True
    is_emb = on_gene & (graph.node_type == NodeType.EMBEDDING)
    is_feat = on_gene & (graph.node_type == NodeType.FEATURE) & explored
    emb = np.zeros(len(genes))
    feat = np.zeros(len(genes))
    n_kept = np.zeros(len(genes), dtype=np.int64)
    np.add.at(emb, g_of_node[is_emb], inf[is_emb])
    np.add.at(feat, g_of_node[is_feat], inf[is_feat])
    np.add.at(n_kept, g_of_node[is_feat & kept], 1)
    df = pd.DataFrame(
        {
            "influence": emb + feat,
            "embedding_influence": emb,
            "feature_influence": feat,
            "n_features": n_kept,
            "rank": np.arange(len(genes)),
        },
        index=pd.Index(genes, name=None),
    )
    return df.sort_values("influence", ascending=False)


def head_table(
    node: str,
    parts: Iterable[tuple[np.ndarray, np.ndarray]],
    names: np.ndarray,
    source_genes: np.ndarray,
) -> pd.DataFrame:
    """Per attention head, how much of ``node``'s incoming edges flows through it.

    ``parts``: chunks of ``(heads, rows)``, ``heads`` ``(n, 2)`` (layer, head) and ``rows``
    ``(n, n_nodes)``, the direct part (``(-1, -1)``: paths without attention) first, as yielded
    by :meth:`~sctranscoder.core.attribution.Attributor.iter_head_rows`. ``names`` and
    ``source_genes``: per graph node, its id and its gene (``""`` for none).
    """
    columns: dict[str, list] = {k: [] for k in ("layer", "head", "sum", "abs", "top", "top_w")}
    for heads, rows in parts:
        rows = rows.astype(np.float64)
        absolute = np.abs(rows)
        top = absolute.argmax(1)
        columns["layer"].append(heads[:, 0])
        columns["head"].append(heads[:, 1])
        columns["sum"].append(rows.sum(1))
        columns["abs"].append(absolute.sum(1))
        columns["top"].append(np.where(absolute.max(1) > 0, top, -1))
        columns["top_w"].append(rows[np.arange(len(rows)), top])
    c = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in columns.items()}
    total_abs = c["abs"].sum()
    has = c["top"] >= 0
    return pd.DataFrame(
        {
            "node": np.full(c["sum"].size, node, dtype=object),
            "layer": c["layer"].astype(np.int64),
            "head": c["head"].astype(np.int64),
            "attribution": c["sum"],
            "abs_attribution": c["abs"],
            "fraction": c["abs"] / total_abs if total_abs > 0 else np.zeros(c["sum"].size),
            "top_source": np.where(has, names[c["top"]].astype(str), ""),
            "top_source_gene": np.where(has, source_genes[c["top"]].astype(str), ""),
            "top_source_attribution": c["top_w"],
        }
    )
