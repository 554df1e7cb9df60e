"""Checks shared by the tools: each raises a clear error before anything is written."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anndata import AnnData

    from .core.model import C2SModel


def check_copy_backed(adata: AnnData, copy: bool) -> None:
    """``copy=True`` of a backed AnnData would load its matrix: refuse, saying what to do."""
    if copy and adata.isbacked:
        raise ValueError(
            "copy=True would load the backed matrix into memory. Use copy=False (a backed "
            "AnnData holds obs, obsm and uns in memory; save them with "
            "`adata.write_h5ad(new_path)`), or call `adata.to_memory()` first."
        )


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int, or a ValueError when it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_fraction(value: object, name: str, *, closed: bool = True) -> float:
    """``value`` in ``(0, 1]`` (or ``(0, 1)`` when not ``closed``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (0 < value < 1 or (closed and value == 1))
    if not ok:
        raise ValueError(f"{name} must be in (0, 1{']' if closed else ')'}, got {value!r}.")
    return float(value)


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """``layers`` (default: all ``n_layers``), sorted, unique and within the model."""
    if layers is None:
        return list(range(n_layers))
    layers = check_layer_list(layers, range(n_layers))
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"Layers {bad} do not exist: the model has MLP layers 0..{n_layers - 1}.")
    return layers


def model_or_default(model: C2SModel | str | None) -> C2SModel:
    """``model`` loaded if given as a name or path; the embedded model when None."""
    from .core.model import C2SModel, load_model

    if model is None:
        from .datasets import tiny_c2s

        return tiny_c2s()
    return model if isinstance(model, C2SModel) else load_model(model)


def duplicated_symbols(symbols: Sequence[str]) -> dict[str, int]:
    """Symbols that occur more than once in ``symbols``, with their counts (first seen first)."""
    counts: dict[str, int] = {}
    for s in symbols:
        counts[s] = counts.get(s, 0) + 1
    return {s: n for s, n in counts.items() if n > 1}


def _examples(duplicates: dict[str, int], n: int = 5) -> str:
    return ", ".join(f"{s!r} x{k}" for s, k in list(duplicates.items())[:n])


def check_unique_symbols(symbols: Sequence[str], *, described: str, fix: str) -> None:
    """Refuse gene symbols that occur more than once: a cell sentence would name such a gene
    twice, and every table by gene would count a cell twice for it.
    """
    duplicates = duplicated_symbols(symbols)
    if duplicates:
        raise ValueError(
            f"{len(duplicates)} gene symbols occur more than once in {described} (e.g. "
            f"{_examples(duplicates)}): a cell sentence would name such a gene twice, and the "
            f"tables by gene would count a cell twice for it. {fix} "
            "(`adata.var_names_make_unique()` is no fix: it renames copies to symbols such as "
            "'GENE-1', which the model does not know.)"
        )


def check_sentences_unique(gene_lists: Sequence[Sequence[str]], names, sentence_key: str) -> None:
    """Refuse cell sentences that name a gene twice (made from duplicated gene symbols)."""
    bad = [i for i, genes in enumerate(gene_lists) if len(set(genes)) != len(genes)]
    if bad:
        first = bad[0]
        duplicates = duplicated_symbols(gene_lists[first])
        raise ValueError(
            f"{len(bad)} cells of adata.obs[{sentence_key!r}] name a gene more than once (e.g. "
            f"cell {str(names[first])!r}: {_examples(duplicates)}), so the tables by gene would "
            "count those cells twice. Build the sentences again with `sct.pp.cell_sentences`, "
            "which refuses duplicated gene symbols and says how to keep one per symbol."
        )


def check_feature(layer: int, index: int, widths: Mapping[int, int], *, key: str) -> None:
    """Refuse feature ``L<layer>F<index>`` unless the transcoders of ``adata.uns[key]`` (their
    ``widths``: features per layer) have it.
    """
    name = f"L{layer}F{index}"
    if layer not in widths:
        raise ValueError(
            f"Feature {name} does not exist: adata.uns[{key!r}] has no transcoder for layer "
            f"{layer}; its layers are {sorted(widths)}."
        )
    if not 0 <= index < widths[layer]:
        raise ValueError(
            f"Feature {name} does not exist: layer {layer} has {widths[layer]} features "
            f"(L{layer}F0..L{layer}F{widths[layer] - 1})."
        )


def check_layer(layer: object, what: str = "layer") -> int:
    """``layer`` as an int, or a clear error for anything that is not a layer number."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        hint = ""
        if isinstance(layer, str) and layer.strip().lstrip("Ll").isdigit():
            hint = f" (for {layer!r}, pass {int(layer.strip().lstrip('Ll'))})"
        raise TypeError(f"{what} must be a layer number such as 2, got {layer!r}{hint}.")
    return int(layer)


def available_devices() -> list[str]:
    """The torch devices this machine has: ``"cpu"``, then each GPU (``"cuda:0"``, ``"mps"``)."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [f"xpu:{i}" for i in range(xpu.device_count())]
    return devices


