"""Shared plotting helpers."""

from __future__ import annotations

import os


def finish(fig, ax, show: bool | None, save):
    import matplotlib.pyplot as plt

    if save is not None:
        path = os.fspath(save)
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if ext not in fig.canvas.get_supported_filetypes():
            raise ValueError(f"Cannot save to {path!r}: give a path ending in .png, .svg or .pdf.")
        fig.savefig(path, bbox_inches="tight", dpi=150)
    if show is None:
        from scanpy import settings

        show = settings.autoshow
    if show:
        plt.show()
        return None
    return ax
