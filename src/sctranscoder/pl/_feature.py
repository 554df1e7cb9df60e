"""Feature card: one transcoder feature's firing rate, top genes, UMAP overlay and top cells."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key, parse_feature_name
from .._records import activations_record
from .._validate import check_feature, check_positive_int
from ..get import activations as get_activations
from ..get import feature_table
from ._utils import check_figsize, check_save, finish

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure


def feature(
    adata: AnnData,
    feature: str,
    *,
    n_top: int = 15,
    n_top_cells: int = 10,
    basis: str | None = "umap",
    groupby: str | None = None,
    activations_key: str = Key.activations(Key.transcoders),
    annotation_key: str | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Figure | list | None:
    """Feature card: everything about one transcoder feature in one figure.

    Four panels: a header with the feature's name, firing rate per prompt token (and its log10),
    live flag and, after :func:`sctranscoder.tl.annotate_features`, its best enriched gene set
    and FDR; a bar chart of the genes on which it fires in the most cells (most frequent on top);
    the ``basis`` embedding coloured by the feature's per-cell activation
    (:func:`scanpy.pl.embedding`); and the ``n_top_cells`` cells with the highest activation,
    labelled by ``obs_names`` (and their ``groupby`` group).

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_activations` (and optionally
        :func:`sctranscoder.tl.annotate_features`).
    feature
        The feature's name, ``"L<layer>F<index>"`` (e.g. ``"L2F17"``).
    n_top
        Number of top genes in the bar chart.
    n_top_cells
        Number of top activating cells listed.
    basis
        Embedding in ``adata.obsm[f"X_{basis}"]`` (or ``adata.obsm[basis]``) for the overlay; it
        must exist. ``None`` leaves the embedding panel empty.
    groupby
        ``adata.obs`` column (e.g. ``"bulk_labels"``) whose value labels each top cell.
    activations_key
        ``adata.uns`` key of the activation record.
    annotation_key
        ``adata.uns`` key of an annotation to show (default: the default one, when present).
    figsize
        Figure size in inches (default ``(13, 7)``).
    show
        Show the figure (default: ``scanpy.settings.autoshow``).
    save
        ``True`` or a file-name suffix: save to ``sc.settings.figdir`` as scanpy does
        (``feature_<name><suffix>.<format>``; an extension matplotlib writes, such as ``.png``
        or ``.jpg``, sets the format).
    return_fig
        Return the figure.

    Returns
    -------
    The figure with ``return_fig``; else its four axes (header, genes, embedding, top cells),
    unless shown.
    """
    import matplotlib.pyplot as plt

    check_positive_int(n_top, "n_top")
    check_positive_int(n_top_cells, "n_top_cells")
    check_figsize(figsize)
    check_save(save)
    if basis is not None and f"X_{basis}" not in adata.obsm and basis not in adata.obsm:
        raise KeyError(
            f"No embedding {basis!r} in adata.obsm; compute it (e.g. sc.tl.umap) first, or pass "
            "basis=None to leave the card's embedding panel empty."
        )
    layer, j = parse_feature_name(feature)
    table = feature_table(
        adata, layer, activations_key=activations_key, annotation_key=annotation_key, n_top=n_top
    )
    check_feature(layer, j, {layer: len(table)}, key=activations_key)
    name = feature
    row = table.iloc[j]
    if groupby is not None and groupby not in adata.obs:
        raise KeyError(f"groupby {groupby!r} is not a column of adata.obs.")
    if "top_genes" not in table:
        raise KeyError(
            f"adata.uns[{activations_key!r}] has no genes x features tables for the card's gene "
            "panel: rerun `sct.tl.feature_activations(adata, genes=True)`."
        )
    fa = get_activations(adata, layer, activations_key=activations_key)
    acts = np.asarray(fa[:, name].X.toarray(), dtype=float).ravel()

    fig = plt.figure(figsize=figsize or (13, 7), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 6], width_ratios=[1, 1.7, 1.1])
    axes = [
        fig.add_subplot(grid[0, :]),
        fig.add_subplot(grid[1, 0]),
        fig.add_subplot(grid[1, 1]),
        fig.add_subplot(grid[1, 2]),
    ]
    # an SAE's concepts (sct.tl.train_sae): rates per cell, genes by counterfactual attribution
    concept = "sae_key" in activations_record(adata, activations_key)["params"]
    _header(axes[0], name, row, unit="cell" if concept else "token")
    _top_genes(
        axes[1],
        row,
        n_top,
        xlabel="cells in which removing the gene lowers it"
        if concept
        else "cells in which it fires on the gene",
    )
    _embedding(axes[2], fa, name, basis)
    _top_cells(axes[3], adata, acts, n_top_cells, groupby)
    return finish(
        fig, axes, writekey=f"feature_{name}", show=show, save=save, return_fig=return_fig
    )


def _header(ax, name: str, row, unit: str = "token") -> None:
    rate, log_rate = float(row["firing_rate"]), float(row["log10_firing_rate"])
    lines = [
        f"firing rate {rate:.3g} per {unit} (log10 {log_rate:.2f})   "
        f"{'live' if bool(row['live']) else 'dead'}   "
        f"{'genes whose removal lowers it' if unit == 'cell' else 'genes fired on'}: "
        f"{int(row['n_genes'])}"
    ]
    for method, name_ in (("ora", "ORA"), ("gsea", "GSEA")):
        if f"{method}_term" in row.index:
            term = str(row[f"{method}_term"])
            fdr = float(row[f"{method}_fdr"])
            lines.append(
                f"best gene set ({name_}): {term}  (FDR {fdr:.2g})"
                if term
                else f"best gene set ({name_}): none"
            )
    ax.axis("off")
    ax.text(0, 1, name, fontsize=15, fontweight="bold", va="top", transform=ax.transAxes)
    ax.text(0, 0.45, "\n".join(lines), fontsize=9.5, va="top", transform=ax.transAxes)


def _top_genes(ax, row, n_top: int, xlabel: str = "cells in which it fires on the gene") -> None:
    genes = [g for g in str(row["top_genes"]).split(";") if g][:n_top]
    counts = [int(c) for c in str(row["top_gene_counts"]).split(";") if c][: len(genes)]
    if genes:
        y = np.arange(len(genes))
        ax.barh(y, counts, color="#1f77b4")
        ax.set_yticks(y, genes, fontsize=8)
        ax.invert_yaxis()
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "fires on no gene", ha="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_title("top genes", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)


def _embedding(ax, fa, name: str, basis: str | None) -> None:
    import scanpy as sc

    if basis is not None:
        sc.pl.embedding(
            fa,
            basis,
            color=name,
            ax=ax,
            show=False,
            cmap="viridis",
            sort_order=True,
            title=f"{name} activation on {basis}",
            frameon=False,
            # a panel, not a whole figure: smaller dots than scanpy's 120000 / n_cells
            size=float(np.clip(20000 / max(fa.n_obs, 1), 4, 60)),
        )
        return
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, "no embedding (basis=None)", ha="center", va="center", transform=ax.transAxes)


def _top_cells(ax, adata, acts: np.ndarray, n_top_cells: int, groupby: str | None) -> None:
    top = np.argsort(-acts, kind="stable")[:n_top_cells]
    labels = [str(adata.obs_names[i]) for i in top]
    if groupby is not None:
        groups = adata.obs[groupby].to_numpy()
        labels = [f"{lab} ({groups[i]})" for lab, i in zip(labels, top, strict=True)]
    y = np.arange(len(top))
    ax.barh(y, acts[top], color="#ff7f0e")
    ax.set_yticks(y, labels, fontsize=6.5)
    ax.invert_yaxis()
    ax.set_xlabel("activation")
    ax.set_title("top activating cells", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
