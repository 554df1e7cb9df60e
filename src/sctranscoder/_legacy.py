"""Read AnnData objects written by sctranscoder 0.1 (the layout before the key registry).

Then a transcoder record held everything about its set (``"activations"``, ``"features"``,
``"interpretability"``, ``"random_model_baseline"``) and circuits lived in
``adata.uns["sct_circuits"]``. :func:`upgrade` moves each into the record it has now (see
``docs/storage.md``), once, in place, and logs what it moved. Results are kept as they are; only
their place and column names change; where a new name is already taken, the 0.1 result stays
where it was.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg

from ._constants import Key
from .core.training import TrainingConfig

if TYPE_CHECKING:
    from anndata import AnnData

#: Column renames of the per-feature annotation table and of the per-layer summary.
FEATURE_COLUMNS = {
    "best_term": "ora_term",
    "best_pvalue": "ora_pvalue",
    "best_fdr": "ora_fdr",
    "interpretable": "ora_interpretable",
    "gsea_best_term": "gsea_term",
    "gsea_best_nes": "gsea_nes",
    "gsea_best_fdr": "gsea_fdr",
}
SUMMARY_COLUMNS = {
    "interpretable": "ora_interpretable",
    "fraction": "ora_fraction",
    "baseline_interpretable": "ora_baseline_interpretable",
    "baseline_fraction": "ora_baseline_fraction",
    "seconds": "ora_seconds",
}
_MOVED = ("activations", "features", "interpretability", "random_model_baseline")


def upgrade(adata: AnnData) -> None:
    """Move every 0.1 record of ``adata.uns`` to its current place (a no-op on current data)."""
    moved: list[str] = []
    for key in list(adata.uns):
        rec = adata.uns[key]
        if is_transcoder_record(rec):
            moved += _upgrade_transcoder_record(adata, key, rec)
    circuits = adata.uns.get(Key.legacy_circuits)
    if isinstance(circuits, dict):
        for name in list(circuits):
            if name not in adata.uns:  # a name already taken keeps its circuit where it was
                moved += _upgrade_circuit(adata, name, circuits.pop(name))
        if not circuits:
            del adata.uns[Key.legacy_circuits]
    rfg = adata.uns.get(Key.rank_features_groups)
    if isinstance(rfg, dict) and "sct_key" in rfg.get("params", {}):
        params = rfg["params"]
        params["activations_key"] = Key.activations(str(params.pop("sct_key")))
    if moved:
        logg.info(
            "upgraded results written by sctranscoder 0.1 to the current layout",
            deep="moved " + ", ".join(moved),
        )


def is_transcoder_record(value: object) -> bool:
    """Whether ``value`` is the record of a transcoder set (weights, or a link to them)."""
    return (
        isinstance(value, dict)
        and "model" in value
        and "params" in value
        and ("transcoders" in value or isinstance(value.get("weights"), dict))
    )


def _upgrade_transcoder_record(adata: AnnData, key: str, rec: dict) -> list[str]:
    moved = []
    params = rec.get("params", {})
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    # 0.1 kept the config's fields at the top of params; a set without a config has neither
    if "config" not in params and names & set(params):
        # 0.1 stored the learning rate it used (not None for "the default"): the config keeps
        # it, and so does the run's record, as records written now do
        config = {k: params[k] for k in params if k in names}
        run = {k: v for k, v in params.items() if k not in names or k == "lr"}
        rec["params"] = {"config": config, **run}
        moved.append(f"adata.uns[{key!r}]['params'] into 'config' and run facts")
    if not any(part in rec for part in _MOVED):
        return moved
    acts_key = Key.activations(key)
    ann_key = Key.derived(acts_key, "annotation")
    random_key = Key.derived(ann_key, "random_model")
    if any(k in adata.uns for k in (acts_key, ann_key, random_key)):
        return moved  # names taken: the 0.1 results stay where they are, untouched
    acts, features = rec.pop("activations", None), rec.pop("features", None)
    summary = rec.pop("interpretability", None)
    random = rec.pop("random_model_baseline", None)
    if acts is not None:
        adata.uns[acts_key] = _activation_record(key, acts, features, adata.n_obs)
        moved.append(f"adata.uns[{key!r}]['activations'] and ['features'] to {acts_key!r}")
    if features is not None and "annotation" in features:
        adata.uns[ann_key] = _annotation_record(acts_key, features, summary)
        moved.append(f"the annotation in adata.uns[{key!r}]['features'] to {ann_key!r}")
    if random is not None:
        random["summary"] = _rename(random["summary"], SUMMARY_COLUMNS)
        random["params"] = {**dict(random["params"]), "annotation_key": ann_key}
        adata.uns[random_key] = random
        moved.append(f"adata.uns[{key!r}]['random_model_baseline'] to {random_key!r}")
    return moved


def _activation_record(key: str, acts: dict, features: dict | None, n_cells: int) -> dict:
    fparams = dict(features["params"]) if features is not None else {}
    params = dict(acts.get("params", {}))
    out = {
        "params": {
            "transcoders_key": key,
            "layers": np.asarray(params.get("layers", []), dtype=np.int64),
            "aggregate": str(params.get("aggregate", "max")),
            "sentence_key": str(params.get("sentence_key", Key.sentence)),
            "live_threshold": float(fparams.get("live_threshold", -3.0)),
            "n_top": int(fparams.get("n_top", 50)),
            "n_tokens": int(acts.get("n_tokens", 0)),
            "n_cells": int(n_cells),
            "genes": features is not None,
        },
        "obsm_keys": dict(acts["obsm_keys"]),
        "firing_rate": dict(acts["firing_rate"]),
    }
    if features is not None:
        layers = [k for k in acts["obsm_keys"] if f"{k}_gene_counts" in features]
        out["genes"] = {
            "names": np.asarray(features["genes"], dtype=object).astype(str),
            "n_cells": np.asarray(features["gene_cells"], dtype=np.int64),
            "counts": {k: features[f"{k}_gene_counts"] for k in layers},
            "sums": {k: features[f"{k}_gene_sums"] for k in layers},
        }
    return out


def _annotation_record(acts_key: str, features: dict, summary) -> dict:
    ann = features["annotation"]
    params = dict(ann["params"])
    params["activations_key"] = acts_key
    params["n_top"] = int(params.pop("n_top_genes", params.get("n_top", 50)))
    params["n_sets"], params["n_background"] = int(ann["n_sets"]), int(ann["n_background"])
    method = str(params.get("method", "ora"))
    tables = {}
    for name in params_layers(params):
        table = _rename(features[name], FEATURE_COLUMNS)
        if method == "prerank":  # 0.1 copied the GSEA results into the ORA columns
            table = table.drop(columns=[c for c in table if c.startswith("ora_")])
        keep = [c for c in table if c.startswith(("ora_", "gsea_"))]
        tables[name] = table[keep].copy()
    out = {"params": params, "features": tables}
    if summary is not None:
        summary = _rename(summary, SUMMARY_COLUMNS)
        if method == "prerank":
            summary = summary.drop(columns=[c for c in summary if c.startswith("ora_")])
        out["summary"] = summary.drop(columns=[c for c in summary if c.startswith("random_model")])
    return out


def params_layers(params: dict) -> list[str]:
    """``"layer_<i>"`` names of the layers in a record's params."""
    return [Key.layer(int(x)) for x in np.atleast_1d(params.get("layers", []))]


