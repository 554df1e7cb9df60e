from __future__ import annotations

from typing import TYPE_CHECKING

from .._constants import Key
from ..tl._feature_genes import features_record

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData


def feature_table(adata: AnnData, layer: int, *, key: str = Key.uns) -> pd.DataFrame:
    """One layer's features: firing rate, live flag, top genes and, when annotated, best term.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.feature_genes` (and optionally
        :func:`sctranscoder.tl.annotate_features`).
    layer
        Layer index.
    key
        ``adata.uns`` key of the transcoders.

    Returns
    -------
    A copy of ``adata.uns[key]["features"]["layer_<layer>"]``, indexed by feature name
    (``"L<layer>F<j>"``): ``firing_rate``, ``log10_firing_rate``, ``live``, ``n_genes``,
    ``top_genes``, ``top_gene_counts`` and, after annotation, ``best_term``, ``best_pvalue``,
    ``best_fdr``, ``interpretable``.
    """
    record = features_record(adata, key)
    name = Key.layer(int(layer))
    if name not in record:
        available = [int(x) for x in record["params"]["layers"]]
        raise KeyError(f"No feature genes for layer {layer}; available layers: {available}.")
    return record[name].copy()
