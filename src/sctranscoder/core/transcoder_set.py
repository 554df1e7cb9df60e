"""A set of transcoders, one per MLP layer of one base model: the unit that is trained, saved,
loaded, moved to a device and used by every tool. Torch only.

On disk a set is a directory::

    config.json          format, layers with their shapes, base-model record, training config,
                         metrics
    layer_<i>.safetensors  the weights of layer i (W_enc, b_enc, W_dec, b_dec[, W_skip])
    manifest.json        every other file with its size and sha256

Loading checks the manifest first (every file listed is present with its size and checksum,
nothing else is there), then the config; file names come from the manifest's fixed pattern, never
from file contents. A directory is written to a temporary sibling and renamed into place, so an
interrupted save leaves the previous directory as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_directory
from .training.config import TrainingConfig
from .transcoder import Transcoder, TranscoderConfig, same_device

#: ``format`` of ``config.json`` written now, and the one of sctranscoder 0.1 (no manifest).
FORMAT = "sctranscoder.transcoders/2"
LEGACY_FORMAT = "sctranscoder.transcoders/1"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")


def layer_file(layer: int) -> str:
    """File name of a layer's weights inside a transcoder directory."""
    return f"layer_{int(layer)}.safetensors"


class TranscoderDirectoryError(ValueError):
    """A transcoder directory is missing, incomplete, changed or not one at all."""


@dataclass(eq=False)
class TranscoderSet(Mapping[int, Transcoder]):
    """Transcoders of one base model, by layer, with everything needed to use and trust them.

    Attributes
    ----------
    transcoders
        One :class:`~sctranscoder.core.transcoder.Transcoder` per MLP layer.
    model
        The base model's record: ``name``, ``fingerprint`` (checked whenever the transcoders
        are used, see :meth:`check_model`), ``architecture``, widths and prompt settings.
    config
        The :class:`~sctranscoder.core.training.TrainingConfig` they were trained with (None for
        transcoders made elsewhere).
    run
        Facts of the training run: tokens seen, steps, seconds, device, ranks, sentence key.
    metrics
        ``{"layers": {column: [value per layer]}, "model": {score: value}}``.
    """

    transcoders: dict[int, Transcoder]
    model: dict[str, Any] = field(default_factory=dict)
    config: TrainingConfig | None = None
    run: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.transcoders:
            raise ValueError("A transcoder set needs at least one layer.")
        bad = [
            k
            for k in self.transcoders
            if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0
        ]
        if bad:
            raise ValueError(f"Layers must be non-negative integers, got {bad}.")
        self.transcoders = {int(k): v for k, v in sorted(self.transcoders.items())}

    def __repr__(self) -> str:
        c = next(iter(self.transcoders.values())).config
        return (
            f"TranscoderSet({len(self)} layers {self.layers}, {c.activation} k={c.k}, "
            f"{c.n_features} features of {c.d_in}, model {self.model.get('name', '?')!r})"
        )

    # -- a mapping of layers --------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """The layers, ascending."""
        return list(self.transcoders)

    def __getitem__(self, layer: int) -> Transcoder:
        try:
            return self.transcoders[int(layer)]
        except KeyError:
            raise KeyError(
                f"No transcoder for layer {layer}; this set has layers {self.layers}."
            ) from None

    def __contains__(self, layer: object) -> bool:
        return layer in self.transcoders

    def __iter__(self) -> Iterator[int]:
        return iter(self.transcoders)

    def __len__(self) -> int:
        return len(self.transcoders)

    def subset(self, layers: list[int]) -> TranscoderSet:
        """The same set restricted to ``layers`` (modules shared, not copied)."""
        missing = [la for la in layers if la not in self.transcoders]
        if missing:
            raise KeyError(
                f"No transcoder for layer(s) {missing}; this set has layers {self.layers}. "
                "Train them with `sct.tl.train_transcoders(adata, model, layers=...)`."
            )
        return TranscoderSet(
            {la: self.transcoders[la] for la in layers},
            self.model,
            self.config,
            self.run,
            self.metrics,
        )

    # -- device and size --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(iter(self.transcoders.values())).W_enc.device

    @property
    def n_bytes(self) -> int:
        """Bytes of all weights."""
        return sum(
            t.numel() * t.element_size()
            for tc in self.transcoders.values()
            for t in tc.state_arrays().values()
        )

    def to(self, device: torch.device | str) -> TranscoderSet:
        """The set on ``device``: ``self`` when already there, else a moved copy."""
        device = torch.device(device)
        if same_device(self.device, device):
            return self
        moved = {layer: tc.moved(device) for layer, tc in self.transcoders.items()}
        return TranscoderSet(moved, self.model, self.config, self.run, self.metrics)

    # -- identity -------------------------------------------------------------------------------
    def check_model(self, fingerprint: str, name: str = "") -> None:
        """Refuse a base model whose fingerprint is not the one these transcoders were trained on."""
        check_fingerprint(self.model, fingerprint, name)

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the set to directory ``path`` (see the module docstring); returns the path.

        Atomic: files go to a temporary sibling, which is renamed to ``path`` once complete; with
        ``overwrite=True`` an existing set at ``path`` is replaced only then. An existing
        ``path`` is refused otherwise.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} exists: pass overwrite=True to replace it, or choose a new directory."
            )
        if path.exists() and not _is_transcoder_directory(path):
            raise FileExistsError(
                f"{path} exists and is not a transcoder directory (config.json of sctranscoder "
                "and layer files only): overwrite=True replaces only those. Choose a new directory."
            )
        with atomic_directory(path) as tmp:
            for layer, tc in self.transcoders.items():
                tensors = {
                    k: t.detach().to("cpu", torch.float32).contiguous()
                    for k, t in tc.state_arrays().items()
                }
                save_file(tensors, str(tmp / layer_file(layer)))
            (tmp / CONFIG_FILE).write_text(
                json.dumps(self._config_doc(), indent=2, default=_json_default) + "\n"
            )
            names = [CONFIG_FILE, *(layer_file(la) for la in self.layers)]
            manifest = {
                "format": "sctranscoder.manifest/1",
                "files": {n: _file_entry(tmp / n) for n in names},
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return path

    def _config_doc(self) -> dict:
        return {
            "format": FORMAT,
            "layers": {str(la): tc.config.to_dict() for la, tc in self.transcoders.items()},
            "model": self.model,
            "config": None if self.config is None else self.config.to_dict(),
            "run": self.run,
            "metrics": self.metrics,
        }

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, layers: list[int] | None = None, verify: bool = True
    ) -> TranscoderSet:
        """Read a set written by :meth:`save` (or by sctranscoder 0.1's ``save_transcoders``).

        Parameters
        ----------
        path
            The directory.
        layers
            Read only these layers' files (default: all).
        verify
            Check the sha256 of every file read against the manifest (else only names and
            sizes); about a second per GB.
        """
        info = read_info(path, layers=layers, verify=verify)
        transcoders = {
            la: _read_layer(Path(path) / layer_file(la), info.layers[la]) for la in info.selected
        }
        return cls(transcoders, info.model, info.config, info.run, info.metrics)


