"""What every plot does at the end: save, show and return, with scanpy's semantics."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _formats() -> set[str]:
    """File formats matplotlib writes (``"png"``, ``"jpg"``, ``"tiff"``, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def check_save(save: object) -> None:
    """Refuse a ``save`` that is not ``True``/``False``/``None`` or a file-name suffix."""
    if save is not None and not isinstance(save, bool | str):
        raise TypeError(
            f"save takes True or a file-name suffix such as '_pbmc.png' (written to "
            f"sc.settings.figdir, as scanpy does), not {type(save).__name__}: to write to a path, "
            "pass return_fig=True and call fig.savefig(path)."
        )
    if isinstance(save, str) and ("/" in save or "\\" in save):
        raise ValueError(
            f"save={save!r} holds a path separator, but save is a file-name suffix (the figure "
            "goes to sc.settings.figdir, as in scanpy): pass a suffix such as '_pbmc.png', set "
            "sc.settings.figdir to choose the folder, or pass return_fig=True and call "
            "fig.savefig(path)."
        )


def check_figsize(figsize: object) -> None:
    """Refuse a ``figsize`` that is not ``None`` or a (width, height) pair of positive numbers."""
    if figsize is None:
        return
    ok = isinstance(figsize, tuple | list) and len(figsize) == 2
    ok = ok and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < float("inf")
        for v in figsize
    )
    if not ok:
        raise ValueError(
            f"figsize must be (width, height) in inches, e.g. (8, 5), got {figsize!r}."
        )


def check_ax(ax: object) -> None:
    """Refuse an ``ax`` that is not ``None`` or a matplotlib :class:`~matplotlib.axes.Axes`."""
    from matplotlib.axes import Axes

    if ax is not None and not isinstance(ax, Axes):
        raise TypeError(
            f"ax must be a matplotlib Axes (e.g. from `fig, ax = plt.subplots()`) or None, "
            f"got {type(ax).__name__}."
        )


def figure_path(writekey: str, save: bool | str) -> Path:
    """Where scanpy's ``save`` puts a figure: ``sc.settings.figdir / f"{writekey}{save}"``.

    ``save=True`` uses ``sc.settings.file_format_figs``; a string is a suffix of the file name.
    As in scanpy, an extension at its end sets the format (any format matplotlib writes:
    ``.png``, ``.pdf``, ``.svg``, ``.jpg``, ``.tiff``, ...); any other ending is part of the
    name and the default format is added.
    """
    from scanpy import settings

    suffix, ext = "", settings.file_format_figs
    if isinstance(save, str):
        suffix = save
        stem, dot, candidate = save.rpartition(".")
        if dot and candidate.lower() in _formats():
            suffix, ext = stem, candidate
    return Path(settings.figdir) / f"{writekey}{suffix}{settings.plot_suffix}.{ext}"


def finish(
    fig: Figure,
    axes: Axes | list[Axes],
    *,
    writekey: str,
    show: bool | None,
    save: bool | str | None,
    return_fig: bool,
) -> Figure | Axes | list[Axes] | None:
    """Save (``save``), show (``show``, default ``sc.settings.autoshow``) and return.

    As in scanpy: ``return_fig=True`` returns the figure; otherwise the axes unless the figure
    was shown, then ``None``. ``save=True`` or a suffix string writes
    ``sc.settings.figdir / f"{writekey}{suffix}.{format}"`` (:func:`figure_path`).
    """
    import matplotlib.pyplot as plt
    from scanpy import logging as logg
    from scanpy import settings

    check_save(save)
    save = settings.autosave if save is None else save
    if save is True or isinstance(save, str):
        path = figure_path(writekey, save)
        path.parent.mkdir(parents=True, exist_ok=True)
        logg.warning(f"saving figure to file {path}")
        fig.savefig(path, bbox_inches="tight", dpi=150)
    show = settings.autoshow if show is None else show
    if return_fig:
        return fig
    if show:
        plt.show()
        return None
    return axes
