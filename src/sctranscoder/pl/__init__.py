"""Plots."""

from ._activations import activations
from ._circuit import circuit, circuit_genes, circuit_heads
from ._feature import feature
from ._interpretability import interpretability

__all__ = [
    "activations",
    "circuit",
    "circuit_genes",
    "circuit_heads",
    "feature",
    "interpretability",
]
