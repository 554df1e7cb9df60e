"""Counterfactual gene attribution of an SAE's concepts (Claye et al. 2025): remove a gene from a
cell, embed it again, and measure how much each concept drops.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy import sparse
from tqdm.auto import tqdm

from .._constants import Key
from .._records import (
    activations_record,
    cell_prompts,
    check_fingerprint,
    check_key,
)
from .._sae import embedding, embedding_record, sae_module, sae_record
from .._validate import (
    check_bool,
    check_copy_backed,
    check_in_memory,
    check_positive_int,
    check_unique_obs_names,
)
from ..core.embeddings import embed_sentences
from ..core.sae import SAE_LAYER, AttributionTables, concept_drops, encode_dense

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from anndata import AnnData

    from ..core.model import C2SModel

#: Relative difference above which the embeddings recomputed for the chosen cells are said not to
#: be those of ``adata.obsm[use_rep]``.
REPRODUCE_TOLERANCE = 1e-3


def concept_attribution(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    encoder: Callable[[AnnData], np.ndarray] | None = None,
    key: str = Key.sae,
    cells: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 10,
    layer: str | None = None,
    batch_size: int = 64,
    key_added: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Genes that make each SAE concept active: the drop in its activation when one is removed.

    For each chosen cell and each of its top ``n_top_genes`` genes (or each gene of ``genes``
    it expresses), the gene is removed from the cell, the cell is embedded again, the SAE
    (:func:`train_sae`) encodes the new embedding, and every concept's drop in activation
    (original minus counterfactual; positive: the gene helps the concept fire) is that gene's
    attribution in that cell (Claye et al. 2025). Batched.

    How a gene is removed depends on the embedding the SAE was trained on:

    * **C2S's own** (:func:`cell_embeddings`, found through its record): the gene is dropped from
      the cell sentence (the prompt still states the original number of genes, so the gene is
      the only change) and the embedding is recomputed through ``model`` (default: the recorded
      one; its fingerprint must match). The top genes are the first of the sentence.
    * **Any other** (scVI, scGPT, Geneformer, PCA, ...): pass ``encoder``, a function from an
      AnnData of cells to their embedding, ``encoder(adata_perturbed) -> array (n_cells, d)``
      in the units of ``adata.obsm[use_rep]``, rows in the order of ``adata_perturbed``. It
      gets copies of the cells (``obs``, ``var``) with the gene's value set to 0 in ``X`` and in
      every ``layers[...]`` entry, and no ``uns``/``obsm`` (so scvi-tools registers it afresh);
      for scVI trained on ``adata``::

          encoder = lambda a: scvi_model.get_latent_representation(a)

      Top genes are the cell's largest values in ``X`` (or ``layers[layer]``); 0 means not
      expressed in counts or log-normalised data (not in scaled data). The encoder first
      embeds the unchanged cells: a warning says so when that differs from
      ``adata.obsm[use_rep]`` (another model, or a sampled latent).

    The results fill the genes x concepts tables of the SAE's activation record (the tables
    :func:`feature_activations` fills for transcoder features), so :func:`annotate_features`
    runs ORA (top genes by the number of cells in which removing them lowers the concept) and
    preranked GSEA (genes by mean attribution over the cells where they were removed) on them,
    and :func:`sctranscoder.get.gene_activations` and :func:`sctranscoder.pl.feature` read them
    (concept ``"L0F<j>"``, ``activations_key=f"{key}_activations"``).
    :func:`sctranscoder.get.concept_attribution` gives the signed mean attribution.

    Parameters
    ----------
    adata
        Annotated data with an SAE (:func:`train_sae`) and its embedding.
    model
        For a C2S embedding: the model (default: the one recorded with the embedding).
    encoder
        For any other embedding: the function described above.
    key
        ``adata.uns`` key of the SAE record.
    cells
        ``adata.obs_names`` of the cells to perturb, each once (default: all).
    genes
        Genes removed from every chosen cell that expresses them (sentence symbols or
        ``var_names``, matched case-insensitively), instead of each cell's top genes.
    n_top_genes
        Without ``genes``: the genes removed per cell, its most expressed first.
    layer
        Encoder path: ``adata.layers`` entry whose values rank a cell's genes (default ``X``).
    batch_size
        Perturbed cells per forward pass of the model, or per call of ``encoder``.
    key_added
        ``adata.uns`` key of the activation record that receives the tables (default: the SAE's,
        ``f"{key}_activations"``); another name writes a copy of it with these tables.
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. In ``adata.uns[key_added]`` (an
    activation record), sets:

    ``genes`` : dict
        ``names`` (str array: every gene removed at least once), ``n_cells`` (int array: cells
        it was removed from), ``counts`` (``{"layer_0": genes x concepts CSR int32}``: cells in
        which removing the gene lowered the concept) and ``sums`` (``{"layer_0": ... float32}``:
        the summed drop in those cells).
    ``attribution`` : dict
        ``signed_sums`` (``{"layer_0": genes x concepts CSR float32}``: the summed drop over
        every cell the gene was removed from, rises counted negative), ``cells`` (str array) and
        ``params`` (``sae_key``, ``route`` ``"c2s"`` or ``"encoder"``, ``n_top_genes``,
        ``genes`` (str array, empty for top genes), ``layer``, ``n_pairs``, ``seconds``).
    ``params["genes"]`` : bool
        ``True``.
    """
    rec = sae_record(adata, key)
    act_key = str(rec["params"]["activations_key"])
    act_rec = activations_record(adata, act_key)
    use_rep = str(rec["params"]["use_rep"])
    stored = embedding(adata, use_rep)
    if encoder is not None and not callable(encoder):
        raise TypeError(
            f"encoder must be a function from an AnnData to its embedding, e.g. `lambda a: "
            f"scvi_model.get_latent_representation(a)`, got {type(encoder).__name__}."
        )
    found = embedding_record(adata, use_rep)
    if encoder is None and found is None:
        raise ValueError(
            f"adata.obsm[{use_rep!r}] is not C2S's cell embedding (no `sct.tl.cell_embeddings` "
            "record points to it), so sctranscoder cannot embed perturbed cells: pass "
            "`encoder=`, a function from an AnnData to its embedding (for scVI, `encoder=lambda "
            "a: scvi_model.get_latent_representation(a)`)."
        )
    if encoder is not None and model is not None:
        raise ValueError(
            "Pass either model= (a C2S embedding, recomputed through the model) or encoder= "
            "(any other embedding), not both."
        )
    check_positive_int(n_top_genes, "n_top_genes")
    check_positive_int(batch_size, "batch_size")
    wanted = _check_genes(genes)
    progress = check_bool(progress, "progress")
    copy = check_bool(copy, "copy")
    check_copy_backed(adata, copy)
    record_key = check_key(
        key_added if key_added is not None else act_key, adata=adata, kind="activations"
    )
    chosen = _chosen(adata, cells)
    sae, scale = sae_module(rec)
    if encoder is None:
        if layer is not None:
            raise ValueError(
                "layer= chooses the matrix that ranks genes for an encoder; a C2S embedding "
                "ranks them by the cell sentence: leave layer=None."
            )
        pairs, embed_original, embed_pairs = _c2s_route(
            adata, found[1], model, chosen, wanted, n_top_genes, batch_size
        )
    else:
        check_in_memory(adata, "concept_attribution(encoder=...)")
        if layer is not None and layer not in adata.layers:
            raise KeyError(f"adata.layers[{layer!r}] not found; layers: {list(adata.layers)}.")
        pairs, embed_original, embed_pairs = _encoder_route(
            adata, encoder, chosen, wanted, n_top_genes, layer, sae.config.d_in
        )
    if not pairs:
        raise ValueError(
            f"No gene to remove: none of {list(wanted)[:5]} is expressed in the chosen cells."
        )

    start = logg.info(
        f"attributing the {sae.config.n_features} concepts of adata.uns[{key!r}] to genes: "
        f"{len(pairs)} perturbed cells from {len(chosen)} cells"
    )
    t0 = time.perf_counter()
    original = embed_original()
    _check_reproduced(original, stored[chosen], use_rep)
    A0 = encode_dense(sae, original, scale)
    tables = AttributionTables(sae.config.n_features)
    bar = tqdm(total=len(pairs), desc="concept attribution", unit="cell", disable=not progress)
    try:
        for b0 in range(0, len(pairs), batch_size):
            chunk = pairs[b0 : b0 + batch_size]
            A1 = encode_dense(sae, embed_pairs(chunk), scale)
            rows = np.fromiter((c for c, _ in chunk), dtype=np.int64, count=len(chunk))
            tables.add([g for _, g in chunk], concept_drops(A0[rows], A1))
            bar.update(len(chunk))
    finally:
        bar.close()
    n_cells, counts, sums, signed = tables.tables()
    layer_key = Key.layer(SAE_LAYER)
    out = {k: v for k, v in act_rec.items() if k not in ("genes", "attribution")}
    out["params"] = {**dict(act_rec["params"]), "genes": True}
    out["genes"] = {
        "names": np.asarray(tables.names, dtype=str),
        "n_cells": n_cells,
        "counts": {layer_key: counts},
        "sums": {layer_key: sums},
    }
    out["attribution"] = {
        "signed_sums": {layer_key: signed},
        "cells": np.asarray([str(adata.obs_names[i]) for i in chosen], dtype=str),
        "params": {
            "sae_key": key,
            "route": "c2s" if encoder is None else "encoder",
            "n_top_genes": int(n_top_genes),
            "genes": np.asarray(list(wanted) if wanted else [], dtype=str),
            "layer": "" if layer is None else str(layer),
            "n_pairs": len(pairs),
            "batch_size": int(batch_size),
            "seconds": time.perf_counter() - t0,
        },
    }
    if copy:
        adata = adata.copy()
    adata.uns[record_key] = out
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {record_key!r}: genes x concepts tables ('genes') and the signed "
        "attribution ('attribution') (adata.uns)",
    )
    return adata if copy else None


