"""The circuit-tracer half of the side-by-side circuit benchmark: its ``attribute`` on CPU, timed,
with every edge written out for comparison with ours.

circuit-tracer pins ``transformers<=4.57.3`` (sctranscoder's environment has 5.x), so it runs in
an environment of its own. Exact commands (CPU torch from the local wheel first, so that pip
never pulls a CUDA build; circuit-tracer 0.5.0 declares ``nnsight>=0.6.0`` but fails to import
with nnsight 0.8.1, ``No module named 'nnsight.intervention.tracing'``, so nnsight is pinned)::

    python3 -m venv /tmp/ctvenv
    /tmp/ctvenv/bin/pip install torch==2.13.0      # the +cpu wheel of the local index
    /tmp/ctvenv/bin/pip install circuit-tracer==0.5.0 nnsight==0.6.3
    /tmp/ctvenv/bin/python -c "import torch; assert torch.__version__.endswith('+cpu')"

    # inputs, with sctranscoder's environment (tiny random Llama, random transcoders, a prompt)
    .venv/bin/python benchmarks/circuit_tracer_fixture.py --out /tmp/ct_side_by_side
    # this script
    /tmp/ctvenv/bin/python benchmarks/circuit_tracer_compare_ct.py --dir /tmp/ct_side_by_side

It reads ``<dir>/model`` (a Hugging Face model saved by ``save_pretrained``), ``<dir>/
transcoders_ct`` (written by ``sct.export_circuit_tracer_transcoders``) and ``<dir>/prompt.json``
(``token_ids``, ``target_token_id``, ``reference_logits``), builds circuit-tracer's
``ReplacementModel`` with its nnsight backend (its TransformerLens backend needs a model name
known to TransformerLens; the nnsight one loads any local directory of a mapped architecture:
Llama, Qwen3, Gemma-2/3, gpt-oss) and runs ``attribute(token_ids, model,
attribution_targets=tensor([target_token_id]))``. The JSON written (``--out``, default
``<dir>/circuit_tracer.json``) holds the seconds (load, attribution), peak resident memory, the
versions, the input tokens actually attributed, the target, circuit-tracer's replacement and
completeness scores, the activation of every explored feature and ``edges``: every non-zero entry of its adjacency matrix, as
``[source, target, weight]`` with nodes named as sctranscoder names them (``"emb@<pos>"``,
``"err L<l>@<pos>"``, ``"L<l>F<j>@<pos>"``, ``"target"``), plus whether circuit-tracer's own
pruning (``prune_graph``, ``--node-threshold``/``--edge-threshold``) keeps it.

For a like-for-like comparison: circuit-tracer zeroes every feature at position 0 (the BOS of
``prompt.json``), and explores at most ``--max-feature-nodes`` features, chosen by its own
influence ranking.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import document, peak_rss_mib, versions, write


def node_names(graph) -> list[str]:
    """The sctranscoder name of every node of a circuit-tracer graph, in adjacency order
    (``Graph``: selected features, errors by layer then position, tokens, logits).
    """
    names = []
    for i in graph.selected_features.tolist():
        layer, pos, feat = graph.active_features[i].tolist()
        names.append(f"L{layer}F{feat}@{pos}")
    n_pos, n_layers = graph.n_pos, graph.cfg.n_layers
    names += [f"err L{la}@{p}" for la in range(n_layers) for p in range(n_pos)]
    names += [f"emb@{p}" for p in range(n_pos)]
    names += ["target" if i == 0 else f"logit{i}" for i in range(len(graph.logit_targets))]
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="output of circuit_tracer_fixture.py")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--max-feature-nodes", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    import torch

    if not torch.__version__.endswith("+cpu") and torch.cuda.is_available():
        print("note: a CUDA build of torch; this benchmark runs on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
    from transformers import AutoModelForCausalLM

    model_dir = (args.dir / "model").resolve()
    tc_dir = (args.dir / "transcoders_ct").resolve()
    prompt = json.loads((args.dir / "prompt.json").read_text())
    ids = torch.tensor(prompt["token_ids"])
    cpu = torch.device("cpu")

    # the same model as the other side? (transformers 4.57 reading a 5.x save, or the reverse)
    ref = prompt["reference_logits"]
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        logits = hf(input_ids=ids[None]).logits[0, -1]
    mismatch = float((logits[ref["token_ids"]] - torch.tensor(ref["values"])).abs().max())
    if mismatch > 1e-3:
        raise SystemExit(f"This environment computes other logits (max diff {mismatch:.2e}).")
    del hf

    t0 = time.perf_counter()
    # circuit-tracer's own loading path: a transcoder "hub reference" that is the absolute path
    # of a directory in its cache layout (config.yaml + layer_<i>.safetensors) is read locally
    transcoders, config = load_transcoder_from_hub(str(tc_dir), device=cpu, dtype=torch.float32)
    extra = config.get("sctranscoder", {})
    if extra.get("activation") == "topk":  # not representable in its files: set by hand
        for tc, k in zip(transcoders, extra["k"], strict=True):
            tc.activation_function = torch.nn.Sequential(torch.nn.ReLU(), TopK(k))
    model = ReplacementModel.from_pretrained_and_transcoders(
        str(model_dir), transcoders, backend="nnsight", device=cpu, dtype=torch.float32
    )
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mib()

    target = int(prompt["target_token_id"])
    t0 = time.perf_counter()
    graph = attribute(
        ids,
        model,
        attribution_targets=torch.tensor([target]),
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
    )
    attr_s = time.perf_counter() - t0
    rss_peak = peak_rss_mib()

    replacement, completeness = compute_graph_scores(graph)
    node_mask, edge_mask, cumulative = prune_graph(graph, args.node_threshold, args.edge_threshold)
    names = node_names(graph)
    adj = graph.adjacency_matrix
    dst, src = adj.nonzero(as_tuple=True)
    edges = [
        [names[s], names[d], float(adj[d, s]), bool(edge_mask[d, s])]
        for d, s in zip(dst.tolist(), src.tolist(), strict=True)
    ]
    doc = document(
        "circuit_tracer_compare_ct",
        "cpu",
        torch.get_num_threads(),
        inputs={
            "dir": str(args.dir),
            "model_config": json.loads((model_dir / "config.json").read_text()),
            "transcoders": config,
            "max_feature_nodes": args.max_feature_nodes,
            "batch_size": args.batch_size,
            "node_threshold": args.node_threshold,
            "edge_threshold": args.edge_threshold,
        },
        results={
            "seconds_load": load_s,
            "seconds_attribution": attr_s,
            "peak_rss_mib_after_load": rss_loaded,
            "peak_rss_mib": rss_peak,
            "reference_logits_max_abs_diff": mismatch,
            "input_tokens": graph.input_tokens.tolist(),
            "target": {
                "token_id": target,
                "token": graph.logit_targets[0].token_str,
                "probability": float(graph.logit_probabilities[0]),
            },
            "n_active_features": int(graph.active_features.shape[0]),
            "n_explored_features": int(graph.selected_features.numel()),
            "explored_feature_activations": dict(
                zip(
                    names[: graph.selected_features.numel()],
                    graph.activation_values[graph.selected_features].tolist(),
                    strict=True,
                )
            ),
            "replacement_score": replacement,
            "completeness_score": completeness,
            "n_nodes_kept": int(node_mask.sum()),
            "n_edges_kept": int(edge_mask.sum()),
            "node_influence_cumulative": {
                names[i]: float(cumulative[i]) for i in node_mask.nonzero().flatten().tolist()
            },
            "edges_columns": ["source", "target", "weight", "kept_by_prune_graph"],
            "edges": edges,
        },
    )
    doc["versions"] = versions("circuit-tracer", "nnsight", "transformer-lens")
    write(doc, args.out or args.dir / "circuit_tracer.json")
    print(
        f"circuit-tracer: {len(ids)} tokens, {graph.active_features.shape[0]} active features, "
        f"{graph.selected_features.numel()} explored, {len(edges)} edges "
        f"({int(edge_mask.sum())} kept); load {load_s:.2f} s, attribution {attr_s:.2f} s, "
        f"peak RSS {rss_peak:.0f} MiB; replacement {replacement:.3f}, completeness "
        f"{completeness:.3f}"
    )


if __name__ == "__main__":
    main()
