"""Counterfactual gene attribution of a transcoder feature (Claye et al. 2025).

Correlation says which genes' tokens a feature is active on; a counterfactual says which genes
make it fire: remove a gene from the cell sentence (or move it to the end), rerun the model up to
the feature's layer, and measure how much the feature's activation drops.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from scipy import sparse, stats
from tqdm.auto import tqdm

from .._constants import Key
from .._store import gene_lists, resolve_model, sct_uns, stored_transcoders
from ..core.hooks import capture_mlp_io, run_to_layers
from ..core.tokens import tokenize_prompts
from ._feature_activations import _symbol_index

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.model import C2SModel
    from ..core.transcoder import Transcoder

logger = logging.getLogger(__name__)

Mode = Literal["remove", "move_to_end"]
MODES = ("remove", "move_to_end")


def counterfactual(genes: Sequence[str], position: int, mode: Mode) -> list[str]:
    """The sentence ``genes`` with the gene at ``position`` removed or moved to the end."""
    rest = [*genes[:position], *genes[position + 1 :]]
    return rest if mode == "remove" else [*rest, genes[position]]


@torch.no_grad()
def feature_values(
    model: C2SModel,
    transcoder: Transcoder,
    layer: int,
    feature: int,
    sentences: Sequence[Sequence[str]],
    *,
    aggregate: Literal["max", "last"] = "max",
    batch_size: int = 64,
    stated_n_genes: int | None = None,
) -> np.ndarray:
    """One feature's activation per sentence: max over gene tokens, or at the last token.

    The model runs only up to ``layer``; the transcoder encodes that layer's MLP input. With
    ``stated_n_genes``, every prompt states that many genes (the template's ``{n_genes}``)
    whatever the sentence's length.
    """
    device = next(model.model.parameters()).device
    settings = model.settings
    if stated_n_genes is not None:
        template = settings.template.replace("{n_genes}", str(int(stated_n_genes)))
        settings = dataclasses.replace(settings, template=template)
    out = []
    for b0 in range(0, len(sentences), batch_size):
        batch = tokenize_prompts(
            model.tokenizer,
            sentences[b0 : b0 + batch_size],
            settings,
            max_length=model.max_length,
        )
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        with capture_mlp_io(model.model, [layer]) as store:
            run_to_layers(model.model, ids, mask)
            x = store[layer][0].float()
        values, indices = transcoder.to(device).encode_sparse(x)
        f = (values * (indices == feature)).sum(-1)  # (B, T): the feature at every token
        if aggregate == "last":
            rows = torch.arange(f.shape[0], device=device)
            out.append(f[rows, batch.lengths.to(device) - 1])
        else:
            is_gene = batch.gene_index.to(device) >= 0
            out.append(f.masked_fill(~is_gene, 0.0).amax(1))
    return torch.cat(out).float().cpu().numpy() if out else np.zeros(0, dtype=np.float32)


def _top_overlap(a: pd.Series, b: pd.Series, k: int) -> float:
    if len(a) < k:
        return float("nan")
    return len(set(a.nlargest(k).index) & set(b.nlargest(k).index)) / k


def gene_attribution(
    adata: AnnData,
    layer: int,
    feature: int,
    *,
    model: C2SModel | str | None = None,
    cells: Sequence[str] | None = None,
    n_cells: int = 20,
    mode: Mode = "remove",
    aggregate: Literal["max", "last"] = "max",
    keep_n_genes: bool = True,
    batch_size: int = 64,
    key: str = Key.uns,
    gene_sets: Mapping[str, Iterable[str]] | str | pd.DataFrame | None = None,
    permutations: int = 200,
    seed: int = 0,
    key_added: str | None = None,
    progress: bool = True,
) -> None:
    """Genes that cause a feature to fire: the drop in its activation when each is removed.

    For each chosen cell, and each gene of its sentence (cut to the model's ``n_genes``), the
    sentence is rebuilt without that gene (``mode="remove"``) or with it moved to the end
    (``"move_to_end"``), run through the model up to
    ``layer`` (batched), and encoded by the layer's transcoder. The feature's activation is
    aggregated over gene tokens (``"max"``, as :func:`feature_activations` does) or read at the
    last prompt token (``"last"``). A gene's effect in a cell is original minus counterfactual
    activation (positive: the gene helps the feature fire); genes are ranked by their mean
    effect over the chosen cells whose sentence contains them.

    The ranking is compared with the correlational one, the gene's mean activation of the feature
    (``adata.varm[f"{key}_genes_L{layer}"]``, from :func:`feature_activations`), over the genes
    that have both scores: Spearman correlation and the overlap of the top 10 and top 20.

    Parameters
    ----------
    adata
        Annotated data with cell sentences and transcoders.
    layer
        Transcoder layer of the feature.
    feature
        Feature index in that layer.
    model
        The base model; default: the recorded one (its fingerprint must match).
    cells
        ``adata.obs_names`` of the cells to explain. Default: the ``n_cells`` cells with the
        largest stored activation (``adata.obsm[f"X_{key}_L{layer}"]``) among those where the
        feature fires. Chosen cells where the feature does not fire (recomputed) are skipped.
    n_cells
        Number of cells when ``cells`` is not given.
    mode
        ``"remove"`` or ``"move_to_end"``.
    aggregate
        ``"max"`` over gene tokens or ``"last"`` token.
    keep_n_genes
        With ``mode="remove"``, keep the gene count the prompt states (the template's
        ``{n_genes}``) at the original sentence length, so that the only change is the missing
        gene. With ``False`` the prompt states one gene fewer, which shifts the activations of
        every counterfactual by a common amount (a confound seen on the embedded model).
    batch_size
        Counterfactual sentences per forward pass.
    key
        ``adata.uns`` key of the transcoders.
    gene_sets
        Optional gene sets (anything :func:`~sctranscoder._genesets.gene_sets` reads) for a
        preranked GSEA (:func:`~sctranscoder._enrichment.prerank`) of the attribution ranking.
    permutations
        GSEA permutations.
    seed
        GSEA seed.
    key_added
        ``adata.uns`` key of the result (default ``f"gene_attribution_L{layer}F{feature}"``).
    progress
        Show a progress bar over cells.

    Returns
    -------
    ``None``. Sets ``adata.uns[key_added]`` : dict with

    ``genes`` : :class:`pandas.DataFrame`
        One row per gene seen in the chosen cells, by decreasing ``mean_effect``: ``gene``,
        ``mean_effect`` (float), ``sd`` (sample standard deviation, NaN for one cell),
        ``n_cells`` (cells whose sentence contains it), ``correlational_score`` (stored mean
        activation on the gene's tokens; NaN when unavailable).
    ``effects`` : :class:`pandas.DataFrame`
        One row per (cell, gene): ``cell``, ``gene``, ``position`` (in the sentence),
        ``original``, ``counterfactual``, ``effect``.
    ``agreement`` : dict
        ``spearman`` (in [-1, 1]), ``top10_overlap``, ``top20_overlap`` (fractions in [0, 1]),
        ``n_genes`` (genes with both scores); NaN where not computable.
    ``gsea`` : :class:`pandas.DataFrame`
        Only with ``gene_sets``: :func:`~sctranscoder._enrichment.prerank`'s table (``term``,
        ``es``, ``nes``, ``pvalue``, ``fdr``, ``lead_genes``).
    ``params`` : dict
        ``layer``, ``feature``, ``mode``, ``aggregate``, ``keep_n_genes``, ``cells`` (str array of cells used),
        ``n_cells``, ``key``, ``permutations``, ``seed``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if aggregate not in ("max", "last"):
        raise ValueError(f"aggregate must be 'max' or 'last', got {aggregate!r}.")
    if batch_size < 1:
        raise ValueError("batch_size must be positive.")
    layer, feature = int(layer), int(feature)
    record = sct_uns(adata, key)
    tc = stored_transcoders(adata, key, [layer])[layer]
    n_features = tc.config.n_features
    if not 0 <= feature < n_features:
        raise ValueError(
            f"feature {feature} out of range: layer {layer} has features 0..{n_features - 1}."
        )
    obsm_key = Key.obsm_activations(key, layer)
    stored = adata.obsm[obsm_key] if obsm_key in adata.obsm else None
    if cells is None:
        if stored is None:
            raise KeyError(
                f"adata.obsm[{obsm_key!r}] not found: run `sct.tl.feature_activations(adata)` "
                "first, or pass `cells=`."
            )
        col = stored[:, feature]
        col = np.asarray(col.todense() if sparse.issparse(col) else col).ravel()
        firing = np.flatnonzero(col > 0)
        if firing.size == 0:
            raise ValueError(
                f"Feature {feature} of layer {layer} fires in no cell (adata.obsm[{obsm_key!r}])."
            )
        order = firing[np.argsort(-col[firing], kind="stable")][: int(n_cells)]
        idx = order
    else:
        cells = [str(c) for c in ([cells] if isinstance(cells, str) else cells)]
        unknown = [c for c in cells if c not in adata.obs_names]
        if unknown:
            raise KeyError(f"Cells not in adata.obs_names: {unknown[:5]}.")
        if not cells:
            raise ValueError("No cells given.")
        idx = adata.obs_names.get_indexer(cells)
    model = resolve_model(adata, key, model)
    sentence_key = str(record.get("params", {}).get("sentence_key", Key.sentence))
    all_sentences = gene_lists(adata, sentence_key, n_genes=model.settings.n_genes)
    sentences = [all_sentences[i] for i in idx]
    names = [str(adata.obs_names[i]) for i in idx]

    start = time.perf_counter()
    original = feature_values(
        model, tc, layer, feature, sentences, aggregate=aggregate, batch_size=batch_size
    )
    fires = original > 0
    if not fires.any():
        raise ValueError(
            f"Feature {feature} of layer {layer} (aggregate {aggregate!r}) fires in none of the "
            f"chosen cells {names[:5]}."
        )
    if not fires.all():
        logger.info("skipping %d chosen cells where the feature does not fire", (~fires).sum())
    rows = []
    used = [i for i in range(len(names)) if fires[i]]
    for i in tqdm(used, desc="gene attribution", disable=not progress, unit="cell"):
        genes = sentences[i]
        cfs = [counterfactual(genes, p, mode) for p in range(len(genes))]
        values = feature_values(
            model,
            tc,
            layer,
            feature,
            cfs,
            aggregate=aggregate,
            batch_size=batch_size,
            stated_n_genes=len(genes) if keep_n_genes else None,
        )
        for p, (g, v) in enumerate(zip(genes, values, strict=True)):
            rows.append((names[i], g, p, float(original[i]), float(v)))
    effects = pd.DataFrame(
        rows, columns=["cell", "gene", "position", "original", "counterfactual"]
    ).astype({"position": np.int64})
    effects["effect"] = effects["original"] - effects["counterfactual"]

    by_gene = effects.groupby("gene", sort=False)["effect"]
    table = pd.DataFrame(
        {
            "mean_effect": by_gene.mean(),
            "sd": by_gene.std(ddof=1),
            "n_cells": by_gene.size().astype(np.int64),
        }
    )
    varm_key = Key.varm_gene_activations(key, layer)
    corr = np.full(len(table), np.nan)
    if varm_key in adata.varm:
        col = adata.varm[varm_key][:, feature]
        col = np.asarray(col.todense() if sparse.issparse(col) else col).ravel()
        symbol_index = _symbol_index(adata, sentence_key)
        pos = np.array([symbol_index.get(str(g).upper(), -1) for g in table.index])
        corr = np.where(pos >= 0, col[np.maximum(pos, 0)], np.nan)
    table["correlational_score"] = corr.astype(np.float64)
    table = table.sort_values("mean_effect", ascending=False, kind="stable")
    table = table.rename_axis("gene").reset_index()

    both = table.dropna(subset=["correlational_score"]).set_index("gene")
    spearman = float("nan")
    if len(both) >= 2 and both["mean_effect"].nunique() > 1:
        spearman = float(stats.spearmanr(both["mean_effect"], both["correlational_score"])[0])
    agreement = {
        "spearman": spearman,
        "top10_overlap": _top_overlap(both["mean_effect"], both["correlational_score"], 10),
        "top20_overlap": _top_overlap(both["mean_effect"], both["correlational_score"], 20),
        "n_genes": len(both),
    }
    result = {
        "genes": table,
        "effects": effects,
        "agreement": agreement,
        "params": {
            "layer": layer,
            "feature": feature,
            "mode": mode,
            "aggregate": aggregate,
            "keep_n_genes": bool(keep_n_genes),
            "cells": np.asarray([names[i] for i in used], dtype=str),
            "n_cells": len(used),
            "key": key,
            "permutations": int(permutations),
            "seed": int(seed),
        },
    }
    if gene_sets is not None:
        from .._enrichment import prerank
        from .._genesets import gene_sets as load_gene_sets

        sets = load_gene_sets(gene_sets, adata=adata)
        ranking = pd.Series(table["mean_effect"].to_numpy(), index=table["gene"].to_numpy())
        result["gsea"] = prerank(ranking, sets, permutations=int(permutations), seed=int(seed))

    key_added = f"gene_attribution_L{layer}F{feature}" if key_added is None else str(key_added)
    adata.uns[key_added] = result
    logger.info(
        "attributed feature %d of layer %d to %d genes over %d cells in %.1fs\n"
        "    added %r (adata.uns)",
        feature,
        layer,
        len(table),
        len(used),
        time.perf_counter() - start,
        key_added,
    )