def _upgrade_circuit(adata: AnnData, name: str, circuit: dict) -> list[str]:
    """Move a 0.1 circuit to ``uns[name]``, its enrichment and cell scores beside it (where those
    names are free; else they stay inside the circuit record).
    """
    adata.uns[name] = circuit
    moved = [f"adata.uns['sct_circuits'][{name!r}] to {name!r}"]
    enrichment_key = Key.circuit_enrichment(name)
    if "enrichment" in circuit and enrichment_key not in adata.uns:
        adata.uns[enrichment_key] = {  # 0.1's columns, gseapy_fdr and decoupler_* included
            "table": pd.DataFrame(circuit.pop("enrichment")),
            "params": {**dict(circuit.pop("enrichment_params", {})), "circuit": name},
        }
        moved.append(f"its enrichment to {enrichment_key!r}")
    score_key = Key.circuit_score(name)
    if "cell_scores" in circuit and score_key not in adata.uns:
        scores = dict(circuit.pop("cell_scores"))
        scores["influence"] = scores.pop("weights")
        adata.uns[score_key] = {"params": {"circuit": name}, **scores}
        moved.append(f"its cell scores to {score_key!r}")
        old, new = f"{name}_gene_score", Key.gene_score(score_key)
        if old in adata.obs and new not in adata.obs:
            adata.obs = adata.obs.rename(columns={old: new})
            moved.append(f"adata.obs[{old!r}] to {new!r}")
    return moved


def _rename(table, columns: dict[str, str]) -> pd.DataFrame:
    table = pd.DataFrame(table)
    return table.rename(columns={k: v for k, v in columns.items() if k in table.columns})
