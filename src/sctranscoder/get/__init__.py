"""Getters: turn stored results into AnnData objects, tables and modules."""

from ._activations import activations, feature_names
from ._circuit import circuit
from ._features import feature_table
from ._tables import metrics, transcoders

__all__ = [
    "activations",
    "circuit",
    "feature_names",
    "feature_table",
    "metrics",
    "transcoders",
]
