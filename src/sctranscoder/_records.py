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

import uuid
import weakref
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scanpy import logging as logg

from ._constants import Key
from .core.model import C2SModel, load_model
from .core.training import TrainingConfig
from .core.transcoder import Transcoder, TranscoderConfig
from .core.transcoder_set import (
    TranscoderDirectoryError,
    TranscoderSet,
    manifest_sha256,
    read_info,
)
from .core.transcoder_set import check_fingerprint as _check_fingerprint

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

#: Above this many bytes of weights, :func:`sctranscoder.load_transcoders` links the directory
#: instead of copying the weights into ``adata.uns`` (unless told otherwise).
EMBED_LIMIT_BYTES = 1 << 30
#: Transcoder sets kept built per AnnData (for as long as it lives), by record and device.
_CACHE_SIZE = 4
_cache: dict[int, OrderedDict[tuple, TranscoderSet]] = {}


# -- keys -----------------------------------------------------------------------------------------


#: Longest ``key_added`` in UTF-8 bytes: derived names (``X_<key>_L<i>``, ``<key>_n_genes``,
#: ``<key>_enrichment``) must stay under the 255 bytes of a file name in .zarr stores.
MAX_KEY_BYTES = 200


def check_key(
    name: object,
    what: str = "key_added",
    *,
    adata: AnnData | None = None,
    kind: str = "",
    obs_columns: Sequence[str] = (),
) -> str:
    r"""A key that every storage backend accepts: a non-empty string without ``/`` or ``\\``,
    not starting with ``.``, without control characters, not ``"_index"``, at most
    :data:`MAX_KEY_BYTES` bytes.

    With ``adata`` and ``kind``, also one that does not name an entry of ``adata.uns`` of
    another kind (a tool replaces its own kind of record, never, say, transcoders with
    activations, or scanpy's ``"neighbors"``), and whose ``obs_columns`` (the columns the tool
    will write) are new or were written with the record of that name (never a user's column).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, got {name!r}.")
    for bad in ("/", "\\"):
        if bad in name:
            raise ValueError(
                f"{what}={name!r} contains {bad!r}, which .h5ad or .zarr files read as a path: "
                "choose a name without it."
            )
    problem = (
        "starts with '.' (.zarr keeps its own metadata in such names)"
        if name.startswith(".")
        else "holds a control character"
        if any(ord(c) < 32 or ord(c) == 127 for c in name)
        else "is a name anndata uses itself"
        if name == "_index"
        else f"is {len(name.encode())} bytes long (at most {MAX_KEY_BYTES}: the names derived "
        "from it must stay file names in .zarr)"
        if len(name.encode()) > MAX_KEY_BYTES
        else None
    )
    if problem is not None:
        raise ValueError(
            f"{what}={name!r} cannot be stored in .h5ad and .zarr files: it {problem}. Choose "
            "a plain name such as 'sct_run2'."
        )
    if adata is not None and name in adata.uns:
        existing = record_kind(adata.uns[name])
        if existing != kind:
            raise ValueError(
                f"{what}={name!r} would replace adata.uns[{name!r}], which holds "
                f"{existing or 'something that is not a ' + kind + ' record'}: choose another "
                f"{what}."
            )
    if adata is not None:
        ours = record_kind(adata.uns.get(name)) == kind  # columns written with this record
        taken = [c for c in obs_columns if c in adata.obs.columns and not ours]
        if taken:
            raise ValueError(
                f"{what}={name!r} would replace adata.obs column(s) {taken}, which this tool did "
                f"not write: choose another {what}."
            )
    return name


#: How each kind of record is recognised: keys it always has.
_KINDS = {
    "circuit": ("nodes", "edges", "genes", "scores"),
    "activations": ("obsm_keys", "firing_rate", "params"),
    # before "annotation", whose keys it also has
    "neuron baseline": ("features", "summary", "model", "params"),
    "annotation": ("features", "summary", "params"),
    "random model baseline": ("summary", "metrics", "model", "params"),
    "circuit enrichment": ("table", "params"),
    "circuit score": ("influence", "features", "genes", "params"),
    "gene attribution": ("genes", "effects", "agreement", "params"),
    "feature ranking": ("names", "scores", "group_means", "params"),
    "feature connections": ("connections", "params"),
    "feature stability": ("summary", "layers", "params"),
    "probe": ("summary", "folds", "params"),
    "cell embedding": ("obsm_key", "model", "params"),
    "sae": ("sae", "metrics", "params"),
    "sae sweep": ("sweep", "params"),
}


def record_kind(value: object) -> str:
    """The kind of sctranscoder record ``value`` is (``"transcoders"``, ``"circuit"``, ...), or
    ``""`` for anything else.
    """
    from ._legacy import is_transcoder_record

    if is_transcoder_record(value):
        return "transcoders"
    if not isinstance(value, dict):
        return ""
    if set(value) == {"params"} and {"template", "n_genes"} <= set(value["params"]):
        return "cell sentences"
    for kind, keys in _KINDS.items():
        if all(k in value for k in keys):
            return kind
    return ""


def record(adata: AnnData, key: str, *, kind: str, hint: str) -> dict:
    """``adata.uns[key]``, upgraded from an older layout if needed, or a KeyError with ``hint``."""
    from ._legacy import upgrade

    upgrade(adata)
    value = adata.uns.get(key)
    if not isinstance(value, dict):
        raise KeyError(f"No {kind} in adata.uns[{key!r}]: {hint}")
    check_current(adata, key, value)
    return value


def transcoders_id(adata: AnnData, key: str) -> str:
    """The ``weights_id`` of the transcoder record ``adata.uns[key]``: results made with it
    record it as ``params["transcoders_id"]`` (:func:`check_current`).
    """
    return str(adata.uns[key].get("weights_id", ""))


def check_current(adata: AnnData, key: str, value: dict) -> None:
    """Refuse a result made with transcoders that ``adata.uns`` no longer holds.

    A result (activations, annotation, circuit, ...) records the transcoder record it used
    (``params["transcoders_key"]``) and that record's ``weights_id`` (``transcoders_id``);
    training or loading other transcoders under the same key gives a new id, and the old
    result then describes features that are not there any more.
    """
    params = _params(value)
    used, tkey = params.get("transcoders_id"), params.get("transcoders_key")
    if not used or tkey is None or not isinstance(adata.uns.get(str(tkey)), dict):
        return
    current = adata.uns[str(tkey)].get("weights_id")
    if current is not None and str(current) != str(used):
        raise ValueError(
            f"adata.uns[{key!r}] was made with other transcoders than those now in "
            f"adata.uns[{str(tkey)!r}] (trained or loaded again since): its features are not "
            "these. Compute it again (e.g. `sct.tl.feature_activations(adata)`, then the tools "
            "that read it), or keep both sets under different keys (`key_added=`)."
        )


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
    return TrainingConfig.from_record(dict(rec["params"]["config"]))


def write_transcoders(
    adata: AnnData,
    key: str,
    tset: TranscoderSet,
    *,
    params: dict,
    weights_dir: str | os.PathLike | None = None,
    manifest: str | None = None,
    weights_id: str | None = None,
) -> None:
    """Store ``tset`` as ``adata.uns[key]``: weights in the record, or linked in ``weights_dir``.

    ``weights_dir`` must already hold the set (``tset.save(weights_dir)``); ``manifest`` is its
    manifest's sha256 when known (data-parallel ranks without the directory get rank 0's). The
    record gets a new ``weights_id`` (what the cache of built sets and the results made with
    them know it by), or ``weights_id`` when the same weights are stored another way.
    """
    if weights_dir is not None:
        write_link(
            adata,
            key,
            weights_dir,
            model=tset.model,
            metrics=tset.metrics,
            params=params,
            n_bytes=tset.n_bytes,
            manifest=manifest,
            weights_id=weights_id,
        )
        return
    rec = _base_record(tset.model, tset.metrics, params, weights_id)
    rec["transcoders"] = {
        Key.layer(layer): {"config": tc.config.to_dict(), **tc.to_numpy()}
        for layer, tc in tset.items()
    }
    adata.uns[key] = rec


def write_link(
    adata: AnnData,
    key: str,
    weights_dir: str | os.PathLike,
    *,
    model: dict,
    metrics: dict,
    params: dict,
    n_bytes: int,
    manifest: str | None = None,
    weights_id: str | None = None,
) -> None:
    """Store a transcoder record that links to the saved set in ``weights_dir`` (path and the
    sha256 of its manifest), without reading its weights.
    """
    path = Path(weights_dir).resolve()
    rec = _base_record(model, metrics, params, weights_id)
    rec["weights"] = {
        "path": str(path),
        "manifest_sha256": manifest or manifest_sha256(path),
        "n_bytes": int(n_bytes),
    }
    adata.uns[key] = rec


def _base_record(model: dict, metrics: dict, params: dict, weights_id: str | None) -> dict:
    return {
        "params": params,
        "model": dict(model),
        "metrics": _metrics_to_uns(metrics),
        "weights_id": weights_id or uuid.uuid4().hex,
    }


def layer_configs(rec: dict, key: str) -> dict[int, TranscoderConfig]:
    """The shape of every layer's transcoder, without reading any weight."""
    if "weights" in rec:
        return read_info(_linked_path(rec, key)).layers
    return {
        Key.parse_layer(name): TranscoderConfig.from_dict(dict(entry["config"]))
        for name, entry in rec["transcoders"].items()
    }


