"""Circuits and transcoders in the formats of circuit-tracer (decoderesearch/circuit-tracer 0.5.0).

Two exports, so that circuit-tracer's frontend opens our circuits and its replacement model runs
our transcoders:

* a **graph JSON** file, ``<slug>.json``, as written by its
  ``circuit_tracer.utils.create_graph_files.create_graph_files`` and validated by its pydantic
  models (``circuit_tracer/frontend/graph_models.py``: ``Model`` = ``metadata`` + ``qParams`` +
  ``nodes`` + ``links``), listed in the ``graph-metadata.json`` of the directory its
  ``circuit_tracer.frontend.local_server.serve(data_dir)`` serves;
* a **transcoder directory** in the layout of its local cache
  (``circuit_tracer/utils/caching.py``): ``config.yaml`` (``model_kind: transcoder_set``,
  ``model_name``, ``feature_input_hook``, ``feature_output_hook``, ``scan``) and one
  ``layer_<i>.safetensors`` per layer with ``W_enc`` ``(n_features, d_model)``, ``W_dec``
  ``(n_features, d_model)``, ``b_enc``, ``b_dec`` and optionally ``W_skip`` ``(d_model,
  d_model)``, read by ``circuit_tracer.transcoder.single_layer_transcoder.load_relu_transcoder``
  (``f = relu(x W_enc^T + b_enc)``, ``y = f W_dec + b_dec (+ x W_skip^T)``: our layout, so no
  transposition).

The converters (:func:`graph_document`, :func:`check_graph_document`, :func:`transcoder_tensors`,
:func:`transcoder_config`) work on tables, dicts and numpy arrays only; the public functions read
the AnnData, convert, check and write atomically.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scanpy import logging as logg

from ._constants import Key, NodeType, feature_name
from .core.files import atomic_directory, write_text_atomic

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence

    import pandas as pd
    from anndata import AnnData

    from .core.model import C2SModel
    from .core.transcoder_set import TranscoderSet

#: circuit-tracer's ``feature_type`` of each of our node types.
FEATURE_TYPES = {
    NodeType.EMBEDDING.label: "embedding",
    NodeType.ERROR.label: "mlp reconstruction error",
    NodeType.FEATURE.label: "cross layer transcoder",
    NodeType.TARGET.label: "logit",
}
#: The file of a directory served by circuit-tracer that lists its graphs.
GRAPH_INDEX = "graph-metadata.json"
#: circuit-tracer's transcoder config and layer files.
CONFIG_YAML = "config.yaml"
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: Longest slug: ``.<slug>.json.tmp-<8 hex>`` (the temporary file) stays within 255 bytes.
MAX_SLUG = 200
#: Hook names of circuit-tracer (TransformerLens names; its nnsight backend maps them per
#: architecture in ``circuit_tracer/utils/tl_nnsight_mapping.py``): our transcoders read what the
#: MLP module reads and write what it adds to the residual stream.
INPUT_HOOK = "mlp.hook_in"
OUTPUT_HOOKS = {"gemma2": "hook_mlp_out"}  # Gemma-2: the post-feedforward norm's output
OUTPUT_HOOK = "mlp.hook_out"
#: The config.yaml entry with what circuit-tracer's loader ignores but a user must know.
EXTRA_KEY = "sctranscoder"


# -- graph: pure conversion -----------------------------------------------------------------------


def cantor_pairing(x: int, y: int) -> int:
    """circuit-tracer's ``feature`` number of feature ``y`` of layer ``x``.

    Its ``frontend/graph_models.py::_cantor_pairing``.
    """
    return (x + y) * (x + y + 1) // 2 + y


def _quote_free(text: str) -> str:
    # the frontend reads a logit's token as the text between its clerp's first two '"'
    return str(text).replace('"', "'")


def graph_document(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    *,
    token_ids: Sequence[int],
    tokens: Sequence[str],
    n_layers: int,
    vocab_size: int,
    target: Mapping,
    token_prob: float,
    slug: str,
    scan: str,
    prompt: str,
    feature_labels: Mapping[str, str] | None = None,
) -> dict:
    """A circuit's node and edge tables as circuit-tracer's graph JSON document (a dict).

    Parameters
    ----------
    nodes, edges
        The ``nodes`` and ``edges`` tables of a circuit record (see
        :func:`sctranscoder.tl.trace_circuit`).
    token_ids, tokens
        Every token of the prompt (ids and decoded strings).
    n_layers
        Layers of the model (circuit-tracer puts logits on layer ``n_layers + 1``).
    vocab_size
        Vocabulary size: a feature target becomes a logit node with the virtual index
        ``vocab_size``, as circuit-tracer numbers custom targets.
    target
        ``params["target"]`` of the circuit record.
    token_prob
        The model's probability of the target token (1.0 for a feature target).
    slug, scan, prompt
        ``metadata`` fields.
    feature_labels
        Optional label per feature name (``"L2F17"``), added to its ``clerp``.

    Returns
    -------
    ``{"metadata", "qParams", "nodes", "links"}`` (see :func:`export_circuit_tracer_graph`).
    """
    n_pos = len(tokens)
    if len(token_ids) != n_pos:
        raise ValueError(f"{len(token_ids)} token ids for {n_pos} tokens.")
    labels = dict(feature_labels or {})
    types = nodes["type"].astype(str)
    unknown = sorted(set(types) - set(FEATURE_TYPES))
    if unknown:
        raise ValueError(f"Unknown node types {unknown}; expected {sorted(FEATURE_TYPES)}.")
    if (types == "target").sum() != 1:
        raise ValueError("A circuit has exactly one target node.")
    pos = nodes["position"].astype(int).to_numpy()
    if pos.size and not ((pos >= 0) & (pos < n_pos)).all():
        raise ValueError(f"Node positions fall outside the prompt's {n_pos} tokens.")

    # influence as circuit-tracer stores it: the node's cumulative share of influence, nodes
    # sorted by influence (0 < value <= 1; the frontend's pruning slider keeps nodes <= its value)
    inf = nodes["influence"].astype(float).to_numpy()
    scored = np.flatnonzero(types.to_numpy() != "target")
    cumulative = np.full(len(nodes), np.nan)
    if scored.size:
        order = scored[np.argsort(-inf[scored], kind="stable")]
        total = inf[order].sum()
        share = np.cumsum(inf[order]) / total if total > 0 else np.ones(order.size)
        cumulative[order] = np.minimum(share, 1.0)

    feature_ids = {
        f"{int(r.layer)}_{int(r.feature)}_{int(r.position)}"
        for r in nodes[types == "feature"].itertuples()
    }
    out, ids = [], {}
    for i, (name, r) in enumerate(nodes.iterrows()):
        kind, layer, p = str(r["type"]), int(r["layer"]), int(r["position"])
        tok = str(tokens[p])
        gene = r.get("gene", "")
        gene = gene if isinstance(gene, str) else ""  # NaN where a table lost its strings
        on = f" · {gene}" if gene else ""
        influence = None if kind == "target" else float(cumulative[i])
        node = {
            "feature_type": FEATURE_TYPES[kind],
            "ctx_idx": p,
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "influence": influence,
            "activation": None,
        }
        if kind == "feature":
            j = int(r["feature"])
            fname = feature_name(layer, j)
            label = f" ({labels[fname]})" if labels.get(fname) else ""
            node.update(
                node_id=f"{layer}_{j}_{p}",
                feature=cantor_pairing(layer, j),
                layer=str(layer),
                jsNodeId=f"{layer}_{j}-0",
                clerp=f"{fname}{label}{on}",
                activation=float(r["activation"]),
            )
        elif kind == "error":
            node_id = f"0_{layer}_{p}"
            if node_id in feature_ids:  # circuit-tracer's error ids can equal a layer-0 feature's
                node_id += "_error"
            node.update(
                node_id=node_id,
                feature=-1,
                layer=str(layer),
                jsNodeId=f"{layer}_{p}-0",
                clerp=f'Err: mlp "{_quote_free(tok)}"{on}',
            )
        elif kind == "embedding":
            vocab = int(token_ids[p])
            node.update(
                node_id=f"E_{vocab}_{p}",
                feature=p,
                layer="E",
                jsNodeId=f"E_{vocab}-{p}",
                clerp=f'Emb: "{_quote_free(tok)}"{on}',
            )
        else:
            node.update(_logit_node(target, n_layers, vocab_size, token_prob, p, tok))
        ids[str(name)] = node["node_id"]
        out.append(node)

    missing = sorted(set(edges["source"].astype(str)).union(edges["target"].astype(str)) - set(ids))
    if missing:
        raise ValueError(f"Edges name nodes missing from the node table: {missing[:5]}.")
    links = [
        {"source": ids[str(s)], "target": ids[str(t)], "weight": float(w)}
        for s, t, w in zip(edges["source"], edges["target"], edges["weight"], strict=True)
    ]
    target_id = next(n["node_id"] for n in out if n["feature_type"] == "logit")
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": [],
            "prompt_tokens": [str(t) for t in tokens],
            "prompt": prompt,
            # the slider's maximum: 1.0 shows every exported node
            "node_threshold": 1.0,
            "schema_version": 1,
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": target_id,
            "sg_pos": "",
        },
        "nodes": out,
        "links": links,
    }


def _logit_node(
    target: Mapping, n_layers: int, vocab_size: int, token_prob: float, pos: int, tok: str
) -> dict:
    """circuit-tracer's logit node (``Node.logit_node``) for our target."""
    kind = str(target.get("kind", ""))
    if kind == "logit":
        vocab = int(target["token_id"])
        shown = str(target.get("token", tok))
        label = str(target.get("label", ""))
        prefix = str(target.get("answer_prefix", ""))
        about = f" of {label}" + (f' after "{_quote_free(prefix)}"' if prefix else "")
    elif kind == "feature":
        vocab = int(vocab_size)  # circuit-tracer's virtual index of a custom target
        shown = feature_name(int(target["layer"]), int(target["feature"]))
        about = " pre-activation"
    else:
        raise ValueError(f"Unknown target kind {kind!r}; expected 'logit' or 'feature'.")
    layer = str(n_layers + 1)
    return {
        "node_id": f"{layer}_{vocab}_{pos}",
        "feature": vocab,
        "layer": layer,
        "token_prob": float(token_prob),
        "is_target_logit": True,
        "jsNodeId": f"L_{vocab}-{pos}",
        # the frontend reads the token between the first two '"' and the probability after "(p="
        "clerp": f'Output "{_quote_free(shown)}" (p={token_prob:.3f}){about}',
    }


