"""Seconds and peak memory per traced circuit.

Cases: the embedded model (transcoders trained here on pbmc68k_reduced); randomly initialised
models of the real C2S-Pythia-410m architecture at 4 and at its full 24 layers (random
transcoders, expansion 8, k 32; the real Pythia tokenizer from ../shared); and of the real
C2S-Scale-Gemma-2-2B architecture at its full 26 layers (a SentencePiece-style tokenizer trained
here on gene symbols, so a small vocabulary; random transcoders of 4096 features, k 32, fewer
than a real 2B transcoder, to fit in 24 GiB with the float32 model), each with 64- and 200-gene
prompts. Each case runs in its own process, so its peak resident memory is its own.

    python benchmarks/circuit_latency.py                       # the small cases
    python benchmarks/circuit_latency.py --models c2s_410m_arch_24_layers gemma2_2b_arch_26_layers \
        --max-feature-nodes 64 --out benchmarks/results/circuit_latency_full_depth_cpu.json
    python benchmarks/circuit_latency.py --models c2s_410m_arch_24_layers --genes 64 \
        --curve 16 32 64 128 256 --out benchmarks/results/circuit_memory_curve_cpu.json

Results are written as JSON with the machine, versions and command, and a table is printed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "assets" / "pythia_20B_tokenizer.json"


def _rss_mib() -> float:
    """Peak resident memory of this process since the last :func:`_reset_peak` (Linux's
    ``VmHWM``; ``ru_maxrss`` where /proc is not readable).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start the peak over from the current resident memory (building the model is not
    traced, so its peak must not count).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _random_transcoders(d: int, n_layers: int, n_features: int):
    import torch

    from sctranscoder.core.transcoder import Transcoder, TranscoderConfig

    gen = torch.Generator().manual_seed(0)
    cfg = TranscoderConfig(d_in=d, d_out=d, n_features=n_features, k=32)
    return {i: Transcoder(cfg, generator=gen).eval().requires_grad_(False) for i in range(n_layers)}


