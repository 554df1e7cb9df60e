"""Getters: stored results as AnnData objects, tables, graphs and torch modules."""

from ._activations import activations, gene_activations
from ._circuit import circuit
from ._features import feature_table
from ._interpretability import interpretability
from ._mudata import mudata
from ._transcoders import metrics, transcoders

__all__ = [
    "activations",
    "circuit",
    "feature_table",
    "gene_activations",
    "interpretability",
    "metrics",
    "mudata",
    "transcoders",
]
