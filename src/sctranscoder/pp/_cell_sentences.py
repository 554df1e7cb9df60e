"""Cell sentences from an AnnData: choose the matrix, check it, rank genes, store the sentences."""

from __future__ import annotations

import numbers
import os
import re
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy import sparse

from .._constants import Key
from .._records import check_key
from .._validate import check_bool, check_copy_backed, check_positive_int, check_unique_symbols
from ..core.sentences import PromptSettings, cell_ids, rank_genes

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.model import C2SModel

#: Cells read and ranked at a time, so that a backed (on-disk) matrix is never loaded whole.
_CHUNK_ROWS = 10_000
#: Cells inspected to tell counts from log-normalised values.
_SAMPLE_ROWS = 1_000
_ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}")

DataKind = Literal["counts", "log-normalised"]


def cell_sentences(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    n_genes: int | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    organism: str | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    key_added: str = Key.sentence,
    copy: bool = False,
) -> AnnData | None:
    """Write each cell as a Cell2Sentence sentence: its expressed genes by descending expression.

    A cell's sentence holds the upper-cased symbols of its genes with non-zero expression, most
    expressed first, cut after ``n_genes`` genes. Genes with equal expression are ordered by a
    shuffle seeded by ``seed`` and the cell's name (``obs_names``), so results are reproducible and
    a cell keeps its sentence when the AnnData is subset, reordered or processed in batches.

    Cell2Sentence builds its sentences from counts normalised to a total and log-transformed
    (``log10(1 + x)``). Within one cell, a ranking does not change under per-cell scaling or a
    monotone transform, so raw counts and their normalised, log-transformed version give the same
    sentences; either may be passed and neither is transformed. Scaled or centred values (with
    negatives, as after :func:`scanpy.pp.scale`) do not preserve the ranking and are refused.

    Parameters
    ----------
    adata
        Annotated data matrix, cells x genes. May be backed (``read_h5ad(..., backed="r")``):
        the matrix is then read ``chunk_size`` cells at a time and never loaded whole, and the
        results are held in memory (save them with ``adata.write_h5ad(new_path)``; see
        ``docs/storage.md``).
    model
        A :class:`~sctranscoder.core.model.C2SModel` (or a local model directory or hub id) whose
        prompt settings (genes per sentence, organism, template) are the defaults. Without one, the Cell2Sentence defaults
        (200 genes, Homo sapiens).
    n_genes
        Genes per sentence (at most). Overrides the model's setting.
    layer
        Read ``adata.layers[layer]`` instead of ``adata.X``.
    use_raw
        Read ``adata.raw.X`` (with ``adata.raw.var``). ``None``: use ``adata.X`` when its values
        are valid (finite, non-negative), otherwise ``adata.raw`` when it is valid.
        ``False``: always ``adata.X``.
    gene_symbols
        Column of ``adata.var`` (``adata.raw.var`` when reading ``.raw``) with the gene symbols.
        Default: the var names. Ensembl ids are refused: C2S models read gene symbols.
    organism
        The organism of the cells, named in their prompts (C2S models were trained on human and
        mouse cells: ``"Homo sapiens"``, ``"Mus musculus"``). Overrides the model's setting, and
        is recorded with the sentences: every tool that builds prompts from them names this
        organism (see :func:`sctranscoder.tl.train_transcoders`).
    seed
        Seed of the shuffle that orders genes of equal expression (a non-negative integer).
    chunk_size
        Cells read and ranked at a time from a backed (or otherwise lazy) matrix, and ranked at a
        time from an in-memory one (default: 10,000). Sentences do not depend on it.
    key_added
        Name of the ``obs`` column with the sentences, and of the ``uns`` entry with the
        parameters.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``, with these fields added:

    ``adata.obs[key_added]`` : :class:`str`
        The cell sentence: gene symbols separated by single spaces.
    ``adata.obs[f"{key_added}_n_genes"]`` : :class:`int`
        Number of genes in each sentence (fewer than ``n_genes`` where a cell expresses fewer).
    ``adata.uns[key_added]["params"]`` : :class:`dict`
        ``n_genes``, ``organism``, ``template`` and ``seed`` used; ``source`` (``"X"``,
        ``"raw"`` or ``"layers/<name>"``); ``data_kind`` (``"counts"`` or ``"log-normalised"``)
        as detected on up to 1,000 cells; ``gene_symbols`` (the var column, or
        ``"var_names"``).

    Raises
    ------
    ValueError
        If the matrix has negative (scaled) or non-finite values, if the gene names look like
        Ensembl ids, if a gene symbol occurs more than once (after upper-casing: a sentence would
        name that gene twice), or if a cell has no expressed gene. Nothing is written in that
        case.
    KeyError
        If ``layer`` or the ``gene_symbols`` column does not exist.

    Examples
    --------
    >>> import scanpy as sc
    >>> import sctranscoder as sct
    >>> adata = sc.datasets.pbmc68k_reduced()  # .X is scaled: .raw is used
    >>> sct.pp.cell_sentences(adata, n_genes=100)
    >>> first_genes = adata.obs["cell_sentence"].str.split().str[0]
    """
    settings = _settings(model)
    n_genes = settings.n_genes if n_genes is None else n_genes
    organism = settings.organism if organism is None else organism
    n_genes = check_positive_int(n_genes, "n_genes")
    if not isinstance(organism, str) or not organism.strip():
        raise ValueError(
            f"organism must be a non-empty string such as 'Mus musculus', got {organism!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    chunk_size = check_positive_int(_CHUNK_ROWS if chunk_size is None else chunk_size, "chunk_size")
    check_key(
        key_added,
        adata=adata,
        kind="cell sentences",
        obs_columns=[key_added, Key.sentence_n_genes(key_added)],
    )
    use_raw = check_bool(use_raw, "use_raw", none=True)
    copy = check_bool(copy, "copy")
    check_copy_backed(adata, copy)

    if adata.n_obs == 0:
        raise ValueError("adata has no cells.")

    X, var, source = _select_matrix(adata, layer=layer, use_raw=use_raw, chunk_size=chunk_size)
    data_kind = _data_kind(X, chunk_size)
    var_where = "adata.raw.var" if source == "raw" else "adata.var"
    symbols = _gene_symbols(var, gene_symbols, var_where)
    start = logg.info(
        f"computing cell sentences from {_describe(source)} ({data_kind} values), "
        f"{n_genes} genes per sentence, for {organism} cells"
    )
    sentences, lengths = _rank(
        X,
        symbols,
        n_genes=int(n_genes),
        seed=seed,
        ids=cell_ids(adata.obs_names),
        chunk_size=chunk_size,
    )
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        first = ", ".join(map(str, adata.obs_names[empty[:5]]))
        raise ValueError(
            f"{empty.size} cells have no expressed gene in {_describe(source)} (first: {first}), "
            "so they have no cell sentence. Remove them first, e.g. "
            "`sc.pp.filter_cells(adata, min_genes=1)`."
        )

    # Everything is checked: only now is adata written to.
    if copy:
        adata = adata.copy()
    adata.obs[key_added] = sentences
    adata.obs[Key.sentence_n_genes(key_added)] = lengths
    adata.uns[key_added] = {
        "params": {
            "n_genes": int(n_genes),
            "organism": str(organism),
            "template": settings.template,
            "seed": int(seed),
            "source": source,
            "data_kind": data_kind,
            "gene_symbols": gene_symbols if gene_symbols is not None else "var_names",
        }
    }
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, cell sentences (adata.obs)\n"
        f"    {Key.sentence_n_genes(key_added)!r}, genes per sentence (adata.obs)\n"
        f"    {key_added!r}, parameters (adata.uns)",
    )
    return adata if copy else None


