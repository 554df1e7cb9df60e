"""Feature card: one transcoder feature's firing rate, top genes, UMAP overlay and top cells."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key
from ..get._features import feature_table
from ._utils import finish

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure


def _feature_index(layer: int, feature: int | str, n_features: int) -> int:
    if isinstance(feature, str):
        match = re.fullmatch(r"L(\d+)F(\d+)", feature.strip())
        if match is None:
            raise ValueError(f"Feature {feature!r} is not an index or a name like 'L{layer}F17'.")
        if int(match.group(1)) != int(layer):
            raise ValueError(f"Feature {feature!r} belongs to layer {match.group(1)}, not {layer}.")
        index = int(match.group(2))
    elif isinstance(feature, int | np.integer) and not isinstance(feature, bool):
        index = int(feature)
    else:
        raise TypeError(f"feature must be an int or a name like 'L{layer}F17', not {feature!r}.")
    if not 0 <= index < n_features:
        raise IndexError(
            f"Feature {index} out of range: layer {layer} has {n_features} features (0..{n_features - 1})."
        )
    return index


def feature(
    adata: AnnData,
    layer: int,
    feature: int | str,
    *,
    key: str = Key.uns,
    n_genes: int = 15,
    n_cells: int = 10,
    basis: str = "umap",
    groupby: str | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure | None:
    """Feature card: everything about one transcoder feature in one figure.

    Four panels: a header with the feature's name, firing rate per prompt token (and its log10),
    live flag and, after :func:`sctranscoder.tl.annotate_features`, its best enriched gene set
    and FDR; a bar chart of the genes on which it fires in the most cells (most frequent on top);
    the ``basis`` embedding coloured by the feature's per-cell activation; and the ``n_cells``
    cells with the highest activation, labelled by ``obs_names`` (and their ``groupby`` group).
    The last two panels need :func:`sctranscoder.tl.feature_activations`; without it they say so.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_genes` (and optionally
        :func:`sctranscoder.tl.annotate_features` and :func:`sctranscoder.tl.feature_activations`).
    layer
        Layer index.
    feature
        Feature index within the layer, or its name (``"L2F17"``; the layer must match).
    key
        ``adata.uns`` key of the transcoders.
    n_genes
        Number of top genes in the bar chart.
    n_cells
        Number of top activating cells listed.
    basis
        Embedding in ``adata.obsm[f"X_{basis}"]`` for the overlay.
    groupby
        ``adata.obs`` column (e.g. ``"bulk_labels"``) whose value labels each top cell.
    show
        Show the figure (default: ``scanpy.settings.autoshow``); then ``None`` is returned.
    save
        Write the figure to this path; the format follows the extension (``.png``, ``.svg``,
        ``.pdf``).
    figsize
        Figure size in inches (default ``(11, 7)``).

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (axes: header, genes, embedding, top cells), unless
    shown.
    """
    import matplotlib.pyplot as plt

    table = feature_table(adata, layer, key=key)
    j = _feature_index(int(layer), feature, len(table))
    name = f"L{int(layer)}F{j}"
    row = table.iloc[j]
    if groupby is not None and groupby not in adata.obs:
        raise KeyError(f"groupby {groupby!r} is not a column of adata.obs.")

    fig = plt.figure(figsize=figsize or (11, 7), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 6], width_ratios=[1, 1.3, 1])
    ax_head = fig.add_subplot(grid[0, :])
    ax_genes = fig.add_subplot(grid[1, 0])
    ax_emb = fig.add_subplot(grid[1, 1])
    ax_cells = fig.add_subplot(grid[1, 2])

    obsm_key = Key.obsm_activations(key, int(layer))
    acts = None
    if obsm_key in adata.obsm:
        X = adata.obsm[obsm_key]
        col = X[:, j]
        acts = np.asarray(col.toarray() if hasattr(col, "toarray") else col, dtype=float).ravel()

    # (1) header
    rate = float(row["firing_rate"])
    log_rate = float(row["log10_firing_rate"])
    lines = [
        f"firing rate {rate:.3g} per token (log10 {log_rate:.2f})   "
        f"{'live' if bool(row['live']) else 'dead'}   genes fired on: {int(row['n_genes'])}"
    ]
    if "best_term" in table:
        term = str(row["best_term"])
        if term:
            lines.append(f"best gene set: {term}  (FDR {float(row['best_fdr']):.2g})")
        else:
            lines.append("best gene set: none")
    if acts is None:
        lines.append("no per-cell activations: run `sct.tl.feature_activations(adata)`")
    ax_head.axis("off")
    ax_head.text(0, 1, name, fontsize=15, fontweight="bold", va="top", transform=ax_head.transAxes)
    ax_head.text(0, 0.45, "\n".join(lines), fontsize=9.5, va="top", transform=ax_head.transAxes)

    # (2) top genes
    genes = [g for g in str(row["top_genes"]).split(";") if g][:n_genes]
    counts = [int(c) for c in str(row["top_gene_counts"]).split(";") if c][: len(genes)]
    if genes:
        y = np.arange(len(genes))
        ax_genes.barh(y, counts, color="#1f77b4")
        ax_genes.set_yticks(y, genes, fontsize=8)
        ax_genes.invert_yaxis()
    else:
        ax_genes.set_yticks([])
        ax_genes.text(0.5, 0.5, "fires on no gene", ha="center", transform=ax_genes.transAxes)
    ax_genes.set_xlabel("cells in which it fires on the gene")
    ax_genes.set_title("top genes", fontsize=10)
    ax_genes.spines[["top", "right"]].set_visible(False)

    # (3) embedding overlay and (4) top cells
    emb_key = basis if basis.startswith("X_") else f"X_{basis}"
    if acts is None:
        for ax, title in ((ax_emb, basis), (ax_cells, "top cells")):
            ax.set_title(title, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(
                0.5,
                0.5,
                "run sct.tl.feature_activations",
                ha="center",
                va="center",
                fontsize=9,
                transform=ax.transAxes,
            )
    else:
        if emb_key in adata.obsm:
            xy = np.asarray(adata.obsm[emb_key])[:, :2]
            order = np.argsort(acts, kind="stable")
            pts = ax_emb.scatter(
                xy[order, 0], xy[order, 1], c=acts[order], s=12, cmap="viridis", linewidths=0
            )
            fig.colorbar(pts, ax=ax_emb, shrink=0.7, label="activation")
        else:
            ax_emb.text(
                0.5,
                0.5,
                f"no adata.obsm[{emb_key!r}]",
                ha="center",
                va="center",
                transform=ax_emb.transAxes,
            )
        ax_emb.set_xticks([])
        ax_emb.set_yticks([])
        ax_emb.set_xlabel(f"{basis}1")
        ax_emb.set_ylabel(f"{basis}2")
        ax_emb.set_title(f"{name} activation on {basis}", fontsize=10)

        top = np.argsort(-acts, kind="stable")[:n_cells]
        labels = [str(adata.obs_names[i]) for i in top]
        if groupby is not None:
            groups = adata.obs[groupby].to_numpy()
            labels = [f"{lab} ({groups[i]})" for lab, i in zip(labels, top, strict=True)]
        y = np.arange(len(top))
        ax_cells.barh(y, acts[top], color="#ff7f0e")
        ax_cells.set_yticks(y, labels, fontsize=7)
        ax_cells.invert_yaxis()
        ax_cells.set_xlabel("activation")
        ax_cells.set_title("top activating cells", fontsize=10)
        ax_cells.spines[["top", "right"]].set_visible(False)

    return finish(fig, fig, show, save)
