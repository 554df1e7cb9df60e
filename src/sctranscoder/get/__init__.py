"""Getters: stored results as AnnData objects, tables, graphs and torch modules."""

from ._activations import activations, gene_activations
from ._circuit import circuit
from ._enrichment import enrichment
from ._features import feature_table
from ._interpretability import interpretability
from ._mudata import mudata
from ._sae import concept_attribution
from ._transcoders import metrics, transcoders

__all__ = [
    "activations",
    "circuit",
    "concept_attribution",
    "enrichment",
    "feature_table",
    "gene_activations",
    "interpretability",
    "metrics",
    "mudata",
    "transcoders",
]
