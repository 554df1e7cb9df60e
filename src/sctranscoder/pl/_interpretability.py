from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key
from .._store import sct_uns
from ._utils import finish

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def interpretability(
    adata,
    *,
    key: str = Key.uns,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Per-layer fraction of live features that are interpretable, beside the chance baseline.

    The paper's Table 4 as a bar chart: for each layer, the fraction of live features whose top
    genes are enriched in a gene set (FDR below the threshold of
    :func:`sctranscoder.tl.annotate_features`) and, beside it, the same fraction with shuffled
    gene labels. The number of live features is written above each layer.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.annotate_features`.
    key
        ``adata.uns`` key of the transcoders.
    ax
        Axes to draw on (default: a new figure).
    show
        Show the figure (default: ``scanpy.settings.autoshow``); then ``None`` is returned.
    save
        Write the figure to this path; the format follows the extension (``.png``, ``.svg``,
        ``.pdf``).

    Returns
    -------
    The axes, unless shown.
    """
    import matplotlib.pyplot as plt

    record = sct_uns(adata, key)
    if "interpretability" not in record:
        raise KeyError(
            f"No interpretability summary under adata.uns[{key!r}]: run "
            "`sct.tl.feature_genes(adata)` then `sct.tl.annotate_features(adata, gene_sets)`."
        )
    table = record["interpretability"]
    layers = table["layer"].to_numpy()
    x = np.arange(len(layers))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(layers) + 2), 3.5))
    fig = ax.figure
    bars = [("fraction", "features", "#1f77b4")]
    if np.isfinite(table["baseline_fraction"].to_numpy(dtype=float)).any():
        bars.append(("baseline_fraction", "shuffled gene labels", "#bbbbbb"))
    if "random_model_fraction" in table.columns:
        bars.append(("random_model_fraction", "random-init model", "#ff7f0e"))
    width = 0.8 / len(bars)
    for i, (column, label, color) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar(x + offset, table[column], width, label=label, color=color)
    for xi, n in zip(x, table["total_live"], strict=True):
        ax.annotate(
            f"{int(n)}",
            (xi, 1.0),
            ha="center",
            va="bottom",
            fontsize=7,
            xytext=(0, 1),
            textcoords="offset points",
            annotation_clip=False,
        )
    ax.set_xticks(x, [str(int(v)) for v in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("interpretable fraction of live features")
    ax.set_ylim(0, 1)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fdr = record.get("features", {}).get("annotation", {}).get("params", {}).get("fdr", np.nan)
    ax.set_title(
        f"live features with a gene set at FDR < {float(fdr):g} (n live above bars)",
        fontsize=9,
        pad=12,
    )
    return finish(fig, ax, show, save)
