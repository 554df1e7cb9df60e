"""Plots."""

from ._activations import activations
from ._circuit import circuit, circuit_genes, circuit_heads
from ._explorer import explorer
from ._feature import feature
from ._interpretability import interpretability
from ._probe import probe
from ._sae import sae_sweep
from ._stability import feature_stability

__all__ = [
    "activations",
    "circuit",
    "circuit_genes",
    "circuit_heads",
    "explorer",
    "feature",
    "feature_stability",
    "interpretability",
    "probe",
    "sae_sweep",
]
