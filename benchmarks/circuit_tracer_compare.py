r"""sctranscoder and circuit-tracer side by side: the same model, transcoders and prompt, traced by
both; agreement of matching edges, seconds and peak memory of each.

circuit-tracer runs in an environment of its own (it pins ``transformers<=4.57.3``; see
``circuit_tracer_compare_ct.py`` for how to make it). This script, run with sctranscoder's
environment, writes the inputs (``circuit_tracer_fixture.py``: a random Llama, random
transcoders exported with ``sct.export_circuit_tracer_transcoders``, a cell-sentence prompt that
starts with BOS), runs circuit-tracer's half with ``--ct-python``, runs ours in a process of its
own (so its peak memory is its own), and compares::

    .venv/bin/python benchmarks/circuit_tracer_compare.py --ct-python /tmp/ctvenv/bin/python
    .venv/bin/python benchmarks/circuit_tracer_compare.py --ct-python /tmp/ctvenv/bin/python \
        --topk 8 --out benchmarks/results/circuit_tracer_compare_topk_cpu.json

Compared: the edges into the target and into every feature both sides explored, from every source
circuit-tracer keeps in its adjacency (its explored features, errors and tokens; it drops the
columns of the other active features, which we keep), except sources at position 0
(circuit-tracer zeroes all features at the first position, so its error term there differs from
ours). A missing edge counts as weight 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

HERE = Path(__file__).resolve().parent


def _ours(d: str, max_feature_nodes: int, batch_size: int, threads: int, queue) -> None:
    import numpy as np
    import torch

    import sctranscoder as sct
    from sctranscoder.core.attribution import Target, build_graph, prune
    from sctranscoder.core.circuit import node_names
    from sctranscoder.core.replacement import ReplacementModel

    torch.set_num_threads(threads)
    d = Path(d)
    prompt = json.loads((d / "prompt.json").read_text())
    t0 = time.perf_counter()
    model = sct.load_model(d / "model")
    tset = sct.TranscoderSet.load(d / "transcoders_sct")
    load_s = time.perf_counter() - t0
    rss_loaded = _common.peak_rss_mib()
    ids = torch.tensor(prompt["token_ids"])
    target = Target(kind="logit", token=int(prompt["target_token_id"]), subtract_mean=True)
    t0 = time.perf_counter()
    rm = ReplacementModel(model.model, dict(tset.items()), ids)
    graph = build_graph(rm, target, max_feature_nodes=max_feature_nodes, batch_size=batch_size)
    pruned = prune(graph)
    attr_s = time.perf_counter() - t0
    names = node_names(graph)
    edges = [
        [str(names[s]), str(names[n]), float(row[s])]
        for n, row in graph.rows.items()
        for s in np.flatnonzero(row)
    ]
    queue.put(
        {
            "seconds_load": load_s,
            "seconds_attribution": attr_s,
            "peak_rss_mib_after_load": rss_loaded,
            "peak_rss_mib": _common.peak_rss_mib(),
            "n_active_features": int(pruned.scores["n_active_features"]),
            "n_explored_features": int(pruned.scores["n_explored_features"]),
            "replacement_score": pruned.scores["replacement_score"],
            "completeness_score": pruned.scores["completeness_score"],
            "max_logit_error_vs_hf": rm.check(atol=float("inf")),
            "edges": edges,
        }
    )


def compare(ours: list, theirs: list) -> dict:
    """Agreement of the edges into nodes explored by both sides (sources at position 0 left out)."""
    import numpy as np

    a = {(s, t): w for s, t, w in ours}
    b = {(s, t): w for s, t, w, *_ in theirs}
    rows_a, rows_b = {t for _, t in a}, {t for _, t in b}
    rows = rows_a & rows_b
    # circuit-tracer's adjacency has columns for its explored features, errors and tokens only:
    # our edges from the other active features have no counterpart
    sources_b = {s for s, _ in b} | rows_b
    keys = sorted(
        k for k in set(a) | set(b) if k[1] in rows and k[0] in sources_b and not k[0].endswith("@0")
    )
    unmatched = sum(1 for s, t in a if t in rows and s not in sources_b)
    x = np.array([a.get(k, 0.0) for k in keys])
    y = np.array([b.get(k, 0.0) for k in keys])
    diff = np.abs(x - y)
    scale = float(np.abs(y).max())
    feats_a = {t for t in rows_a if t != "target"}
    feats_b = {t for t in rows_b if t != "target"}
    return {
        "explored_features_ours": len(feats_a),
        "explored_features_circuit_tracer": len(feats_b),
        "explored_features_in_both": len(feats_a & feats_b),
        "rows_compared": len(rows),
        "edges_compared": len(keys),
        "edges_only_ours": sum(k not in b for k in keys),
        "edges_only_circuit_tracer": sum(k not in a for k in keys),
        "edges_ours_from_features_circuit_tracer_leaves_out": unmatched,
        "max_abs_difference": float(diff.max()),
        "median_abs_difference": float(np.median(diff)),
        "max_abs_weight": scale,
        "max_relative_difference": float(diff.max() / scale),
        "pearson_r": float(np.corrcoef(x, y)[0, 1]),
        "fraction_within_1e-5_of_max_weight": float((diff <= 1e-5 * scale).mean()),
        "target_row_max_abs_difference": float(
            max((diff[i] for i, k in enumerate(keys) if k[1] == "target"), default=float("nan"))
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ct-python", type=Path, required=True, help="python of circuit-tracer's env")
    ap.add_argument("--dir", type=Path, default=None, help="where the inputs go (default: tmp)")
    ap.add_argument("--topk", type=int, default=0, help="TopK transcoders with this k (0: ReLU)")
    ap.add_argument("--n-genes", type=int, default=20)
    ap.add_argument("--max-feature-nodes", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=_common.RESULTS / "circuit_tracer_compare_cpu.json")
    args = ap.parse_args()
    _common.snapshot_code()
    d = args.dir or Path(tempfile.mkdtemp(prefix="ct_side_by_side_"))
    fixture = [sys.executable, str(HERE / "circuit_tracer_fixture.py"), "--out", str(d)]
    fixture += ["--topk", str(args.topk), "--n-genes", str(args.n_genes)]
    subprocess.run(fixture, check=True)
    ct = [str(args.ct_python), str(HERE / "circuit_tracer_compare_ct.py"), "--dir", str(d)]
    ct += ["--max-feature-nodes", str(args.max_feature_nodes)]
    ct += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    subprocess.run(ct, check=True)
    theirs = json.loads((d / "circuit_tracer.json").read_text())
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(
        target=_ours, args=(str(d), args.max_feature_nodes, args.batch_size, args.threads, q)
    )
    p.start()
    ours = q.get()
    p.join()
    agreement = compare(ours.pop("edges"), theirs["results"].pop("edges"))
    t = theirs["results"]
    keys = ("seconds_load", "seconds_attribution", "peak_rss_mib_after_load", "peak_rss_mib")
    doc = _common.document(
        "circuit_tracer_compare",
        "cpu",
        args.threads,
        inputs={
            "transcoders": f"TopK k={args.topk}" if args.topk else "ReLU",
            "n_genes": args.n_genes,
            "n_tokens": len(t["input_tokens"]),
            "max_feature_nodes": args.max_feature_nodes,
            "batch_size": args.batch_size,
            "model_config": theirs["inputs"]["model_config"],
        },
        agreement=agreement,
        sctranscoder=ours,
        circuit_tracer={
            **{k: t[k] for k in keys},
            "n_active_features": t["n_active_features"],
            "n_explored_features": t["n_explored_features"],
            "replacement_score": t["replacement_score"],
            "completeness_score": t["completeness_score"],
            "versions": theirs["versions"],
        },
    )
    _common.write(doc, args.out)
    print(json.dumps({"agreement": agreement}, indent=1))
    for side, r in (("sctranscoder", ours), ("circuit-tracer", t)):
        print(
            f"{side:<15} attribution {r['seconds_attribution']:.2f} s, load "
            f"{r['seconds_load']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
