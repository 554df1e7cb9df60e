from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from .._constants import Key
from ..core.activations import AGGREGATES, Aggregate
from ._activation_pass import activation_pass

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.model import C2SModel

logger = logging.getLogger(__name__)


def _symbol_index(adata: AnnData, sentence_key: str) -> dict[str, int]:
    """Upper-case gene symbol -> position in ``adata.var_names`` (for per-gene results)."""
    params = adata.uns.get(sentence_key, {}).get("params", {})
    column = params.get("gene_symbols", "var_names")
    if column != "var_names" and column in adata.var:
        names = adata.var[column].astype(str)
    else:
        names = adata.var_names
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(str(name).upper(), i)
    return index


def feature_activations(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    layers: Sequence[int] | None = None,
    aggregate: Aggregate = "max",
    gene_activations: bool = True,
    batch_size: int = 32,
    sentence_key: str | None = None,
    key: str = Key.uns,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Per-cell activation of every transcoder feature, for every trained layer.

    Each cell's prompt is run through the model once; every layer's transcoder encodes its MLP
    input at every token; a cell's activation of a feature is aggregated over the tokens of its
    genes (``"max"`` or ``"mean"``) or read at the final prompt token (``"last"``, where the model
    predicts). Per gene, the feature's activation (maximum over the gene's subword tokens) is
    averaged over the cells whose sentence contains the gene.

    Parameters
    ----------
    adata
        Annotated data with cell sentences and transcoders (:func:`train_transcoders`). May be
        backed (``anndata.read_h5ad(path, backed="r")``): only ``obs``, ``var`` and ``uns`` are
        read, cells go through the model ``batch_size`` at a time, and the results are held in
        memory (save them with ``adata.write_h5ad(new_path)``).
    model
        The base model; default: the one recorded in ``adata.uns[key]["model"]``. Its fingerprint
        must match the recorded one.
    layers
        Layers to compute (default: all trained layers).
    aggregate
        ``"max"`` (default), ``"mean"`` or ``"last"``.
    gene_activations
        Also compute the per-gene mean activations (``adata.varm``).
    batch_size
        Cells per forward pass.
    sentence_key
        ``adata.obs`` column with the sentences (default: the one used in training).
    key
        ``adata.uns`` key of the transcoders.
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata`` (not for a backed ``adata``).

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets these fields:

    ``adata.obsm[f"X_{key}_L{layer}"]`` : :class:`scipy.sparse.csr_matrix`, float32
        Cells x features activations of each layer.
    ``adata.varm[f"{key}_genes_L{layer}"]`` : :class:`scipy.sparse.csr_matrix`, float32
        Genes x features: mean activation of each feature on each gene's tokens, over the cells
        whose sentence contains the gene (when ``gene_activations``; genes of the sentences not
        in ``var_names`` are left out).
    ``adata.uns[key]["activations"]`` : dict
        ``params`` (aggregate, layers, sentence key), ``obsm_keys`` and ``varm_keys`` (per
        ``"layer_<i>"``, the keys above), ``firing_rate`` (per layer: fraction of prompt tokens on
        which each feature fires), ``gene_cells`` (cells whose sentence contains each gene),
        ``n_tokens``.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}.")
    if batch_size < 1:
        raise ValueError("batch_size must be positive.")
    if copy and adata.isbacked:
        raise ValueError(
            "copy=True would load the backed matrix into memory. Use copy=False (results go to "
            "obsm, varm and uns, held in memory; save them with `adata.write_h5ad(new_path)`), "
            "or call `adata.to_memory()` first."
        )
    run = activation_pass(adata, model, key=key, layers=layers, sentence_key=sentence_key)
    sentences, transcoders, sentence_key, layers = (
        run.sentences,
        run.transcoders,
        run.sentence_key,
        run.layers,
    )
    symbol_index = _symbol_index(adata, sentence_key) if gene_activations else {}
    n_obs, n_vars = adata.n_obs, adata.n_vars

    start = time.perf_counter()
    cell_rows: dict[int, list[sparse.csr_matrix]] = {x: [] for x in layers}
    gene_sums: dict[int, sparse.csr_matrix] = {}
    fired = {x: 0.0 for x in layers}
    gene_cells = np.zeros(n_vars, dtype=np.int64)
    n_tokens = 0
    for gl, acts, n_batch_tokens in run.batches(
        batch_size=batch_size, aggregate=aggregate, genes=gene_activations, progress=progress
    ):
        n_tokens += n_batch_tokens
        var_of_pair = None
        for layer in layers:
            a = acts[layer]
            cell_rows[layer].append(sparse.csr_matrix(a.cells.cpu().numpy().astype(np.float32)))
            fired[layer] = fired[layer] + a.fired.cpu().numpy()
            if gene_activations and a.gene_values.shape[0]:
                if var_of_pair is None:
                    cells_ = a.gene_cell.cpu().numpy()
                    pos_ = a.gene_pos.cpu().numpy()
                    var_of_pair = np.array(
                        [symbol_index.get(gl[c][p], -1) for c, p in zip(cells_, pos_, strict=True)]
                    )
                    known = var_of_pair >= 0
                    np.add.at(gene_cells, var_of_pair[known], 1)
                vals = sparse.csr_matrix(a.gene_values.cpu().numpy()[known].astype(np.float32))
                onto = sparse.csr_matrix(
                    (
                        np.ones(known.sum(), dtype=np.float32),
                        (var_of_pair[known], np.arange(known.sum())),
                    ),
                    shape=(n_vars, known.sum()),
                )
                add = (onto @ vals).tocsr()
                gene_sums[layer] = add if layer not in gene_sums else gene_sums[layer] + add

    obsm_keys, varm_keys, firing = {}, {}, {}
    results_obsm, results_varm = {}, {}
    for layer in layers:
        name = Key.layer(layer)
        X = sparse.vstack(cell_rows[layer], format="csr").astype(np.float32)
        X.eliminate_zeros()
        obsm_keys[name] = Key.obsm_activations(key, layer)
        results_obsm[obsm_keys[name]] = X
        firing[name] = (np.asarray(fired[layer], dtype=np.float64) / max(n_tokens, 1)).astype(
            np.float32
        )
        if gene_activations:
            n_feat = transcoders[layer].config.n_features
            sums = gene_sums.get(layer, sparse.csr_matrix((n_vars, n_feat), dtype=np.float32))
            inv = np.divide(1.0, gene_cells, out=np.zeros(n_vars), where=gene_cells > 0)
            mean = sparse.diags(inv.astype(np.float32)) @ sums
            mean = sparse.csr_matrix(mean, dtype=np.float32)
            mean.eliminate_zeros()
            varm_keys[name] = Key.varm_gene_activations(key, layer)
            results_varm[varm_keys[name]] = mean
    seen = {g for s in sentences for g in s}
    n_unknown = sum(1 for g in seen if g not in symbol_index)
    if gene_activations and n_unknown:
        log = logger.warning if n_unknown > len(seen) / 2 else logger.info
        log(
            "%d of %d genes of the sentences match no gene of adata.var (by upper-case symbol); "
            "they are left out of adata.varm",
            n_unknown,
            len(seen),
        )

    if copy:
        adata = adata.copy()
    adata.obsm.update(results_obsm)
    if gene_activations:
        adata.varm.update(results_varm)
    adata.uns[key]["activations"] = {
        "params": {
            "aggregate": aggregate,
            "layers": np.asarray(layers, dtype=np.int64),
            "sentence_key": sentence_key,
            "gene_activations": bool(gene_activations),
        },
        "obsm_keys": obsm_keys,
        "varm_keys": varm_keys,
        "firing_rate": firing,
        "gene_cells": gene_cells,
        "n_tokens": int(n_tokens),
    }
    logger.info(
        "computed activations of %d layers for %d cells in %.1fs\n    added %s (adata.obsm)%s",
        len(layers),
        n_obs,
        time.perf_counter() - start,
        list(obsm_keys.values()),
        f", {list(varm_keys.values())} (adata.varm)" if varm_keys else "",
    )
    return adata if copy else None
