"""What sctranscoder keeps in an AnnData, and how it is read back.

``adata.uns[key]`` (default ``"sct"``) holds everything about one set of transcoders::

    params        training parameters (h5ad-safe scalars and arrays)
    model         base model identity: name, fingerprint, architecture, prompt settings
    transcoders   {"layer_<i>": {"config": {...}, "W_enc", "b_enc", "W_dec", "b_dec"[, "W_skip"]}}
    metrics       {"layers": DataFrame per layer, "model": whole-model scores}
    activations   written by feature_activations: params, obsm/varm key pointers, firing rates

Only strings, numbers, numpy arrays and DataFrames are stored, so all of it survives
``write_h5ad``/``read_h5ad``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._constants import Key
from .core.model import C2SModel, load_model
from .core.transcoder import Transcoder, TranscoderConfig

if TYPE_CHECKING:
    from anndata import AnnData


def sct_uns(adata: AnnData, key: str) -> dict:
    """``adata.uns[key]``, or a clear error saying which tool writes it."""
    if key not in adata.uns:
        raise KeyError(
            f"adata.uns[{key!r}] not found: run `sct.tl.train_transcoders(adata, model)` first "
            f"(or `sct.load_transcoders(path, adata)`), or pass the key you used as `key=`."
        )
    return adata.uns[key]


def gene_lists(
    adata: AnnData, sentence_key: str = Key.sentence, *, n_genes: int | None = None
) -> list[list[str]]:
    """Cell sentences from ``adata.obs[sentence_key]`` as lists of symbols.

    With ``n_genes``, each sentence is cut to its top ``n_genes`` genes: a sentence is a ranking,
    so this is exactly the sentence a model reading ``n_genes`` genes expects.
    """
    if sentence_key not in adata.obs:
        raise KeyError(
            f"adata.obs[{sentence_key!r}] not found: run `sct.pp.cell_sentences(adata, "
            "model=model)` first, or pass `sentence_key=` naming the column with the sentences."
        )
    col = adata.obs[sentence_key].astype(str).to_numpy()
    out = [s.split()[:n_genes] for s in col]
    empty = [adata.obs_names[i] for i, g in enumerate(out) if not g]
    if empty:
        raise ValueError(
            f"{len(empty)} cells have empty sentences (e.g. {empty[:3]}); filter them out first."
        )
    return out


def model_record(model: C2SModel) -> dict:
    """The base model's identity, as stored with transcoders."""
    cfg = getattr(model.model, "config", None)
    return {
        "name": str(model.name),
        "fingerprint": model.fingerprint,
        "architecture": str(getattr(cfg, "model_type", type(model.model).__name__)),
        "n_layers": int(model.n_layers),
        "d_model": int(model.d_model),
        "parallel_residual": bool(getattr(cfg, "use_parallel_residual", False)),
        "n_genes": int(model.settings.n_genes),
        "template": str(model.settings.template),
        "organism": str(model.settings.organism),
    }


def resolve_model(adata: AnnData, key: str, model: C2SModel | str | None) -> C2SModel:
    """The model the transcoders in ``adata.uns[key]`` were trained on, checked by fingerprint.

    Without ``model``, the recorded name is loaded (the embedded model, a local path or a hub id).
    """
    record = sct_uns(adata, key)["model"]
    if model is None:
        from .datasets import TINY_C2S_NAME, tiny_c2s

        name = str(record["name"])
        model = tiny_c2s() if name == TINY_C2S_NAME else load_model(name)
    elif not isinstance(model, C2SModel):
        model = load_model(model)
    check_fingerprint(record, model)
    return model


def check_fingerprint(record: dict, model: C2SModel) -> None:
    expected = str(record["fingerprint"])
    if model.fingerprint != expected:
        raise ValueError(
            f"These transcoders were trained on model {record['name']!r} (fingerprint {expected}), "
            f"but the model given is {model.name!r} (fingerprint {model.fingerprint}): its config "
            "or weights differ. Pass the model the transcoders were trained on, or train new ones."
        )


def transcoders_to_uns(transcoders: dict[int, Transcoder]) -> dict:
    out = {}
    for layer, tc in sorted(transcoders.items()):
        entry = {"config": {k: v for k, v in tc.config.to_dict().items()}}
        entry.update(tc.to_numpy())
        out[Key.layer(layer)] = entry
    return out


def stored_transcoders(
    adata: AnnData, key: str = Key.uns, layers: list[int] | None = None
) -> dict[int, Transcoder]:
    """Transcoders stored in ``adata.uns[key]``, by layer."""
    stored = sct_uns(adata, key).get("transcoders", {})
    available = sorted(int(k.split("_", 1)[1]) for k in stored)
    if layers is None:
        layers = available
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise KeyError(
            f"No transcoder for layer(s) {missing} in adata.uns[{key!r}]; trained layers: "
            f"{available}. Train them with `sct.tl.train_transcoders(adata, model, layers=...)`."
        )
    out = {}
    for layer in layers:
        entry = stored[Key.layer(layer)]
        cfg = dict(entry["config"])
        cfg = {
            "d_in": int(cfg["d_in"]),
            "d_out": int(cfg["d_out"]),
            "n_features": int(cfg["n_features"]),
            "activation": str(cfg["activation"]),
            "k": int(cfg["k"]),
            "skip": bool(cfg["skip"]),
        }
        tc = Transcoder.from_numpy(
            TranscoderConfig(**cfg), {k: np.asarray(v) for k, v in entry.items() if k != "config"}
        )
        tc.eval()
        tc.requires_grad_(False)
        out[layer] = tc
    return out


def circuit_record(adata: AnnData, key: str, circuits_key: str = Key.circuits) -> dict:
    """``adata.uns[circuits_key][key]``, or a KeyError naming the circuits there are.

    A cell name is accepted for its default key ``"circuit_<cell>"``.
    """
    circuits = adata.uns.get(circuits_key)
    if not circuits:
        raise KeyError(
            f"No circuits in adata.uns[{circuits_key!r}]: trace one with "
            "`sct.tl.trace_circuit(adata, cell)`."
        )
    if key not in circuits and f"circuit_{key}".replace("/", "_") in circuits:
        key = f"circuit_{key}".replace("/", "_")
    if key not in circuits:
        raise KeyError(
            f"No circuit {key!r} in adata.uns[{circuits_key!r}]; available: {sorted(circuits)}."
        )
    return circuits[key]
