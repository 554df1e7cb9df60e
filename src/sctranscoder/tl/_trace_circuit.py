from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from .._constants import Key
from .._store import gene_lists, resolve_model, sct_uns, stored_transcoders
from ..core.attribution import NODE_TYPES, TARGET, Target, build_graph, prune
from ..core.model import C2SModel
from ..core.replacement import ReplacementModel

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

_FEATURE_NAME = re.compile(r"^L(\d+)F(\d+)$")


def circuit_key(cell: str) -> str:
    """Default key of a cell's circuit (h5ad keys cannot contain ``/``)."""
    return f"circuit_{cell}".replace("/", "_")


def _label_tokens(model: C2SModel, label: str) -> list[int]:
    tok = model.tokenizer
    ids = tok(model.settings.answer_prefix + label, add_special_tokens=False)["input_ids"]
    unk = tok.unk_token_id
    if not label.strip() or not ids or (unk is not None and unk in ids):
        raise ValueError(
            f"The tokenizer cannot encode the label {label!r}; pass a label the model can answer"
            + (f" (it knows: {model.labels})." if model.labels else ".")
        )
    return ids


def _resolve_target(
    model: C2SModel, genes: list[str], target: str | None, label_token: str, subtract_mean: bool
) -> tuple[Target, list[int], dict]:
    """The attribution target and the answer tokens to append to the prompt (teacher forcing)."""
    if target is not None and (m := _FEATURE_NAME.match(target)):
        layer, feature = int(m.group(1)), int(m.group(2))
        return (
            Target(kind="feature", layer=layer, feature=feature),
            [],
            {
                "kind": "feature",
                "label": "",
                "layer": layer,
                "feature": feature,
            },
        )
    predicted = model.predict([genes])[0]
    label = predicted if target is None else target
    ids = _label_tokens(model, label)
    prefix_len = 0
    if label_token == "distinct" and model.labels:
        others = [_label_tokens(model, lab) for lab in model.labels if lab != label]
        # first position where no other label shares the label's tokens so far
        while prefix_len < len(ids) - 1 and any(
            o[: prefix_len + 1] == ids[: prefix_len + 1] for o in others
        ):
            prefix_len += 1
    elif label_token not in ("first", "distinct"):
        raise ValueError(f"label_token must be 'first' or 'distinct', got {label_token!r}.")
    token = ids[prefix_len]
    info = {
        "kind": "logit",
        "label": label,
        "predicted": predicted,
        "token": model.tokenizer.decode([token]),
        "token_id": int(token),
        "answer_prefix": model.tokenizer.decode(ids[:prefix_len]),
        "subtract_mean": bool(subtract_mean),
    }
    return (
        Target(kind="logit", token=int(token), subtract_mean=subtract_mean),
        ids[:prefix_len],
        info,
    )