#: Fields of circuit-tracer's pydantic models (``frontend/graph_models.py``): name -> (types,
#: required). ``float`` fields accept ints, as pydantic does.
_METADATA = {
    "slug": ((str,), True),
    "scan": ((str,), True),
    "transcoder_list": ((list,), True),
    "prompt_tokens": ((list,), True),
    "prompt": ((str,), True),
    "node_threshold": ((float, int, type(None)), False),
    "schema_version": ((int, type(None)), False),
}
_QPARAMS = {
    "pinnedIds": ((list,), True),
    "supernodes": ((list,), True),
    "linkType": ((str,), True),
    "clickedId": ((str,), True),
    "sg_pos": ((str,), True),
}
_NODE = {
    "node_id": ((str,), True),
    "feature": ((int,), True),
    "layer": ((str,), True),
    "ctx_idx": ((int,), True),
    "feature_type": ((str,), True),
    "token_prob": ((float, int), False),
    "is_target_logit": ((bool,), False),
    "run_idx": ((int,), False),
    "reverse_ctx_idx": ((int,), False),
    "jsNodeId": ((str,), True),
    "clerp": ((str,), False),
    "influence": ((float, int, type(None)), False),
    "activation": ((float, int, type(None)), False),
}
_LINK = {"source": ((str,), True), "target": ((str,), True), "weight": ((float, int), True)}


