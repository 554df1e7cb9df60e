"""sctranscoder's records in an AnnData: written, found, checked and turned back into objects.

Every tool keeps its results in a record at the top level of ``adata.uns`` (named by its
``key_added``), with pointers to the ``obs``/``obsm`` entries it wrote; ``docs/storage.md`` shows
the whole layout. Only strings, numbers, numpy arrays, CSR matrices and DataFrames are stored, so
all of it survives ``write_h5ad``/``read_h5ad`` and ``write_zarr``.

The transcoder record of :func:`~sctranscoder.tl.train_transcoders`::

    params        {"config": TrainingConfig fields, "layers", "tokens_seen", "steps", ...}
    model         base model identity: name, fingerprint, architecture, prompt settings
    metrics       {"layers": DataFrame per layer, "model": whole-model scores}
    transcoders   {"layer_<i>": {"config": {...}, "W_enc", "b_enc", "W_dec", "b_dec"[, "W_skip"]}}
                  (weights in the file), or
    weights       {"path", "manifest_sha256", "n_bytes"} (weights in a directory beside it)

Tools get the weights as one :class:`~sctranscoder.core.transcoder_set.TranscoderSet`
(:func:`transcoder_set`), built once per AnnData, record and device and cached for as long as
the AnnData lives; a linked directory is checked (manifest, checksums) when first read.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ._constants import Key
from .core.model import C2SModel, load_model
from .core.training import TrainingConfig
from .core.transcoder import Transcoder, TranscoderConfig
from .core.transcoder_set import TranscoderDirectoryError, TranscoderSet, manifest_sha256

if TYPE_CHECKING:
    import os

    from anndata import AnnData

#: Above this many bytes of weights, :func:`sctranscoder.load_transcoders` links the directory
#: instead of copying the weights into ``adata.uns`` (unless told otherwise).
EMBED_LIMIT_BYTES = 1 << 30
#: Transcoder sets kept built per AnnData (for as long as it lives), by record and device.
_CACHE_SIZE = 4
_cache: dict[int, OrderedDict[tuple, TranscoderSet]] = {}


# -- keys -----------------------------------------------------------------------------------------


def check_key(name: object, what: str = "key_added") -> str:
    """A key that every storage backend accepts: a non-empty string without ``/``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, got {name!r}.")
    if "/" in name:
        raise ValueError(
            f"{what}={name!r} contains '/', which .h5ad and .zarr files read as a path: "
            "choose a name without it."
        )
    return name


def record(adata: AnnData, key: str, *, kind: str, hint: str) -> dict:
    """``adata.uns[key]``, upgraded from an older layout if needed, or a KeyError with ``hint``."""
    from ._legacy import upgrade

    upgrade(adata)
    value = adata.uns.get(key)
    if not isinstance(value, dict):
        raise KeyError(f"No {kind} in adata.uns[{key!r}]: {hint}")
    return value


# -- transcoders ----------------------------------------------------------------------------------


def transcoder_record(adata: AnnData, key: str) -> dict:
    """The transcoder record ``adata.uns[key]``."""
    rec = record(
        adata,
        key,
        kind="transcoders",
        hint="run `sct.tl.train_transcoders(adata, model)` first (or "
        "`sct.load_transcoders(path, adata)`), or pass the `key=` you used.",
    )
    from ._legacy import is_transcoder_record

    if not is_transcoder_record(rec):
        raise KeyError(f"adata.uns[{key!r}] is not a transcoder record (weights or a link).")
    return rec


def training_config(rec: dict) -> TrainingConfig:
    """The :class:`TrainingConfig` stored in a transcoder record."""
    return TrainingConfig.from_dict(dict(rec["params"]["config"]))


def write_transcoders(
    adata: AnnData,
    key: str,
    tset: TranscoderSet,
    *,
    params: dict,
    weights_dir: str | os.PathLike | None = None,
    manifest: str | None = None,
) -> None:
    """Store ``tset`` as ``adata.uns[key]``: weights in the record, or linked in ``weights_dir``.

    ``weights_dir`` must already hold the set (``tset.save(weights_dir)``); ``manifest`` is its
    manifest's sha256 when known (data-parallel ranks without the directory get rank 0's).
    """
    rec = {"params": params, "model": dict(tset.model), "metrics": _metrics_to_uns(tset.metrics)}
    if weights_dir is None:
        rec["transcoders"] = {
            Key.layer(layer): {"config": tc.config.to_dict(), **tc.to_numpy()}
            for layer, tc in tset.items()
        }
    else:
        path = Path(weights_dir).resolve()
        rec["weights"] = {
            "path": str(path),
            "manifest_sha256": manifest or manifest_sha256(path),
            "n_bytes": int(tset.n_bytes),
        }
    adata.uns[key] = rec


