"""sctranscoder: transcoders and circuits for single-cell foundation models, in scverse workflows.

>>> import scanpy as sc, sctranscoder as sct
>>> adata = sc.datasets.pbmc68k_reduced()
>>> model = sct.datasets.tiny_c2s()
>>> sct.pp.cell_sentences(adata, model=model)
>>> sct.tl.train_transcoders(adata, model)
>>> sct.tl.feature_activations(adata)
"""

from . import datasets, get, pl, pp, tl
from ._io import load_transcoders, save_transcoders
from .core.model import DEFAULT_C2S_MODEL, C2SModel, load_model

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_C2S_MODEL",
    "C2SModel",
    "datasets",
    "get",
    "load_model",
    "load_transcoders",
    "pl",
    "pp",
    "save_transcoders",
    "tl",
]