def _settings(model: C2SModel | str | None) -> PromptSettings:
    if model is None:
        return PromptSettings()
    if isinstance(model, str | os.PathLike):
        from ..core.model import load_model

        model = load_model(model)
    settings = getattr(model, "settings", None)
    if not isinstance(settings, PromptSettings):
        raise TypeError(
            "model must be a C2SModel (see `sctranscoder.load_model`), a model directory or a hub "
            "id, "
            f"got {type(model).__name__}."
        )
    return settings


def _describe(source: str) -> str:
    if source == "X":
        return "adata.X"
    if source == "raw":
        return "adata.raw.X"
    return f"adata.layers[{source.removeprefix('layers/')!r}]"


def _select_matrix(
    adata: AnnData, *, layer: str | None, use_raw: bool | None, chunk_size: int = _CHUNK_ROWS
):
    """The matrix to rank, its var table and its source (``"X"``, ``"raw"``, ``"layers/…"``)."""
    if layer is not None:
        if use_raw:
            raise ValueError("Pass either `layer=` or `use_raw=True`, not both.")
        if layer not in adata.layers:
            raise KeyError(
                f"No layer {layer!r} in adata.layers; available layers: {list(adata.layers)}."
            )
        source = f"layers/{layer}"
        _raise_if_invalid(adata.layers[layer], source, chunk_size)
        return adata.layers[layer], adata.var, source
    if use_raw:
        if adata.raw is None:
            raise ValueError(
                "use_raw=True but adata.raw is not set. Use `layer=` to name a layer with counts "
                "or log-normalised values, or leave use_raw unset to read adata.X."
            )
        _raise_if_invalid(adata.raw.X, "raw", chunk_size)
        return adata.raw.X, adata.raw.var, "raw"
    problem = _value_problem(adata.X, chunk_size)
    if problem is None:
        return adata.X, adata.var, "X"
    if use_raw is None and adata.raw is not None:
        raw_problem = _value_problem(adata.raw.X, chunk_size)
        if raw_problem is None:
            logg.info(f"adata.X {problem}: using adata.raw.X instead")
            return adata.raw.X, adata.raw.var, "raw"
        problem += f" (and adata.raw.X {raw_problem})"
    raise ValueError(_invalid_message("X", problem))


