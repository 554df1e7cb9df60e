"""Plots."""

from ._activations import activations
from ._circuit import circuit, circuit_genes

__all__ = ["activations", "circuit", "circuit_genes"]