def transcoder_set(
    adata: AnnData,
    key: str = Key.transcoders,
    *,
    layers: list[int] | None = None,
    device: torch.device | str | None = None,
) -> TranscoderSet:
    """The transcoders of ``adata.uns[key]`` as a :class:`TranscoderSet` (frozen, cached).

    Only the requested layers are read and moved to ``device``. Weights stored in the record are
    wrapped without a copy on the CPU (editing them edits ``adata.uns``); a linked directory is
    read and checked (manifest, checksums) when first used. Built sets are cached for as long as
    the AnnData lives, per record, layers and device, so tools never rebuild them call after call.
    """
    rec = transcoder_record(adata, key)
    device = torch.device(device) if device is not None else torch.device("cpu")
    available = sorted(layer_configs(rec, key)) if "weights" not in rec else None
    if layers is not None:
        layers = sorted({int(x) for x in np.atleast_1d(layers)})
        _check_available(layers, available if available is not None else _recorded_layers(rec), key)
    return _cached_set(adata, rec, key, layers, device)


def _cached_set(
    adata: AnnData, rec: dict, key: str, layers: list[int] | None, device: torch.device
) -> TranscoderSet:
    """The set of ``rec`` on ``device``, from this AnnData's cache when built before.

    The cache of an AnnData goes with it (a finaliser). Entries are known by the record's key and
    ``weights_id`` (a record written again gets a new one, and its old entries are dropped), by
    the identity of the weight arrays for records without one (written by hand or by 0.1).
    """
    if id(adata) not in _cache:
        _cache[id(adata)] = OrderedDict()
        weakref.finalize(adata, _cache.pop, id(adata), None)
    cache = _cache[id(adata)]
    link = (
        f"{rec['weights']['path']}:{rec['weights']['manifest_sha256']}" if "weights" in rec else ""
    )
    if "weights_id" in rec:  # a record relinked keeps its id: where the weights are counts too
        token = f"{rec['weights_id']}:{link}"
    elif link:
        token = link
    else:
        token = str(tuple(id(a) for entry in rec["transcoders"].values() for a in entry.values()))
    for stale in [k for k in cache if k[0] == key and k[1] != token]:
        del cache[stale]
    ident = (key, token, None if layers is None else tuple(layers), str(device))
    if ident in cache:
        cache.move_to_end(ident)
        return cache[ident]
    if "weights" in rec:
        cpu = _linked_set(rec, key, layers)
    else:
        cpu = _embedded_set(rec, key, layers)
    cache[ident] = tset = cpu.to(device)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return tset


