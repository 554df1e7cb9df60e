"""Counterfactual gene attribution of a transcoder feature (Claye et al. 2025)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy import sparse, stats

from .._constants import Key, feature_name, parse_feature_name
from .._genesets import clean_symbol
from .._genesets import gene_sets as load_gene_sets
from .._gsea import prerank
from .._records import (
    activations_record,
    cell_prompts,
    check_key,
    check_same_transcoders,
    layer_configs,
    model_and_transcoders,
    obsm_activations,
    recorded_sentence_key,
    strings,
    transcoder_record,
    transcoders_id,
)
from .._validate import (
    check_bool,
    check_copy_backed,
    check_feature,
    check_positive_int,
    check_seed,
    check_unique_obs_names,
)
from ..core.counterfactual import MODES, Mode, counterfactual_effects

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from anndata import AnnData

    from ..core.model import C2SModel


def gene_attribution(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    feature: str,
    cells: Sequence[str] | None = None,
    n_cells: int = 20,
    mode: Mode = "remove",
    aggregate: Literal["max", "last"] = "max",
    keep_n_genes: bool = True,
    batch_size: int = 64,
    gene_sets: Mapping[str, Iterable[str]] | str | pd.DataFrame | None = None,
    permutations: int = 200,
    seed: int = 0,
    allow_network: bool = False,
    key: str = Key.transcoders,
    activations_key: str | None = None,
    key_added: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Genes that cause a feature to fire: the drop in its activation when each is removed.

    For each chosen cell, and each gene of its sentence (cut to the model's ``n_genes``), the
    sentence is rebuilt without that gene (``mode="remove"``) or with it moved to the end
    (``"move_to_end"``), run through the model up to the feature's layer (batched), and encoded
    by the layer's transcoder. The feature's activation is aggregated over gene tokens
    (``"max"``, as :func:`feature_activations` does) or read at the last prompt token
    (``"last"``). A gene's effect in a cell is original minus counterfactual activation
    (positive: the gene helps the feature fire); genes are ranked by their mean effect over the
    chosen cells whose sentence contains them.

    The ranking is compared with the correlational one, the gene's mean activation of the
    feature over the cells containing it (:func:`sctranscoder.get.gene_activations`), over the
    genes that have both scores: Spearman correlation and the overlap of the top 10 and top 20.

    Parameters
    ----------
    adata
        Annotated data with cell sentences and transcoders.
    model
        The base model; default: the recorded one (its fingerprint must match).
    feature
        The feature, by name: ``"L<layer>F<index>"`` (e.g. ``"L2F17"``).
    cells
        ``adata.obs_names`` of the cells to explain, each once. Default: the ``n_cells`` cells with the
        largest stored activation among those where the feature fires. Chosen cells where the
        feature does not fire (recomputed) are skipped.
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
    gene_sets
        Optional gene sets (anything :func:`~sctranscoder._genesets.gene_sets` reads) for a
        preranked GSEA (:func:`~sctranscoder._gsea.prerank`) of the attribution ranking.
    permutations
        GSEA permutations.
    seed
        GSEA seed (a non-negative integer).
    allow_network
        Let a named gene set library be downloaded.
    key
        ``adata.uns`` key of the transcoders.
    activations_key
        ``adata.uns`` key of the activation record (default ``f"{key}_activations"``), read to
        choose cells and for the correlational score; not needed with ``cells``.
    key_added
        ``adata.uns`` key of the result (default ``f"gene_attribution_{feature}"``).
    progress
        Show a progress bar over cells.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``adata.uns[key_added]``, a dict:

    ``genes`` : :class:`pandas.DataFrame`
        One row per gene seen in the chosen cells, by decreasing ``mean_effect``: ``gene``,
        ``mean_effect`` (float), ``sd`` (sample standard deviation, NaN for one cell),
        ``n_cells`` (cells whose sentence contains it), ``correlational_score`` (mean activation
        on the gene's tokens; NaN when unavailable).
    ``effects`` : :class:`pandas.DataFrame`
        One row per (cell, gene): ``cell``, ``gene``, ``position`` (in the sentence),
        ``original``, ``counterfactual``, ``effect``.
    ``agreement`` : dict
        ``spearman`` (in [-1, 1]), ``top10_overlap``, ``top20_overlap`` (fractions in [0, 1]),
        ``n_genes`` (genes with both scores); NaN where not computable.
    ``gsea`` : :class:`pandas.DataFrame`
        Only with ``gene_sets``: :func:`~sctranscoder._gsea.prerank`'s table (``term``, ``es``,
        ``nes``, ``pvalue``, ``fdr``, ``lead_genes``).
    ``params`` : dict
        ``feature``, ``layer``, ``index``, ``mode``, ``aggregate``, ``keep_n_genes``, ``cells``
        (str array of cells used), ``n_cells``, ``transcoders_key``, ``activations_key``, ``permutations``, ``seed``.
    """
    layer, index = parse_feature_name(feature)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if aggregate not in ("max", "last"):
        raise ValueError(f"aggregate must be 'max' or 'last', got {aggregate!r}.")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(permutations, "permutations")
    seed = check_seed(seed)
    keep_n_genes = check_bool(keep_n_genes, "keep_n_genes")
    allow_network = check_bool(allow_network, "allow_network")
    progress = check_bool(progress, "progress")
    copy = check_bool(copy, "copy")
    check_copy_backed(adata, copy)
    record_key = check_key(
        key_added if key_added is not None else Key.gene_attribution(feature),
        adata=adata,
        kind="gene attribution",
    )
    activations_key = activations_key or Key.activations(key)
    rec = transcoder_record(adata, key)
    if cells is None or activations_key in adata.uns:
        check_same_transcoders(adata, activations_key, key)
    sets = None
    if gene_sets is not None:  # resolved first: nothing is computed if they cannot be had
        sets = load_gene_sets(gene_sets, adata=adata, allow_network=allow_network)
    configs = layer_configs(rec, key)
    check_feature(layer, index, {la: c.n_features for la, c in configs.items()}, key=key)
    chosen = _chosen_cells(adata, cells, n_cells, layer, index, activations_key)
    model, tset = model_and_transcoders(adata, key, model, layers=[layer])
    tc = tset[layer]
    all_sentences, model = cell_prompts(
        adata, recorded_sentence_key(rec), model, trained=rec["model"]
    )
    cell_sentences = [all_sentences[i] for i in chosen]
    names = [str(adata.obs_names[i]) for i in chosen]

    start = logg.info(f"attributing {feature} to genes over {len(names)} cells")
    original, counterfactuals = counterfactual_effects(
        model,
        tc,
        layer,
        index,
        cell_sentences,
        mode=mode,
        aggregate=aggregate,
        batch_size=batch_size,
        keep_n_genes=keep_n_genes,
        progress=progress,
    )
    used = np.fromiter(counterfactuals, dtype=np.int64)
    if used.size == 0:
        raise ValueError(
            f"{feature} (aggregate {aggregate!r}) fires in none of the chosen cells {names[:5]}."
        )
    if used.size < len(names):
        logg.info(f"    skipping {len(names) - used.size} chosen cells where it does not fire")
    rows = [
        (names[i], g, p, float(original[i]), float(v))
        for i, values in counterfactuals.items()
        for p, (g, v) in enumerate(zip(cell_sentences[i], values, strict=True))
    ]
    effects = pd.DataFrame(rows, columns=["cell", "gene", "position", "original", "counterfactual"])
    effects = effects.astype({"position": np.int64})
    effects["effect"] = effects["original"] - effects["counterfactual"]
    table = _gene_table(effects, _correlational(adata, activations_key, layer, index))
    result = {
        "genes": table,
        "effects": effects,
        "agreement": _agreement(table),
        "params": {
            "feature": feature,
            "layer": layer,
            "index": index,
            "mode": mode,
            "aggregate": aggregate,
            "keep_n_genes": bool(keep_n_genes),
            "cells": np.asarray([names[i] for i in used], dtype=str),
            "n_cells": int(used.size),
            "transcoders_key": key,
            "transcoders_id": transcoders_id(adata, key),
            "activations_key": activations_key,
            "permutations": int(permutations),
            "seed": int(seed),
        },
    }
    if sets is not None:
        ranking = pd.Series(table["mean_effect"].to_numpy(), index=table["gene"].to_numpy())
        result["gsea"] = prerank(ranking, sets, permutations=int(permutations), seed=int(seed))
    if copy:
        adata = adata.copy()
    adata.uns[record_key] = result
    logg.info("    finished", time=start, deep=f"added\n    {record_key!r} (adata.uns)")
    return adata if copy else None