def _raise_if_invalid(X, source: str, chunk_size: int = _CHUNK_ROWS) -> None:
    problem = _value_problem(X, chunk_size)
    if problem is not None:
        raise ValueError(_invalid_message(source, problem))


def _invalid_message(source: str, problem: str) -> str:
    if "negative" in problem:
        why = (
            "it looks scaled or centred (as after `sc.pp.scale`, like the .X of "
            "`sc.datasets.pbmc68k_reduced()`), and genes cannot be ranked by such values"
        )
    else:
        why = "cell sentences need finite, non-negative expression"
    return (
        f"{_describe(source)} {problem}: {why}. Pass `use_raw=True` if adata.raw holds counts or "
        "log-normalised values, or `layer=` naming a layer that does."
    )


def _values(block) -> np.ndarray:
    """The stored values of an in-memory block (the non-zeros of a sparse one)."""
    if sparse.issparse(block):
        return np.asarray(block.data)
    return np.asarray(block)


def _in_memory(X) -> bool:
    return sparse.issparse(X) or isinstance(X, np.ndarray)


def _blocks(X, chunk_size: int = _CHUNK_ROWS):
    """The values of ``X``: whole when in memory, ``chunk_size`` rows at a time when backed."""
    if _in_memory(X):
        yield _values(X)
        return
    for start in range(0, X.shape[0], chunk_size):
        yield _values(X[start : start + chunk_size])


def _value_problem(X, chunk_size: int = _CHUNK_ROWS) -> str | None:
    """What makes ``X`` unusable for ranking (checked on every value), or ``None``."""
    if X is None:
        return "is empty (None)"
    lowest = np.inf
    for values in _blocks(X, chunk_size):
        if values.size == 0:
            continue
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            return "has NaN or infinite values"
        lowest = min(lowest, float(values.min()))
    if lowest < 0:
        return f"has negative values (minimum {lowest:.4g})"
    return None


