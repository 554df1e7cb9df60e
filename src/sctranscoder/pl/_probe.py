"""Concepts as predictors as a figure: probe accuracy per representation, fold by fold."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from .._records import record, strings
from ..tl._probe import PROBE_KEY
from ._utils import check_ax, check_save, finish

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def probe(
    adata: AnnData,
    *,
    probe_key: str = PROBE_KEY,
    metric: Literal["accuracy", "balanced_accuracy"] = "balanced_accuracy",
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Cross-validated accuracy of the sparse linear probe per representation.

    From :func:`sctranscoder.tl.probe`: one row per representation, each fold's score as a dot,
    the mean with one standard deviation over folds as a bar, the chance level as a dashed line
    (the largest group's fraction for accuracy, 1 / number of groups for balanced accuracy), and
    the inputs the probe used out of those it had on the right.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.probe`.
    probe_key
        ``adata.uns`` key of its result.
    metric
        ``"balanced_accuracy"`` (mean recall over groups) or ``"accuracy"``.
    ax
        Axes to draw on (default: a new figure).
    show
        Show the figure (default: ``scanpy.settings.autoshow``).
    save
        ``True`` or a file-name suffix: save to ``sc.settings.figdir`` as scanpy does
        (``probe<suffix>.<format>``).
    return_fig
        Return the figure.

    Returns
    -------
    The figure with ``return_fig``; else the axes, unless shown.
    """
    import matplotlib.pyplot as plt

    if metric not in ("accuracy", "balanced_accuracy"):
        raise ValueError(f"metric must be 'accuracy' or 'balanced_accuracy', got {metric!r}.")
    check_ax(ax)
    check_save(save)
    rec = record(
        adata,
        probe_key,
        kind="probe",
        hint="run `sct.tl.probe(adata, groupby=...)` first, or pass the probe_key= you used.",
    )
    if "folds" not in rec or "summary" not in rec:
        raise KeyError(f"adata.uns[{probe_key!r}] is not a probe result.")
    summary, params = rec["summary"], rec["params"]
    names = strings(summary.index)
    scores = np.asarray(rec["folds"][metric], dtype=float)
    used = np.asarray(rec["folds"]["n_nonzero"], dtype=float).mean(axis=1)
    n_inputs = summary["n_inputs"].to_numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 0.55 * len(names) + 1.4))
    y = np.arange(len(names))[::-1]
    rng = np.random.default_rng(0)  # fixed jitter: the same figure each time
    for yi, row in zip(y, scores, strict=True):
        ax.scatter(
            row, yi + rng.uniform(-0.12, 0.12, row.size), s=14, color="#1f77b4", alpha=0.6, lw=0
        )
    mean, sd = scores.mean(axis=1), scores.std(axis=1, ddof=1)
    ax.errorbar(mean, y, xerr=sd, fmt="o", color="black", ms=5, capsize=3, lw=1.2)
    chance = float(params["chance_" + metric])
    ax.axvline(chance, color="#888888", linestyle="--", linewidth=1)
    ax.annotate(
        "chance", (chance, y.max() + 0.45), fontsize=7, color="#666666", ha="left", va="bottom"
    )
    for yi, u, n in zip(y, used, n_inputs, strict=True):
        ax.annotate(
            f"{u:.0f} / {int(n)} inputs",
            (1.0, yi),
            xycoords=("axes fraction", "data"),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            annotation_clip=False,
        )
    ax.set_yticks(y, names)
    ax.set_ylim(y.min() - 0.6, y.max() + 0.9)
    ax.set_xlim(min(chance, float(scores.min())) - 0.05, 1.0)
    ax.set_xlabel(f"{metric.replace('_', ' ')} ({int(params['n_splits'])}-fold CV)")
    ax.spines[["top", "right"]].set_visible(False)
    budget = (
        f"at most {int(params['n_nonzero'])} inputs"
        if str(params["comparison"]) == "n_nonzero"
        else f"C = {float(params['C']):g}"
    )
    ax.set_title(f"L1 logistic probe of {params['groupby']!r} ({budget})", fontsize=9, loc="left")
    return finish(ax.figure, ax, writekey="probe", show=show, save=save, return_fig=return_fig)