def _chosen_cells(
    adata: AnnData, cells, n_cells: int, layer: int, index: int, activations_key: str
) -> np.ndarray:
    """Row indices of the given cells, or of the ``n_cells`` with the largest stored activation."""
    if cells is not None:
        check_unique_obs_names(adata)
        cells = [str(c) for c in ([cells] if isinstance(cells, str) else cells)]
        if not cells:
            raise ValueError("No cells given.")
        unknown = [c for c in cells if c not in adata.obs_names]
        if unknown:
            raise KeyError(f"Cells not in adata.obs_names: {unknown[:5]}.")
        twice = pd.Index(cells)[pd.Index(cells).duplicated()].unique()
        if len(twice):  # the cell would count twice in every gene's mean effect
            raise ValueError(
                f"cells names {list(twice[:5])} more than once: pass each cell once, e.g. "
                "`cells=list(dict.fromkeys(cells))`."
            )
        return adata.obs_names.get_indexer(cells)
    check_positive_int(n_cells, "n_cells")
    rec = activations_record(adata, activations_key)
    X = obsm_activations(adata, rec, layer, activations_key)
    col = X[:, index]
    col = np.asarray(col.todense() if sparse.issparse(col) else col).ravel()
    firing = np.flatnonzero(col > 0)
    if firing.size == 0:
        raise ValueError(
            f"{feature_name(layer, index)} fires in no cell (adata.uns[{activations_key!r}])."
        )
    return firing[np.argsort(-col[firing], kind="stable")][: int(n_cells)]


