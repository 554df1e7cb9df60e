"""An interactive explorer of features and circuits: one self-contained HTML file.

The file holds plotly.js (from the installed plotly package, MIT licence), the data as JSON and a
small script of ours (``_explorer_assets/explorer.js``) for navigation, the feature table and the
pages; it opens offline from a file, with no server, and inside Jupyter (:class:`Explorer`).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy import sparse

from .._constants import Key
from .._records import (
    activation_layers,
    activations_record,
    check_current,
    circuit_dependents,
    circuit_names,
    circuit_record,
    record,
    record_kind,
    strings,
)
from .._validate import check_bool, check_positive_int, check_seed
from ._circuit import _target_label

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from anndata import AnnData

#: Methods of an annotation record, in the order their best term is shown.
_METHODS = ("ora", "gsea", "ulm")
#: Levels of the quantised per-cell activations (a value is ``q / 255`` of its feature's max).
_LEVELS = 255
#: The MIT licence of plotly.js, embedded with it (its copyright line is read from the bundle).
_MIT = """Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in
all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
THE SOFTWARE."""


class Explorer(os.PathLike):
    """The explorer file written by :func:`sctranscoder.pl.explorer`.

    A path (``os.fspath(explorer)`` is the file), shown inside Jupyter as an ``<iframe>`` whose
    ``srcdoc`` holds the whole file, so it works in a notebook without a server and stays with
    the notebook's outputs (which then grow by the file's size). To keep a notebook small, show
    the file by its path instead: ``IPython.display.IFrame("pbmc_explorer.html", "100%", 800)``
    (the path relative to the notebook).

    Attributes
    ----------
    path
        The HTML file.
    n_bytes
        Its size in bytes.
    height
        Height of the notebook ``<iframe>`` in pixels.
    """

    def __init__(self, path: Path, n_bytes: int, height: int = 820):
        self.path = Path(path)
        self.n_bytes = int(n_bytes)
        self.height = int(height)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"Explorer({str(self.path)!r}, {self.n_bytes / 2**20:.1f} MiB)"

    def _repr_html_(self) -> str:
        doc = self.path.read_text(encoding="utf-8")
        return (
            f'<iframe srcdoc="{html.escape(doc, quote=True)}" title="sctranscoder explorer" '
            f'style="width:100%;height:{self.height}px;border:1px solid #ddd"></iframe>'
        )


def explorer(
    adata: AnnData,
    path: str | os.PathLike,
    *,
    groupby: str | None = None,
    basis: str | None = "umap",
    activations_key: str = Key.activations(Key.transcoders),
    annotation_key: str | None = None,
    rank_key: str | None = None,
    circuits: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    n_top_genes: int = 20,
    n_terms: int = 5,
    max_cells: int = 2000,
    seed: int = 0,
    title: str | None = None,
    overwrite: bool = False,
) -> Explorer:
    """Write an interactive explorer of the features and circuits: one self-contained HTML file.

    The file opens in any browser, offline and without a server (it embeds plotly.js, the data
    as JSON and a small script), and inside Jupyter (the returned ``Explorer``). Its pages:

    - **Features**: every feature of every layer in a table that sorts by any column and
      filters by a search (name, gene, term, group), a layer and live features only: firing
      rate, live, genes fired on, top genes, the best enriched gene set and its FDR (after
      :func:`sctranscoder.tl.annotate_features`), the group where the feature is most active (from
      :func:`sctranscoder.tl.rank_features_groups`, else computed from ``groupby``).
    - **A feature**: its top genes (and their counterfactual effect after
      :func:`sctranscoder.tl.gene_attribution`), the cells on the ``basis`` embedding coloured by
      its activation, its mean activation per group, its enriched gene sets, its strongest
      connections (:func:`sctranscoder.tl.feature_connections`, and the edges of the traced
      circuits that touch it) and its top cells.
    - **Circuits** (:func:`sctranscoder.tl.trace_circuit`): the attribution graph, layers bottom
      to top and the prompt's genes left to right (as :func:`sctranscoder.pl.circuit` draws it),
      with a node's gene, feature, activation and influence on hover; a click on a feature opens
      it; a slider keeps the most influential nodes (80 at first, as ``pl.circuit``) and another
      the edges above a fraction of the largest ``|weight|``, the layout giving the kept nodes
      the room. Beside it the circuit's genes, their enrichment
      (:func:`sctranscoder.tl.circuit_enrichment`) and the cells that carry it
      (:func:`sctranscoder.tl.score_circuit`).
    - **A cell**: its sentence, each gene coloured by its influence when a circuit was traced
      for the cell, its most active features per layer and its place on the embedding.

    Per-cell activations are quantised to 255 levels of each feature's largest activation
    (every non-zero value stays non-zero) and stored densely or sparsely, whichever is smaller;
    the embedded default (4 layers x 1,024 features, 700 cells) makes a file of about 10 MB.
    When most features are active in most cells the file grows by about one byte per cell and
    feature (plus 4.8 MB of plotly.js): for larger data, lower ``max_cells`` or pick ``layers``.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_activations`.
    path
        The ``.html`` file to write, in an existing folder.
    groupby
        ``adata.obs`` column of cell groups (e.g. ``"bulk_labels"``), for the activation per
        group and the group where each feature is most active (default: the ``groupby`` of the
        feature ranking, when there is one).
    basis
        Embedding in ``adata.obsm[f"X_{basis}"]`` (or ``adata.obsm[basis]``) on which cells are
        drawn (its first two dimensions); ``None`` draws none.
    activations_key
        ``adata.uns`` key of the activation record.
    annotation_key
        ``adata.uns`` key of an annotation record (default: the default one, when present).
    rank_key
        ``adata.uns`` key of a feature ranking (default: ``"rank_features_groups"``, when
        present).
    circuits
        Keys (or cells) of the circuits to include (default: every circuit traced with the
        transcoders of ``activations_key``).
    layers
        Layers to include (default: every layer of the activation record).
    n_top_genes
        Top genes kept per feature (and attributed genes per attribution).
    n_terms
        Enriched gene sets kept per feature (those with a p-value below 0.05, the best first),
        from the annotation's tables.
    max_cells
        Cells embedded at most: a seeded random sample of this size when there are more (the
        cells of the circuits always kept); the table's firing rates and groups use every cell.
    seed
        Seed of that sample.
    title
        Title of the page (default: the activation record's key and the number of cells).
    overwrite
        Replace an existing file at ``path``.

    Returns
    -------
    An ``Explorer``: the path of the file written (``os.fspath(explorer)``; its ``n_bytes``),
    shown as the explorer inside Jupyter (an ``<iframe>`` holding the file, so the notebook grows
    by its size; ``IPython.display.IFrame(path, "100%", 800)`` shows it by its path instead).
    Nothing is written to ``adata``.
    """
    target = _check_output(path, overwrite)
    n_top_genes = check_positive_int(n_top_genes, "n_top_genes")
    n_terms = check_positive_int(n_terms, "n_terms")
    max_cells = check_positive_int(max_cells, "max_cells")
    seed = check_seed(seed)
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a string or None, got {type(title).__name__}.")
    rec = activations_record(adata, activations_key)
    layers = activation_layers(rec, layers, activations_key)
    ann = _annotation(adata, annotation_key, activations_key)
    rank = _ranking(adata, rank_key, activations_key)
    if groupby is None and rank is not None and str(rank["params"]["groupby"]) in adata.obs:
        groupby = str(rank["params"]["groupby"])
    if groupby is not None and groupby not in adata.obs.columns:
        raise KeyError(
            f"groupby {groupby!r} is not a column of adata.obs; columns: "
            f"{list(adata.obs.columns)[:20]}."
        )
    xy = _embedding(adata, basis)
    names = _circuits(adata, circuits, rec)

    start = logg.info(f"writing the explorer of adata.uns[{activations_key!r}] to {target}")
    data = _data(
        adata,
        rec=rec,
        layers=layers,
        activations_key=activations_key,
        ann=ann,
        rank=rank,
        groupby=groupby,
        basis=basis,
        xy=xy,
        circuits=names,
        n_top_genes=n_top_genes,
        n_terms=n_terms,
        max_cells=max_cells,
        seed=seed,
        title=title,
    )
    document = _document(data)
    from ..core.files import write_text_atomic

    write_text_atomic(target, document)
    n_bytes = target.stat().st_size
    logg.info(
        f"    finished: {n_bytes / 2**20:.1f} MiB, {sum(data['meta']['n_features'])} features, "
        f"{len(data['cells']['names'])} cells, {len(data['circuits'])} circuit(s)",
        time=start,
    )
    return Explorer(target, n_bytes)


# -- checks ---------------------------------------------------------------------------------------


def _check_output(path: object, overwrite: object) -> Path:
    """The file to write, refused before anything is computed: a ``.html`` name, in an existing
    writable folder, not a directory, not an existing file unless ``overwrite``.
    """
    overwrite = check_bool(overwrite, "overwrite")
    if not isinstance(path, str | os.PathLike) or not str(os.fspath(path)).strip():
        raise TypeError(f"path must be the .html file to write (a str or Path), got {path!r}.")
    target = Path(path).expanduser()
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory: name the .html file to write in it.")
    if target.suffix.lower() not in (".html", ".htm"):
        raise ValueError(
            f"path {str(target)!r} must end in .html (the explorer is one HTML file): e.g. "
            f"{str(target.with_suffix('.html'))!r}."
        )
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"The folder {folder} does not exist: create it first "
            f"(`Path({str(folder)!r}).mkdir(parents=True)`), or write the file elsewhere."
        )
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"Cannot write {target}: the folder {folder} is not writable.")
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} exists: pass overwrite=True to replace it, or choose another path."
        )
    return target


def _annotation(adata: AnnData, key: str | None, activations_key: str) -> dict | None:
    default = Key.derived(activations_key, "annotation")
    if key is None:
        if record_kind(adata.uns.get(default)) != "annotation":
            return None
        key = default
    ann = record(adata, key, kind="annotation", hint="run `sct.tl.annotate_features` first.")
    if record_kind(ann) != "annotation":
        raise KeyError(f"adata.uns[{key!r}] is not an annotation record.")
    of = str(ann.get("params", {}).get("activations_key", activations_key))
    if of != activations_key:
        raise ValueError(
            f"adata.uns[{key!r}] annotates the features of adata.uns[{of!r}], not of "
            f"adata.uns[{activations_key!r}]: pass activations_key={of!r}."
        )
    return {"key": key, **ann}


def _ranking(adata: AnnData, key: str | None, activations_key: str) -> dict | None:
    explicit = key is not None
    key = Key.rank_features_groups if key is None else key
    if not explicit and record_kind(adata.uns.get(key)) != "feature ranking":
        return None
    rank = record(
        adata,
        key,
        kind="feature ranking",
        hint="run `sct.tl.rank_features_groups(adata, groupby=...)` first.",
    )
    if record_kind(rank) != "feature ranking":
        raise KeyError(f"adata.uns[{key!r}] is not a feature ranking.")
    of = str(rank["params"].get("activations_key", activations_key))
    if of != activations_key:
        if explicit:
            raise ValueError(
                f"adata.uns[{key!r}] ranks the features of adata.uns[{of!r}], not of "
                f"adata.uns[{activations_key!r}]: pass activations_key={of!r}."
            )
        return None
    return rank


def _embedding(adata: AnnData, basis: str | None) -> np.ndarray | None:
    if basis is None:
        return None
    if not isinstance(basis, str):
        raise TypeError(f"basis must be the name of an embedding or None, got {basis!r}.")
    key = f"X_{basis}" if f"X_{basis}" in adata.obsm else basis
    if key not in adata.obsm:
        raise KeyError(
            f"No embedding {basis!r} in adata.obsm (looked for {f'X_{basis}'!r} and {basis!r}): "
            "compute it first (e.g. `sc.pp.neighbors(adata); sc.tl.umap(adata)`), or pass "
            "basis=None to leave the cells off the pages."
        )
    xy = np.asarray(adata.obsm[key])
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"adata.obsm[{key!r}] must have at least 2 columns, got {xy.shape}.")
    xy = np.asarray(xy[:, :2], dtype=np.float64)
    if not np.isfinite(xy).all():
        raise ValueError(f"adata.obsm[{key!r}] holds NaN or infinite coordinates.")
    return xy


def _circuits(adata: AnnData, circuits: Sequence[str] | None, rec: dict) -> list[str]:
    tkey = str(rec["params"].get("transcoders_key", ""))
    if circuits is not None:
        if isinstance(circuits, str):
            circuits = [circuits]
        return [circuit_record(adata, str(c))[0] for c in circuits]
    names = []
    for name in circuit_names(adata):
        value = adata.uns[name]
        if str(value.get("params", {}).get("transcoders_key", tkey)) != tkey:
            continue
        try:
            circuit_record(adata, name)
        except ValueError as err:  # made with other transcoders
            logg.warning(f"left out circuit {name!r}: {err}")
            continue
        names.append(name)
    return names


# -- the data -------------------------------------------------------------------------------------


def _num(value: object, digits: int = 4) -> float | None:
    """A finite number rounded to ``digits`` significant digits (JSON has no NaN), else None."""
    if value is None or isinstance(value, bool | np.bool_):
        return None if value is None else float(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _nums(values, digits: int = 4) -> list[float | None]:
    return [_num(v, digits) for v in np.asarray(values, dtype=np.float64).ravel()]


def _b64(array: np.ndarray) -> str:
    """Little-endian bytes of ``array``, base64 (decoded in the page into a typed array)."""
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return base64.b64encode(a.tobytes()).decode("ascii")


class _Vocabulary:
    """Strings by index, so that each is stored once (genes, gene sets, groups)."""

    def __init__(self, values=()):
        self.items: list[str] = []
        self.index: dict[str, int] = {}
        for v in values:
            self(v)

    def __call__(self, value: object) -> int:
        value = str(value)
        if value not in self.index:
            self.index[value] = len(self.items)
            self.items.append(value)
        return self.index[value]


def _data(
    adata: AnnData,
    *,
    rec: dict,
    layers: list[int],
    activations_key: str,
    ann: dict | None,
    rank: dict | None,
    groupby: str | None,
    basis: str | None,
    xy: np.ndarray | None,
    circuits: list[str],
    n_top_genes: int,
    n_terms: int,
    max_cells: int,
    seed: int,
    title: str | None,
) -> dict:
    from .. import __version__
    from ..get import feature_table

    genes = _Vocabulary(strings(rec["genes"]["names"]) if rec.get("genes") else ())
    terms = _Vocabulary()
    circuit_records = {name: circuit_record(adata, name)[1] for name in circuits}
    keep = _sample(adata, circuit_records, max_cells, seed)
    if len(keep) < adata.n_obs:
        logg.info(f"    {len(keep)} of {adata.n_obs} cells embedded (max_cells={max_cells})")

    groups, group_names, colors = _groups(adata, groupby)
    cells: dict = {
        "names": [str(n) for n in adata.obs_names[keep]],
        "group": groups[keep].tolist() if groups is not None else None,
        "x": np.round(xy[keep, 0], 3).tolist() if xy is not None else None,
        "y": np.round(xy[keep, 1], 3).tolist() if xy is not None else None,
    }
    sentence_key = str(rec["params"].get("sentence_key", Key.sentence))
    if sentence_key in adata.obs.columns:
        cells["sentences"] = _sentences(adata.obs[sentence_key].to_numpy()[keep], genes)

    table_columns: dict[str, list] = {
        k: []
        for k in (
            "layer",
            "rate",
            "live",
            "n_genes",
            "top_genes",
            "top_counts",
            "term",
            "fdr",
            "group",
            "group_mean",
        )
    }
    method = _best_method(ann)
    acts, enrichment, n_features = {}, {}, []
    group_means = _group_means(adata, rec, layers, activations_key, rank, groupby, group_names)
    for layer in layers:
        table = feature_table(
            adata,
            layer,
            activations_key=activations_key,
            annotation_key=ann["key"] if ann is not None else None,
            n_top=n_top_genes,
        )
        n = len(table)
        n_features.append(n)
        table_columns["layer"] += [layer] * n
        table_columns["rate"] += _nums(table["firing_rate"], 6)
        table_columns["live"] += table["live"].astype(int).tolist()
        if "top_genes" in table:
            table_columns["n_genes"] += table["n_genes"].astype(int).tolist()
            table_columns["top_genes"] += [
                [genes(g) for g in str(s).split(";") if g] for s in table["top_genes"]
            ]
            table_columns["top_counts"] += [
                [int(c) for c in str(s).split(";") if c] for s in table["top_gene_counts"]
            ]
        else:
            table_columns["n_genes"] += [None] * n
            table_columns["top_genes"] += [[] for _ in range(n)]
            table_columns["top_counts"] += [[] for _ in range(n)]
        if method is not None and f"{method}_term" in table:
            table_columns["term"] += [terms(t) if t else -1 for t in table[f"{method}_term"]]
            table_columns["fdr"] += _nums(table[f"{method}_fdr"], 3)
        else:
            table_columns["term"] += [-1] * n
            table_columns["fdr"] += [None] * n
        top_group, top_mean = group_means.get(layer, (None, None))
        table_columns["group"] += top_group.tolist() if top_group is not None else [-1] * n
        table_columns["group_mean"] += _nums(top_mean, 4) if top_mean is not None else [None] * n
        X = _activations(adata, rec, layer, activations_key)
        acts[str(layer)] = _quantised(X[keep])
        if ann is not None:
            enrichment.update(_enriched_terms(adata, ann, layer, n_terms, terms))

    data = {
        "meta": {
            "title": title
            or f"{activations_key} · {adata.n_obs:,} cells · {sum(n_features):,} features",
            "version": __version__,
            "activations_key": activations_key,
            "annotation_key": ann["key"] if ann is not None else None,
            "annotation": _annotation_meta(ann, method),
            "ranking": _ranking_meta(rank),
            "groupby": groupby,
            "basis": basis,
            "layers": layers,
            "n_features": n_features,
            "n_cells": adata.n_obs,
            "unit": "cell" if "sae_key" in rec["params"] else "token",
            "live_threshold": _num(rec["params"].get("live_threshold"), 6),
            "aggregate": str(rec["params"].get("aggregate", "")),
            "levels": _LEVELS,
        },
        "genes": genes.items,
        "terms": terms.items,
        "groups": {"names": group_names, "colors": colors},
        "cells": cells,
        "features": table_columns,
        "enrichment": enrichment,
        "activations": acts,
        "attribution": _attributions(adata, activations_key, n_top_genes, layers),
        "connections": _connections(adata, rec, layers),
        "circuits": [_circuit(adata, name, circuit_records[name], keep) for name in circuits],
    }
    return data


def _sample(adata: AnnData, circuit_records: dict, max_cells: int, seed: int) -> np.ndarray:
    """Positions of the cells to embed, in order: all, or ``max_cells`` with the circuits' cells."""
    if adata.n_obs <= max_cells:
        return np.arange(adata.n_obs)
    must = set()
    for value in circuit_records.values():
        cell = value.get("params", {}).get("cell")
        if cell is not None and str(cell) in adata.obs_names:
            must.add(int(adata.obs_names.get_loc(str(cell))))
    rng = np.random.default_rng(seed)
    rest = np.setdiff1d(np.arange(adata.n_obs), np.fromiter(must, dtype=np.int64, count=len(must)))
    n = max(max_cells - len(must), 0)
    chosen = rng.choice(rest, size=min(n, len(rest)), replace=False)
    return np.sort(np.concatenate([chosen, np.fromiter(must, dtype=np.int64, count=len(must))]))


def _groups(adata: AnnData, groupby: str | None):
    """Group code of every cell (-1: none), the group names and their colours."""
    if groupby is None:
        return None, [], []
    column = adata.obs[groupby]
    if not isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype(str).astype("category")
    names = [str(c) for c in column.cat.categories]
    codes = column.cat.codes.to_numpy().astype(np.int64)
    colors = adata.uns.get(f"{groupby}_colors")
    if colors is None or len(colors) != len(names):
        palette = (
            "#1f77b4 #ff7f0e #2ca02c #d62728 #9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf "
            "#aec7e8 #ffbb78 #98df8a #ff9896 #c5b0d5 #c49c94 #f7b6d2 #c7c7c7 #dbdb8d #9edae5"
        ).split()
        colors = [palette[i % len(palette)] for i in range(len(names))]
    return codes, names, [str(c) for c in colors]


def _sentences(sentences: np.ndarray, genes: _Vocabulary) -> dict:
    """Sentences as gene indices: ``offsets`` (n_cells + 1) and ``genes``, both base64."""
    offsets, flat = [0], []
    for s in sentences:
        words = str(s).split() if isinstance(s, str) else []
        flat += [genes(w) for w in words]
        offsets.append(len(flat))
    dtype = np.uint16 if len(genes.items) < 2**16 else np.uint32
    return {
        "offsets": _b64(np.asarray(offsets, dtype=np.uint32)),
        "genes": _b64(np.asarray(flat, dtype=dtype)),
        "wide": dtype == np.uint32,
    }


def _activations(adata: AnnData, rec: dict, layer: int, activations_key: str) -> sparse.csr_matrix:
    from .._records import obsm_activations

    X = obsm_activations(adata, rec, layer, activations_key)
    return sparse.csr_matrix(X, dtype=np.float32)


def _quantised(X: sparse.csr_matrix) -> dict:
    """One layer's activations in the embedded cells, each feature's values as ``q / 255`` of
    its largest (``q`` in 1..255 for every non-zero value), dense or sparse (the smaller).
    """
    X = sparse.csc_matrix(X)
    X.eliminate_zeros()
    X.data = np.maximum(X.data, 0)
    X.eliminate_zeros()
    n_cells, n_features = X.shape
    top = X.max(axis=0).toarray().ravel().astype(np.float64)
    scale = np.where(top > 0, top, 1.0)
    col = np.repeat(np.arange(n_features), np.diff(X.indptr))
    q = np.clip(np.rint(X.data / scale[col] * _LEVELS), 1, _LEVELS).astype(np.uint8)
    used = np.flatnonzero(np.diff(X.indptr) > 0)
    wide = n_cells >= 2**16
    sparse_bytes = X.nnz * (1 + (4 if wide else 2)) + 4 * (n_features + 1)
    dense_bytes = len(used) * n_cells + 4 * len(used)
    out = {"max": _nums(top, 5), "n_cells": int(n_cells)}
    if dense_bytes <= sparse_bytes:
        dense = np.zeros((len(used), n_cells), dtype=np.uint8)
        where = np.full(n_features, -1, dtype=np.int64)
        where[used] = np.arange(len(used))
        dense[where[col], X.indices] = q
        out.update(format="dense", features=_b64(used.astype(np.uint32)), data=_b64(dense))
    else:
        out.update(
            format="sparse",
            indptr=_b64(X.indptr.astype(np.uint32)),
            cells=_b64(X.indices.astype(np.uint32 if wide else np.uint16)),
            data=_b64(q),
            wide=wide,
        )
    return out


def _best_method(ann: dict | None) -> str | None:
    if ann is None:
        return None
    frames = list(ann.get("features", {}).values())
    for method in _METHODS:
        if frames and f"{method}_term" in pd.DataFrame(frames[0]).columns:
            return method
    return None


def _annotation_meta(ann: dict | None, method: str | None) -> dict | None:
    if ann is None:
        return None
    params = ann.get("params", {})
    return {
        "key": ann["key"],
        "method": method,
        "gene_sets": str(params.get("gene_sets", "")),
        "fdr": _num(params.get("fdr"), 4),
    }


def _ranking_meta(rank: dict | None) -> dict | None:
    if rank is None:
        return None
    params = rank["params"]
    return {
        "groupby": str(params.get("groupby", "")),
        "layers": [int(x) for x in np.atleast_1d(params.get("layers", []))],
    }


def _group_means(
    adata: AnnData,
    rec: dict,
    layers: list[int],
    activations_key: str,
    rank: dict | None,
    groupby: str | None,
    group_names: list[str],
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per layer, each feature's top group (code into ``group_names``, -1 for none) and its mean
    activation there: from the ranking's ``specificity`` for the layers it ranked (by the same
    ``groupby``), else computed from every cell's activation and ``groupby``.
    """
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    code = {name: i for i, name in enumerate(group_names)}
    # the ranking writes "/" in group names as the look-alike "∕"
    code.update({name.replace("/", "∕"): i for i, name in enumerate(group_names)})
    ranked: set[int] = set()
    if rank is not None and str(rank["params"].get("groupby", "")) == (groupby or ""):
        spec = pd.DataFrame(rank["specificity"])
        for layer in layers:
            rows = spec[spec["layer"].astype(int) == layer]
            if rows.empty:
                continue
            n = len(rec["firing_rate"][Key.layer(layer)])
            top = np.full(n, -1, dtype=np.int64)
            mean = np.full(n, np.nan)
            idx = rows["feature"].to_numpy(dtype=np.int64)
            top[idx] = [code.get(str(g), -1) for g in rows["top_group"]]
            mean[idx] = rows["top_mean"].to_numpy(dtype=np.float64)
            out[layer] = (top, mean)
            ranked.add(layer)
    if groupby is None:
        return out
    codes = adata.obs[groupby]
    if not isinstance(codes.dtype, pd.CategoricalDtype):
        codes = codes.astype(str).astype("category")
    codes = codes.cat.codes.to_numpy()
    valid = codes >= 0
    n_groups = len(group_names)
    counts = np.bincount(codes[valid], minlength=n_groups).astype(np.float64)
    G = sparse.csr_matrix(
        (np.ones(int(valid.sum())), (codes[valid], np.flatnonzero(valid))),
        shape=(n_groups, adata.n_obs),
    )
    for layer in layers:
        if layer in ranked:
            continue
        X = _activations(adata, rec, layer, activations_key)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.asarray((G @ X).toarray()) / counts[:, None]
        means[counts == 0] = -np.inf  # empty groups are never the top one
        top = means.argmax(0) if n_groups else np.zeros(X.shape[1], dtype=np.int64)
        best = means.max(0) if n_groups else np.zeros(X.shape[1])
        live = best > 0
        out[layer] = (np.where(live, top, -1), np.where(live, best, np.nan))
    return out


def _enriched_terms(
    adata: AnnData, ann: dict, layer: int, n_terms: int, terms: _Vocabulary
) -> dict[str, list]:
    """Per live feature of ``layer``, its best ``n_terms`` gene sets with p < 0.05:
    ``[term, fdr, pvalue, score]`` (score: overlap for ORA, NES for GSEA, t for ULM).
    """
    from ..get import enrichment

    if not isinstance(ann.get("tables"), dict) or Key.layer(layer) not in ann["tables"]:
        return {}
    en = enrichment(adata, layer, annotation_key=ann["key"])
    method = en.uns["enrichment"]["method"]
    pvalue = np.asarray(en.layers["pvalue"], dtype=np.float64)
    padj = np.asarray(en.layers["padj"], dtype=np.float64)
    score = np.asarray(
        en.layers["overlap"] if method == "ora" else en.X,
        dtype=np.float64,
    )
    names = list(en.var_names)
    out = {}
    for i, feature in enumerate(en.obs_names):
        p = np.where(np.isfinite(pvalue[i]), pvalue[i], np.inf)
        fdr = np.where(np.isfinite(padj[i]), padj[i], np.inf)
        order = np.lexsort((p, fdr))
        order = [j for j in order[:n_terms] if p[j] < 0.05]
        if order:
            out[str(feature)] = [
                [terms(names[j]), _num(padj[i, j], 3), _num(pvalue[i, j], 3), _num(score[i, j], 4)]
                for j in order
            ]
    return out


def _current_records(
    adata: AnnData, kind: str, wanted: Callable[[dict], bool]
) -> Iterator[tuple[str, dict]]:
    """``(key, record)`` of every record of ``kind`` in ``adata.uns`` that is ``wanted`` and was
    made with the transcoders it holds now; a stale one is left out with a warning.
    """
    for key, value in adata.uns.items():
        if record_kind(value) != kind or not wanted(value.get("params", {})):
            continue
        try:
            check_current(adata, key, value)
        except ValueError as err:
            logg.warning(f"left out adata.uns[{key!r}]: {err}")
            continue
        yield key, value


def _attributions(
    adata: AnnData, activations_key: str, n_top: int, layers: list[int]
) -> dict[str, dict]:
    """Counterfactual gene attributions (:func:`sctranscoder.tl.gene_attribution`) by feature."""
    out = {}

    def wanted(params: dict) -> bool:
        of = str(params.get("activations_key", activations_key))
        return of == activations_key and int(params.get("layer", -1)) in layers

    for key, value in _current_records(adata, "gene attribution", wanted):
        params = value.get("params", {})
        genes = pd.DataFrame(value["genes"]).head(n_top)
        feature = str(params.get("feature", ""))
        out[feature] = {
            "key": key,
            "genes": genes["gene"].astype(str).tolist(),
            "effect": _nums(genes["mean_effect"], 4),
            "sd": _nums(genes["sd"], 3),
            "n_cells": genes["n_cells"].astype(int).tolist(),
            "mode": str(params.get("mode", "")),
        }
    return out


def _connections(adata: AnnData, rec: dict, layers: list[int]) -> dict[str, list]:
    """Each feature's partners in :func:`sctranscoder.tl.feature_connections` records:
    ``[partner, direction, connection, rank]``.
    """
    tkey = str(rec["params"].get("transcoders_key", ""))
    out: dict[str, list] = {}

    def wanted(params: dict) -> bool:
        return str(params.get("transcoders_key", tkey)) == tkey

    for _key, value in _current_records(adata, "feature connections", wanted):
        table = pd.DataFrame(value["connections"])
        for feature, rows in table.groupby("feature", sort=False):
            out.setdefault(str(feature), []).extend(
                [str(r.partner), str(r.direction), _num(r.connection, 4), int(r.rank)]
                for r in rows.itertuples()
                if int(r.partner_layer) in layers
            )
    return out


def _circuit(adata: AnnData, name: str, value: dict, keep: np.ndarray) -> dict:
    """One circuit: nodes, edges, each position's label, genes, enrichment and per-cell scores
    (of the embedded cells ``keep``); the page lays the graph out.
    """
    nodes = pd.DataFrame(value["nodes"])
    edges = pd.DataFrame(value["edges"])
    # each position's label: its gene, else the prompt text
    first = nodes.sort_values("layer", kind="stable").groupby("position").first()
    labels = {
        str(int(p)): [
            str(row.gene) or str(row.token).strip() or repr(str(row.token)),
            bool(row.gene),
        ]
        for p, row in first.iterrows()
    }
    index = {n: i for i, n in enumerate(nodes.index)}
    edges = edges[edges["source"].isin(index) & edges["target"].isin(index)]
    params = value.get("params", {})
    table = pd.DataFrame(value["genes"])

    def column(name: str, as_int: bool = False):
        if name not in table:
            return None
        return table[name].astype(int).tolist() if as_int else _nums(table[name], 4)

    out = {
        "key": name,
        "cell": str(params.get("cell", "")),
        "target": _target_label(params),
        "predicted": str(params.get("target", {}).get("predicted", "")),
        "scores": {k: _num(v, 4) for k, v in value.get("scores", {}).items()},
        "nodes": {
            "id": [str(n) for n in nodes.index],
            "type": nodes["type"].astype(str).tolist(),
            "layer": nodes["layer"].astype(int).tolist(),
            "position": nodes["position"].astype(int).tolist(),
            "feature": nodes["feature"].astype(int).tolist(),
            "token": nodes["token"].astype(str).tolist(),
            "gene": nodes["gene"].astype(str).tolist(),
            "activation": _nums(nodes["activation"], 4),
            "influence": _nums(nodes["influence"], 4),
        },
        "edges": {
            "source": [index[s] for s in edges["source"]],
            "target": [index[t] for t in edges["target"]],
            "weight": _nums(edges["weight"], 4),
        },
        "labels": labels,
        "genes": {
            "gene": [str(g) for g in table.index],
            "influence": _nums(table["influence"], 4),
            "embedding": column("embedding_influence"),
            "features": column("feature_influence"),
            "n_features": column("n_features", as_int=True),
            "rank": column("rank", as_int=True),
        },
        "enrichment": None,
        "scores_per_cell": [],
    }
    uns, obs = circuit_dependents(adata, name)
    for key in uns:
        dep = adata.uns[key]
        if record_kind(dep) == "circuit enrichment" and out["enrichment"] is None:
            en = pd.DataFrame(dep["table"]).head(10)
            out["enrichment"] = {
                "key": key,
                "gene_sets": str(dep.get("params", {}).get("gene_sets", "")),
                "rows": [
                    [
                        str(r.term),
                        int(r.size),
                        int(r.overlap),
                        _num(r.pvalue, 3),
                        _num(r.fdr, 3),
                        str(getattr(r, "genes", "")),
                    ]
                    for r in en.itertuples()
                ],
            }
    for column in obs:
        values = pd.to_numeric(adata.obs[column], errors="coerce").to_numpy(dtype=np.float64)
        label = "gene score (AUCell)" if column.endswith("_genes") else "feature score"
        out["scores_per_cell"].append(
            {"column": column, "label": label, "values": _nums(values[keep], 4)}
        )
    return out


# -- the document ---------------------------------------------------------------------------------


def _asset(name: str) -> str:
    return (resources.files("sctranscoder.pl") / "_explorer_assets" / name).read_text("utf-8")


def _plotly_js() -> tuple[str, str, str]:
    """plotly.js (minified) from the installed plotly package, its version and copyright line."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    head = js[:400]
    version = re.search(r"plotly\.js v([0-9][^\s*]*)", head)
    copyright_ = re.search(r"Copyright [^\n*]*", head)
    return (
        js,
        version.group(1) if version else "",
        copyright_.group(0).strip() if copyright_ else "Copyright Plotly, Inc.",
    )


def _script_json(data: dict) -> str:
    """JSON safe inside ``<script>``: no ``</`` and no ``<!--`` (escaped; JSON.parse reads them)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def _document(data: dict) -> str:
    plotly_js, version, copyright_ = _plotly_js()
    if "</script" in plotly_js.lower():  # never in plotly's bundle; checked, not assumed
        raise RuntimeError("the plotly.js bundle holds '</script': it cannot be inlined.")
    notice = (
        f"This file embeds plotly.js v{version} (https://github.com/plotly/plotly.js), "
        f"{copyright_}, under the MIT License:\n\n{_MIT}"
    )
    title = html.escape(str(data["meta"]["title"]))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="sctranscoder {html.escape(str(data["meta"]["version"]))}">\n'
        f"<title>{title}</title>\n"
        f"<!--\n{notice.replace('--', '- -')}\n-->\n"
        f"<style>\n{_asset('explorer.css')}\n</style>\n"
        "</head>\n<body>\n"
        f"{_asset('explorer.html')}\n"
        f'<script type="application/json" id="sct-data">{_script_json(data)}</script>\n'
        f"<script>\n{plotly_js}\n</script>\n"
        f"<script>\n{_asset('explorer.js')}\n</script>\n"
        "</body>\n</html>\n"
    )