def _case(kind: str, n_genes: int, max_feature_nodes: int, threads: int, queue) -> None:
    import numpy as np
    import scanpy as sc
    import torch

    import sctranscoder as sct
    from sctranscoder.core.attribution import Attributor, Target, build_graph, prune
    from sctranscoder.core.replacement import ReplacementModel
    from sctranscoder.core.sentences import PromptSettings, rank_genes

    torch.set_num_threads(threads)
    pbmc = sc.datasets.pbmc68k_reduced()
    genes = [g.upper() for g in pbmc.raw.var_names]
    sentence = rank_genes(pbmc.raw.X[:1], genes, n_genes=n_genes, seed=0)[0]
    if kind == "tiny_c2s":
        model = sct.datasets.tiny_c2s()
        adata = pbmc.copy()
        sct.pp.cell_sentences(adata, model=model)
        sct.tl.train_transcoders(adata, model, n_tokens=200_000, progress=False)
        tcs = sct.get.transcoders(adata)
    elif kind.startswith("c2s_410m_arch"):
        sys.path.insert(0, str(ROOT / "tests"))
        from _models import c2s_410m_shrunk

        depth = 24 if kind.endswith("24_layers") else 4
        path = c2s_410m_shrunk(Path(tempfile.mkdtemp()) / "c2s", TOKENIZER, n_layers=depth)
        model = sct.load_model(path, settings=PromptSettings(n_genes=200))
        tcs = _random_transcoders(model.d_model, model.n_layers, 8 * model.d_model)
    elif kind == "gemma2_2b_arch_26_layers":
        sys.path.insert(0, str(ROOT / "tests"))
        from _models import c2s_scale_gemma2_shrunk, gene_sentencepiece_tokenizer

        tok = gene_sentencepiece_tokenizer(genes)
        hf = c2s_scale_gemma2_shrunk(None, tok, n_layers=26)
        model = sct.load_model(hf, tokenizer=tok, settings=PromptSettings(n_genes=200))
        tcs = _random_transcoders(model.d_model, model.n_layers, 4096)
    else:
        raise ValueError(f"unknown case {kind!r}")
    batch = model.tokenize([sentence])
    ids = batch.input_ids[0, : int(batch.lengths[0])]
    token = model.tokenizer(" CD", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():  # pages in every weight (loading maps the files lazily)
        model.model(input_ids=ids[None])
    loaded = _common.current_rss_mib()
    _reset_peak()
    t0 = time.perf_counter()
    rm = ReplacementModel(model.model, tcs, ids)
    t1 = time.perf_counter()
    graph = build_graph(rm, Target(kind="logit", token=token), max_feature_nodes=max_feature_nodes)
    t2 = time.perf_counter()
    pruned = prune(graph)
    t3 = time.perf_counter()
    peak_tracing = _rss_mib()
    # the target's head split as trace_circuit makes it: chunk by chunk, summed as it comes
    at = Attributor(rm, Target(kind="logit", token=token), batch_size=32)
    parts_sum, n_heads = np.zeros(graph.n_nodes), -1
    for heads, rows in at.iter_head_rows(at.target_node):
        parts_sum += rows.sum(0, dtype=np.float64)
        n_heads += len(heads)
    t4 = time.perf_counter()
    peak_heads = _rss_mib()
    target_row = graph.rows[graph.target_node].astype(np.float64)
    head_error = float(np.abs(parts_sum - target_row).max())
    logit_error = rm.check(atol=float("inf"))
    queue.put(
        {
            "model": kind,
            "n_genes": n_genes,
            "n_tokens": int(ids.numel()),
            "n_layers": int(model.n_layers),
            "d_model": int(model.d_model),
            "n_features": int(next(iter(tcs.values())).config.n_features),
            "active_features": int(pruned.scores["n_active_features"]),
            "explored_features": int(pruned.scores["n_explored_features"]),
            "kept_nodes": int(pruned.nodes.size),
            "kept_edges": int(pruned.edges.shape[0]),
            "replacement_score": float(pruned.scores["replacement_score"]),
            "completeness_score": float(pruned.scores["completeness_score"]),
            "seconds_replacement_model": t1 - t0,
            "seconds_attribution": t2 - t1,
            "seconds_prune": t3 - t2,
            "seconds_total": t3 - t0,
            "seconds_head_split_of_target": t4 - t3,
            "n_heads": n_heads,
            "max_head_split_error": head_error,
            "max_abs_target_edge": float(np.abs(target_row).max()),
            "max_logit_error_vs_hf": logit_error,
            "peak_rss_mib": peak_tracing,
            "rss_loaded_mib": loaded,
            "peak_over_loaded_mib": peak_tracing - loaded,
            "peak_rss_with_head_split_mib": peak_heads,
            "max_feature_nodes": max_feature_nodes,
            "rows_mib": len(graph.rows) * graph.n_nodes * 4 / 2**20,
            "n_nodes": int(graph.n_nodes),
            "max_exactness_error": float(
                max(
                    abs(graph.rows[n].astype(np.float64).sum() + graph.bias[n] - graph.value[n])
                    for n in graph.rows
                )
            ),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "circuit_latency_cpu.json"
    )
    ap.add_argument("--max-feature-nodes", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["tiny_c2s", "c2s_410m_arch_4_layers"])
    ap.add_argument("--genes", nargs="+", type=int, default=[64, 200])
    ap.add_argument(
        "--curve",
        nargs="+",
        type=int,
        default=None,
        help="explored-node counts: one case per count (memory against explored nodes)",
    )
    args = ap.parse_args()
    budgets = args.curve or [args.max_feature_nodes]

    _common.snapshot_code()
    ctx = mp.get_context("spawn")
    results = []
    for kind in args.models:
        if kind != "tiny_c2s" and not TOKENIZER.exists():
            print(f"skipping {kind}: {TOKENIZER} not found", file=sys.stderr)
            continue
        for n in args.genes:
            for budget in budgets:
                q = ctx.Queue()
                p = ctx.Process(target=_case, args=(kind, n, budget, args.threads, q))
                p.start()
                res = q.get()
                p.join()
                results.append(res)
                print(
                    f"{kind} {n} genes, {budget} nodes: {res['seconds_total']:.1f}s, "
                    f"peak {res['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    doc = _common.document(
        "circuit_latency",
        "cpu",
        args.threads,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=32,
        results=results,
    )
    _common.write(doc, args.out)
    print(
        f"\n{'model':<24}{'genes':>6}{'tokens':>8}{'active':>8}{'kept':>6}{'seconds':>9}{'peak MiB':>10}{'repl.':>7}{'compl.':>7}"
    )
    for r in results:
        print(
            f"{r['model']:<24}{r['n_genes']:>6}{r['n_tokens']:>8}{r['active_features']:>8}{r['kept_nodes']:>6}"
            f"{r['seconds_total']:>9.1f}{r['peak_rss_mib']:>10.0f}{r['replacement_score']:>7.2f}{r['completeness_score']:>7.2f}"
        )


if __name__ == "__main__":
    main()