def _check_genes(genes) -> dict[str, str] | None:
    """``genes`` as ``{UPPER: as given}``, or None; refused unless a non-empty list of str."""
    if genes is None:
        return None
    items = [genes] if isinstance(genes, str) else genes
    ok = not isinstance(items, dict) and hasattr(items, "__iter__")
    items = list(items) if ok else []
    if not ok or not items or not all(isinstance(g, str) and g for g in items):
        raise ValueError(f"genes must be a non-empty list of gene names, got {genes!r}.")
    return {g.upper(): g for g in items}


def _chosen(adata: AnnData, cells) -> np.ndarray:
    """Row indices of ``cells`` (default: all), each named once and present."""
    if cells is None:
        return np.arange(adata.n_obs)
    check_unique_obs_names(adata)
    names = [str(c) for c in ([cells] if isinstance(cells, str) else cells)]
    if not names:
        raise ValueError("cells is empty: pass obs_names, or None for all cells.")
    unknown = [c for c in names if c not in adata.obs_names]
    if unknown:
        raise KeyError(f"Cells not in adata.obs_names: {unknown[:5]}.")
    index = pd.Index(names)
    if index.has_duplicates:
        raise ValueError(
            f"cells names {list(index[index.duplicated()].unique()[:5])} more than once: pass "
            "each cell once, e.g. `cells=list(dict.fromkeys(cells))`."
        )
    return adata.obs_names.get_indexer(names)