def _correlational(adata: AnnData, activations_key: str, layer: int, index: int) -> pd.Series:
    """The feature's mean activation per gene (over cells containing it); empty if unavailable."""
    rec = adata.uns.get(activations_key)
    genes = rec.get("genes") if isinstance(rec, dict) else None
    if not genes or Key.layer(layer) not in genes.get("sums", {}):
        return pd.Series(dtype=float)
    n = np.asarray(genes["n_cells"], dtype=np.float64)
    col = sparse.csc_matrix(genes["sums"][Key.layer(layer)])[:, index].toarray().ravel()
    mean = np.divide(col, n, out=np.zeros_like(n), where=n > 0)
    names = pd.Index([clean_symbol(g) for g in strings(genes["names"])])
    return pd.Series(mean, index=names).groupby(level=0).first()


def _gene_table(effects: pd.DataFrame, correlational: pd.Series) -> pd.DataFrame:
    by_gene = effects.groupby("gene", sort=False)["effect"]
    table = pd.DataFrame(
        {
            "mean_effect": by_gene.mean(),
            "sd": by_gene.std(ddof=1),
            "n_cells": by_gene.size().astype(np.int64),
        }
    )
    upper = [clean_symbol(g) for g in table.index]
    table["correlational_score"] = correlational.reindex(upper).to_numpy(dtype=np.float64)
    table = table.sort_values("mean_effect", ascending=False, kind="stable")
    return table.rename_axis("gene").reset_index()


def _top_overlap(a: pd.Series, b: pd.Series, k: int) -> float:
    if len(a) < k:
        return float("nan")
    return len(set(a.nlargest(k).index) & set(b.nlargest(k).index)) / k


def _agreement(table: pd.DataFrame) -> dict:
    both = table.dropna(subset=["correlational_score"]).set_index("gene")
    spearman = float("nan")
    if len(both) >= 2 and both["mean_effect"].nunique() > 1:
        spearman = float(stats.spearmanr(both["mean_effect"], both["correlational_score"])[0])
    return {
        "spearman": spearman,
        "top10_overlap": _top_overlap(both["mean_effect"], both["correlational_score"], 10),
        "top20_overlap": _top_overlap(both["mean_effect"], both["correlational_score"], 20),
        "n_genes": len(both),
    }
