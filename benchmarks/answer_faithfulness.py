"""Faithfulness where the model answers: transcoders trained on prompt tokens only against
transcoders trained with the model's teacher-forced answer tokens in the stream (issue 13, part 7).

For each variant, transcoders are trained on all 4 layers of the embedded default
(``tiny_c2s``, ``pbmc68k_reduced``, same seed, split, k and tokens per layer) and the
validation metrics are recorded: per-layer FVU and L0, CE recovered and KL at the prompt
positions, and at the answer positions the KL, token agreement and the fraction of cells whose
greedy answer is unchanged (``prediction_agreement``; ``answer_agreement`` computes the same
thing teacher-forced).

Run: ``python benchmarks/answer_faithfulness.py [--n-tokens N] [--weights 1 4]``
Writes ``benchmarks/results/answer_faithfulness_cpu.json``.
"""

from __future__ import annotations

import argparse
import time

import _common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-tokens", type=int, default=1_000_000)
    p.add_argument(
        "--weights",
        type=int,
        nargs="+",
        default=[1, 4],
        help="answer_weight values to train with answer tokens",
    )
    p.add_argument("--out", default=str(_common.RESULTS / "answer_faithfulness_cpu.json"))
    args = p.parse_args()
    _common.snapshot_code()

    import scanpy as sc
    import torch

    import sctranscoder as sct

    sc.settings.verbosity = 0
    model = sct.datasets.tiny_c2s()
    adata = _common.pbmc()
    sct.pp.cell_sentences(adata, model=model)

    variants = [("prompts only", False, 1)] + [
        (f"with answers (weight {w})", True, w) for w in args.weights
    ]
    runs = []
    for name, answers, weight in variants:
        t0 = time.perf_counter()
        ad = adata.copy()
        sct.tl.train_transcoders(
            ad,
            model,
            n_tokens=args.n_tokens,
            answer_tokens=answers,
            answer_weight=weight,
            progress=False,
        )
        seconds = time.perf_counter() - t0
        m = ad.uns["sct"]["metrics"]
        layers = m["layers"]
        row = {
            "variant": name,
            "answer_tokens": answers,
            "answer_weight": weight,
            "seconds": round(seconds, 1),
            "tokens_seen": int(ad.uns["sct"]["params"]["tokens_seen"]),
            "fvu": [round(float(x), 4) for x in layers["fvu"]],
            "l0": [round(float(x), 2) for x in layers["l0"]],
            **{k: float(v) for k, v in m["model"].items()},
        }
        runs.append(row)
        print(
            f"{name:28s} agreement {row['prediction_agreement']:.3f} answer KL "
            f"{row['answer_kl_replaced']:.4f} token agr {row['answer_token_agreement']:.3f} "
            f"prompt KL {row['kl_replaced']:.4f} CE rec {row['ce_recovered']:.4f} "
            f"FVU {row['fvu']} L0 {row['l0']} ({seconds:.0f} s)",
            flush=True,
        )
    doc = _common.document(
        "answer_faithfulness",
        "cpu",
        torch.get_num_threads(),
        model="tiny_c2s",
        data="pbmc68k_reduced (700 cells, 10% validation)",
        n_tokens=args.n_tokens,
        runs=runs,
    )
    _common.write(doc, __import__("pathlib").Path(args.out))


if __name__ == "__main__":
    main()
