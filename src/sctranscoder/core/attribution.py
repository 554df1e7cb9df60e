"""Attribution graphs: the direct linear effects between the nodes of a replacement model.

Nodes are token embeddings (per position), error terms (per layer and position), active transcoder
features (per layer, position and feature id) and one target (a logit, or a feature's
pre-activation). In the replacement model (:mod:`.replacement`) every node's value is a linear
function of the sources below it, so the edge from a source to a target is exactly
``source value x d target / d source``: one backward pass gives a target's whole row, and a batch
of targets is done at once by running copies of the prompt side by side. The incoming edges of a
node plus its constant bias sum to its value (checked in the tests).

Features are explored in order of their influence on the target (influence flows through the
row-normalised absolute adjacency, as in Ameisen et al. 2025's circuit-tracer), so memory grows
with the number of explored nodes times the number of sources, never with the square of all active
features. Torch only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .._constants import NodeType

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .replacement import Contributions, LinearOutputs, ReplacementModel

logger = logging.getLogger(__name__)

EMBEDDING, ERROR, FEATURE, TARGET = NodeType


@dataclass
class Target:
    """What the graph explains.

    ``kind="logit"``: the logit of ``token`` at the last position (minus the mean logit when
    ``subtract_mean``). ``kind="feature"``: the pre-activation of ``feature`` of ``layer`` at
    ``position`` (default: last position).
    """

    kind: str = "logit"
    token: int | None = None
    subtract_mean: bool = True
    layer: int | None = None
    feature: int | None = None
    position: int | None = None


@dataclass
class Graph:
    """An attribution graph before pruning.

    Attributes
    ----------
    node_type, layer, position, feature
        Per node (``n_nodes``); ``layer`` is -1 for embeddings and ``n_layers`` for a logit target;
        ``feature`` is -1 for non-features.
    activation
        The node's value: a feature's activation, an error's norm, an embedding's norm, the target.
    rows
        ``{node: (n_nodes,) incoming edges}`` for every explored node (the target and explored
        features); other nodes' incoming edges are not computed.
    bias
        ``{node: constant term}`` for explored nodes: value = sum(row) + bias.
    """

    node_type: np.ndarray
    layer: np.ndarray
    position: np.ndarray
    feature: np.ndarray
    activation: np.ndarray
    target_node: int
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    bias: dict[int, float] = field(default_factory=dict)
    value: dict[int, float] = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return int(self.node_type.size)


def _node_tables(rm: ReplacementModel, target: Target):
    """Enumerate nodes: embeddings, errors, active features, target."""
    f = rm.frozen
    T = f.embeddings.shape[0]
    n_layers = len(rm.layers)
    types, layers, positions, features, acts = [], [], [], [], []
    types.append(np.full(T, int(EMBEDDING)))
    layers.append(np.full(T, -1))
    positions.append(np.arange(T))
    features.append(np.full(T, -1))
    acts.append(f.embeddings.norm(dim=-1).cpu().numpy())
    for i in range(n_layers):
        types.append(np.full(T, int(ERROR)))
        layers.append(np.full(T, i))
        positions.append(np.arange(T))
        features.append(np.full(T, -1))
        acts.append(f.errors[i].norm(dim=-1).cpu().numpy())
    feature_slots = {}  # layer -> (positions, slots) of active features, in node order
    offset = T * (1 + n_layers)
    for i in range(n_layers):
        vals = f.values[i]
        pos, slot = torch.nonzero(vals > 0, as_tuple=True)
        feature_slots[i] = (pos, slot, offset)
        offset += pos.numel()
        types.append(np.full(pos.numel(), int(FEATURE)))
        layers.append(np.full(pos.numel(), i))
        positions.append(pos.cpu().numpy())
        features.append(f.indices[i][pos, slot].cpu().numpy())
        acts.append(vals[pos, slot].cpu().numpy())
    types.append(np.array([int(TARGET)]))
    tl = n_layers if target.kind == "logit" else int(target.layer)
    layers.append(np.array([tl]))
    positions.append(np.array([T - 1 if target.position is None else target.position]))
    features.append(np.array([target.feature if target.kind == "feature" else -1]))
    acts.append(np.array([np.nan]))
    cat = lambda xs, dt: np.concatenate(xs).astype(dt)  # noqa: E731
    return (
        cat(types, np.int8),
        cat(layers, np.int32),
        cat(positions, np.int32),
        cat(features, np.int64),
        cat(acts, np.float32),
        feature_slots,
    )


class Attributor:
    """Computes rows of the attribution graph of one prompt in batches of backward passes."""

    def __init__(self, rm: ReplacementModel, target: Target, *, batch_size: int = 32):
        self.rm = rm
        self.target = target
        self.batch_size = batch_size
        (self.node_type, self.layer, self.position, self.feature, self.activation, self.slots) = (
            _node_tables(rm, target)
        )
        self.n_layers = len(rm.layers)
        self.T = rm.frozen.embeddings.shape[0]
        self.target_node = self.node_type.size - 1
        if target.kind == "logit":
            if target.token is None:
                raise ValueError("A logit target needs a token id.")
        elif target.kind == "feature":
            if target.layer is None or target.feature is None:
                raise ValueError("A feature target needs a layer and a feature id.")
        else:
            raise ValueError(f"Unknown target kind {target.kind!r}: use 'logit' or 'feature'.")
        with torch.no_grad():
            self._bias_out = rm.linear_forward(*self._sources(1, zero=True))
            self._out = rm.linear_forward(*self._sources(1))

    def _sources(self, B: int, *, zero: bool = False):
        f = self.rm.frozen

        def make(x):
            x = x[None].expand(B, *x.shape).clone()
            return torch.zeros_like(x) if zero else x

        emb = make(f.embeddings)
        vals = {i: make(f.values[i]) for i in range(self.n_layers)}
        errs = {i: make(f.errors[i]) for i in range(self.n_layers)}
        return emb, vals, errs

    def _node_scalar(self, node: int, out: LinearOutputs, b: int) -> torch.Tensor:
        """The value of ``node`` in batch element ``b`` of a linear forward's outputs."""
        if node == self.target_node and self.target.kind == "logit":
            row = out.logits[b, self.T - 1]
            value = row[self.target.token]
            return value - row.mean() if self.target.subtract_mean else value
        layer, pos = int(self.layer[node]), int(self.position[node])
        feat = int(self.feature[node])
        tc = self.rm.transcoders[layer]
        return out.mlp_inputs[layer][b, pos] @ tc.W_enc[feat] + tc.b_enc[feat]

    def _depth(self, node: int) -> int:
        """Layer whose MLP input the node reads (``n_layers`` for a logit target)."""
        if node == self.target_node and self.target.kind == "logit":
            return self.n_layers
        return int(self.layer[node])

    def target_value(self) -> float:
        """The target's value on the prompt."""
        with torch.no_grad():
            return float(self._node_scalar(self.target_node, self._out, 0))

    def _rows_from(self, c: Contributions) -> torch.Tensor:
        """``(B, n_nodes)`` rows from per-source contributions."""
        B = c.embeddings.shape[0]
        rows = torch.zeros(B, self.node_type.size, device=c.embeddings.device)
        rows[:, : self.T] = c.embeddings
        for i in range(self.n_layers):
            pos, slot, off = self.slots[i]
            if i in c.errors:
                lo = self.T * (1 + i)
                rows[:, lo : lo + self.T] = c.errors[i]
                rows[:, off : off + pos.numel()] = c.values[i][:, pos, slot]
        return rows

    def _seeds(self, nodes: list[int]) -> dict:
        """What each node reads, as readout weights for :meth:`ReplacementModel.contributions`:
        the target logit's unembedding row (minus the mean row) on the final norm's output at
        the last position, or a feature's encoder row on its layer's MLP input at its position.
        """
        B, T, d = len(nodes), self.T, self.rm.frozen.embeddings.shape[1]
        device = self.rm.frozen.embeddings.device
        final, mlp_inputs = None, {}
        for b, n in enumerate(nodes):
            if n == self.target_node and self.target.kind == "logit":
                if final is None:
                    final = torch.zeros(B, T, d, device=device)
                final[b, T - 1] = self.rm.logit_direction(
                    self.target.token, subtract_mean=self.target.subtract_mean
                )
            else:
                layer = int(self.layer[n])
                if layer not in mlp_inputs:
                    mlp_inputs[layer] = torch.zeros(B, T, d, device=device)
                W_enc = self.rm.transcoders[layer].W_enc
                mlp_inputs[layer][b, int(self.position[n])] = W_enc[int(self.feature[n])]
        return {"final": final, "mlp_inputs": mlp_inputs}

    def rows(self, nodes: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Incoming edges of ``nodes``: ``(len(nodes), n_nodes)``, plus their bias and value."""
        out = np.zeros((len(nodes), self.node_type.size), dtype=np.float32)
        biases = np.zeros(len(nodes))
        values = np.zeros(len(nodes))
        # batches of similar depth: the backward starts at the deepest node of the batch
        order = sorted(range(len(nodes)), key=lambda j: self._depth(nodes[j]))
        for start in range(0, len(nodes), self.batch_size):
            where = order[start : start + self.batch_size]
            chunk = [nodes[j] for j in where]
            c = self.rm.contributions(**self._seeds(chunk))
            out[where] = self._rows_from(c).cpu().numpy()
            with torch.no_grad():
                for j, n in zip(where, chunk, strict=True):
                    biases[j] = float(self._node_scalar(n, self._bias_out, 0))
                    values[j] = float(self._node_scalar(n, self._out, 0))
        return out, biases, values

    def head_rows(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """``node``'s incoming edges split by the last attention head on their paths.

        Every path from a source to ``node`` either never passes through attention (the
        *direct* part: the residual stream at the node's position, and transcoder skip
        connections) or has a last attention head ``(l, h)``; the edge is the sum of these parts.
        The part of ``(l, h)`` is the source's effect on what the head writes, read by the node
        through non-attention paths: with ``G_l`` the node's gradient at the point where layer
        ``l``'s attention writes, computed with every attention path cut, it is the source's
        value times the gradient of ``G_l . write(l, h)``.

        Returns
        -------
        ``heads`` ``(n + 1, 2)`` int array of (layer, head), ``(-1, -1)`` first for the direct
        part, and ``rows`` ``(n + 1, n_nodes)``, one row per part.
        """
        heads, rows = zip(*self.iter_head_rows(node), strict=True)
        return np.concatenate(heads), np.concatenate(rows)

    def iter_head_rows(self, node: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """:meth:`head_rows` in chunks of ``batch_size`` heads (the direct part first), so that a
        caller can summarise each chunk instead of holding every row.
        """
        depth = self._depth(node)
        layers = list(range(min(depth + 1, self.n_layers)))
        seeds = self._seeds([node])
        direct = self.rm.contributions(**seeds, attention=False, attention_grads=layers)
        readouts = {i: self.rm.head_readout(i, direct.attention_grads[i][0]) for i in layers}
        yield np.array([[-1, -1]]), self._rows_from(direct).cpu().numpy()
        heads = [(i, h) for i in layers for h in range(self.rm.layers[i].attention.n_heads)]
        for start in range(0, len(heads), self.batch_size):
            chunk = heads[start : start + self.batch_size]
            B = len(chunk)
            readout = {}
            for b, (i, h) in enumerate(chunk):
                if i not in readout:
                    readout[i] = torch.zeros(B, *readouts[i].shape, device=readouts[i].device)
                readout[i][b, :, h] = readouts[i][:, h]
            rows = self._rows_from(self.rm.contributions(head_readout=readout))
            yield np.array(chunk, dtype=np.int64), rows.cpu().numpy()


def influence(graph: Graph) -> np.ndarray:
    """Influence of every node on the target through the explored part of the graph.

    With ``A`` the row-normalised absolute adjacency (rows: explored nodes), the influence is
    ``e_target^T (A + A^2 + ...)``; the graph is acyclic, so the series ends after at most the
    number of layers + 2 terms. The target's own influence is 1.
    """
    explored = np.fromiter(graph.rows, dtype=np.int64)
    if explored.size == 0:
        return np.zeros(graph.n_nodes)
    A = np.abs(np.stack([graph.rows[n] for n in explored]))
    A /= np.maximum(A.sum(1, keepdims=True), 1e-30)
    where = {int(n): i for i, n in enumerate(explored)}
    total = np.zeros(graph.n_nodes)
    current = np.zeros(explored.size)
    current[where[graph.target_node]] = 1.0
    for _ in range(int(graph.layer.max()) + 3):
        spread = current @ A  # (n_nodes,)
        if not spread.any():
            break
        total += spread
        current = spread[explored]
    total[graph.target_node] = 1.0
    return total


def build_graph(
    rm: ReplacementModel,
    target: Target,
    *,
    max_feature_nodes: int = 512,
    batch_size: int = 32,
    progress: bool = False,
) -> Graph:
    """Explore the attribution graph of ``target`` (see the module docstring).

    The target's row is computed first; then, repeatedly, the unexplored features with the largest
    influence on the target get their rows computed, ``batch_size`` at a time, until
    ``max_feature_nodes`` features are explored or none has influence left.
    """
    at = Attributor(rm, target, batch_size=batch_size)
    g = Graph(at.node_type, at.layer, at.position, at.feature, at.activation, at.target_node)
    rows, bias, value = at.rows([at.target_node])
    g.rows[at.target_node], g.bias[at.target_node], g.value[at.target_node] = (
        rows[0],
        bias[0],
        value[0],
    )
    g.activation[at.target_node] = value[0]
    is_feature = g.node_type == FEATURE
    if target.kind == "feature":
        # features at or above the target's layer cannot affect it
        is_feature &= g.layer < int(target.layer)
    n_explore = min(max_feature_nodes, int(is_feature.sum()))
    check_memory(n_explore + 1, len(g.node_type), rows[0].itemsize)
    bar = tqdm(
        total=n_explore,
        desc="attribution",
        disable=not progress,
        unit="node",
    )
    n_explored = 0
    while n_explored < max_feature_nodes:
        inf = influence(g)
        candidates = np.flatnonzero(is_feature & (inf > 0))
        candidates = (
            candidates[[c not in g.rows for c in candidates]] if candidates.size else candidates
        )
        if candidates.size == 0:
            break
        take = min(batch_size * 4, max_feature_nodes - n_explored)
        chosen = candidates[np.argsort(-inf[candidates], kind="stable")[:take]].tolist()
        rows, bias, value = at.rows(chosen)
        for n, r, b, v in zip(chosen, rows, bias, value, strict=True):
            g.rows[n], g.bias[n], g.value[n] = r, float(b), float(v)
        n_explored += len(chosen)
        bar.update(len(chosen))
    bar.close()
    return g


def check_memory(n_rows: int, n_nodes: int, itemsize: int) -> None:
    """Refuse to explore ``n_rows`` nodes when their edge rows (``n_nodes`` each) would not fit
    in the memory available now (80% of it), before any is computed.
    """
    need = n_rows * n_nodes * itemsize
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform says
        return
    if need > 0.8 * available:
        raise MemoryError(
            f"Exploring {n_rows - 1} feature nodes of this prompt ({n_nodes} nodes) needs "
            f"{need / 2**30:.1f} GiB for their edges, and {available / 2**30:.1f} GiB are free: "
            "lower max_feature_nodes (512, the default, is usually enough)."
        )


@dataclass
class Pruned:
    """A pruned graph: kept nodes and edges, with influence and the graph's scores."""

    nodes: np.ndarray  # kept node ids
    edges: np.ndarray  # (n_edges, 2) source, target node ids
    weights: np.ndarray  # (n_edges,) edge weights
    influence: np.ndarray  # (n_nodes,) influence of every node on the target
    scores: dict[str, float]


def graph_scores(g: Graph, inf: np.ndarray) -> dict[str, float]:
    """Replacement and completeness scores of the explored graph (Ameisen et al. 2025).

    ``replacement``: of the influence that reaches the target from its ultimate sources (token
    embeddings and error terms), the fraction from embeddings, i.e. flowing through features
    rather than unexplained error. ``completeness``: influence-weighted mean, over explored nodes,
    of the fraction of incoming (absolute, normalised) edge weight that comes from non-error nodes.
    """
    emb = inf[g.node_type == EMBEDDING].sum()
    err = inf[g.node_type == ERROR].sum()
    replacement = float(emb / (emb + err)) if emb + err > 0 else float("nan")
    num, den = 0.0, 0.0
    for n, row in g.rows.items():
        a = np.abs(row)
        s = a.sum()
        if s == 0:
            continue
        non_error = 1.0 - a[g.node_type == ERROR].sum() / s
        w = inf[n]
        num += w * non_error
        den += w
    completeness = float(num / den) if den > 0 else float("nan")
    return {"replacement_score": replacement, "completeness_score": completeness}


def prune(g: Graph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Keep the nodes that carry ``node_threshold`` of the influence of their kind (explored
    features, embeddings, errors), and the edges among kept nodes that carry ``edge_threshold``
    of the edge influence.

    An edge's influence is the influence of its target times its normalised weight. Nodes left
    without edges are dropped (the target is always kept).
    """
    if not (0 < node_threshold <= 1 and 0 < edge_threshold <= 1):
        raise ValueError("node_threshold and edge_threshold must be in (0, 1].")
    inf = influence(g)
    scores = graph_scores(g, inf)
    keep = np.zeros(g.n_nodes, dtype=bool)
    keep[g.target_node] = True
    for kind in (FEATURE, EMBEDDING, ERROR):
        cand = np.flatnonzero((g.node_type == kind) & (inf > 0))
        if kind == FEATURE:
            cand = np.array([n for n in cand if n in g.rows], dtype=np.int64)
        if cand.size:
            order = cand[np.argsort(-inf[cand], kind="stable")]
            cum = np.cumsum(inf[order]) / inf[order].sum()
            keep[order[: int(np.searchsorted(cum, node_threshold) + 1)]] = True
    src, dst, w, score = [], [], [], []
    for n, row in g.rows.items():
        if not keep[n]:
            continue
        a = np.abs(row)
        s = a.sum()
        if s == 0:
            continue
        cols = np.flatnonzero(keep & (row != 0))
        src.append(cols)
        dst.append(np.full(cols.size, n))
        w.append(row[cols])
        score.append(inf[n] * a[cols] / s)
    if src:
        src, dst, w, score = map(np.concatenate, (src, dst, w, score))
        order = np.argsort(-score, kind="stable")
        cum = np.cumsum(score[order]) / max(score.sum(), 1e-30)
        n_keep = int(np.searchsorted(cum, edge_threshold) + 1)
        sel = order[:n_keep]
        src, dst, w = src[sel], dst[sel], w[sel]
    else:
        src = dst = np.zeros(0, dtype=np.int64)
        w = np.zeros(0)
    connected = np.zeros(g.n_nodes, dtype=bool)
    connected[src] = True
    connected[dst] = True
    connected[g.target_node] = True
    nodes = np.flatnonzero(keep & connected)
    scores["n_explored_features"] = float(len(g.rows) - 1)
    scores["n_active_features"] = float((g.node_type == FEATURE).sum())
    scores["n_kept_features"] = float((g.node_type[nodes] == FEATURE).sum())
    return Pruned(
        nodes,
        np.stack([src, dst], 1).astype(np.int64),
        np.asarray(w, dtype=np.float32),
        inf,
        scores,
    )