def trace_circuit(
    adata: AnnData,
    cell: str,
    *,
    target: str | None = None,
    model: C2SModel | str | None = None,
    label_token: Literal["distinct", "first"] = "distinct",
    subtract_mean: bool = True,
    max_feature_nodes: int = 512,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    batch_size: int = 32,
    gene_sets=None,
    n_top_genes: int = 25,
    sentence_key: str | None = None,
    key: str = Key.uns,
    key_added: str | None = None,
    progress: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Trace the circuit behind one cell's prediction: an exact attribution graph, pruned.

    The cell's prompt is run through a *local replacement model*: every MLP replaced by its
    transcoder plus a constant error term (so the forward pass is unchanged), attention patterns and
    LayerNorm scales frozen. The model is then linear in token embeddings, feature activations and
    errors, and the edges between them (direct effects through the residual stream and attention
    value/output paths) are computed exactly by batched backward passes. Features are explored in
    order of influence on the target, then nodes and edges are pruned by influence.

    Parameters
    ----------
    adata
        Annotated data with cell sentences and transcoders on every layer.
    cell
        ``obs_name`` of the cell.
    target
        What to explain: ``None`` (the model's predicted cell type), a cell-type label, or a feature
        ``"L<layer>F<id>"`` (its pre-activation at the last prompt token).
    model
        The base model (default: the one recorded with the transcoders; fingerprint checked).
    label_token
        Which token of the label is the target: ``"distinct"`` (default), the first token at which
        the label differs from every other label the model knows, after feeding the shared
        prefix as the start of the answer (labels such as ``"CD14+ Monocyte"`` and ``"CD19+ B"``
        share their first token); ``"first"``, the label's first token.
    subtract_mean
        Target the logit minus the mean logit (what changes the token's probability).
    max_feature_nodes
        Most features whose incoming edges are computed.
    node_threshold, edge_threshold
        Fractions of influence kept by pruning nodes and edges.
    batch_size
        Target nodes per backward pass.
    gene_sets
        If given, the circuit's top ``n_top_genes`` genes are tested against these gene sets
        (see :func:`circuit_enrichment` for the sources and tests) into ``["enrichment"]``.
    n_top_genes
        Genes tested for enrichment.
    sentence_key, key
        ``adata.obs`` column of the sentences and ``adata.uns`` key of the transcoders.
    key_added
        Circuit key (default ``"circuit_<cell>"``).
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets
    ``adata.uns["sct_circuits"][key_added]``, a dict with:

    ``nodes`` : :class:`pandas.DataFrame`
        Kept nodes, indexed by id: ``type`` (embedding, error, feature, target), ``layer``
        (-1 for embeddings), ``position``, ``feature`` (-1 if not a feature), ``token``, ``gene``
        (the gene whose subword token the node sits on, ``""`` for prompt text), ``activation``,
        ``influence`` (on the target), and for explored nodes ``value`` (pre-activation),
        ``input_sum`` (sum of all incoming edges, before pruning) and ``bias``, with
        ``value == input_sum + bias`` exactly.
    ``edges`` : :class:`pandas.DataFrame`
        ``source``, ``target``, ``weight`` (direct effect) of kept edges.
    ``genes`` : :class:`pandas.DataFrame`
        Per gene of the prompt, most influential first: ``influence`` (on the target, of the
        gene's embedding nodes plus its explored feature nodes, before pruning),
        ``embedding_influence``, ``feature_influence``, ``n_features`` (features kept in the
        circuit at the gene's tokens) and ``rank`` (position in the sentence).
    ``scores`` : dict
        ``replacement_score``, ``completeness_score``, ``target_value``, counts of features.
    ``params`` : dict
        The arguments, the cell, the target description and the model's fingerprint.
    ``enrichment`` : :class:`pandas.DataFrame`
        With ``gene_sets``: see :func:`circuit_enrichment`.
    """
    if cell not in adata.obs_names:
        raise KeyError(f"Cell {cell!r} is not in adata.obs_names.")
    sets = None
    if gene_sets is not None:  # resolve first: nothing is written if they cannot be had
        from .._genesets import gene_sets as load_gene_sets

        sets = load_gene_sets(gene_sets, adata=adata, min_size=1, max_size=10**9)
    record = sct_uns(adata, key)
    if sentence_key is None:
        sentence_key = str(record.get("params", {}).get("sentence_key", Key.sentence))
    model = resolve_model(adata, key, model)
    transcoders = stored_transcoders(adata, key)
    if sorted(transcoders) != list(range(model.n_layers)):
        missing = sorted(set(range(model.n_layers)) - set(transcoders))
        raise KeyError(
            f"Circuits need a transcoder for every layer; missing layer(s) {missing}. Train them "
            "with `sct.tl.train_transcoders(adata, model)` (default: all layers)."
        )
    i = adata.obs_names.get_loc(cell)
    genes = gene_lists(adata[[cell]], sentence_key, n_genes=model.settings.n_genes)[0]
    tgt, answer_ids, target_info = _resolve_target(model, genes, target, label_token, subtract_mean)
    if tgt.kind == "feature" and not 0 <= tgt.layer < model.n_layers:
        raise ValueError(f"Layer {tgt.layer} does not exist (0..{model.n_layers - 1}).")
    batch = model.tokenize([genes])
    n = int(batch.lengths[0])
    ids = torch.cat([batch.input_ids[0, :n], torch.as_tensor(answer_ids, dtype=torch.long)])
    gene_index = np.concatenate([batch.gene_index[0, :n].numpy(), np.full(len(answer_ids), -1)])

    start = time.perf_counter()
    device = model.device
    transcoders = {k: v.to(device) for k, v in transcoders.items()}
    rm = ReplacementModel(model.model, transcoders, ids)
    graph = build_graph(
        rm, tgt, max_feature_nodes=max_feature_nodes, batch_size=batch_size, progress=progress
    )
    pruned = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    seconds = time.perf_counter() - start

    tokens = [model.tokenizer.decode([t]) for t in ids.tolist()]
    names = _node_names(graph)
    kept = pruned.nodes
    gene_of = np.array([genes[g] if g >= 0 else "" for g in gene_index], dtype=object)
    pos = graph.position[kept]
    nodes = pd.DataFrame(
        {
            "type": [NODE_TYPES[int(t)] for t in graph.node_type[kept]],
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
    gene_table = _gene_table(graph, pruned, gene_index, genes)
    scores = dict(pruned.scores)
    scores["target_value"] = float(graph.value[graph.target_node])
    scores["seconds"] = float(seconds)
    params = {
        "cell": str(cell),
        "cell_index": int(i),
        "target": {k: v for k, v in target_info.items()},
        "label_token": label_token,
        "max_feature_nodes": int(max_feature_nodes),
        "node_threshold": float(node_threshold),
        "edge_threshold": float(edge_threshold),
        "n_tokens": int(ids.numel()),
        "transcoders_key": key,
        "sentence_key": sentence_key,
        "model_fingerprint": model.fingerprint,
    }
    key_added = key_added or circuit_key(cell)
    if "/" in key_added:
        raise ValueError("key_added cannot contain '/' (it is an h5ad key).")
    if copy:
        adata = adata.copy()
    circuits = adata.uns.setdefault(Key.circuits, {})
    circuits[key_added] = {
        "params": params,
        "nodes": nodes,
        "edges": edges,
        "genes": gene_table,
        "scores": scores,
    }
    logger.info(
        "traced %s for cell %s in %.1fs: %d features kept of %d explored (%d active), "
        "replacement %.2f, completeness %.2f\n    added %r (adata.uns[%r])",
        target_info.get("label") or target,
        cell,
        seconds,
        int(scores["n_kept_features"]),
        int(scores["n_explored_features"]),
        int(scores["n_active_features"]),
        scores["replacement_score"],
        scores["completeness_score"],
        key_added,
        Key.circuits,
    )
    if gene_sets is not None:
        from ._circuit_enrichment import circuit_enrichment

        name = gene_sets if isinstance(gene_sets, str) else type(gene_sets).__name__
        circuit_enrichment(adata, key_added, sets, n_top_genes=n_top_genes, _source=name)
    return adata if copy else None


def _node_names(graph) -> np.ndarray:
    names = np.empty(graph.n_nodes, dtype=object)
    for n in range(graph.n_nodes):
        t, layer, p, f = (
            int(graph.node_type[n]),
            int(graph.layer[n]),
            int(graph.position[n]),
            int(graph.feature[n]),
        )
        if t == TARGET:
            names[n] = "target"
        elif t == 0:
            names[n] = f"emb@{p}"
        elif t == 1:
            names[n] = f"err L{layer}@{p}"
        else:
            names[n] = f"L{layer}F{f}@{p}"
    return names


def _gene_table(graph, pruned, gene_index: np.ndarray, genes: list[str]) -> pd.DataFrame:
    """Per gene: influence of its embedding and explored feature nodes, and kept features."""
    inf = pruned.influence
    g_of_node = gene_index[graph.position]
    on_gene = g_of_node >= 0
    explored = np.zeros(graph.n_nodes, dtype=bool)
    explored[list(graph.rows)] = True
    kept = np.zeros(graph.n_nodes, dtype=bool)
    kept[pruned.nodes] = True
    is_emb = on_gene & (graph.node_type == 0)
    is_feat = on_gene & (graph.node_type == 2) & explored
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
