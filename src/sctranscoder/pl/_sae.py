"""Claye et al.'s Figure 2: an SAE's reconstruction R^2 by expansion factor, one line per sweep."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key
from .._records import record, record_kind
from ._utils import check_ax, check_save, finish

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def sae_sweep(
    adata: AnnData,
    keys: str | Sequence[str] = Key.sae_sweep,
    *,
    labels: Sequence[str] | None = None,
    train: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Reconstruction R^2 of SAEs by expansion factor (Claye et al., Figure 2).

    One line per :func:`sctranscoder.tl.sae_sweep` record: the validation R^2 (solid; with
    ``train``, the training R^2 dashed, in the same colour), the expansion factor on a log2
    axis, each point labelled with its validation L0 when ``k`` differs between sweeps.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.sae_sweep`.
    keys
        ``adata.uns`` key(s) of the sweeps to draw, e.g. ``["sweep_pca", "sweep_c2s"]``.
    labels
        Legend labels, one per key (default: each sweep's ``use_rep``).
    train
        Also draw the training R^2.
    ax
        Axes to draw on (default: a new figure).
    show
        Show the figure (default: ``scanpy.settings.autoshow``).
    save
        ``True`` or a file-name suffix: save to ``sc.settings.figdir`` as scanpy does
        (``sae_sweep<suffix>.<format>``).
    return_fig
        Return the figure.

    Returns
    -------
    The figure with ``return_fig``; else the axes, unless shown.
    """
    import matplotlib.pyplot as plt

    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"keys must name one or more sae_sweep records, got {keys!r}.")
    records = []
    for key in keys:
        rec = record(
            adata, key, kind="SAE sweep", hint="run `sct.tl.sae_sweep(adata, use_rep=...)`."
        )
        if record_kind(rec) != "sae sweep":
            raise KeyError(f"adata.uns[{key!r}] is not a record of `sct.tl.sae_sweep`.")
        records.append(rec)
    if labels is None:
        labels = [str(rec["params"]["use_rep"]) for rec in records]
    labels = [labels] if isinstance(labels, str) else list(labels)
    if len(labels) != len(keys):
        raise ValueError(f"labels has {len(labels)} entries for {len(keys)} keys: pass one each.")
    check_ax(ax)
    check_save(save)
    if ax is None:
        _, ax = plt.subplots(figsize=(4.8, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    factors = set()
    for i, (rec, label) in enumerate(zip(records, labels, strict=True)):
        t = rec["sweep"]
        x = t["expansion_factor"].to_numpy(dtype=float)
        factors |= set(x.tolist())
        color = colors[i % len(colors)]
        p = rec["params"]
        ax.plot(
            x,
            t["validation_r2"],
            "o-",
            color=color,
            label=f"{label} (d={int(p['n_dims'])}, k={int(p['k'])})",
        )
        if train:
            ax.plot(x, t["train_r2"], "s--", color=color, alpha=0.6, markersize=4)
    ax.set_xscale("log", base=2)
    ticks = sorted(factors)
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.minorticks_off()
    ax.set_xlabel("expansion factor (concepts per dimension)")
    ax.set_ylabel("reconstruction $R^2$")
    low = min(
        float(np.nanmin(rec["sweep"][c].to_numpy(dtype=float)))
        for rec in records
        for c in (["validation_r2", "train_r2"] if train else ["validation_r2"])
    )
    ax.set_ylim(min(0.0, low - 0.05), 1.0)
    ax.spines[["top", "right"]].set_visible(False)
    handles, texts = ax.get_legend_handles_labels()
    if train:
        from matplotlib.lines import Line2D

        handles += [
            Line2D([], [], color="0.3", marker="o", label="validation"),
            Line2D([], [], color="0.3", marker="s", ls="--", alpha=0.6, label="training"),
        ]
        texts += ["validation cells", "training cells"]
    ax.legend(handles, texts, frameon=False, fontsize=8, loc="lower right")
    ax.set_title("SAE reconstruction by width", fontsize=10)
    return finish(ax.figure, ax, writekey="sae_sweep", show=show, save=save, return_fig=return_fig)
