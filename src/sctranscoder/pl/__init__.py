"""Plots."""

from ._activations import activations
from ._circuit import circuit, circuit_genes
from ._feature import feature
from ._interpretability import interpretability

__all__ = [
    "activations",
    "circuit",
    "circuit_genes",
    "feature",
    "interpretability",
]