def _check_fields(obj: object, spec: dict, where: str, problems: list[str]) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where} is not an object")
        return
    for name, (types, required) in spec.items():
        if name not in obj:
            if required:
                problems.append(f"{where} lacks {name!r}")
            continue
        value = obj[name]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            problems.append(
                f"{where}[{name!r}] = {value!r} is not {'/'.join(t.__name__ for t in types)}"
            )


def check_graph_document(doc: Mapping) -> None:
    """Check ``doc`` against circuit-tracer 0.5.0's graph ``Model`` and what its frontend reads.

    The pydantic models' fields and types (``frontend/graph_models.py``), plus: node ids unique,
    every link between known nodes, every logit's ``clerp`` with ``(p=`` (the frontend parses it),
    ``layer`` ``"E"`` exactly for embeddings and a number otherwise, ``ctx_idx`` within the prompt,
    numbers finite. Raises ``ValueError`` listing the problems.
    """
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ValueError("A graph document is a dict.")
    for part in ("metadata", "qParams", "nodes", "links"):
        if part not in doc:
            problems.append(f"no {part!r}")
    if problems:
        raise ValueError(f"Not a circuit-tracer graph: {'; '.join(problems)}.")
    _check_fields(doc["metadata"], _METADATA, "metadata", problems)
    _check_fields(doc["qParams"], _QPARAMS, "qParams", problems)
    meta = doc["metadata"] if isinstance(doc["metadata"], dict) else {}
    tokens = meta.get("prompt_tokens", [])
    if not all(isinstance(t, str) for t in tokens):
        problems.append("metadata['prompt_tokens'] holds non-strings")
    seen: set[str] = set()
    for i, node in enumerate(doc["nodes"]):
        _check_fields(node, _NODE, f"nodes[{i}]", problems)
        if not isinstance(node, dict) or "node_id" not in node:
            continue
        nid = node["node_id"]
        if nid in seen:
            problems.append(f"node id {nid!r} is repeated")
        seen.add(nid)
        kind, layer = node.get("feature_type"), node.get("layer")
        if kind not in FEATURE_TYPES.values():
            problems.append(f"nodes[{i}] has feature_type {kind!r}")
        if (layer == "E") != (kind == "embedding") or (layer != "E" and not str(layer).isdigit()):
            problems.append(f"nodes[{i}] ({kind}) has layer {layer!r}")
        if kind == "logit" and "(p=" not in str(node.get("clerp", "")):
            problems.append(f"logit nodes[{i}] has no '(p=' in its clerp")
        if isinstance(node.get("ctx_idx"), int) and not 0 <= node["ctx_idx"] < len(tokens):
            problems.append(f"nodes[{i}] has ctx_idx {node['ctx_idx']} outside the prompt")
    for i, link in enumerate(doc["links"]):
        _check_fields(link, _LINK, f"links[{i}]", problems)
        if isinstance(link, dict):
            for end in ("source", "target"):
                if end in link and link[end] not in seen:
                    problems.append(f"links[{i}][{end!r}] = {link[end]!r} is not a node")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError(f"Invalid circuit-tracer graph: {'; '.join(problems[:10])}{more}.")