def check_device(device: object, name: str = "device"):
    """``device`` as a :class:`torch.device` (``None`` stays ``None``), or a ValueError naming
    the devices this machine has, before anything is moved there.
    """
    if device is None:
        return None
    import torch

    available = available_devices()
    dev = None
    if isinstance(device, str | torch.device):
        try:
            dev = torch.device(device)
        except RuntimeError:
            dev = None
    if dev is not None:
        usable = set(available) | {d.split(":")[0] for d in available} | {"cpu:0"}
        if "mps" in available:
            usable.add("mps:0")
        if str(dev) in usable:
            return dev
    hint = ""
    if isinstance(device, str) and device.strip().lower() == "gpu":
        hint = " (torch calls a GPU 'cuda', or 'mps' on a Mac)"
    elif dev is not None and dev.type == "cuda" and not torch.backends.cuda.is_built():
        hint = " (this torch was built without CUDA: install a CUDA build of torch to use a GPU)"
    elif dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        hint = f" (it has {torch.cuda.device_count()} CUDA devices)"
    raise ValueError(
        f"{name}={device!r} is not a device of this machine{hint}. Available: "
        f"{', '.join(repr(d) for d in available)}; pass one of them, or {name}=None for the "
        "default."
    )


def check_path(path: object, name: str = "path"):
    """``path`` as a :class:`~pathlib.Path`, refusing ``None``, non-paths and the empty string
    (which :class:`~pathlib.Path` reads as the working directory).
    """
    import os
    from pathlib import Path

    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"{name} must be a directory path (a str or pathlib.Path), got {type(path).__name__}."
        )
    if not str(os.fspath(path)).strip():
        raise ValueError(
            f"{name} is empty, which would mean the working directory: pass the directory to "
            "use, such as 'transcoders/'."
        )
    return Path(path)


def check_unique_obs_names(adata: AnnData) -> None:
    """Refuse duplicated ``adata.obs_names``: a cell must be found by its name."""
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        raise ValueError(
            f"{len(dup)} cell names occur more than once in adata.obs_names (e.g. "
            f"{list(dup[:3])}), so a cell cannot be found by its name: call "
            "`adata.obs_names_make_unique()` first."
        )


def check_finite(value: object, name: str) -> float:
    """``value`` as a float, or a ValueError when it is not a finite real number."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not np.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def check_layer_list(layers: object, available: Sequence[int], what: str = "layers") -> list[int]:
    """``layers`` (one layer number or several) as sorted unique ints, refusing an empty list and
    anything that is not a whole number; ``available`` (the layers there are) names the fix.
    Whether each layer is available is left to the caller, whose error says how to add it.
    """
    values = [layers] if isinstance(layers, numbers.Integral | str) else layers
    try:
        values = list(values)
    except TypeError:
        values = [values]
    bad = [x for x in values if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
    if bad:
        raise TypeError(f"{what} takes layer numbers such as [0, 2], got {bad!r} in {layers!r}.")
    if not values:
        raise ValueError(
            f"No {what} given: pass some of {sorted(int(x) for x in available)}, or None for all."
        )
    return sorted({int(x) for x in values})


def check_bool(value: object, name: str, *, none: bool = False) -> bool | None:
    """``value`` as a bool (``None`` kept when ``none``), or a TypeError: a string such as
    ``"no"`` would otherwise count as True.
    """
    if value is None and none:
        return None
    if not isinstance(value, bool | np.bool_):
        either = "True, False or None" if none else "True or False"
        raise TypeError(f"{name} must be {either}, got {value!r}.")
    return bool(value)


def check_seed(value: object, name: str = "seed") -> int:
    """``value`` as an int, or a ValueError when it is not a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer such as 0, got {value!r}.")
    return int(value)


def check_set_sizes(min_size: object, max_size: object) -> tuple[int, int]:
    """Gene set size limits as ints, refused unless ``1 <= min_size <= max_size``."""
    low = check_positive_int(min_size, "min_size")
    high = check_positive_int(max_size, "max_size")
    if low > high:
        raise ValueError(
            f"min_size ({low}) is above max_size ({high}): no gene set could be kept. "
            "Pass min_size <= max_size."
        )
    return low, high


def check_in_memory(adata: AnnData, needs: str, *, otherwise: str = "") -> None:
    """Refuse a backed AnnData when ``needs`` (e.g. "gene_score=True") reads its whole matrix."""
    if adata.isbacked:
        raise ValueError(
            f"{needs} reads the expression matrix, which a backed AnnData keeps on disk: call "
            f"`adata = adata.to_memory()` first{f', or {otherwise}' if otherwise else ''}."
        )


def check_live_threshold(value: object, name: str = "live_threshold") -> float:
    """A log10 firing rate as a float: finite and at most 0 (a feature firing on every token)."""
    value = check_finite(value, name)
    if value > 0:
        raise ValueError(
            f"{name} is a log10 firing rate, at most 0 (fires on every token), got {value}: "
            "pass e.g. -3 (fires on 1 token in 1,000)."
        )
    return value
