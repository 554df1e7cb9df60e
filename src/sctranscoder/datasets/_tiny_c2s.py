"""The embedded default model, trained by ``scripts/train_tiny_c2s.py`` on ``pbmc68k_reduced``."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ..core.model import C2SModel, load_model

#: Name under which results record the embedded model (resolved back to it on load).
TINY_C2S_NAME = "sctranscoder/tiny_c2s"


def _path() -> Path:
    return Path(str(files("sctranscoder.datasets") / "tiny_c2s"))


def tiny_c2s(*, device: str | None = None) -> C2SModel:
    """The embedded Cell2Sentence-style model (works offline).

    A 4-layer GPT-NeoX (parallel residual, partial rotary, as Pythia) with a byte-level BPE
    tokenizer that splits gene symbols into subwords, trained on the C2S cell-type prompt for
    ``scanpy.datasets.pbmc68k_reduced()`` (``.raw``, labels ``obs['bulk_labels']``). Its model
    card (``README.md`` beside the weights) gives the held-out accuracy and training settings.

    Parameters
    ----------
    device
        Where to put the model: one of this machine's devices (``"cpu"``, ``"cuda:0"``,
        ``"mps"``; others are refused, naming those available). Default: CPU.

    Returns
    -------
    The model with its tokenizer and prompt settings (100 genes per sentence).
    """
    return load_model(_path(), device=device, name=TINY_C2S_NAME)


def tiny_c2s_heldout_cells() -> list[str]:
    """``obs_names`` of the pbmc68k_reduced cells held out from training ``tiny_c2s``."""
    return (_path() / "heldout_cells.txt").read_text().split()
