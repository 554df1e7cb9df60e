"""Stability across datasets as a figure: matched cosines of two runs beside chance, per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key
from .._records import record
from .._validate import check_layer_list
from ._utils import check_ax, check_save, finish

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: What is drawn per layer (entry of the layer's record, legend label, colour).
_SERIES = (
    ("cosine", "trained vs trained", "#1f77b4"),
    ("covariance_baseline", "random, same covariance", "#2ca02c"),
    ("trained_vs_init", "trained vs untrained", "#ff7f0e"),
    ("baseline", "untrained vs untrained", "#888888"),
)


def feature_stability(
    adata: AnnData,
    *,
    stability_key: str = Key.derived(Key.transcoders, "stability"),
    layers: int | Sequence[int] | None = None,
    bins: int = 40,
    ncols: int = 4,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | list[Axes] | Figure | None:
    """Per layer, the distribution of matched cosine similarities against chance.

    One panel per layer (from :func:`sctranscoder.tl.feature_stability`): histograms (as
    densities) of the cosines of the two trained sets' matched features, of random directions with
    each set's covariance, of each trained set matched to an untrained decoder, and of pairs of
    untrained decoders (the baseline), with the
    medians as dashed lines and, in the title, the fraction of matched features above 0.7 (and
    of the covariance-matched random directions).

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_stability`.
    stability_key
        ``adata.uns`` key of its result.
    layers
        Layers to draw (default: all in the result).
    bins
        Histogram bins over ``[-0.2, 1]``.
    ncols
        Panels per row.
    ax
        Axes to draw on, when one layer is drawn (default: a new figure).
    show
        Show the figure (default: ``scanpy.settings.autoshow``).
    save
        ``True`` or a file-name suffix: save to ``sc.settings.figdir`` as scanpy does
        (``feature_stability<suffix>.<format>``).
    return_fig
        Return the figure.

    Returns
    -------
    The figure with ``return_fig``; else the axes (a list with several panels), unless shown.
    """
    import matplotlib.pyplot as plt

    check_ax(ax)
    check_save(save)
    for name, value in (("bins", bins), ("ncols", ncols)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    rec = record(
        adata,
        stability_key,
        kind="feature stability",
        hint="run `sct.tl.feature_stability(adata, other)` first, or pass the stability_key= you used.",
    )
    if "layers" not in rec or "summary" not in rec:
        raise KeyError(f"adata.uns[{stability_key!r}] is not a feature stability result.")
    available = sorted(Key.parse_layer(k) for k in rec["layers"])
    if layers is None:
        layers = available
    else:
        layers = check_layer_list(layers, available)
        missing = sorted(set(layers) - set(available))
        if missing:
            raise KeyError(
                f"Layer(s) {missing} are not in adata.uns[{stability_key!r}]; it has {available}."
            )
    if ax is not None and len(layers) != 1:
        raise ValueError(
            f"ax draws one panel, but {len(layers)} layers were asked for: pass layers=[one] "
            "with ax, or leave ax out for a figure with one panel per layer."
        )
    if ax is None:
        cols = min(int(ncols), len(layers))
        rows = -(-len(layers) // cols)
        fig, axes = plt.subplots(
            rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=False
        )
        axes = list(axes.ravel())
        for extra in axes[len(layers) :]:
            extra.remove()
        axes = axes[: len(layers)]
    else:
        fig, axes = ax.figure, [ax]
    edges = np.linspace(-0.2, 1.0, int(bins) + 1)
    for panel, layer in zip(axes, layers, strict=True):
        entry = rec["layers"][Key.layer(layer)]
        for name, label, color in _SERIES:
            values = np.asarray(entry[name], dtype=float).ravel()
            panel.hist(
                np.clip(values, edges[0], edges[-1]),
                bins=edges,
                density=True,
                histtype="step",
                linewidth=1.5,
                color=color,
                label=label,
            )
            panel.axvline(np.median(values), color=color, linestyle="--", linewidth=0.8)
        cosine = np.asarray(entry["cosine"], dtype=float)
        cov = np.asarray(entry["covariance_baseline"], dtype=float)
        panel.set_title(
            f"layer {layer}: {100 * (cosine > 0.7).mean():.1f}% > 0.7 (n={cosine.size})\n"
            f"random, same covariance: {100 * (cov > 0.7).mean():.1f}%",
            fontsize=8,
        )
        panel.set_xlabel("cosine of matched decoder rows", fontsize=8)
        panel.set_xlim(edges[0], edges[-1])
        panel.tick_params(labelsize=7)
        panel.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("density", fontsize=8)
    axes[-1].legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    features = "live features" if bool(rec["params"].get("live_only", False)) else "features"
    if len(axes) > 1 or ax is None:
        fig.suptitle(
            f"{rec['params']['transcoders_key']} vs {rec['params']['other_key']}"
            f"{' (other AnnData)' if rec['params']['other'] != 'adata' else ''}: {features} "
            "matched one to one (Hungarian)",
            fontsize=9,
        )
        fig.tight_layout()
    return finish(
        fig,
        axes if len(axes) > 1 else axes[0],
        writekey="feature_stability",
        show=show,
        save=save,
        return_fig=return_fig,
    )
