"""Build the explorer for the embedded default, measure it in headless Chromium, take screenshots.

The embedded default: scanpy's ``pbmc68k_reduced`` (700 cells), the embedded model
``sct.datasets.tiny_c2s()``, transcoders on its 4 layers (1,024 features each) trained on
300,000 tokens, per-cell activations, features annotated against the shipped GO_BP_2022,
ranked by ``bulk_labels``, one circuit of a CD14+ Monocyte cell (up to 64 features kept) and its
per-cell score. Writes:

- ``docs/_static/explorer_table.png``, ``explorer_feature.png``, ``explorer_circuit.png`` and
  ``explorer_cell.png`` (the four pages, 1400 px wide);
- ``benchmarks/results/explorer_cpu.json``: the file's size and its load time in headless
  Chromium (navigation start to the ``load`` event and to the first rendered table; median of
  3 fresh pages), with the machine and versions.

The AnnData is kept in ``--cache`` (computed once, then reused; delete it to recompute).
Needs playwright and a system Chromium (``chromium`` on the PATH, or ``--chromium``).

    python scripts/explorer_screenshots.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import scanpy as sc

import sctranscoder as sct

ROOT = Path(__file__).resolve().parents[1]
N_TOKENS = 300_000
GROUPBY = "bulk_labels"
CELL_TYPE = "CD14+ Monocyte"
MAX_FEATURE_NODES = 64
VIEWPORT = {"width": 1400, "height": 900}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cache", type=Path, default=ROOT / "outputs" / "explorer" / "pbmc.h5ad")
    ap.add_argument(
        "--html", type=Path, default=ROOT / "outputs" / "explorer" / "pbmc_explorer.html"
    )
    ap.add_argument("--static", type=Path, default=ROOT / "docs" / "_static")
    ap.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "explorer_cpu.json"
    )
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args()


def build(cache: Path) -> tuple[ad.AnnData, dict]:
    """The embedded default with every record the explorer shows (from ``cache`` when there)."""
    if cache.exists():
        adata = ad.read_h5ad(cache)
        return adata, dict(adata.uns.get("explorer_screenshots_timings", {}))
    timings: dict[str, float] = {}

    def step(name, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 2)
        print(f"{name}: {timings[name]:.1f} s", flush=True)
        return out

    model = sct.datasets.tiny_c2s()
    adata = sc.datasets.pbmc68k_reduced()
    step("cell_sentences", sct.pp.cell_sentences, adata, model=model)
    step("train_transcoders", sct.tl.train_transcoders, adata, model, n_tokens=N_TOKENS)
    step("feature_activations", sct.tl.feature_activations, adata, model)
    step("annotate_features", sct.tl.annotate_features, adata, gene_sets="GO_BP_2022")
    step("rank_features_groups", sct.tl.rank_features_groups, adata, groupby=GROUPBY)
    cell = str(adata.obs_names[adata.obs[GROUPBY].astype(str) == CELL_TYPE][0])
    step(
        "trace_circuit",
        sct.tl.trace_circuit,
        adata,
        model,
        cell=cell,
        max_feature_nodes=MAX_FEATURE_NODES,
    )
    step("score_circuit", sct.tl.score_circuit, adata, circuit=cell)
    adata.uns["explorer_screenshots_timings"] = timings
    cache.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(cache)
    return adata, timings


def measure(browser, url: str, repeats: int) -> dict:
    """Load ``url`` in fresh pages: ms from navigation start to ``load`` and to the first table."""
    loads, tables, errors = [], [], []
    for _ in range(repeats):
        page = browser.new_page(viewport=VIEWPORT)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url, wait_until="load")
        page.wait_for_selector("html[data-sct-ready='1']")
        timing = page.evaluate(
            """() => ({
                load: performance.getEntriesByType("navigation")[0].loadEventEnd,
                table: performance.getEntriesByName("sct-table-rendered")[0].startTime,
            })"""
        )
        loads.append(timing["load"])
        tables.append(timing["table"])
        page.close()
    return {
        "load_event_ms": round(statistics.median(loads), 1),
        "first_table_ms": round(statistics.median(tables), 1),
        "load_event_ms_runs": [round(x, 1) for x in loads],
        "first_table_ms_runs": [round(x, 1) for x in tables],
        "page_errors": errors,
    }


def screenshots(browser, url: str, static: Path, circuit: dict) -> dict:
    """The four pages as a user reaches them: search, click a row, open the circuit, a cell."""
    page = browser.new_page(viewport=VIEWPORT)
    console = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(str(e)))
    page.goto(url)
    page.wait_for_selector("html[data-sct-ready='1']")
    page.screenshot(path=static / "explorer_table.png")
    # the circuit's most influential feature, found through the table's search
    nodes = circuit["nodes"]
    top = nodes[nodes["type"] == "feature"]
    name = top.loc[top["influence"].abs().idxmax()]
    feature = f"L{int(name['layer'])}F{int(name['feature'])}"
    page.fill("#feature-search", feature)
    page.wait_for_selector(f"#feature-table tbody tr[data-feature='{feature}']")
    page.click(f"#feature-table tbody tr[data-feature='{feature}'] td:nth-child(3)")
    page.wait_for_selector("#feature-umap .main-svg")
    page.wait_for_timeout(500)
    page.screenshot(path=static / "explorer_feature.png", full_page=True)
    page.click("nav.tabs a[data-tab='circuits']")
    page.click("#circuit-table tbody tr:first-child td:nth-child(2)")
    page.wait_for_selector("#circuit-graph .main-svg")
    page.wait_for_timeout(500)
    page.screenshot(path=static / "explorer_circuit.png", full_page=True)
    page.click("#circuit-name a")
    page.wait_for_selector("#cell-sentence .chip")
    page.wait_for_timeout(500)
    page.screenshot(path=static / "explorer_cell.png", full_page=True)
    page.close()
    return {"feature_shown": feature, "console_errors": console}


def main() -> None:
    args = parse_args()
    from playwright.sync_api import sync_playwright

    adata, timings = build(args.cache)
    key = next(
        k for k, v in adata.uns.items() if isinstance(v, dict) and {"nodes", "edges"} <= set(v)
    )
    circuit = adata.uns[key]
    args.html.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sct.pl.explorer(adata, args.html, overwrite=True)
    seconds = time.perf_counter() - start
    args.static.mkdir(parents=True, exist_ok=True)
    url = args.html.resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        loaded = measure(browser, url, args.repeats)
        shots = screenshots(browser, url, args.static, circuit)
        chromium = browser.version
        browser.close()
    nodes = circuit["nodes"]
    result = {
        "what": "sct.pl.explorer on the embedded default: pbmc68k_reduced (700 cells), "
        f"tiny_c2s, transcoders on 4 layers x 1,024 features ({N_TOKENS:,} tokens), annotated "
        f"against GO_BP_2022, ranked by {GROUPBY}, one circuit of a {CELL_TYPE} cell",
        "command": "python scripts/explorer_screenshots.py",
        "file_bytes": args.html.stat().st_size,
        "file_mib": round(args.html.stat().st_size / 2**20, 2),
        "write_seconds": round(seconds, 2),
        **loaded,
        "n_cells": adata.n_obs,
        "n_features": int(sum(adata.obsm[f"X_sct_L{i}"].shape[1] for i in range(4))),
        "circuit": {
            "key": key,
            "nodes": len(nodes),
            "feature_nodes": int((nodes["type"] == "feature").sum()),
            "embedding_nodes": int((nodes["type"] == "embedding").sum()),
            "error_nodes": int((nodes["type"] == "error").sum()),
            "edges": len(circuit["edges"]),
        },
        **shots,
        "pipeline_seconds": timings,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "chromium": chromium,
            "plotly": version("plotly"),
            "sctranscoder": sct.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "screenshots": [
            f"docs/_static/explorer_{p}.png" for p in ("table", "feature", "circuit", "cell")
        ],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("file_mib", "load_event_ms", "first_table_ms")}))
    if shots["console_errors"] or loaded["page_errors"]:
        raise SystemExit(f"errors in the page: {shots['console_errors'] + loaded['page_errors']}")


if __name__ == "__main__":
    main()
