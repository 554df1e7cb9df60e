"""sctranscoder: transcoders and circuits for single-cell foundation models, in scverse workflows.

>>> import scanpy as sc, sctranscoder as sct
>>> adata = sc.datasets.pbmc68k_reduced()
>>> model = sct.datasets.tiny_c2s()
>>> sct.pp.cell_sentences(adata, model=model)
>>> sct.tl.train_transcoders(adata, model)
>>> sct.tl.feature_activations(adata)
"""

import importlib.metadata as _metadata

from . import datasets, get, pl, pp, tl
from ._circuit_tracer import export_circuit_tracer_graph, export_circuit_tracer_transcoders
from ._io import load_transcoders, save_transcoders
from ._logging import bridge_core_logs
from .core.model import DEFAULT_C2S_MODEL, C2SModel, load_model
from .core.training import TrainingConfig
from .core.transcoder_set import TranscoderSet

try:
    __version__ = _metadata.version("sctranscoder")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

bridge_core_logs()

__all__ = [
    "DEFAULT_C2S_MODEL",
    "C2SModel",
    "TrainingConfig",
    "TranscoderSet",
    "datasets",
    "export_circuit_tracer_graph",
    "export_circuit_tracer_transcoders",
    "get",
    "load_model",
    "load_transcoders",
    "pl",
    "pp",
    "save_transcoders",
    "tl",
]