def _data_kind(X, chunk_size: int = _CHUNK_ROWS) -> DataKind:
    """``"counts"`` when the sampled non-zeros are all integers, else ``"log-normalised"``."""
    n_obs = X.shape[0]
    rows = np.unique(np.linspace(0, n_obs - 1, num=min(n_obs, _SAMPLE_ROWS)).astype(np.int64))
    if _in_memory(X):
        values = _values(X[rows])
    else:  # at most chunk_size rows per read of a backed matrix
        values = np.concatenate(
            [_values(X[rows[i : i + chunk_size]]).ravel() for i in range(0, rows.size, chunk_size)]
        )
    if np.issubdtype(values.dtype, np.integer) or values.dtype == bool:
        return "counts"
    values = values[values != 0]
    return "counts" if np.array_equal(values, np.round(values)) else "log-normalised"


def _gene_symbols(var: pd.DataFrame, gene_symbols: str | None, where: str) -> np.ndarray:
    """Upper-cased gene symbols for the columns of the matrix, checked."""
    if gene_symbols is None:
        names = pd.Series(var.index, dtype=object)
        described = f"{where} names"
    else:
        if gene_symbols not in var.columns:
            raise KeyError(
                f"No column {gene_symbols!r} in {where}; available columns: "
                f"{list(map(str, var.columns))}."
            )
        names = pd.Series(var[gene_symbols].to_numpy(), dtype=object)
        described = f"{where}[{gene_symbols!r}]"
        missing = names.isna().to_numpy()
        if missing.any():
            examples = ", ".join(map(str, var.index[missing][:5]))
            raise ValueError(
                f"{missing.sum()} genes have no symbol in {described} (e.g. {examples}). Fill "
                "them in, or subset adata to genes with symbols."
            )
    symbols = np.array([str(s).upper() for s in names], dtype=object)
    n_ensembl = sum(bool(_ENSEMBL_ID.match(s)) for s in symbols)
    if n_ensembl > len(symbols) / 2:
        raise ValueError(
            f"{n_ensembl} of {len(symbols)} {described} look like Ensembl ids (e.g. "
            f"{symbols[0]}), but C2S models read gene symbols. Pass "
            "`gene_symbols=<var column with symbols>`."
        )
    bad = [s for s in symbols if not s or len(s.split()) != 1 or s.strip() != s]
    if bad:
        raise ValueError(
            f"{len(bad)} {described} are empty or contain whitespace (e.g. {bad[:3]}); genes in "
            "a cell sentence are separated by spaces, so symbols cannot contain any."
        )
    index = f"{where}_names" if gene_symbols is None else f"{where}[{gene_symbols!r}]"
    keep = f"~{index}.str.upper().duplicated()" + ("" if gene_symbols is None else ".to_numpy()")
    subset = (
        f"adata.raw = adata.raw.to_adata()[:, {keep}]"
        if where == "adata.raw.var"
        else f"adata = adata[:, {keep}].copy()"
    )
    check_unique_symbols(
        symbols,
        described=f"{described} (upper-cased)",
        fix=f"Keep one row per symbol before building sentences, e.g. the first: `{subset}`, or "
        "sum the rows of each symbol into one.",
    )
    return symbols


def _rank(
    X,
    symbols: np.ndarray,
    *,
    n_genes: int,
    seed: int,
    ids: np.ndarray,
    chunk_size: int = _CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Sentences (space-joined) and their lengths, ranking ``chunk_size`` cells at a time."""
    n_obs = X.shape[0]
    sentences = np.empty(n_obs, dtype=object)
    lengths = np.zeros(n_obs, dtype=np.int64)
    for start in range(0, n_obs, chunk_size):
        stop = min(start + chunk_size, n_obs)
        block = X[start:stop]
        if not (sparse.issparse(block) or isinstance(block, np.ndarray)):
            block = np.asarray(block)
        ranked = rank_genes(block, symbols, n_genes=n_genes, seed=seed, row_ids=ids[start:stop])
        for i, genes in enumerate(ranked, start=start):
            sentences[i] = " ".join(genes)
            lengths[i] = len(genes)
    return sentences, lengths
