"""Tools: train transcoders and compute what their features do."""

from ._circuit_enrichment import circuit_enrichment
from ._feature_activations import feature_activations
from ._score_circuit import score_circuit
from ._trace_circuit import trace_circuit
from ._train_transcoders import train_transcoders

__all__ = [
    "circuit_enrichment",
    "feature_activations",
    "score_circuit",
    "trace_circuit",
    "train_transcoders",
]
