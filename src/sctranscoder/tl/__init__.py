"""Tools: train transcoders and compute what their features and circuits do."""

from ._annotate_features import annotate_features
from ._circuit_enrichment import circuit_enrichment
from ._feature_activations import feature_activations
from ._feature_connections import feature_connections
from ._gene_attribution import gene_attribution
from ._random_model_baseline import random_model_baseline
from ._rank_features_groups import rank_features_groups
from ._score_circuit import score_circuit
from ._trace_circuit import trace_circuit
from ._train_transcoders import train_transcoders

__all__ = [
    "annotate_features",
    "circuit_enrichment",
    "feature_activations",
    "feature_connections",
    "gene_attribution",
    "random_model_baseline",
    "rank_features_groups",
    "score_circuit",
    "trace_circuit",
    "train_transcoders",
]
