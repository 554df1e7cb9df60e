"""One registry of what sctranscoder writes into an AnnData, and of the names it gives features.

Every key a tool reads or writes is built here, so a reader finds the layout in one place (see
``docs/storage.md`` for the whole picture). Records live at the top level of ``adata.uns``; the
``key_added`` of each tool names its record, and the ``obs``/``obsm`` keys it writes derive from
that name as documented by the tool.
"""

from __future__ import annotations

import re
from enum import IntEnum

__all__ = [
    "Key",
    "NodeType",
    "feature_name",
    "feature_names",
    "neuron_name",
    "neuron_names",
    "parse_feature_name",
]


class Key:
    """Key names in an AnnData. Defaults first, then the functions that derive keys."""

    #: ``adata.uns`` record of a transcoder set (:func:`sctranscoder.tl.train_transcoders`).
    transcoders = "sct"
    #: ``adata.obs`` column with the cell sentences; also the ``adata.uns`` record of their params.
    sentence = "cell_sentence"
    #: ``adata.uns`` record of :func:`sctranscoder.tl.rank_features_groups`.
    rank_features_groups = "rank_features_groups"
    #: ``adata.uns`` record of :func:`sctranscoder.tl.feature_connections`.
    feature_connections = "feature_connections"
    #: ``adata.uns`` record of C2S's cell embedding (:func:`sctranscoder.tl.cell_embeddings`);
    #: the embedding is ``adata.obsm[Key.obsm(key)]``.
    cell_embedding = "c2s"
    #: ``adata.uns`` record of a sparse autoencoder (:func:`sctranscoder.tl.train_sae`).
    sae = "sae"
    #: ``adata.uns`` record of :func:`sctranscoder.tl.sae_sweep`.
    sae_sweep = "sae_sweep"
    #: ``adata.uns`` container of circuits written by sctranscoder 0.1 (read for compatibility).
    legacy_circuits = "sct_circuits"

    @staticmethod
    def obsm(key: str) -> str:
        """``adata.obsm`` key of a per-cell matrix named by record ``key``: ``"X_<key>"`` (an
        embedding, or an SAE's concept activations), as scanpy names ``X_pca``.
        """
        return f"X_{key}"

    @staticmethod
    def layer(layer: int) -> str:
        """Key of one layer inside a record (h5ad keys are strings): ``"layer_<i>"``."""
        return f"layer_{int(layer)}"

    @staticmethod
    def parse_layer(name: str) -> int:
        """The layer of a ``"layer_<i>"`` key."""
        match = re.fullmatch(r"layer_(\d+)", str(name))
        if match is None:
            raise ValueError(f"{name!r} is not a layer key like 'layer_2'.")
        return int(match.group(1))

    @staticmethod
    def split(key: str) -> str:
        """``adata.obs`` column with the train/validation split of a transcoder set."""
        return f"{key}_split"

    @staticmethod
    def sentence_n_genes(key: str) -> str:
        """``adata.obs`` column with the number of genes in each sentence."""
        return f"{key}_n_genes"

    @staticmethod
    def activations(key: str) -> str:
        """Default ``adata.uns`` record of the activations of transcoder set ``key``."""
        return f"{key}_activations"

    @staticmethod
    def obsm_activations(prefix: str, layer: int) -> str:
        """``adata.obsm`` key of the per-cell feature activations of one layer."""
        return f"X_{prefix}_L{int(layer)}"

    @staticmethod
    def derived(parent: str, kind: str) -> str:
        """Default name of a record derived from record ``parent``: ``"<stem>_<kind>"``.

        The stem drops a trailing ``"_activations"`` or ``"_annotation"``, so that
        ``"sct_activations"`` gives ``"sct_annotation"`` and ``"sct_annotation"`` gives
        ``"sct_random_model"``.
        """
        for suffix in ("_activations", "_annotation"):
            if parent.endswith(suffix) and len(parent) > len(suffix):
                parent = parent[: -len(suffix)]
                break
        return f"{parent}_{kind}"

    @staticmethod
    def circuit(cell: str) -> str:
        r"""Default ``adata.uns`` record of the circuit of ``cell``: ``"circuit_<cell>"``, with
        ``%``, ``/`` and ``\\`` in the name written ``%25``, ``%2F`` and ``%5C`` (paths in .h5ad
        and .zarr files), so that distinct cells always get distinct keys.
        """
        return f"circuit_{_escape(str(cell))}"

    @staticmethod
    def legacy_circuit(cell: str) -> str:
        """The default circuit key of sctranscoder 0.1 and 0.2.dev (``/`` read as ``_``)."""
        return f"circuit_{cell}".replace("/", "_")

    @staticmethod
    def circuit_enrichment(circuit: str) -> str:
        """Default ``adata.uns`` record of a circuit's enrichment."""
        return f"{circuit}_enrichment"

    @staticmethod
    def gene_attribution(feature: str) -> str:
        """Default ``adata.uns`` record of a feature's counterfactual gene attribution."""
        return f"gene_attribution_{feature}"

    @staticmethod
    def feature_modality(layer: int) -> str:
        """Name of a layer's modality in :func:`sctranscoder.get.mudata`."""
        return f"L{int(layer)}"

    @staticmethod
    def circuit_score(circuit: str) -> str:
        """Default ``adata.uns`` record and ``adata.obs`` column of a circuit's feature score."""
        return f"{circuit}_score"

    @staticmethod
    def gene_score(score_key: str) -> str:
        """``adata.obs`` column of the gene score written beside feature score ``score_key``."""
        return f"{score_key}_genes"