def _check_reproduced(original: np.ndarray, stored: np.ndarray, use_rep: str) -> None:
    """Warn when the unperturbed cells' embedding is not ``adata.obsm[use_rep]``."""
    scale = float(np.linalg.norm(stored)) or 1.0
    diff = float(np.linalg.norm(original - stored)) / scale
    if diff > REPRODUCE_TOLERANCE:
        logg.warning(
            f"the unperturbed cells embed {diff:.1%} away from adata.obsm[{use_rep!r}] (relative "
            "Frobenius difference): attribution is measured against the recomputed embedding, "
            f"but check that the encoder is the one that made adata.obsm[{use_rep!r}]"
        )


def _c2s_route(adata, emb_rec, model, chosen, wanted, n_top_genes, batch_size):
    """Pairs ``(row in chosen, gene)`` and the two embedding functions, for C2S's embedding."""
    from .._validate import model_or_default

    params = emb_rec["params"]
    recorded = dict(emb_rec["model"])
    if model is None:
        from ..datasets import TINY_C2S_NAME

        model = None if str(recorded.get("name")) == TINY_C2S_NAME else str(recorded["name"])
    model = model_or_default(model)
    check_fingerprint(recorded, model)
    sentences, model = cell_prompts(adata, str(params["sentence_key"]), model)
    cells = [sentences[i] for i in chosen]
    pairs = []
    for r, sentence in enumerate(cells):
        if wanted is None:
            pairs += [(r, g) for g in sentence[:n_top_genes]]
        else:
            pairs += [(r, g) for g in sentence if g.upper() in wanted]
    layer, pool = int(params["layer"]), str(params["pool"])

    def embed_original():
        return embed_sentences(model, cells, layer=layer, pool=pool, batch_size=batch_size)

    def embed_pairs(chunk):
        perturbed = [[x for x in cells[r] if x != g] for r, g in chunk]
        stated = [len(cells[r]) for r, _ in chunk]
        return embed_sentences(
            model, perturbed, layer=layer, pool=pool, batch_size=batch_size, stated_n_genes=stated
        )

    return pairs, embed_original, embed_pairs


