"""What every plot does at the end: save, show and return, with scanpy's semantics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_EXTENSIONS = (".png", ".pdf", ".svg")


def figure_path(writekey: str, save: bool | str) -> Path:
    """Where scanpy's ``save`` puts a figure: ``sc.settings.figdir / f"{writekey}{save}"``.

    ``save=True`` uses ``sc.settings.file_format_figs``; a string is a suffix of the file name,
    whose extension (``.png``, ``.pdf``, ``.svg``) sets the format.
    """
    from scanpy import settings

    suffix, ext = "", settings.file_format_figs
    if isinstance(save, str):
        suffix = save
        for candidate in _EXTENSIONS:
            if save.endswith(candidate):
                suffix, ext = save[: -len(candidate)], candidate[1:]
                break
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

    save = settings.autosave if save is None else save
    if not isinstance(save, bool | str):
        raise TypeError(
            f"save takes True or a file-name suffix such as '_pbmc.png' (written to "
            f"sc.settings.figdir, as scanpy does), not {type(save).__name__}: to write to a path, "
            "pass return_fig=True and call fig.savefig(path)."
        )
    if save:
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