# -- graph: from an AnnData -----------------------------------------------------------------------


def export_circuit_tracer_graph(
    adata: AnnData,
    path: str | os.PathLike,
    *,
    circuit: str,
    model: C2SModel | str | None = None,
    annotation_key: str | None = None,
    slug: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a traced circuit as circuit-tracer graph JSON, for its frontend.

    ``path`` is the directory circuit-tracer serves (``from circuit_tracer.frontend.local_server
    import serve; serve(data_dir=path)``): the graph goes to ``<path>/<slug>.json`` and is listed
    in ``<path>/graph-metadata.json`` (other graphs listed there are kept). The document is
    checked against circuit-tracer 0.5.0's pydantic ``Model`` (and what its frontend parses)
    before anything is written; each file is written to a temporary name and renamed into place.

    What maps exactly: nodes and their ids (``"{layer}_{feature}_{pos}"`` for features,
    ``"0_{layer}_{pos}"`` for errors, ``"E_{token id}_{pos}"`` for embeddings,
    ``"{n_layers + 1}_{token id}_{pos}"`` for the target logit), ``feature_type``, ``layer``
    (``"E"`` for embeddings), ``ctx_idx``, a feature's ``feature`` (circuit-tracer's Cantor
    pairing of layer and index) and ``activation``, and every kept edge with its weight (the
    direct effect, as in circuit-tracer's adjacency matrix).

    What is approximated or ours:

    - ``influence``: circuit-tracer stores a node's cumulative share of influence over the whole
      unpruned graph; the circuit record keeps only the pruned nodes, so here it is the
      cumulative share within the exported circuit (nodes sorted by our influence on the target;
      in ``(0, 1]``, smaller is more influential) and ``metadata.node_threshold`` is 1.0, so the
      frontend's pruning slider starts with every node shown.
    - ``clerp`` (the label shown): for features their name ``"L<l>F<j>"``, the annotation term
      with ``annotation_key``, and the gene at the node's token; for errors and embeddings the
      token and gene; for the target ``Output "<token>" (p=<probability>) of <label> after
      "<answer prefix>"``. circuit-tracer's own feature descriptions and activation examples
      (fetched by its frontend from its servers) do not exist for our features.
    - The target: a logit target becomes a logit node with ``is_target_logit`` and the model's
      probability of the token (one forward pass of the prompt). A feature target (``"L2F17"``)
      becomes a logit node with the virtual index ``vocab_size`` (circuit-tracer's numbering of
      custom targets), probability 1 and its name in ``clerp``, drawn at the top like a logit.
    - An error node whose circuit-tracer id would equal that of a kept layer-0 feature (``"0_3_5"``
      is both error 3@5 and feature L0F3@5 in circuit-tracer) gets the suffix ``"_error"``.
    - ``metadata.scan`` is ``"<model name>@<fingerprint>"`` (the same as
      :func:`export_circuit_tracer_transcoders`' default), ``transcoder_list`` is empty and
      ``qParams`` selects the target (``clickedId``), with nothing pinned or grouped.

    Parameters
    ----------
    adata
        Annotated data with a traced circuit (:func:`sctranscoder.tl.trace_circuit`) and the
        transcoders it was traced with.
    path
        The directory served to circuit-tracer's frontend (created if missing).
    circuit
        The circuit's key in ``adata.uns`` (or its cell's name).
    model
        The base model. The circuit record keeps the tokens of its nodes only, so the prompt is
        tokenised again (and checked against them), and the target's probability is computed.
        Default: the model recorded with the transcoders (fingerprint checked).
    annotation_key
        ``adata.uns`` key of a feature annotation (:func:`sctranscoder.tl.annotate_features`)
        whose terms are added to the features' labels.
    slug
        The graph's name in the frontend and file (letters, digits, ``.``, ``_``, ``-``; at most
        200 characters; default: the circuit's key with other characters replaced by ``_``).
    overwrite
        Replace an existing ``<slug>.json``.

    Returns
    -------
    The path of the graph file. The file holds ``metadata`` (``slug``, ``scan``,
    ``transcoder_list``, ``prompt_tokens``, ``prompt``, ``node_threshold``, ``schema_version``),
    ``qParams`` (``pinnedIds``, ``supernodes``, ``linkType``, ``clickedId``, ``sg_pos``),
    ``nodes`` (``node_id``, ``feature``, ``layer``, ``ctx_idx``, ``feature_type``,
    ``token_prob``, ``is_target_logit``, ``run_idx``, ``reverse_ctx_idx``, ``jsNodeId``,
    ``clerp``, ``influence``, ``activation``) and ``links`` (``source``, ``target``,
    ``weight``).
    """
    from ._records import circuit_record, record, resolve_model, transcoder_record

    name, rec = circuit_record(adata, circuit)
    params = dict(rec.get("params", {}))
    if "cell" not in params or "target" not in params:
        raise ValueError(f"adata.uns[{name!r}] records no cell or target; trace it again.")
    slug = _check_slug(slug if slug is not None else re.sub(r"[^A-Za-z0-9._-]", "_", name))
    out_dir = Path(path)
    if out_dir.suffix == ".json":
        raise ValueError(
            f"path={str(path)!r} names a file: pass the directory that circuit-tracer's frontend "
            f"serves; the graph is written there as {slug}.json."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory.")
    graph_file = out_dir / f"{slug}.json"
    if graph_file.exists() and not overwrite:
        raise FileExistsError(f"{graph_file} exists: pass overwrite=True to replace it.")
    index = _read_graph_index(out_dir / GRAPH_INDEX)
    key = str(params.get("transcoders_key", Key.transcoders))
    model_rec = dict(transcoder_record(adata, key)["model"])
    labels = None
    if annotation_key is not None:
        ann = record(
            adata, annotation_key, kind="annotation", hint="run `sct.tl.annotate_features`."
        )
        labels = _feature_labels(ann, rec["nodes"])
    model = resolve_model(adata, key, model)
    ids, tokens, prob = _prompt(adata, model, params, rec["nodes"], name)
    target = dict(params["target"])
    doc = graph_document(
        rec["nodes"],
        rec["edges"],
        token_ids=ids,
        tokens=tokens,
        n_layers=model.n_layers,
        vocab_size=int(model.model.config.vocab_size),
        target=target,
        token_prob=prob,
        slug=slug,
        scan=default_scan(model_rec),
        prompt=model.tokenizer.decode(ids),
        feature_labels=labels,
    )
    check_graph_document(doc)
    text = json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False)
    index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug] + [doc["metadata"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        graph_file, text + "\n"
    )  # the graph first: the index never lists a missing one
    write_text_atomic(out_dir / GRAPH_INDEX, json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    logg.info(
        f"wrote circuit {name!r} as circuit-tracer graph {graph_file}",
        deep=f"{len(doc['nodes'])} nodes, {len(doc['links'])} links; listed in "
        f"{out_dir / GRAPH_INDEX}",
    )
    return graph_file


def _check_slug(slug: object) -> str:
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
        raise ValueError(
            f"slug must be letters, digits, '.', '_' or '-' (not starting with '.', '_' or '-'), "
            f"got {slug!r}."
        )
    if len(slug) > MAX_SLUG:  # <slug>.json and its temporary name must fit a file name
        raise ValueError(
            f"slug is {len(slug)} characters long; file names allow at most {MAX_SLUG}: pass a "
            "shorter slug= (the default is the circuit's key)."
        )
    return slug


def default_scan(model_record: Mapping, fallback: str = "") -> str:
    """The ``scan`` (transcoder set identifier) of our exports: ``"<model name>@<fingerprint>"``."""
    name = str(model_record.get("name") or fallback or "sctranscoder")
    fp = model_record.get("fingerprint")
    return f"{name}@{fp}" if fp else name


def _read_graph_index(file: Path) -> dict:
    """The existing ``graph-metadata.json`` (or an empty one), refused when malformed."""
    if not file.exists():
        return {"graphs": []}
    try:
        index = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); move it away first.") from err
    if not isinstance(index, dict) or not isinstance(index.get("graphs"), list):
        raise ValueError(f"{file} is not a circuit-tracer graph index ({{'graphs': [...]}}).")
    return index


def _feature_labels(ann: dict, nodes: pd.DataFrame) -> dict[str, str]:
    """The annotation term (ORA, else GSEA) of each feature of ``nodes`` that has one."""
    feats = nodes[nodes["type"].astype(str) == "feature"]
    out = {}
    tables = ann.get("features", {})
    for layer, j in zip(feats["layer"].astype(int), feats["feature"].astype(int), strict=True):
        table = tables.get(Key.layer(layer))
        fname = feature_name(layer, j)
        if table is None or fname not in table.index:
            continue
        row = table.loc[fname]
        for col in ("ora_term", "gsea_term"):
            term = str(row.get(col, "") or "")
            if term and term != "nan":
                out[fname] = term
                break
    return out


def _prompt(
    adata: AnnData, model: C2SModel, params: dict, nodes: pd.DataFrame, name: str
) -> tuple[list[int], list[str], float]:
    """Token ids and strings of the circuit's prompt (checked against its nodes), and the model's
    probability of the target token.
    """
    import torch

    from ._records import cell_prompts
    from .core.targets import label_tokens, teacher_forced

    cell = str(params["cell"])
    if cell not in adata.obs_names:
        raise KeyError(f"The cell {cell!r} of adata.uns[{name!r}] is not in adata.obs_names.")
    sentence_key = str(params.get("sentence_key", Key.sentence))
    (genes,), model = cell_prompts(adata[[cell]], sentence_key, model)
    n_tokens = int(params["n_tokens"])
    n_prompt = int(model.tokenize([genes]).lengths[0])
    target = dict(params["target"])
    answer = []
    if target.get("kind") == "logit" and n_tokens > n_prompt:
        answer = label_tokens(model, str(target["label"]))[: n_tokens - n_prompt]
    ids, _ = teacher_forced(model, genes, answer)
    tokens = [model.tokenizer.decode([t]) for t in ids.tolist()]
    stale = len(tokens) != n_tokens or any(
        tokens[int(p)] != str(t)
        for p, t in zip(nodes["position"], nodes["token"], strict=True)
        if int(p) < len(tokens)
    )
    if stale:
        raise ValueError(
            f"The prompt of cell {cell!r} (adata.obs[{sentence_key!r}] with this model) is not "
            f"the one adata.uns[{name!r}] was traced on: trace it again."
        )
    prob = 1.0
    if target.get("kind") == "logit":
        with torch.no_grad():
            logits = model.model(input_ids=ids[None].to(model.device)).logits[0, -1].float()
        prob = float(logits.softmax(-1)[int(target["token_id"])])
    return [int(t) for t in ids.tolist()], tokens, prob


# -- transcoders ----------------------------------------------------------------------------------


def transcoder_tensors(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One layer's weights in circuit-tracer's safetensors layout (float32, contiguous).

    Ours already are: ``W_enc`` ``(n_features, d_model)``, ``W_dec`` ``(n_features, d_model)``,
    ``b_enc`` ``(n_features,)``, ``b_dec`` ``(d_model,)`` and ``W_skip`` ``(d_model, d_model)``
    applied as ``x W_skip^T``, as in circuit-tracer's ``SingleLayerTranscoder``; shapes checked.
    """
    names = {"W_enc", "W_dec", "b_enc", "b_dec"}
    missing = sorted(names - set(weights))
    unknown = sorted(set(weights) - names - {"W_skip"})
    if missing or unknown:
        raise ValueError(f"Transcoder weights: missing {missing}, unexpected {unknown}.")
    out = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in weights.items()}
    n, d = out["W_enc"].shape
    expected = {"W_enc": (n, d), "W_dec": (n, d), "b_enc": (n,), "b_dec": (d,), "W_skip": (d, d)}
    bad = [
        f"{k} {v.shape} (expected {expected[k]})" for k, v in out.items() if v.shape != expected[k]
    ]
    if bad:
        raise ValueError(
            "circuit-tracer's transcoders map d_model to d_model; got " + ", ".join(bad) + "."
        )
    return out


