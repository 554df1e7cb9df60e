"""Feature to genes: on which genes of the cell sentences each transcoder feature fires."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Key
from .._store import sct_uns
from ..get._activations import feature_names
from ._activation_pass import activation_pass

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.model import C2SModel

logger = logging.getLogger(__name__)

#: ``adata.uns[key]`` entry written by :func:`feature_genes` (and extended by annotate_features).
FEATURES = "features"


def feature_genes(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    layers: Sequence[int] | None = None,
    n_top: int = 50,
    live_threshold: float = -3.0,
    batch_size: int = 32,
    sentence_key: str | None = None,
    key: str = Key.uns,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """For every transcoder feature: its firing rate, whether it is live, and the genes it fires on.

    Each cell's prompt is run through the model once. A feature *fires on a gene* of a cell when
    its maximum activation over the gene's subword tokens is positive. Per layer this counts, for
    every (gene, feature), the cells in which the feature fires on the gene and sums those
    activations. Genes are the symbols of the sentences (their union, in first-seen order), not
    ``adata.var_names``: sentences made from ``adata.raw`` may hold genes that ``var`` lacks.

    Parameters
    ----------
    adata
        Annotated data with cell sentences and transcoders (:func:`train_transcoders`).
    model
        The base model; default: the one recorded in ``adata.uns[key]["model"]``.
    layers
        Layers to compute (default: all trained layers).
    n_top
        Genes listed per feature in ``top_genes``.
    live_threshold
        A feature is live when ``log10(firing_rate) >= live_threshold`` (the paper: -3).
    batch_size
        Cells per forward pass.
    sentence_key
        ``adata.obs`` column with the sentences (default: the one used in training).
    key
        ``adata.uns`` key of the transcoders.
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``adata.uns[key]["features"]``, a
    dict with:

    ``"layer_<i>"`` : :class:`~pandas.DataFrame`
        One row per feature (index ``"L<i>F<j>"``) with ``firing_rate`` (float, fraction of prompt
        tokens on which it fires), ``log10_firing_rate`` (float, ``-inf`` when it never fires),
        ``live`` (bool), ``n_genes`` (int, genes it fired on), ``top_genes`` (str, up to ``n_top``
        genes joined by ``";"``, ranked by firing count then mean activation) and
        ``top_gene_counts`` (str, their firing counts joined by ``";"``).
    ``"layer_<i>_gene_counts"`` : :class:`scipy.sparse.csr_matrix`, int32
        Genes x features: cells in which the feature fires on the gene.
    ``"layer_<i>_gene_sums"`` : :class:`scipy.sparse.csr_matrix`, float32
        Genes x features: sum of those activations (divide by the counts for the mean).
    ``"genes"`` : :class:`numpy.ndarray` of str
        The gene index of those matrices: every gene of the sentences.
    ``"gene_cells"`` : :class:`numpy.ndarray`, int64
        Cells whose sentence contains each gene.
    ``"params"`` : dict
        ``layers``, ``n_top``, ``live_threshold``, ``sentence_key``, ``n_tokens``, ``n_cells``.
    """
    if n_top < 1:
        raise ValueError(f"n_top must be positive, got {n_top}.")
    if batch_size < 1:
        raise ValueError("batch_size must be positive.")
    if not np.isfinite(live_threshold):
        raise ValueError(f"live_threshold must be a finite log10 rate, got {live_threshold}.")
    run = activation_pass(adata, model, key=key, layers=layers, sentence_key=sentence_key)
    sentences, transcoders, sentence_key, layers = (
        run.sentences,
        run.transcoders,
        run.sentence_key,
        run.layers,
    )
    genes = pd.Index(pd.unique(np.fromiter((g for s in sentences for g in s), dtype=object)))
    n_genes = len(genes)

    start = time.perf_counter()
    counts: dict[int, sparse.csr_matrix] = {}
    sums: dict[int, sparse.csr_matrix] = {}
    fired = {x: np.zeros(transcoders[x].config.n_features) for x in layers}
    gene_cells = np.zeros(n_genes, dtype=np.int64)
    n_tokens = 0
    for gl, acts, n_batch_tokens in run.batches(
        batch_size=batch_size, genes=True, progress=progress, desc="feature genes"
    ):
        n_tokens += n_batch_tokens
        onto = None
        for layer in layers:
            a = acts[layer]
            fired[layer] += a.fired.cpu().numpy()
            if not a.gene_values.shape[0]:
                continue
            if onto is None:
                cells_, pos_ = a.gene_cell.cpu().numpy(), a.gene_pos.cpu().numpy()
                rows = genes.get_indexer([gl[c][p] for c, p in zip(cells_, pos_, strict=True)])
                np.add.at(gene_cells, rows, 1)
                # gene x (cell, gene) pair: sums the pairs of one gene over the batch's cells
                onto = sparse.csr_matrix(
                    (np.ones(len(rows), dtype=np.float32), (rows, np.arange(len(rows)))),
                    shape=(n_genes, len(rows)),
                )
            vals = a.gene_values.cpu().numpy().astype(np.float32)
            vals[vals < 0] = 0.0  # fires = positive; a negative pre-activation is not a firing
            vals = sparse.csr_matrix(vals)
            hit = vals.copy()
            hit.data = (hit.data > 0).astype(np.float32)
            add_c, add_s = (onto @ hit).tocsr(), (onto @ vals).tocsr()
            counts[layer] = add_c if layer not in counts else counts[layer] + add_c
            sums[layer] = add_s if layer not in sums else sums[layer] + add_s

    out: dict[str, object] = {}
    for layer in layers:
        name = Key.layer(layer)
        n_feat = transcoders[layer].config.n_features
        C = counts.get(layer, sparse.csr_matrix((n_genes, n_feat), dtype=np.float32))
        S = sums.get(layer, sparse.csr_matrix((n_genes, n_feat), dtype=np.float32))
        C = sparse.csr_matrix(C, dtype=np.float32)
        C.data = np.rint(C.data)
        C = C.astype(np.int32)
        S = sparse.csr_matrix(S, dtype=np.float32)
        C.eliminate_zeros()
        S.eliminate_zeros()
        rate = fired[layer] / max(n_tokens, 1)
        out[name] = _feature_frame(layer, C, S, genes, rate, n_top, live_threshold)
        out[f"{name}_gene_counts"] = C
        out[f"{name}_gene_sums"] = S
    out["genes"] = genes.to_numpy(dtype=str)
    out["gene_cells"] = gene_cells
    out["params"] = {
        "layers": np.asarray(layers, dtype=np.int64),
        "n_top": int(n_top),
        "live_threshold": float(live_threshold),
        "sentence_key": sentence_key,
        "n_tokens": int(n_tokens),
        "n_cells": int(adata.n_obs),
    }

    if copy:
        adata = adata.copy()
    adata.uns[key][FEATURES] = out
    logger.info(
        "computed the genes of the features of %d layers over %d cells (%d genes) in %.1fs\n"
        "    added 'features' (adata.uns[%r]): per-layer feature tables and gene x feature counts",
        len(layers),
        adata.n_obs,
        n_genes,
        time.perf_counter() - start,
        key,
    )
    return adata if copy else None


def _feature_frame(
    layer: int,
    counts: sparse.csr_matrix,
    sums: sparse.csr_matrix,
    genes: pd.Index,
    rate: np.ndarray,
    n_top: int,
    live_threshold: float,
) -> pd.DataFrame:
    """One row per feature: firing rate, live flag and its top genes."""
    n_feat = counts.shape[1]
    Cc = counts.tocsc()
    Cc.sort_indices()
    inv = Cc.astype(np.float64)
    inv.data = 1.0 / inv.data
    # mean activation where the feature fired; same pattern as the counts (or a subset of it)
    Mc = sparse.csc_matrix(sums.multiply(inv), dtype=np.float64)
    Mc.sort_indices()
    names = genes.to_numpy(dtype=str)
    top_genes, top_counts = [], []
    for j in range(n_feat):
        lo, hi = Cc.indptr[j], Cc.indptr[j + 1]
        rows, c = Cc.indices[lo:hi], Cc.data[lo:hi].astype(np.float64)
        m = np.zeros(len(rows))
        mrows = Mc.indices[Mc.indptr[j] : Mc.indptr[j + 1]]
        m[np.searchsorted(rows, mrows)] = Mc.data[Mc.indptr[j] : Mc.indptr[j + 1]]
        order = np.lexsort((rows, -m, -c))[:n_top]
        top_genes.append(";".join(names[rows[order]]))
        top_counts.append(";".join(str(int(x)) for x in c[order]))
    rate = np.asarray(rate, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_rate = np.log10(rate)
    return pd.DataFrame(
        {
            "firing_rate": rate,
            "log10_firing_rate": log_rate,
            "live": log_rate >= live_threshold,
            "n_genes": np.diff(Cc.indptr).astype(np.int64),
            "top_genes": top_genes,
            "top_gene_counts": top_counts,
        },
        index=feature_names(layer, n_feat),
    )


def features_record(adata: AnnData, key: str) -> dict:
    """``adata.uns[key]["features"]``, or a KeyError saying to run :func:`feature_genes`."""
    record = sct_uns(adata, key)
    if FEATURES not in record:
        raise KeyError(
            f"No feature genes under adata.uns[{key!r}]: run `sct.tl.feature_genes(adata)` first."
        )
    return record[FEATURES]
