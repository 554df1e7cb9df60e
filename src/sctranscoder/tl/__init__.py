"""Tools: train transcoders and compute what their features and circuits do."""

from ._annotate_features import annotate_features
from ._cell_embeddings import cell_embeddings
from ._circuit_enrichment import circuit_enrichment
from ._concept_attribution import concept_attribution
from ._feature_activations import feature_activations
from ._feature_connections import feature_connections
from ._feature_stability import feature_stability
from ._gene_attribution import gene_attribution
from ._neuron_baseline import neuron_baseline
from ._probe import probe
from ._random_model_baseline import random_model_baseline
from ._rank_features_groups import rank_features_groups
from ._score_circuit import score_circuit
from ._trace_circuit import trace_circuit
from ._train_sae import sae_sweep, train_sae
from ._train_transcoders import train_transcoders

__all__ = [
    "annotate_features",
    "cell_embeddings",
    "circuit_enrichment",
    "concept_attribution",
    "feature_activations",
    "feature_connections",
    "feature_stability",
    "gene_attribution",
    "neuron_baseline",
    "probe",
    "random_model_baseline",
    "rank_features_groups",
    "sae_sweep",
    "score_circuit",
    "trace_circuit",
    "train_sae",
    "train_transcoders",
]
