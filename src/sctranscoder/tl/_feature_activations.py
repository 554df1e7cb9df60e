"""Feature activations of every cell, and the genes every feature fires on, in one pass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from scanpy import logging as logg

from .._constants import Key
from .._records import (
    cell_prompts,
    check_key,
    layer_configs,
    model_and_transcoders,
    recorded_sentence_key,
    transcoder_record,
    transcoders_id,
)
from .._validate import (
    check_bool,
    check_copy_backed,
    check_layer_list,
    check_live_threshold,
    check_positive_int,
    check_sentences_unique,
)
from ..core import distributed as dist
from ..core.activations import AGGREGATES, collect_activations, gather_tables, shard_cells

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..core.model import C2SModel


def feature_activations(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    layers: Sequence[int] | None = None,
    aggregate: Literal["max", "mean", "last"] = "max",
    genes: bool = True,
    live_threshold: float = -3.0,
    n_top: int = 50,
    batch_size: int = 32,
    sentence_key: str | None = None,
    key: str = Key.transcoders,
    key_added: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Per-cell activation of every transcoder feature, and the genes each feature fires on.

    Each cell's prompt is run through the model once; every layer's transcoder encodes its MLP
    input at every token. A cell's activation of a feature is aggregated over the tokens of its
    genes (``"max"`` or ``"mean"``) or read at the final prompt token (``"last"``, where the model
    predicts). In the same pass, per (gene, feature): in how many cells the feature *fires on the
    gene* (its maximum activation over the gene's subword tokens is positive) and the sum of those
    activations. Genes are the symbols of the sentences (their union, in first-seen order), not
    ``adata.var_names``: sentences made from ``adata.raw`` may hold genes that ``var`` lacks.

    **Many cells, several processes.** Launched with ``torchrun`` and called after
    ``torch.distributed.init_process_group()`` (more than one rank), every rank runs the model
    on its share of the cells only (every ``world_size``-th cell, from position ``rank``; with a
    backed ``adata`` each rank reads only ``obs`` and ``uns``), and rank 0 gathers the shares into
    one result in the original cell order, identical to a one-process run up to float rounding of
    the summed gene tables. Only rank 0's ``adata`` is written (the other ranks' is left as it
    was): write the file from rank 0. Each rank's memory is the model plus its share of the
    results; rank 0 also holds the whole result. See ``docs/scaling.md``.

    Read the results with :func:`sctranscoder.get.activations` (cells x features AnnData, for
    scanpy plots), :func:`sctranscoder.get.feature_table` (firing rate, live flag, top genes)
    and :func:`sctranscoder.get.gene_activations` (genes x features).

    Parameters
    ----------
    adata
        Annotated data with cell sentences and transcoders (:func:`train_transcoders`). May be
        backed (``anndata.read_h5ad(path, backed="r")``): only ``obs`` and ``uns`` are read,
        cells go through the model ``batch_size`` at a time, and the results are held in memory
        (save them with ``adata.write_h5ad(new_path)``).
    model
        The base model; default: the one recorded with the transcoders. Its fingerprint must
        match the recorded one.
    layers
        Layers to compute (default: all trained layers).
    aggregate
        ``"max"`` (default), ``"mean"`` or ``"last"``.
    genes
        Also gather the genes x features tables (needed by :func:`annotate_features`).
    live_threshold
        A feature is *live* when ``log10(firing_rate) >= live_threshold`` (Hosokawa et al.: -3;
        a finite number, at most 0); stored as the default of :func:`sctranscoder.get.feature_table`.
    n_top
        Genes listed per feature by :func:`sctranscoder.get.feature_table` (stored default).
    batch_size
        Cells per forward pass.
    sentence_key
        ``adata.obs`` column with the sentences (default: the one used in training).
    key
        ``adata.uns`` key of the transcoders.
    key_added
        ``adata.uns`` key of the activation record; default ``f"{key}_activations"``. The
        ``obsm`` keys are ``f"X_{key}_L<layer>"`` for the default record,
        ``f"X_{key_added}_L<layer>"`` for any other, so that two runs (say
        ``aggregate="last"`` beside ``"max"``) coexist. A record written again under the same key
        replaces the old one, and its ``obsm`` matrices no longer listed are removed.
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata`` (not for a backed ``adata``).

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets these fields:

    ``adata.obsm[f"X_{key}_L{layer}"]`` : :class:`scipy.sparse.csr_matrix`, float32
        Cells x features activations of each layer (``f"X_{key_added}_L{layer}"`` for a record
        named otherwise than by default).
    ``adata.uns[key_added]["obsm_keys"]`` : dict
        Per ``"layer_<i>"``, the ``obsm`` key above.
    ``adata.uns[key_added]["firing_rate"]`` : dict
        Per ``"layer_<i>"``, a float array: fraction of prompt tokens on which each feature fires.
    ``adata.uns[key_added]["genes"]`` : dict
        With ``genes``: ``names`` (str array, every gene of the sentences), ``n_cells`` (int
        array, cells whose sentence contains the gene), ``counts`` and ``sums`` (per
        ``"layer_<i>"``, genes x features CSR: cells in which the feature fires on the gene,
        int32; the sum of those activations, float32).
    ``adata.uns[key_added]["params"]`` : dict
        ``transcoders_key``, ``layers``, ``aggregate``, ``sentence_key``, ``live_threshold``,
        ``n_top``, ``genes``, ``n_tokens`` and ``n_cells``.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}.")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(n_top, "n_top")
    live_threshold = check_live_threshold(live_threshold)
    genes = check_bool(genes, "genes")
    progress = check_bool(progress, "progress")
    copy = check_bool(copy, "copy")
    check_copy_backed(adata, copy)
    record_key = check_key(
        key_added if key_added is not None else Key.activations(key),
        adata=adata,
        kind="activations",
    )
    # the default record writes X_<key>_L<i>; any other name, X_<key_added>_L<i>
    prefix = key if record_key == Key.activations(key) else record_key
    rec = transcoder_record(adata, key)
    if layers is not None:  # an empty list would compute nothing
        layers = check_layer_list(layers, sorted(layer_configs(rec, key)))
    sentence_key = sentence_key or recorded_sentence_key(rec)
    model, tset = model_and_transcoders(adata, key, model, layers=layers)
    cells, model = cell_prompts(adata, sentence_key, model, trained=rec["model"])
    if genes:  # a gene named twice in a sentence would count its cell twice
        check_sentences_unique(cells, adata.obs_names, sentence_key)

    mine = shard_cells(len(cells))  # all cells, or this rank's share under torchrun
    ranks = f" on {dist.world_size()} ranks" if dist.is_distributed() else ""
    start = logg.info(f"computing feature activations of layers {tset.layers}{ranks}")
    tables = collect_activations(
        model,
        tset,
        [cells[i] for i in mine] if ranks else cells,
        batch_size=batch_size,
        aggregate=aggregate,
        genes=genes,
        progress=progress and dist.rank() == 0,
        gene_names=list(dict.fromkeys(g for s in cells for g in s)) if genes and ranks else None,
    )
    tables = gather_tables(tables, mine, len(cells), device=model.device)
    if tables is None:  # a rank other than 0 under torchrun: rank 0 holds and writes the result
        logg.info(f"    rank {dist.rank()}: its cells sent to rank 0", time=start)
        return adata.copy() if copy else None
    obsm = {Key.layer(la): Key.obsm_activations(prefix, la) for la in tset}
    out = {
        "params": {
            "transcoders_key": key,
            "transcoders_id": transcoders_id(adata, key),
            "layers": np.asarray(tset.layers, dtype=np.int64),
            "aggregate": aggregate,
            "sentence_key": sentence_key,
            "live_threshold": float(live_threshold),
            "n_top": int(n_top),
            "genes": bool(genes),
            "n_tokens": int(tables.n_tokens),
            "n_cells": int(adata.n_obs),
        },
        "obsm_keys": obsm,
        "firing_rate": {Key.layer(la): tables.firing_rate[la] for la in tset},
    }
    if genes:
        out["genes"] = {
            "names": np.asarray(tables.genes, dtype=str),
            "n_cells": tables.gene_cells,
            "counts": {Key.layer(la): tables.gene_counts[la] for la in tset},
            "sums": {Key.layer(la): tables.gene_sums[la] for la in tset},
        }
    if copy:
        adata = adata.copy()
    old = adata.uns.get(record_key)
    if isinstance(old, dict) and "obsm_keys" in old:  # replaced: drop what it wrote and we do not
        for stale in set(map(str, old["obsm_keys"].values())) - set(obsm.values()):
            adata.obsm.pop(stale, None)
    for la in tset:
        adata.obsm[obsm[Key.layer(la)]] = tables.cells[la]
    adata.uns[record_key] = out
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {list(obsm.values())}, cells x features activations (adata.obsm)\n"
        f"    {record_key!r}, firing rates{', genes x features tables' if genes else ''} and "
        "params (adata.uns)",
    )
    return adata if copy else None