@dataclass
class DirectoryInfo:
    """What a transcoder directory holds, read without its weights (:func:`read_info`)."""

    layers: dict[int, TranscoderConfig]
    selected: list[int]
    model: dict[str, Any]
    config: TrainingConfig | None
    run: dict[str, Any]
    metrics: dict[str, Any]
    n_bytes: int


def read_info(
    path: str | os.PathLike, *, layers: list[int] | None = None, verify: bool = False
) -> DirectoryInfo:
    """A transcoder directory's layers, records and size, checked against its manifest.

    Every file must be listed with its size and no other file may be there; with ``verify``,
    ``config.json`` and the files of ``layers`` (default: all) are also checked by sha256.
    """
    path = Path(path)
    if not path.is_dir():
        raise TranscoderDirectoryError(
            f"{path} is not a directory of transcoders (it does not exist or is a file)."
        )
    files = read_manifest(path, verify=False)
    doc = _read_json(path / CONFIG_FILE)
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt not in (FORMAT, LEGACY_FORMAT):
        raise TranscoderDirectoryError(
            f"{path / CONFIG_FILE} is not an sctranscoder transcoder config (format {fmt!r})."
        )
    if fmt == FORMAT and files is None:
        raise TranscoderDirectoryError(f"{path / MANIFEST_FILE} is missing.")
    configs = _layer_configs(doc, path)
    selected = sorted(configs) if layers is None else [int(x) for x in layers]
    missing = sorted(set(selected) - set(configs))
    if missing:
        raise KeyError(
            f"{path} has no transcoder for layer(s) {missing}; layers: {sorted(configs)}."
        )
    if files is not None:
        if set(files) - {CONFIG_FILE} != {layer_file(la) for la in configs}:
            raise TranscoderDirectoryError(
                f"{path}: the manifest lists {sorted(set(files) - {CONFIG_FILE})} but "
                f"{CONFIG_FILE} has layers {sorted(configs)}."
            )
        if verify:
            for name in [CONFIG_FILE, *(layer_file(la) for la in selected)]:
                _check_sha256(path / name, files[name]["sha256"], path / MANIFEST_FILE)
        n_bytes = sum(int(files[layer_file(la)]["bytes"]) for la in configs)
    else:
        n_bytes = sum((path / layer_file(la)).stat().st_size for la in configs)
    if fmt == LEGACY_FORMAT:
        meta = doc.get("metadata", {})
        params = dict(meta.get("params", {}))
        model, config, run = dict(meta.get("model", {})), _legacy_config(params), params
        metrics = dict(meta.get("metrics", {}))
    else:
        model, run = dict(doc.get("model") or {}), dict(doc.get("run") or {})
        config = None if doc.get("config") is None else TrainingConfig.from_record(doc["config"])
        metrics = dict(doc.get("metrics") or {})
    return DirectoryInfo(configs, selected, model, config, run, metrics, n_bytes)


