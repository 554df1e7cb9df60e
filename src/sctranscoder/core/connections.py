"""Feature-pair connections: the input-independent weights between transcoder features.

A feature ``i`` of layer ``l`` writes its decoder row ``f_dec(l, i)`` into the residual stream; a
feature ``j`` of a later layer ``l'`` reads the residual stream through the norm before its MLP
and its encoder row ``f_enc(l', j)``. Through the residual stream alone (no attention, no other
feature), the pre-activation of ``j`` changes by ``z(l, i) * s * connection`` with

``connection = f_enc(l', j) . (w * C f_dec(l, i))``

where ``w`` is the reading norm's effective weight, ``C`` removes the mean (LayerNorm; the
identity for RMSNorm) and ``s = 1 / sqrt(var + eps)`` is the norm's input-dependent scale.
``connection`` leaves ``s`` out (it is the weight per unit of norm scale, the same for every
input); in a traced circuit ``s`` is frozen, and ``z * s * connection`` is exactly the part of an
edge between two features at one position that flows through the residual stream alone (the rest
flows through attention heads, or through transcoder skip connections). Torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._constants import NodeType

if TYPE_CHECKING:
    from .architectures import Norm
    from .transcoder import Transcoder


def read_through(norm: Norm, directions: torch.Tensor) -> torch.Tensor:
    """``w * C directions``: what a norm with unit scale makes of residual ``directions``."""
    d = directions.float()
    if norm.centred:
        d = d - d.mean(-1, keepdim=True)
    return d * norm.weight


def connection_weights(
    writer: Transcoder, reader: Transcoder, norm: Norm, *, sources=None, targets=None
) -> torch.Tensor:
    """``(n_sources, n_targets)`` connections from ``writer``'s features to ``reader``'s through
    ``norm`` (the reader's MLP norm). ``sources`` / ``targets``: feature ids (default all).
    """
    W_dec = writer.W_dec if sources is None else writer.W_dec[torch.as_tensor(sources)]
    W_enc = reader.W_enc if targets is None else reader.W_enc[torch.as_tensor(targets)]
    return read_through(norm, W_dec) @ W_enc.float().T


@dataclass
class Partners:
    """Strongest connections of query features: per query, ``n_top`` partners by ``|weight|``."""

    query: np.ndarray  # (n,) query index
    layer: np.ndarray  # (n,) partner layer
    feature: np.ndarray  # (n,) partner feature id
    weight: np.ndarray  # (n,) connection
    direction: np.ndarray  # (n,) "upstream" (partner writes, query reads) or "downstream"


def _top_by_abs(best_w, best_l, best_f, w, layer, ids, n_top):
    """Merge ``w`` ``(n_query, m)`` of partners ``ids`` in ``layer`` into the running top-n."""
    cat_w = torch.cat([best_w, w], 1)
    cat_l = torch.cat([best_l, torch.full_like(w, layer, dtype=torch.long)], 1)
    cat_f = torch.cat([best_f, ids[None].expand(w.shape[0], -1)], 1)
    k = min(n_top, cat_w.shape[1])
    top = cat_w.abs().topk(k, dim=1).indices
    return cat_w.gather(1, top), cat_l.gather(1, top), cat_f.gather(1, top)


@torch.no_grad()
def partners(
    transcoders: dict[int, Transcoder],
    mlp_norms: list[Norm],
    queries: list[tuple[int, int]],
    *,
    n_top: int = 20,
    chunk_size: int = 8192,
) -> Partners:
    """For each ``(layer, feature)`` query, its ``n_top`` strongest upstream partners (features of
    earlier layers writing into what it reads) and downstream partners (features of later layers
    reading what it writes), by ``|connection|``.

    Connections are computed ``chunk_size`` partner features at a time for all queries of a layer
    together, so memory is ``n_queries x chunk_size`` whatever the width.
    """
    layers = sorted(transcoders)
    out = {k: [] for k in ("query", "layer", "feature", "weight", "direction")}
    by_layer: dict[int, list[int]] = {}
    for q, (layer, _) in enumerate(queries):
        by_layer.setdefault(layer, []).append(q)
    for layer, qs in by_layer.items():
        ids = torch.as_tensor([queries[q][1] for q in qs])
        tc = transcoders[layer]
        reads = tc.W_enc[ids].float()  # (nq, d) what the queries read
        writes = tc.W_dec[ids].float()  # (nq, d) what they write
        for direction, others in (
            ("upstream", [m for m in layers if m < layer]),
            ("downstream", [m for m in layers if m > layer]),
        ):
            nq = len(qs)
            best_w = torch.zeros(nq, 0)
            best_l = torch.zeros(nq, 0, dtype=torch.long)
            best_f = torch.zeros(nq, 0, dtype=torch.long)
            for m in others:
                other = transcoders[m]
                n = other.W_enc.shape[0]
                for start in range(0, n, chunk_size):
                    part = torch.arange(start, min(start + chunk_size, n))
                    if direction == "upstream":
                        w = reads @ read_through(mlp_norms[layer], other.W_dec[part]).T
                    else:
                        w = read_through(mlp_norms[m], writes) @ other.W_enc[part].float().T
                    best_w, best_l, best_f = _top_by_abs(
                        best_w, best_l, best_f, w.cpu(), m, part, n_top
                    )
            k = best_w.shape[1]
            out["query"].append(np.repeat(np.asarray(qs), k))
            out["layer"].append(best_l.reshape(-1).numpy())
            out["feature"].append(best_f.reshape(-1).numpy())
            out["weight"].append(best_w.reshape(-1).numpy())
            out["direction"].append(np.full(nq * k, direction, dtype=object))
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    return Partners(**cat)


@torch.no_grad()
def edge_split(rm, graph, edges: np.ndarray, target) -> dict[str, np.ndarray]:
    """Per edge ``(source, target)`` of a traced graph: the input-independent ``connection``, the
    source's activation, the reading norm's frozen ``norm_scale`` at the target's position and
    ``residual_part = activation * norm_scale * connection`` (0 when source and target sit at
    different positions: then every path goes through attention).

    Defined for edges from a feature to a feature or to a logit target (for a logit, the
    connection reads through the final norm into the unembedding row of the token, minus the mean
    row when the target subtracts the mean logit); NaN for other edges.
    """
    n = edges.shape[0]
    out = {k: np.full(n, np.nan) for k in ("connection", "norm_scale", "residual_part")}
    out["source_activation"] = np.full(n, np.nan)
    f = rm.frozen
    if target.kind == "logit":
        u = rm.logit_direction(target.token, subtract_mean=target.subtract_mean)
    for e, (s, t) in enumerate(edges.tolist()):
        if graph.node_type[s] != NodeType.FEATURE:
            continue
        src_layer, src_feat = int(graph.layer[s]), int(graph.feature[s])
        w_dec = rm.transcoders[src_layer].W_dec[src_feat][None]
        pos = int(graph.position[t])
        if graph.node_type[t] == NodeType.FEATURE or (
            graph.node_type[t] == NodeType.TARGET and target.kind == "feature"
        ):
            layer, feat = int(graph.layer[t]), int(graph.feature[t])
            norm, scale = rm.layers[layer].mlp_norm, f.mlp_scale[layer][pos]
            read = rm.transcoders[layer].W_enc[feat].float()
        elif graph.node_type[t] == NodeType.TARGET:
            norm, scale, read = rm.arch.final_norm, f.final_scale[pos], u
        else:
            continue
        conn = float(read_through(norm, w_dec)[0] @ read)
        act = float(graph.activation[s])
        out["connection"][e] = conn
        out["source_activation"][e] = act
        out["norm_scale"][e] = float(scale)
        out["residual_part"][e] = (
            act * float(scale) * conn if int(graph.position[s]) == pos else 0.0
        )
    return out