def _recorded_layers(rec: dict) -> list[int]:
    """The layers a transcoder record says it has (from the run's params, or its weights)."""
    if "layers" in rec.get("params", {}):
        return sorted(int(x) for x in np.atleast_1d(rec["params"]["layers"]))
    return sorted(Key.parse_layer(n) for n in rec.get("transcoders", {}))


def _check_available(layers: list[int], available: list[int], key: str) -> None:
    missing = sorted(set(layers) - set(available))
    if missing:
        raise KeyError(
            f"No transcoder for layer(s) {missing} in adata.uns[{key!r}]; trained layers: "
            f"{available}. Train them with `sct.tl.train_transcoders(adata, model, layers=...)`."
        )


def _embedded_set(rec: dict, key: str, layers: list[int] | None) -> TranscoderSet:
    transcoders = {}
    for name, entry in rec["transcoders"].items():
        layer = Key.parse_layer(name)
        if layers is not None and layer not in layers:
            continue
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


def _linked_path(rec: dict, key: str) -> Path:
    """The directory a transcoder record links to, checked to be the one it linked."""
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
    return path


def _linked_set(rec: dict, key: str, layers: list[int] | None) -> TranscoderSet:
    tset = TranscoderSet.load(_linked_path(rec, key), layers=layers)
    return _with_record(dict(tset.items()), rec)