def _encoder_route(adata, encoder, chosen, wanted, n_top_genes, layer, d):
    """Pairs ``(row in chosen, gene)`` and the two embedding functions, for an encoder."""
    import anndata as ad

    M = adata.X if layer is None else adata.layers[layer]
    M = sparse.csr_matrix(M[chosen]) if sparse.issparse(M) else np.asarray(M[chosen])
    var_names = np.asarray(adata.var_names, dtype=str)
    col_of = {g: j for j, g in enumerate(var_names)}
    pairs = []
    if wanted is not None:
        upper = pd.Index([g.upper() for g in var_names])
        cols = np.flatnonzero(upper.isin(list(wanted)))
        if cols.size == 0:
            raise KeyError(
                f"None of genes {list(wanted.values())[:5]} is in adata.var_names (e.g. "
                f"{list(var_names[:3])})."
            )
    for r in range(len(chosen)):
        row = M[r].toarray().ravel() if sparse.issparse(M) else M[r]
        if wanted is None:
            top = np.argsort(-row, kind="stable")[:n_top_genes]
            top = top[row[top] != 0]
        else:
            top = cols[row[cols] != 0]
        pairs += [(r, var_names[j]) for j in top]
    obs = adata.obs.iloc[chosen]

    def cells_of(rows, drop=None):
        """AnnData of ``chosen[rows]``, with gene ``drop[i]`` set to 0 in row i."""
        idx = chosen[rows]
        matrices = {"X": adata.X, **{name: adata.layers[name] for name in adata.layers}}
        out = {}
        for name, m in matrices.items():
            part = m[idx]
            part = part.copy() if sparse.issparse(part) else np.array(part, copy=True)
            if drop is not None:
                cols = np.asarray([col_of[g] for g in drop])
                if sparse.issparse(part):
                    part = sparse.csr_matrix(part)
                    part[np.arange(len(idx)), cols] = 0
                    part.eliminate_zeros()
                else:
                    part[np.arange(len(idx)), cols] = 0
            out[name] = part
        o = obs.iloc[rows].copy()
        if drop is not None:
            o.index = [f"{c}-without-{g}" for c, g in zip(o.index, drop, strict=True)]
        X = out.pop("X")
        return ad.AnnData(X=X, obs=o, var=adata.var.copy(), layers=out)

    def run(a):
        value = encoder(a)
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        value = np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value)
        if value.shape != (a.n_obs, d):
            raise ValueError(
                f"encoder returned shape {value.shape} for {a.n_obs} cells; it must return one "
                f"row of {d} numbers (the SAE's embedding width) per cell, in their order."
            )
        if not np.isfinite(value).all():
            raise ValueError("encoder returned NaN or infinite values.")
        return value.astype(np.float32)

    def embed_original():
        return run(cells_of(np.arange(len(chosen))))

    def embed_pairs(chunk):
        rows = np.asarray([r for r, _ in chunk])
        return run(cells_of(rows, drop=[g for _, g in chunk]))

    return pairs, embed_original, embed_pairs