def check_fingerprint(model_record: dict, fingerprint: str, name: str = "") -> None:
    """Refuse a model (its ``fingerprint``) unless it is the one of ``model_record``."""
    expected = str(model_record.get("fingerprint", ""))
    if expected and fingerprint != expected:
        raise ValueError(
            f"These transcoders were trained on model {model_record.get('name', '?')!r} "
            f"(fingerprint {expected}), but the model given is {name!r} (fingerprint "
            f"{fingerprint}): its config or weights differ. Pass the model the transcoders were "
            "trained on, or train new ones."
        )


def manifest_sha256(path: str | os.PathLike) -> str:
    """sha256 of a directory's ``manifest.json``: it identifies the whole directory's content."""
    return hashlib.sha256((Path(path) / MANIFEST_FILE).read_bytes()).hexdigest()


def read_manifest(path: Path, *, verify: bool) -> dict[str, dict] | None:
    """The files of a transcoder directory by its manifest, checked; None for a legacy directory.

    Every listed file must be present with its size (and, with ``verify``, its sha256) and no
    other file may be there. Names must be ``config.json`` or ``layer_<i>.safetensors``.
    """
    manifest = path / MANIFEST_FILE
    if not manifest.exists():
        return None
    doc = _read_json(manifest)
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not files:
        raise TranscoderDirectoryError(f"{manifest} lists no files.")
    for name, entry in files.items():
        if name != CONFIG_FILE and not _LAYER_FILE.fullmatch(str(name)):
            raise TranscoderDirectoryError(f"{manifest} lists an unexpected file name {name!r}.")
        if not isinstance(entry, dict) or not {"bytes", "sha256"} <= set(entry):
            raise TranscoderDirectoryError(f"{manifest}: the entry of {name!r} is incomplete.")
    present = {p.name for p in path.iterdir()} - {MANIFEST_FILE}
    missing, unknown = sorted(set(files) - present), sorted(present - set(files))
    if missing or unknown:
        raise TranscoderDirectoryError(
            f"{path} does not match its manifest: missing {missing}, unknown {unknown}. "
            "Save the transcoders again, or restore the directory."
        )
    for name, entry in files.items():
        f = path / name
        if f.stat().st_size != int(entry["bytes"]):
            raise TranscoderDirectoryError(
                f"{f} has {f.stat().st_size} bytes, the manifest says {entry['bytes']}: the file "
                "is truncated or was changed."
            )
        if verify:
            _check_sha256(f, entry["sha256"], manifest)
    return files


def _check_sha256(file: Path, expected: str, manifest: Path) -> None:
    if _sha256(file) != expected:
        raise TranscoderDirectoryError(
            f"{file} does not match the sha256 in {manifest}: the file was changed or damaged."
        )


def _layer_configs(doc: dict, path: Path) -> dict[int, TranscoderConfig]:
    raw = doc.get("layers")
    if not isinstance(raw, dict) or not raw:
        raise TranscoderDirectoryError(f"{path / CONFIG_FILE} lists no layers.")
    out = {}
    for name, cfg in raw.items():
        if not re.fullmatch(r"\d+", str(name)):
            raise TranscoderDirectoryError(
                f"{path / CONFIG_FILE}: layer {name!r} is not a non-negative integer."
            )
        if not isinstance(cfg, dict):
            raise TranscoderDirectoryError(f"{path / CONFIG_FILE}: layer {name} has no settings.")
        try:
            out[int(name)] = TranscoderConfig.from_dict(cfg)
        except ValueError as err:
            raise TranscoderDirectoryError(f"{path / CONFIG_FILE}, layer {name}: {err}") from err
    return out


def _read_layer(file: Path, config: TranscoderConfig) -> Transcoder:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise TranscoderDirectoryError(f"{file} is missing.")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise TranscoderDirectoryError(f"{file} cannot be read as safetensors: {err}") from err
    try:
        return Transcoder.from_tensors(config, tensors, copy=False)
    except ValueError as err:
        raise TranscoderDirectoryError(f"{file}: {err}") from err


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise TranscoderDirectoryError(
            f"{file} not found: is {file.parent} a transcoder directory?"
        )
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TranscoderDirectoryError(
            f"{file} is not valid JSON ({err}): it is truncated or damaged."
        ) from err


def _legacy_config(params: dict) -> TrainingConfig | None:
    """The training config of a 0.1 record, whose parameters mixed config and run facts."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    values = {k: v for k, v in params.items() if k in names}
    try:
        return TrainingConfig.from_record(values)
    except (TypeError, ValueError):
        return None


def _file_entry(file: Path) -> dict:
    with open(file, "rb") as fh:
        os.fsync(fh.fileno())
    return {"bytes": file.stat().st_size, "sha256": _sha256(file)}


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_transcoder_directory(path: Path) -> bool:
    """Whether ``path`` holds a saved transcoder set and nothing else (safe to replace)."""
    if not path.is_dir():
        return False
    allowed = {CONFIG_FILE, MANIFEST_FILE}
    names = {p.name for p in path.iterdir()}
    if CONFIG_FILE not in names or any(
        n not in allowed and not _LAYER_FILE.fullmatch(n) for n in names
    ):
        return False
    try:
        doc = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") in (FORMAT, LEGACY_FORMAT)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"Cannot serialise {type(o).__name__} to JSON.")