def _with_record(transcoders: dict[int, Transcoder], rec: dict) -> TranscoderSet:
    params = dict(rec.get("params", {}))
    config = TrainingConfig.from_record(dict(params.pop("config"))) if "config" in params else None
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
    """The base model (fingerprint checked) and the transcoders of ``adata.uns[key]`` on its
    device; a missing layer is refused before any model is loaded.
    """
    rec = transcoder_record(adata, key)
    if layers is not None:
        layers = sorted({int(x) for x in np.atleast_1d(layers)})
        _check_available(layers, _recorded_layers(rec), key)
    model = resolve_model(adata, key, model)
    return model, transcoder_set(adata, key, layers=layers, device=model.device)


def recorded_sentence_key(rec: dict) -> str:
    """The ``adata.obs`` column of sentences a transcoder set was trained on."""
    return str(rec.get("params", {}).get("sentence_key", Key.sentence))


def check_fingerprint(recorded: dict, model: C2SModel) -> None:
    """Refuse ``model`` unless its fingerprint is the recorded one."""
    _check_fingerprint(recorded, model.fingerprint, str(model.name))


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


def _check_sentence_column(adata: AnnData, sentence_key: str, column: pd.Series) -> None:
    """Refuse a column that holds numbers or labels rather than cell sentences.

    Sentences made by :func:`sctranscoder.pp.cell_sentences` (their record is in
    ``adata.uns[sentence_key]``) are taken as they are; any other column must hold text, and
    not the few repeated values of a label column (say ``"bulk_labels"``).
    """
    fix = (
        f"adata.obs[{sentence_key!r}] does not hold cell sentences ({{why}}): pass the "
        "`sentence_key=` of the sentences, or make them with `sct.pp.cell_sentences(adata, "
        "model=model)`."
    )
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        raise ValueError(fix.format(why=f"it holds {column.dtype} values"))
    if record_kind(adata.uns.get(sentence_key)) == "cell sentences" or adata.n_obs < 20:
        return
    n_distinct = column.nunique(dropna=True)
    if n_distinct < adata.n_obs / 2:
        raise ValueError(
            fix.format(
                why=f"{n_distinct} distinct values over {adata.n_obs} cells, as in a column of "
                "labels, and no sentence record in adata.uns"
            )
        )


def sentences(
    adata: AnnData, sentence_key: str = Key.sentence, *, n_genes: int | None = None
) -> list[list[str]]:
    """Cell sentences from ``adata.obs[sentence_key]`` as lists of symbols.

    With ``n_genes``, each sentence is cut to its top ``n_genes`` genes: a sentence is a ranking,
    so this is exactly the sentence a model reading ``n_genes`` genes expects. A warning says so
    when any sentence is longer.
    """
    if sentence_key not in adata.obs:
        raise KeyError(
            f"adata.obs[{sentence_key!r}] not found: run `sct.pp.cell_sentences(adata, "
            "model=model)` first, or pass `sentence_key=` naming the column with the sentences."
        )
    column = adata.obs[sentence_key]
    _check_sentence_column(adata, sentence_key, column)
    missing = column.isna().to_numpy()
    if missing.any():  # str(NaN) would be read as a gene called "nan"
        names = list(adata.obs_names[missing][:3])
        raise ValueError(
            f"{int(missing.sum())} of {adata.n_obs} cells have no sentence in "
            f"adata.obs[{sentence_key!r}] (e.g. {names}), as after concatenating an AnnData "
            "without sentences: run `sct.pp.cell_sentences` on the combined data, or keep the "
            f"cells that have one: `adata[adata.obs[{sentence_key!r}].notna()]`."
        )
    col = column.astype(str).to_numpy()
    out = [s.split() for s in col]
    longest = max(map(len, out), default=0)
    if n_genes is not None and longest > n_genes:
        logg.warning(
            f"the sentences of adata.obs[{sentence_key!r}] hold up to {longest} genes, but the "
            f"model reads {n_genes}: the top {n_genes} genes of each sentence are used (a "
            "sentence is a ranking, so they are its sentence of that length)"
        )
        out = [s[:n_genes] for s in out]
    empty = [adata.obs_names[i] for i, g in enumerate(out) if not g]
    if empty:
        raise ValueError(
            f"{len(empty)} cells have empty sentences (e.g. {empty[:3]}); filter them out first."
        )
    return out


def sentence_organism(adata: AnnData, sentence_key: str) -> str | None:
    """The organism recorded with the sentences of ``adata.obs[sentence_key]`` by
    :func:`~sctranscoder.pp.cell_sentences`, or ``None`` without such a record.
    """
    rec = adata.uns.get(sentence_key)
    if record_kind(rec) != "cell sentences" or "organism" not in rec["params"]:
        return None
    return str(rec["params"]["organism"])


