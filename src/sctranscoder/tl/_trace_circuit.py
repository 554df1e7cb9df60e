"""Trace the circuit behind one cell's prediction: an exact attribution graph, pruned."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scanpy import logging as logg

from .._constants import Key, is_feature_name, loose_feature_name
from .._genesets import SHIPPED
from .._genesets import gene_sets as load_gene_sets
from .._records import (
    cell_prompts,
    check_key,
    circuit_dependents,
    model_and_transcoders,
    recorded_sentence_key,
    remove_circuit,
    transcoder_record,
    transcoders_id,
)
from .._validate import (
    check_bool,
    check_copy_backed,
    check_feature,
    check_fraction,
    check_positive_int,
    check_unique_obs_names,
)
from ..core.attribution import Attributor, build_graph, prune
from ..core.circuit import circuit_tables, head_table, node_names
from ..core.connections import edge_split
from ..core.replacement import ReplacementModel
from ..core.targets import resolve_target, teacher_forced
from ._circuit_enrichment import enrich_circuit

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..core.model import C2SModel


def trace_circuit(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    cell: str,
    target: str | None = None,
    label_token: Literal["distinct", "first"] = "distinct",
    subtract_mean: bool = True,
    max_feature_nodes: int = 512,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    batch_size: int = 32,
    head_nodes: Sequence[str] = ("target",),
    gene_sets="auto",
    n_top: int = 25,
    allow_network: bool = False,
    sentence_key: str | None = None,
    key: str = Key.transcoders,
    key_added: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Trace the circuit behind one cell's prediction: an exact attribution graph, pruned.

    The cell's prompt is run through a *local replacement model*: every MLP replaced by its
    transcoder plus a constant error term (so the forward pass is unchanged), attention patterns and
    LayerNorm scales frozen. The model is then linear in token embeddings, feature activations and
    errors, and the edges between them (direct effects through the residual stream and attention
    value/output paths) are computed exactly by batched backward passes. Features are explored in
    order of influence on the target, then nodes and edges are pruned by influence.

    Works on every family of :mod:`sctranscoder.core.architectures`: GPT-NeoX (C2S-Pythia),
    Llama/Mistral/Qwen2, Gemma-2 (C2S-Scale) and GPT-2. For Gemma-2, logit targets are the logits
    before the final soft-cap (monotone, not linear).

    Parameters
    ----------
    adata
        Annotated data with cell sentences and transcoders on every layer.
    model
        The base model (default: the one recorded with the transcoders; fingerprint checked).
    cell
        ``obs_name`` of the cell.
    target
        What to explain: ``None`` (the model's predicted cell type), a cell-type label, or a feature
        ``"L<layer>F<id>"`` (its pre-activation at the last prompt token). A feature name written
        loosely (``"l2f17"``, ``"L2 F17"``) is refused with the exact spelling, not read as a
        label. When the model records the labels it answers (``model.labels``), a label outside
        them is refused with the closest ones, unless ``label_token="first"`` (then it is
        traced from its first token, with a warning).
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
    head_nodes
        Nodes whose incoming edges are split by attention head (``"target"`` and node ids such
        as ``"L2F17@40"`` of explored features), into the ``heads`` table; ``()`` for none. Each
        node costs about as much as exploring one feature per attention head of the layers
        below it (384 heads for C2S-Pythia-410m, 208 for C2S-Scale-Gemma-2-2B).
    gene_sets
        The circuit's top ``n_top`` genes are tested against these gene sets (see
        :func:`circuit_enrichment` for the sources and the test), into
        ``adata.uns[f"{key_added}_enrichment"]``. ``"auto"`` (default): the human GO
        Biological Process sets shipped with sctranscoder (``"GO_BP_2022"``, offline) when the
        sentences are of Homo sapiens, and no enrichment otherwise; a circuit whose genes no set
        covers is then written without enrichment, with a warning. ``None``: no enrichment.
    n_top
        Genes tested for enrichment.
    allow_network
        Let a named gene set library be downloaded.
    sentence_key
        ``adata.obs`` column of the sentences (default: the one the transcoders were trained on).
    key
        ``adata.uns`` key of the transcoders.
    key_added
        ``adata.uns`` key of the circuit. Default ``"circuit_<cell>"``, with ``%`` and ``/`` in
        the cell name written ``%25`` and ``%2F``, so that distinct cells get distinct keys.
        Trace another target of the same cell under another ``key_added``.
    overwrite
        Replace a circuit already at ``key_added``, and remove everything derived from it (its
        enrichment and score records in ``adata.uns`` and score columns in ``adata.obs``, which
        would describe the old circuit). Default: an existing circuit is refused.
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``adata.uns[key_added]``, a dict:

    ``nodes`` : :class:`pandas.DataFrame`
        Kept nodes, indexed by id: ``type`` (embedding, error, feature, target), ``layer``
        (-1 for embeddings), ``position``, ``feature`` (-1 if not a feature), ``token``, ``gene``
        (the gene whose subword token the node sits on, ``""`` for prompt text), ``activation``,
        ``influence`` (on the target), and for explored nodes ``value`` (pre-activation),
        ``input_sum`` (sum of all incoming edges, before pruning) and ``bias``, with
        ``value == input_sum + bias`` exactly.
    ``edges`` : :class:`pandas.DataFrame`
        ``source``, ``target``, ``weight`` (direct effect) of kept edges; for edges from a
        feature to a feature or a logit target also ``connection`` (input-independent:
        ``f_enc . (w * f_dec)`` through the reading norm's weight, see
        :func:`feature_connections`), ``source_activation``, ``norm_scale`` (the reading norm's
        frozen ``1/rms`` at the target's position) and ``residual_part`` (``source_activation *
        norm_scale * connection`` at the same position, else 0: the part of the weight that
        flows through the residual stream alone; the rest flows through attention), NaN for
        other edges.
    ``heads`` : :class:`pandas.DataFrame`
        For each node of ``head_nodes``, its incoming edges (all sources, before pruning) split
        by the last attention head ``(layer, head)`` on their paths, exactly: per ``node``,
        ``layer``, ``head`` (``-1, -1`` for the direct part, paths without attention),
        ``attribution`` (sum of the parts; over a node's rows it sums to ``input_sum``),
        ``abs_attribution``, ``fraction`` (of the node's total absolute parts), ``top_source``,
        ``top_source_gene`` and ``top_source_attribution`` (the source sending most through
        the head).
    ``genes`` : :class:`pandas.DataFrame`
        Per gene of the prompt, most influential first: ``influence`` (on the target, of the
        gene's embedding nodes plus its explored feature nodes, before pruning),
        ``embedding_influence``, ``feature_influence``, ``n_features`` (features kept in the
        circuit at the gene's tokens) and ``rank`` (position in the sentence).
    ``scores`` : dict
        ``replacement_score``, ``completeness_score``, ``target_value``, counts of features,
        ``seconds``.
    ``params`` : dict
        The arguments, the cell, the target description and the model's fingerprint.

    With ``gene_sets``, also ``adata.uns[f"{key_added}_enrichment"]``: see
    :func:`circuit_enrichment`.
    """
    if not isinstance(cell, str):
        raise TypeError(f"cell takes one obs name (a str), got {cell!r}.")
    check_unique_obs_names(adata)
    if cell not in adata.obs_names:
        raise KeyError(f"Cell {cell!r} is not in adata.obs_names.")
    check_positive_int(max_feature_nodes, "max_feature_nodes")
    check_positive_int(batch_size, "batch_size")
    check_fraction(node_threshold, "node_threshold")
    check_fraction(edge_threshold, "edge_threshold")
    subtract_mean = check_bool(subtract_mean, "subtract_mean")
    overwrite, copy = check_bool(overwrite, "overwrite"), check_bool(copy, "copy")
    check_copy_backed(adata, copy)
    head_nodes = [head_nodes] if isinstance(head_nodes, str) else list(head_nodes)
    bad = [n for n in head_nodes if n != "target" and not _is_feature_node(n)]
    if bad:
        raise ValueError(
            f"head_nodes must be 'target' or feature node ids such as 'L2F17@40'; got {bad}."
        )
    loose = loose_feature_name(target)
    if loose is not None:
        raise ValueError(
            f"target={target!r} looks like a feature name: write it exactly as {loose!r} "
            "(upper-case L and F, no spaces), or pass a cell-type label the model answers."
        )
    record_key = check_key(
        key_added if key_added is not None else Key.circuit(str(cell)), adata=adata, kind="circuit"
    )
    if record_key in adata.uns and not overwrite:
        old = adata.uns[record_key].get("params", {})
        raise ValueError(
            f"adata.uns[{record_key!r}] already holds a circuit (cell {old.get('cell')!r}): "
            "pass key_added= to keep both, or overwrite=True to replace it and remove what was "
            f"derived from it ({_derived(adata, record_key)})."
        )
    auto = isinstance(gene_sets, str) and gene_sets == "auto"
    sets = None
    if gene_sets is not None and not auto:  # resolved first (the loaded sets remember their source)
        sets = load_gene_sets(
            gene_sets, adata=adata, min_size=1, max_size=10**9, allow_network=allow_network
        )
    sentence_key = sentence_key or recorded_sentence_key(transcoder_record(adata, key))
    model, tset = model_and_transcoders(adata, key, model)
    (genes,), model = cell_prompts(
        adata[[cell]], sentence_key, model, trained=transcoder_record(adata, key)["model"]
    )
    if auto:
        sets = _default_gene_sets(model.settings.organism)
    tgt, answer_ids, target_info = resolve_target(
        model, genes, target, label_token=label_token, subtract_mean=subtract_mean
    )
    if tgt.kind == "feature":
        widths = {la: tset[la].config.n_features for la in tset.layers}
        check_feature(tgt.layer, tgt.feature, widths, key=key)
    ids, gene_index = teacher_forced(model, genes, answer_ids)
    start = logg.info(f"tracing the circuit of cell {cell}")
    t0 = time.perf_counter()
    rm = ReplacementModel(model.model, tset, ids)
    graph = build_graph(
        rm, tgt, max_feature_nodes=max_feature_nodes, batch_size=batch_size, progress=progress
    )
    names = node_names(graph)
    where = {name: i for i, name in enumerate(names)}
    missing = [n for n in head_nodes if where.get(n) not in graph.rows]
    if missing:
        raise ValueError(
            f"head_nodes {missing} are not explored nodes of this circuit; pass 'target' or ids "
            "of explored features (trace once, then pick from the `nodes` table)."
        )
    pruned = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    tokens = [model.tokenizer.decode([t]) for t in ids.tolist()]
    nodes, edges, gene_table = circuit_tables(graph, pruned, tokens, genes, gene_index, names=names)
    for column, values in edge_split(rm, graph, pruned.edges, tgt).items():
        edges[column] = values
    at = Attributor(rm, tgt, batch_size=batch_size)
    source_genes = np.array([genes[g] if g >= 0 else "" for g in gene_index], dtype=object)[
        graph.position
    ]
    tables = [head_table(n, at.iter_head_rows(where[n]), names, source_genes) for n in head_nodes]
    heads = (
        pd.concat(tables, ignore_index=True) if tables else head_table("", [], names, source_genes)
    )
    scores = dict(pruned.scores)
    scores["target_value"] = float(graph.value[graph.target_node])
    scores["seconds"] = float(time.perf_counter() - t0)
    params = {
        "cell": str(cell),
        "cell_index": int(adata.obs_names.get_loc(cell)),
        "target": dict(target_info),
        "label_token": label_token,
        "max_feature_nodes": int(max_feature_nodes),
        "node_threshold": float(node_threshold),
        "edge_threshold": float(edge_threshold),
        "head_nodes": list(head_nodes),
        "family": rm.arch.family,
        "n_tokens": int(ids.numel()),
        "transcoders_key": key,
        "transcoders_id": transcoders_id(adata, key),
        "sentence_key": sentence_key,
        "model_fingerprint": model.fingerprint,
    }
    circuit = {
        "params": params,
        "nodes": nodes,
        "edges": edges,
        "heads": heads,
        "genes": gene_table,
        "scores": scores,
    }
    # enrichment before anything is written: a failing test leaves adata as it was
    enriched = None
    if sets is not None:
        try:
            enriched = enrich_circuit(adata, record_key, circuit, sets, n_top=n_top)
        except ValueError as err:
            if not auto:
                raise
            logg.warning(f"the circuit is written without enrichment: {err}")
    if copy:
        adata = adata.copy()
    if record_key in adata.uns:
        removed = remove_circuit(adata, record_key)
        logg.info(f"    replaced the circuit {record_key!r}, removed {', '.join(removed)}")
    adata.uns[record_key] = circuit
    if enriched is not None:
        adata.uns[Key.circuit_enrichment(record_key)] = enriched
    logg.info(
        f"    finished: {target_info.get('label') or target}, {int(scores['n_kept_features'])} "
        f"features kept of {int(scores['n_explored_features'])} explored, replacement "
        f"{scores['replacement_score']:.2f}, completeness {scores['completeness_score']:.2f}",
        time=start,
        deep=f"added\n    {record_key!r}, the circuit"
        + (f"\n    {Key.circuit_enrichment(record_key)!r}, its enrichment" if enriched else "")
        + " (adata.uns)",
    )
    return adata if copy else None


#: The gene sets of ``gene_sets="auto"`` (human sentences).
GO_BP = SHIPPED[0]


def _default_gene_sets(organism: str):
    """The shipped GO Biological Process sets for human sentences, else None (logged)."""
    if str(organism).strip().lower() in ("homo sapiens", "human"):
        return load_gene_sets(GO_BP, min_size=1, max_size=10**9)
    logg.info(f"    no gene sets shipped for {organism}: pass gene_sets= to annotate the circuit")
    return None


def _derived(adata: AnnData, key: str) -> str:
    uns, obs = circuit_dependents(adata, key)
    names = [f"adata.uns[{k!r}]" for k in uns] + [f"adata.obs[{c!r}]" for c in obs]
    return ", ".join(names) if names else "nothing else yet"


def _is_feature_node(name: str) -> bool:
    """Whether ``name`` reads like a feature node id ``"L<l>F<j>@<pos>"``."""
    feature, _, pos = str(name).partition("@")
    return pos.isdigit() and is_feature_name(feature)
