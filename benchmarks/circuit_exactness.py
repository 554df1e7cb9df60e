"""How exact circuits are, per model family: the replacement forward against the Hugging Face
logits, every explored node's incoming edges plus bias against its value, and the split of the
target's edges by attention head against the edges.

Cases: small random models of each family (GPT-NeoX parallel and sequential, Llama, Mistral with
a sliding window of 4, Qwen2 with QKV biases, Gemma-2 with every special setting, GPT-2; 3 layers,
d 64) and the real widths of C2S-Pythia-410m (the real Pythia tokenizer from ../shared) and
C2S-Scale-Gemma-2-2B (a SentencePiece-style tokenizer trained on gene symbols), 2 layers deep;
random transcoders with non-zero biases (expansion 2, k 8; 1 and 8 at the real widths), a
20-gene pbmc68k_reduced cell sentence.

    python benchmarks/circuit_exactness.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _common


def _models(genes):
    from _graphs import FAMILIES
    from _models import (
        c2s_410m_shrunk,
        c2s_scale_gemma2_shrunk,
        gene_sentencepiece_tokenizer,
        tiny_tokenizer,
    )

    import sctranscoder as sct
    from sctranscoder.core.sentences import PromptSettings

    settings = PromptSettings(n_genes=20)
    for name, build in FAMILIES.items():
        yield name, sct.load_model(build(), tokenizer=tiny_tokenizer(), settings=settings), 2
    if _common.TOKENIZER.exists():
        path = c2s_410m_shrunk(Path(tempfile.mkdtemp()) / "c2s", _common.TOKENIZER, n_layers=2)
        yield "c2s_pythia_410m_widths_2_layers", sct.load_model(path, settings=settings), 1
    tok = gene_sentencepiece_tokenizer(genes)
    hf = c2s_scale_gemma2_shrunk(None, tok, n_layers=2)
    yield "c2s_scale_gemma2_2b_widths_2_layers", sct.load_model(hf, tokenizer=tok), 1


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=_common.RESULTS / "circuit_exactness_cpu.json")
    ap.add_argument("--max-feature-nodes", type=int, default=64)
    args = ap.parse_args()
    _common.snapshot_code()

    import numpy as np
    import scanpy as sc
    import torch
    from _graphs import random_transcoders

    from sctranscoder.core.attribution import Attributor, Target, build_graph
    from sctranscoder.core.sentences import rank_genes

    pbmc = sc.datasets.pbmc68k_reduced()
    genes = [g.upper() for g in pbmc.raw.var_names]
    sentence = rank_genes(pbmc.raw.X[:1], genes, n_genes=20, seed=0)[0]
    results = []
    for name, m, expansion in _models(genes):
        from sctranscoder.core.replacement import ReplacementModel

        tcs = random_transcoders(m.model, expansion=expansion, k=8)
        batch = m.tokenize([sentence])
        ids = batch.input_ids[0, : int(batch.lengths[0])]
        rm = ReplacementModel(m.model, tcs, ids)
        target = Target(kind="logit", token=int(ids[-1]))
        graph = build_graph(rm, target, max_feature_nodes=args.max_feature_nodes)
        err = [
            abs(graph.rows[n].astype(np.float64).sum() + graph.bias[n] - graph.value[n])
            for n in graph.rows
        ]
        scale = [abs(graph.value[n]) for n in graph.rows]
        heads, parts = Attributor(rm, target).head_rows(graph.target_node)
        row = graph.rows[graph.target_node].astype(np.float64)
        hf_logits = m.model(input_ids=ids[None]).logits[0].float()
        results.append(
            {
                "case": name,
                "family": rm.arch.family,
                "n_layers": m.n_layers,
                "d_model": m.d_model,
                "n_tokens": int(ids.numel()),
                "explored_nodes": len(graph.rows),
                "max_abs_logit": float(hf_logits.abs().max()),
                "max_logit_error_vs_hf": rm.check(atol=float("inf")),
                "max_node_error": float(max(err)),
                "max_abs_node_value": float(max(scale)),
                "max_head_split_error": float(np.abs(parts.sum(0) - row).max()),
                "max_abs_target_edge": float(np.abs(row).max()),
                "n_heads": len(heads) - 1,  # the first row is the direct part
            }
        )
        r = results[-1]
        print(
            f"{name:<38} logits {r['max_logit_error_vs_hf']:.1e} (of {r['max_abs_logit']:.2g}), "
            f"nodes {r['max_node_error']:.1e} (of {r['max_abs_node_value']:.2g}), heads "
            f"{r['max_head_split_error']:.1e} (of {r['max_abs_target_edge']:.2g})",
            flush=True,
        )
    doc = _common.document(
        "circuit_exactness",
        "cpu",
        torch.get_num_threads(),
        max_feature_nodes=args.max_feature_nodes,
        results=results,
    )
    _common.write(doc, args.out)


if __name__ == "__main__":
    main()