def transcoder_config(
    *,
    model_name: str,
    feature_input_hook: str,
    feature_output_hook: str,
    scan: str,
    extra: Mapping | None = None,
) -> dict:
    """circuit-tracer's ``config.yaml`` of a per-layer transcoder set, as a dict."""
    doc = {
        "model_kind": "transcoder_set",
        "model_name": model_name,
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
        "scan": scan,
    }
    if extra:
        doc[EXTRA_KEY] = dict(extra)
    return doc


def export_circuit_tracer_transcoders(
    transcoders: TranscoderSet | AnnData,
    path: str | os.PathLike,
    *,
    model_name: str,
    key: str = Key.transcoders,
    feature_input_hook: str = INPUT_HOOK,
    feature_output_hook: str | None = None,
    scan: str | None = None,
    allow_topk: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write transcoders as a circuit-tracer transcoder directory.

    The directory has circuit-tracer's local-cache layout (``circuit_tracer/utils/caching.py``):
    ``config.yaml`` and ``layer_<i>.safetensors`` for layers ``0..n_layers - 1``, with ``W_enc``,
    ``W_dec``, ``b_enc``, ``b_dec`` (and ``W_skip``) in float32, laid out as circuit-tracer's
    ``SingleLayerTranscoder`` reads them (our own layout; nothing is transposed). Load it in
    circuit-tracer with its absolute path, e.g.
    ``circuit_tracer.utils.caching.load_transcoders_from_cache(str(path.resolve()))`` or
    ``ReplacementModel.from_pretrained(model_name, str(path.resolve()), backend="nnsight")``. It is
    written to a temporary sibling and renamed into place: nothing is ever half-written.

    **Activation.** circuit-tracer's loader (``load_relu_transcoder``) knows two activations:
    ReLU, and JumpReLU when the file holds ``activation_function.threshold``. ReLU transcoders
    map exactly. Our TopK (keep the ``k`` largest ReLU pre-activations per token) has no
    representation in its files or config (a ``TopK`` module exists in
    ``circuit_tracer/transcoder/activation_functions.py`` but no loader builds it, and it selects
    before the ReLU), so loading TopK weights as they are would silently give ReLU transcoders
    with far more active features. TopK sets are refused unless ``allow_topk=True``; then the
    weights are written with ``config.yaml`` recording ``sctranscoder: {activation: topk, k:
    [k per layer]}``, and after loading, each layer's activation must be set by hand::

        from circuit_tracer.transcoder.activation_functions import TopK

        for tc, k in zip(transcoder_set, config["sctranscoder"]["k"]):
            tc.activation_function = torch.nn.Sequential(torch.nn.ReLU(), TopK(k))

    which is exactly ours.

    **Hooks.** Our transcoders read the MLP module's input (after its norm) and write what the
    MLP adds to the residual stream: circuit-tracer's ``"mlp.hook_in"`` and ``"mlp.hook_out"``
    (``"hook_mlp_out"`` for Gemma-2, after its post-feedforward norm). Its nnsight backend
    (0.5.0) maps them for Llama, Qwen3, Gemma-3 and gpt-oss; it has no mapping for GPT-NeoX
    (Pythia, C2S-Pythia) and none of ``"mlp.hook_in"`` for Gemma-2, whose models it runs only
    with its TransformerLens backend (which needs a model name known to TransformerLens).
    circuit-tracer zeroes every feature at position 0 (where it expects a BOS token).

    Parameters
    ----------
    transcoders
        A :class:`~sctranscoder.core.transcoder_set.TranscoderSet` (e.g. from
        :func:`sctranscoder.get.transcoders`), or an AnnData whose ``adata.uns[key]`` holds them.
        It must cover every layer ``0..n_layers - 1`` (circuit-tracer replaces every MLP), with
        one number of features, ``d_in == d_out`` and a skip connection on all layers or none.
    path
        The directory to write (must not exist unless ``overwrite``).
    model_name
        What circuit-tracer loads the base model from (``config.yaml``'s ``model_name``): a hub id
        or a local directory.
    key
        ``adata.uns`` key of the transcoders, when ``transcoders`` is an AnnData.
    feature_input_hook, feature_output_hook
        circuit-tracer's hook names (default: see **Hooks**).
    scan
        circuit-tracer's identifier of the transcoder set (default ``"<model name>@<fingerprint>"``
        of the recorded base model, as in :func:`export_circuit_tracer_graph`).
    allow_topk
        Write TopK transcoders (see **Activation**).
    overwrite
        Replace an existing circuit-tracer transcoder directory at ``path``.

    Returns
    -------
    The directory.
    """
    from .core.transcoder_set import TranscoderSet

    if not isinstance(transcoders, TranscoderSet):
        from anndata import AnnData

        from ._records import transcoder_set

        if not isinstance(transcoders, AnnData):
            raise TypeError(
                f"transcoders must be a TranscoderSet or an AnnData, got {type(transcoders).__name__}."
            )
        transcoders = transcoder_set(transcoders, key)
    tset = transcoders
    if not isinstance(model_name, str) or not model_name.strip():
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}.")
    for value, what in ((feature_input_hook, "input"), (feature_output_hook, "output")):
        if (value is not None or what == "input") and (not isinstance(value, str) or not value):
            raise ValueError(f"feature_{what}_hook must be a non-empty string, got {value!r}.")
    configs = {la: tc.config for la, tc in tset.items()}
    n_layers = int(tset.model.get("n_layers", max(configs) + 1))
    missing = sorted(set(range(n_layers)) - set(configs))
    extra_layers = sorted(set(configs) - set(range(n_layers)))
    if missing or extra_layers:
        raise ValueError(
            f"circuit-tracer replaces every MLP layer 0..{n_layers - 1}: transcoders are missing "
            f"for layers {missing}"
            + (f" and layers {extra_layers} exceed it" if extra_layers else "")
            + ". Train them with `sct.tl.train_transcoders(adata, model)` (all layers)."
        )
    first = configs[0]
    for la, c in configs.items():
        if c.d_in != c.d_out:
            raise ValueError(
                f"Layer {la} maps {c.d_in} to {c.d_out}; circuit-tracer needs d_in == d_out."
            )
        if (c.n_features, c.skip, c.activation) != (first.n_features, first.skip, first.activation):
            raise ValueError(
                "circuit-tracer needs one number of features, skip connection and activation "
                f"on every layer; layer {la} has {c.n_features}, skip={c.skip}, {c.activation} and "
                f"layer 0 {first.n_features}, skip={first.skip}, {first.activation}."
            )
    extra = {"format": "sctranscoder.circuit_tracer/1", "activation": first.activation}
    if first.activation == "topk":
        if not allow_topk:
            raise ValueError(
                "These are TopK transcoders, which circuit-tracer's loader cannot represent (it "
                "builds ReLU or JumpReLU only, and would silently run them as ReLU). Pass "
                "allow_topk=True to write them anyway and set each loaded layer's "
                "activation_function to Sequential(ReLU(), TopK(k)) yourself (see the docstring), "
                "or export ReLU transcoders (`sct.tl.train_transcoders(..., activation='relu')`)."
            )
        extra["k"] = [int(configs[la].k) for la in range(n_layers)]
    if tset.model.get("fingerprint"):
        extra["model"] = str(tset.model.get("name", ""))
        extra["model_fingerprint"] = str(tset.model["fingerprint"])
    output_hook = feature_output_hook or OUTPUT_HOOKS.get(
        str(tset.model.get("architecture", "")), OUTPUT_HOOK
    )
    config = transcoder_config(
        model_name=model_name,
        feature_input_hook=feature_input_hook,
        feature_output_hook=output_hook,
        scan=scan if scan is not None else default_scan(tset.model, model_name),
        extra=extra,
    )
    tensors = {la: transcoder_tensors(tset[la].to_numpy()) for la in range(n_layers)}
    out = _write_transcoder_dir(Path(path), tensors, config, overwrite=overwrite)
    logg.info(
        f"wrote {n_layers} transcoders for circuit-tracer to {out}",
        deep=f"config.yaml and layer_0..{n_layers - 1}.safetensors ({first.activation})",
    )
    return out


def _is_export_dir(path: Path) -> bool:
    """Whether ``path`` holds a circuit-tracer transcoder directory and nothing else."""
    names = {p.name for p in path.iterdir()}
    if CONFIG_YAML not in names or any(
        n != CONFIG_YAML and not _LAYER_FILE.fullmatch(n) for n in names
    ):
        return False
    import yaml

    try:
        doc = yaml.safe_load((path / CONFIG_YAML).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and doc.get("model_kind") == "transcoder_set"


def _write_transcoder_dir(
    path: Path, tensors: dict[int, dict[str, np.ndarray]], config: dict, *, overwrite: bool
) -> Path:
    import yaml
    from safetensors.numpy import save_file

    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists: pass overwrite=True to replace it, or choose another."
        )
    if path.exists() and (not path.is_dir() or not _is_export_dir(path)):
        raise FileExistsError(
            f"{path} exists and is not a circuit-tracer transcoder directory (config.yaml and "
            "layer files only): overwrite=True replaces only those. Choose a new directory."
        )
    with atomic_directory(path) as tmp:
        for layer, arrays in tensors.items():
            save_file(arrays, str(tmp / f"layer_{layer}.safetensors"))
        (tmp / CONFIG_YAML).write_text(yaml.safe_dump(config, sort_keys=False))
    return path