def cell_prompts(
    adata: AnnData, sentence_key: str, model: C2SModel, *, trained: dict | None = None
) -> tuple[list[list[str]], C2SModel]:
    """The sentences of ``adata.obs[sentence_key]`` as a model reads them, and that model.

    Sentences are cut to the model's ``n_genes`` (:func:`sentences`). Prompts name the organism
    recorded with the sentences (``adata.uns[sentence_key]["params"]["organism"]``): the cells'
    organism is a fact of the data, so where it differs from the model's setting, a copy of
    ``model`` with that organism is returned (same weights and tokenizer), and the model's
    ``record()`` names it. With ``trained``, the model record of a transcoder set: a warning when
    its prompts named another organism.
    """
    organism = sentence_organism(adata, sentence_key)
    if organism is not None and organism != model.settings.organism:
        logg.info(
            f"prompts name {organism!r}, the organism of the sentences in "
            f"adata.obs[{sentence_key!r}] (the model's setting is {model.settings.organism!r})"
        )
        model = replace(model, settings=replace(model.settings, organism=organism))
    used = str(trained.get("organism", "")) if trained is not None else ""
    if used and used != model.settings.organism:
        logg.warning(
            f"these transcoders were trained on prompts naming {used!r} cells, but the prompts "
            f"of adata.obs[{sentence_key!r}] name {model.settings.organism!r}: their features "
            "may not mean the same here. Train transcoders on these sentences, or build the "
            f"sentences with `sct.pp.cell_sentences(adata, model, organism={used!r})`"
        )
    return sentences(adata, sentence_key, n_genes=model.settings.n_genes), model


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


def check_same_transcoders(adata: AnnData, activations_key: str, transcoders_key: str) -> dict:
    """The activation record, refused when it was computed with another transcoder set (its
    feature indices would name other features).
    """
    rec = activations_record(adata, activations_key)
    used = str(rec["params"].get("transcoders_key", transcoders_key))
    if used != transcoders_key:
        raise ValueError(
            f"adata.uns[{activations_key!r}] holds activations of the transcoders "
            f"adata.uns[{used!r}], not of adata.uns[{transcoders_key!r}]: pass the "
            "activations_key of the same transcoders."
        )
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
    for name in (circuit, Key.circuit(str(circuit)), Key.legacy_circuit(str(circuit))):
        value = adata.uns.get(name)
        if not (isinstance(value, dict) and "nodes" in value and "edges" in value):
            continue
        # a cell name found through a default key must be that cell's circuit (before 0.2 the
        # cells "a/b" and "a_b" shared the key "circuit_a_b")
        cell = _params(value).get("cell")
        if name == circuit or cell is None or str(cell) == str(circuit):
            check_current(adata, name, value)
            return name, value
    available = circuit_names(adata)
    raise KeyError(
        f"No circuit {circuit!r} in adata.uns (by key, or by cell name as "
        f"{Key.circuit(str(circuit))!r}); circuits: {available}. Trace one with "
        "`sct.tl.trace_circuit(adata, cell=...)`."
    )


def circuit_dependents(adata: AnnData, circuit: str) -> tuple[list[str], list[str]]:
    """``(uns keys, obs columns)`` written from circuit ``circuit``: its enrichments and scores
    (records whose ``params["circuit"]`` names it) and the score columns in ``obs``.
    """
    uns, obs = [], []
    for key, value in adata.uns.items():
        if record_kind(value) not in ("circuit enrichment", "circuit score"):
            continue
        if str(_params(value).get("circuit", "")) != circuit:
            continue
        uns.append(key)
        if record_kind(value) == "circuit score":
            obs += [c for c in (key, Key.gene_score(key)) if c in adata.obs.columns]
    return uns, obs


def remove_circuit(adata: AnnData, circuit: str) -> list[str]:
    """Remove circuit ``circuit`` and what was derived from it; the names removed."""
    uns, obs = circuit_dependents(adata, circuit)
    for key in [circuit, *uns]:
        adata.uns.pop(key, None)
    adata.obs.drop(columns=obs, inplace=True)
    return [f"adata.uns[{k!r}]" for k in [circuit, *uns]] + [f"adata.obs[{c!r}]" for c in obs]


def _params(value: object) -> dict:
    params = value.get("params") if isinstance(value, dict) else None
    return params if isinstance(params, dict) else {}


def circuit_names(adata: AnnData) -> list[str]:
    """Keys of every traced circuit in ``adata.uns``."""
    return sorted(
        k for k, v in adata.uns.items() if isinstance(v, dict) and "nodes" in v and "edges" in v
    )
