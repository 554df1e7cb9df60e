"""One registry of the keys sctranscoder reads and writes in an AnnData."""

from __future__ import annotations


class Key:
    """Default key names. Tools take ``key_added`` to change the prefix."""

    #: ``adata.uns`` entry holding traced circuits, one dict per circuit key.
    circuits = "sct_circuits"
    #: ``adata.uns`` entry with transcoders, parameters, metrics and pointers to obsm/varm keys.
    uns = "sct"
    #: ``adata.obs`` column with the cell sentence (space-separated gene symbols); also the
    #: ``adata.uns`` key recording how the sentences were made.
    sentence = "cell_sentence"

    @staticmethod
    def obsm_activations(key: str, layer: int) -> str:
        """``adata.obsm`` key of the per-cell feature activations of one layer."""
        return f"X_{key}_L{layer}"

    @staticmethod
    def varm_gene_activations(key: str, layer: int) -> str:
        """``adata.varm`` key of the per-gene mean feature activations of one layer."""
        return f"{key}_genes_L{layer}"

    @staticmethod
    def layer(layer: int) -> str:
        """Key of one layer inside ``adata.uns[key]["transcoders"]`` (h5ad keys are strings)."""
        return f"layer_{layer}"