def transcoder_set(
    adata: AnnData,
    key: str = Key.transcoders,
    *,
    layers: list[int] | None = None,
    device: torch.device | str | None = None,
) -> TranscoderSet:
    """The transcoders of ``adata.uns[key]`` as a :class:`TranscoderSet` (frozen, cached).

    Weights stored in the record are wrapped without a copy on the CPU; a linked directory is
    read once (checked against its manifest and the recorded checksum). Built sets are cached per
    record and device, so tools never rebuild them call after call.
    """
    rec = transcoder_record(adata, key)
    device = torch.device(device) if device is not None else torch.device("cpu")
    tset = _cached_set(adata, rec, key, device)
    return tset if layers is None else tset.subset([int(x) for x in layers])


def _cached_set(adata: AnnData, rec: dict, key: str, device: torch.device) -> TranscoderSet:
    """The set of ``rec`` on ``device``, from this AnnData's cache when built before.

    The cache of an AnnData goes with it (a finaliser); an entry is identified by the weight
    arrays themselves (replaced arrays make a new entry), or by the linked directory and its
    manifest checksum.
    """
    if id(adata) not in _cache:
        _cache[id(adata)] = OrderedDict()
        weakref.finalize(adata, _cache.pop, id(adata), None)
    cache = _cache[id(adata)]
    if "weights" in rec:
        link = rec["weights"]
        ident = ("dir", str(link["path"]), str(link["manifest_sha256"]), str(device))
    else:
        arrays = [a for entry in rec["transcoders"].values() for a in entry.values()]
        ident = ("uns", key, tuple(id(a) for a in arrays), str(device))
    if ident in cache:
        cache.move_to_end(ident)
        return cache[ident]
    cpu = _linked_set(rec, key) if "weights" in rec else _embedded_set(rec, key)
    cache[ident] = tset = cpu.to(device)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return tset


def _embedded_set(rec: dict, key: str) -> TranscoderSet:
    transcoders = {}
    for name, entry in rec["transcoders"].items():
        layer = Key.parse_layer(name)
        try:
            config = TranscoderConfig.from_dict(dict(entry["config"]))
            weights = {k: np.asarray(v) for k, v in entry.items() if k != "config"}
            # float32 arrays are wrapped, not copied
            transcoders[layer] = Transcoder.from_tensors(config, weights, copy=False)
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"adata.uns[{key!r}]['transcoders'][{name!r}] is damaged: {err}"
            ) from err
    return _with_record(transcoders, rec)


def _linked_set(rec: dict, key: str) -> TranscoderSet:
    link = rec["weights"]
    path = Path(str(link["path"]))
    fix = (
        "Move the directory back, or link its new place with "
        f"`sct.load_transcoders(new_path, adata, key_added={key!r}, link=True)`."
    )
    if not path.is_dir():
        raise FileNotFoundError(
            f"The transcoders of adata.uns[{key!r}] are linked to {path}, which does not exist "
            f"(moved or deleted?). {fix}"
        )
    try:
        if manifest_sha256(path) != str(link["manifest_sha256"]):
            raise TranscoderDirectoryError(
                f"The transcoder directory {path} has changed since it was linked to "
                f"adata.uns[{key!r}] (its manifest differs). {fix}"
            )
    except FileNotFoundError as err:
        raise TranscoderDirectoryError(f"{path} has no manifest.json. {fix}") from err
    tset = TranscoderSet.load(path)
    return _with_record(dict(tset.items()), rec)


def _with_record(transcoders: dict[int, Transcoder], rec: dict) -> TranscoderSet:
    params = dict(rec.get("params", {}))
    config = TrainingConfig.from_dict(dict(params.pop("config"))) if "config" in params else None
    return TranscoderSet(
        transcoders,
        model=_plain(dict(rec.get("model", {}))),
        config=config,
        run=_plain(params),
        metrics=_metrics_from_uns(rec.get("metrics", {})),
    )


def resolve_model(adata: AnnData, key: str, model: C2SModel | str | None) -> C2SModel:
    """The model the transcoders of ``adata.uns[key]`` were trained on, checked by fingerprint.

    Without ``model``, the recorded name is loaded (the embedded model, a local path or a hub id).
    """
    recorded = transcoder_record(adata, key)["model"]
    if model is None:
        from .datasets import TINY_C2S_NAME, tiny_c2s

        name = str(recorded["name"])
        model = tiny_c2s() if name == TINY_C2S_NAME else load_model(name)
    elif not isinstance(model, C2SModel):
        model = load_model(model)
    check_fingerprint(recorded, model)
    return model


def model_and_transcoders(
    adata: AnnData, key: str, model: C2SModel | str | None, *, layers=None
) -> tuple[C2SModel, TranscoderSet]:
    """The base model (fingerprint checked) and the transcoders of ``adata.uns[key]`` on its device."""
    rec = transcoder_record(adata, key)
    layers = None if layers is None else [int(x) for x in np.atleast_1d(layers)]
    if layers is not None:  # a missing layer is refused before any model is loaded
        available = [Key.parse_layer(n) for n in rec.get("transcoders", {})] or None
        if available is not None and (missing := sorted(set(layers) - set(available))):
            raise KeyError(
                f"No transcoder for layer(s) {missing} in adata.uns[{key!r}]; trained layers: "
                f"{sorted(available)}. Train them with "
                "`sct.tl.train_transcoders(adata, model, layers=...)`."
            )
    model = resolve_model(adata, key, model)
    return model, transcoder_set(adata, key, layers=layers, device=model.device)