def _escape(name: str) -> str:
    r"""``name`` with ``%``, ``/`` and ``\\`` percent-encoded (reversible: keys stay distinct)."""
    return name.replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")


#: Name of feature ``j`` of layer ``i``: ``"L<i>F<j>"``.
_FEATURE = re.compile(r"L(\d+)F(\d+)")


def feature_name(layer: int, feature: int) -> str:
    """The name of a feature: ``"L<layer>F<index>"``."""
    return f"L{int(layer)}F{int(feature)}"


def feature_names(layer: int, n_features: int) -> list[str]:
    """Names of every feature of a layer, in index order."""
    return [feature_name(layer, j) for j in range(int(n_features))]


def neuron_name(layer: int, neuron: int) -> str:
    """The name of an MLP neuron (a post-activation hidden unit): ``"L<layer>N<index>"``."""
    return f"L{int(layer)}N{int(neuron)}"


def neuron_names(layer: int, n_neurons: int) -> list[str]:
    """Names of every neuron of a layer's MLP, in index order."""
    return [neuron_name(layer, j) for j in range(int(n_neurons))]


def parse_feature_name(name: str) -> tuple[int, int]:
    """``(layer, index)`` of a feature name ``"L<layer>F<index>"``; ``ValueError`` otherwise.

    Exact: no surrounding spaces, upper-case ``L`` and ``F``, decimal digits.
    """
    match = _FEATURE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        loose = loose_feature_name(name)
        hint = f" Write it exactly as {loose!r}." if loose else ""
        raise ValueError(
            f"{name!r} is not a feature name like 'L2F17' (layer 2, feature 17).{hint}"
        )
    return int(match.group(1)), int(match.group(2))


#: What a feature name written loosely looks like: ``"l2f17"``, ``"L2 F17"``, ``"L2_F17"``.
_LOOSE_FEATURE = re.compile(r"\s*[lL]\s*[-_ ]?\s*(\d+)\s*[-_ ]?\s*[fF]\s*[-_ ]?\s*(\d+)\s*")


def loose_feature_name(name: object) -> str | None:
    """The exact name ``"L<i>F<j>"`` that ``name`` seems to mean when it is written loosely
    (lower case, spaces, ``_`` or ``-``, leading zeros), else None.
    """
    if not isinstance(name, str) or is_feature_name(name):
        return None
    match = _LOOSE_FEATURE.fullmatch(name)
    return None if match is None else feature_name(int(match.group(1)), int(match.group(2)))


def is_feature_name(name: object) -> bool:
    """Whether ``name`` is a feature name ``"L<layer>F<index>"``."""
    return isinstance(name, str) and _FEATURE.fullmatch(name) is not None


class NodeType(IntEnum):
    """Kinds of node in an attribution graph."""

    EMBEDDING = 0
    ERROR = 1
    FEATURE = 2
    TARGET = 3

    @property
    def label(self) -> str:
        """The name stored in node tables (``"embedding"``, ``"error"``, ...)."""
        return self.name.lower()
