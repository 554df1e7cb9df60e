"""The sctranscoder quickstart: the user's workflow on the embedded default, measured.

Loads scanpy's ``pbmc68k_reduced`` and the embedded model ``sct.datasets.tiny_c2s()``, writes
cell sentences, trains a transcoder for every MLP layer (default settings), computes per-cell
feature activations, and writes into ``--out``:

- ``pbmc_sct.h5ad``: the AnnData with everything sctranscoder stored;
- ``umap_features_L2.png``: the most variable layer-2 features over the UMAP;
- ``pbmc_explorer.html``: the interactive explorer of every feature (``sct.pl.explorer``; the
  features annotated with GO Biological Process and ranked by ``bulk_labels`` first), one
  self-contained file to open in any browser;
- ``summary.json``: the quality metrics, timings and paths printed at the end.

Works offline. ``make quickstart`` runs it as ``python scripts/quickstart.py --out
outputs/quickstart``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import scanpy as sc
import torch

import sctranscoder as sct

#: The issue's bar for the embedded default with default settings.
TARGET_CE_RECOVERED = 0.95
TARGET_MEAN_L0 = 32
LAYER_SHOWN = 2
#: Whole-model scores printed (the paper's Tables 1-2, plus agreement of the greedy answers).
MODEL_METRICS = (
    "ce_original",
    "ce_replaced",
    "ce_removed",
    "kl_replaced",
    "kl_removed",
    "ce_recovered",
    "prediction_agreement",
    "answer_kl_replaced",
    "answer_token_agreement",
)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("outputs/quickstart"), help="output folder")
    ap.add_argument(
        "--n-tokens",
        type=int,
        default=None,
        help="training tokens per layer (default: that of sct.tl.train_transcoders)",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the train/validation split and training"
    )
    return ap.parse_args()


@contextmanager
def timed(timings: dict[str, float], step: str):
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start


def _number(x):
    """A JSON-safe number (NaN and infinities become null)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _format(x) -> str:
    return "nan" if x is None else f"{x:.4f}"


def main() -> None:
    args = parse_args()
    sc.settings.verbosity = "info"  # sctranscoder logs through scanpy's logger
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_kwargs = {"seed": args.seed}
    if args.n_tokens is not None:
        train_kwargs["n_tokens"] = args.n_tokens

    timings: dict[str, float] = {}
    with timed(timings, "load data"):
        adata = sc.datasets.pbmc68k_reduced()
    with timed(timings, "load model"):
        model = sct.datasets.tiny_c2s()
    with timed(timings, "cell sentences"):
        sct.pp.cell_sentences(adata, model=model)
    with timed(timings, "train transcoders"):
        sct.tl.train_transcoders(adata, model, **train_kwargs)
    with timed(timings, "feature activations"):
        sct.tl.feature_activations(adata)
    with timed(timings, "annotate (GO BP)"):
        sct.tl.annotate_features(adata, gene_sets="GO_BP_2022")
    with timed(timings, "rank by cell type"):
        sct.tl.rank_features_groups(adata, groupby="bulk_labels")
    with timed(timings, "get activations"):
        fa = sct.get.activations(adata, layer=LAYER_SHOWN)
    h5ad = out / "pbmc_sct.h5ad"
    with timed(timings, "write h5ad"):
        adata.write_h5ad(h5ad)
    png = out / f"umap_features_L{LAYER_SHOWN}.png"
    with timed(timings, "plot"):
        fig = sct.pl.activations(adata, LAYER_SHOWN, show=False, return_fig=True)
        fig.savefig(png, dpi=120, bbox_inches="tight")
        plt.close("all")

    html = out / "pbmc_explorer.html"
    with timed(timings, "explorer"):
        sct.pl.explorer(adata, html, groupby="bulk_labels", overwrite=True)

    layers, whole = sct.get.metrics(adata)
    tset = sct.get.transcoders(adata)
    config, run, model_record = tset.config, tset.run, tset.model
    mean_l0 = float(layers["l0"].mean())
    target_met = whole["ce_recovered"] >= TARGET_CE_RECOVERED and mean_l0 <= TARGET_MEAN_L0
    summary = {
        "data": {
            "name": "scanpy.datasets.pbmc68k_reduced",
            "n_obs": adata.n_obs,
            "n_vars": adata.n_vars,
        },
        "model": {
            "name": model_record["name"],
            "fingerprint": model_record["fingerprint"],
            "n_layers": int(model_record["n_layers"]),
            "d_model": int(model_record["d_model"]),
            "n_genes": int(model_record["n_genes"]),
        },
        "training": {
            "activation": str(config.activation),
            "n_features": int(fa.n_vars),
            "k": int(config.k),
            "n_tokens": int(config.n_tokens),
            "tokens_seen": int(run["tokens_seen"]),
            "steps": int(run["steps"]),
            "device": str(run["device"]),
            "seed": args.seed,
        },
        "layers": {
            name: {col: _number(row[col]) for col in ("fvu", "l0", "dead_fraction")}
            for name, row in layers.iterrows()
        },
        "model_metrics": {k: _number(v) for k, v in whole.items()},
        "mean_l0": mean_l0,
        "target": {
            "ce_recovered_min": TARGET_CE_RECOVERED,
            "mean_l0_max": TARGET_MEAN_L0,
            "met": bool(target_met),
        },
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "files": {
            "h5ad": str(h5ad),
            "umap_png": str(png),
            "explorer": str(html),
            "explorer_mib": round(html.stat().st_size / 2**20, 2),
            "summary": str(out / "summary.json"),
        },
        "versions": {
            "sctranscoder": sct.__version__,
            "torch": torch.__version__,
            "scanpy": version("scanpy"),
            "python": platform.python_version(),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, layers)


def print_summary(summary: dict, layers) -> None:
    m = summary["model_metrics"]
    t = summary["training"]
    print()
    print(
        f"sctranscoder quickstart: {summary['model']['name']} on pbmc68k_reduced "
        f"({summary['data']['n_obs']} cells)"
    )
    print(
        f"transcoders: {t['activation']}, {t['n_features']} features, k={t['k']}, "
        f"{t['tokens_seen']:,} tokens per layer in {t['steps']} steps on {t['device']}"
    )
    print()
    print("per layer (validation cells):")
    print(layers[["fvu", "l0", "dead_fraction"]].to_string(float_format=lambda x: f"{x:.4f}"))
    print()
    print("whole model, every MLP replaced / removed (validation cells):")
    for k in MODEL_METRICS:
        print(f"  {k:<24}{_format(m.get(k))}")
    target = summary["target"]
    print(
        f"  target: ce_recovered >= {target['ce_recovered_min']} with mean L0 <= "
        f"{target['mean_l0_max']} (mean L0 {summary['mean_l0']:.1f}): "
        f"{'met' if target['met'] else 'NOT met'}"
    )
    print()
    print("timings:")
    for step, seconds in summary["timings_s"].items():
        print(f"  {step:<22}{seconds:8.1f} s")
    print()
    print("written:")
    for what, path in summary["files"].items():
        print(f"  {what:<22}{path}")


if __name__ == "__main__":
    main()