def recorded_sentence_key(rec: dict) -> str:
    """The ``adata.obs`` column of sentences a transcoder set was trained on."""
    return str(rec.get("params", {}).get("sentence_key", Key.sentence))


def check_fingerprint(recorded: dict, model: C2SModel) -> None:
    """Refuse ``model`` unless its fingerprint is the recorded one."""
    expected = str(recorded["fingerprint"])
    if model.fingerprint != expected:
        raise ValueError(
            f"These transcoders were trained on model {recorded['name']!r} (fingerprint "
            f"{expected}), but the model given is {model.name!r} (fingerprint {model.fingerprint}):"
            " its config or weights differ. Pass the model the transcoders were trained on, or "
            "train new ones."
        )


def _metrics_to_uns(metrics: dict) -> dict:
    layers = metrics.get("layers", {})
    df = pd.DataFrame(layers)
    if "layer" in df:
        df.index = [Key.layer(int(x)) for x in df["layer"]]
    return {"layers": df, "model": {k: float(v) for k, v in metrics.get("model", {}).items()}}


def _metrics_from_uns(metrics: dict) -> dict:
    df = pd.DataFrame(metrics.get("layers", pd.DataFrame()))
    return {
        "layers": {c: _plain(df[c].to_numpy()) for c in df.columns},
        "model": {k: float(v) for k, v in dict(metrics.get("model", {})).items()},
    }


def _plain(value):
    """Numpy values as plain Python (for JSON and dataclasses)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def strings(values) -> np.ndarray:
    """A string array read from ``adata.uns`` as a numpy ``str`` array (``.zarr`` gives numpy's
    ``StringDType``, which does not cast to ``str`` directly; ``.h5ad`` gives objects).
    """
    return np.asarray(values, dtype=object).astype(str)


# -- sentences ------------------------------------------------------------------------------------


def sentences(
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


# -- activations ----------------------------------------------------------------------------------


def activations_record(adata: AnnData, activations_key: str) -> dict:
    """The activation record ``adata.uns[activations_key]`` of :func:`feature_activations`."""
    rec = record(
        adata,
        activations_key,
        kind="feature activations",
        hint="run `sct.tl.feature_activations(adata)` first, or pass the `activations_key=` "
        "(the key_added) you used.",
    )
    if "obsm_keys" not in rec:
        raise KeyError(f"adata.uns[{activations_key!r}] is not a feature activation record.")
    return rec


def activation_layers(rec: dict, layers, activations_key: str) -> list[int]:
    """``layers`` (default: all) checked against the layers of an activation record."""
    available = sorted(Key.parse_layer(k) for k in rec["obsm_keys"])
    if layers is None:
        return available
    layers = [int(x) for x in np.atleast_1d(layers)]
    missing = [x for x in layers if x not in available]
    if missing:
        raise KeyError(
            f"No activations for layer(s) {missing} in adata.uns[{activations_key!r}]; "
            f"available layers: {available}. Run `sct.tl.feature_activations(adata, layers=...)`."
        )
    return layers


def obsm_activations(adata: AnnData, rec: dict, layer: int, activations_key: str):
    """The cells x features matrix of one layer (CSR), checked to be present."""
    obsm_key = str(rec["obsm_keys"][Key.layer(layer)])
    if obsm_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{obsm_key!r}] (layer {layer} of adata.uns[{activations_key!r}]) is "
            "missing: rerun `sct.tl.feature_activations(adata)`."
        )
    return adata.obsm[obsm_key]


# -- circuits -------------------------------------------------------------------------------------


def circuit_record(adata: AnnData, circuit: str) -> tuple[str, dict]:
    """``(name, record)`` of a traced circuit, by its key or by its cell's name."""
    from ._legacy import upgrade

    upgrade(adata)
    for name in (circuit, Key.circuit(str(circuit))):
        value = adata.uns.get(name)
        if isinstance(value, dict) and "nodes" in value and "edges" in value:
            return name, value
    available = circuit_names(adata)
    raise KeyError(
        f"No circuit {circuit!r} in adata.uns (by key, or by cell name as "
        f"{Key.circuit(str(circuit))!r}); circuits: {available}. Trace one with "
        "`sct.tl.trace_circuit(adata, cell=...)`."
    )


def circuit_names(adata: AnnData) -> list[str]:
    """Keys of every traced circuit in ``adata.uns``."""
    return sorted(
        k for k, v in adata.uns.items() if isinstance(v, dict) and "nodes" in v and "edges" in v
    )
