"""The paper's Table 4 as a bar chart: interpretable fraction per layer, beside the baselines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from .._constants import Key
from .._records import record
from ..get import interpretability as get_interpretability
from ._utils import check_ax, check_save, finish

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Bars drawn per layer (column suffix, legend label, colour), when present.
_BARS = (
    ("fraction", "features", "#1f77b4"),
    ("baseline_fraction", "shuffled gene labels", "#bbbbbb"),
    ("random_model_{m}fraction", "random-init model", "#ff7f0e"),
    ("neurons_{m}fraction", "MLP neurons", "#2ca02c"),
    ("neurons_{m}baseline_fraction", "MLP neurons, shuffled labels", "#a1d99b"),
)


def interpretability(
    adata: AnnData,
    *,
    annotation_key: str = Key.derived(Key.activations(Key.transcoders), "annotation"),
    random_model_key: str | None = None,
    neurons_key: str | None = None,
    method: Literal["ora", "gsea", "prerank"] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Per-layer fraction of live features that are interpretable, beside the chance baselines.

    The paper's Table 4 as a bar chart: for each layer, the fraction of live features whose genes
    are enriched in a gene set (FDR below the threshold of
    :func:`sctranscoder.tl.annotate_features`) and, beside it, the same fraction with shuffled
    gene labels, on a randomly initialised model (:func:`sctranscoder.tl.random_model_baseline`)
    and for the MLP's own neurons, with their own shuffled-label level
    (:func:`sctranscoder.tl.neuron_baseline`), when computed. The number of live features (and
    of live neurons, after a ``|``) is written above each layer.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.annotate_features`.
    annotation_key
        ``adata.uns`` key of the annotation.
    random_model_key
        ``adata.uns`` key of a random-model baseline to draw (default: its default key, when
        present).
    neurons_key
        ``adata.uns`` key of a neuron baseline to draw (default: its default key, when present).
    method
        ``"ora"`` or ``"gsea"`` (``"prerank"`` is the same): which test's results to draw
        (default: ORA when it ran).
    ax
        Axes to draw on (default: a new figure).
    show
        Show the figure (default: ``scanpy.settings.autoshow``).
    save
        ``True`` or a file-name suffix: save to ``sc.settings.figdir`` as scanpy does
        (``interpretability<suffix>.<format>``; an extension matplotlib writes, such as ``.png``
        or ``.jpg``, sets the format).
    return_fig
        Return the figure.

    Returns
    -------
    The figure with ``return_fig``; else the axes, unless shown.
    """
    import matplotlib.pyplot as plt

    if method not in (None, "ora", "gsea", "prerank"):
        raise ValueError(f"method must be 'ora', 'gsea' or 'prerank' (or None), got {method!r}.")
    check_ax(ax)
    check_save(save)
    table = get_interpretability(
        adata,
        annotation_key=annotation_key,
        random_model_key=random_model_key,
        neurons_key=neurons_key,
    )
    if method is None:
        method = "ora" if "ora_fraction" in table else "gsea"
    method = {"prerank": "gsea"}.get(method, method)
    if f"{method}_fraction" not in table:
        raise ValueError(f"adata.uns[{annotation_key!r}] has no {method!r} results.")
    layers = table["layer"].to_numpy()
    x = np.arange(len(layers))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(layers) + 2), 3.5))
    bars = []
    for suffix, label, color in _BARS:
        column = suffix.format(m=f"{method}_") if "{m}" in suffix else f"{method}_{suffix}"
        if column in table and np.isfinite(table[column].to_numpy(dtype=float)).any():
            bars.append((column, label, color))
    width = 0.8 / len(bars)
    for i, (column, label, color) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar(x + offset, table[column], width, label=label, color=color)
    neurons = "neurons_total_live" in table and any(c.startswith("neurons_") for c, _, _ in bars)
    live = [f"{int(n)}" for n in table["total_live"]]
    if neurons:
        live = [f"{a}|{int(b)}" for a, b in zip(live, table["neurons_total_live"], strict=True)]
    for xi, n in zip(x, live, strict=True):
        ax.annotate(
            n,
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
    fdr = record(adata, annotation_key, kind="annotation", hint="")["params"]["fdr"]
    ax.set_title(
        f"live features with a gene set at FDR < {float(fdr):g} ({method.upper()}; "
        f"n live {'features|neurons ' if neurons else ''}above bars)",
        fontsize=9,
        pad=12,
    )
    return finish(
        ax.figure, ax, writekey="interpretability", show=show, save=save, return_fig=return_fig
    )
