"""An SAE's counterfactual gene attribution as a genes x concepts AnnData."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Key, feature_names
from .._records import activations_record, strings
from .._sae import sae_record
from ..core.sae import SAE_LAYER

if TYPE_CHECKING:
    from anndata import AnnData


def concept_attribution(
    adata: AnnData, *, key: str = Key.sae, activations_key: str | None = None
) -> AnnData:
    """Genes x concepts AnnData of an SAE's counterfactual gene attribution.

    Rows are the genes removed at least once by :func:`sctranscoder.tl.concept_attribution`,
    columns the concepts (``"L0F<j>"``). ``X`` is the signed mean attribution: the concept's
    drop in activation when the gene is removed, averaged over the cells it was removed from
    (negative where removing it raises the concept). ``layers["count"]``: cells in which
    removing it lowered the concept; ``layers["sum"]``: the summed drop there (what
    :func:`sctranscoder.tl.annotate_features` reads); ``obs["n_cells"]``: cells it was removed
    from. Transposed (``.T``, concepts x genes), it is ready for decoupler's ``dc.mt.*``.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.concept_attribution`.
    key
        ``adata.uns`` key of the SAE record.
    activations_key
        ``adata.uns`` key of the activation record holding the attribution (default: the
        SAE's, ``f"{key}_activations"``).
    """
    import anndata as ad

    rec = sae_record(adata, key)
    activations_key = activations_key or str(rec["params"]["activations_key"])
    act = activations_record(adata, activations_key)
    if str(act["params"].get("sae_key", "")) != key:
        raise ValueError(
            f"adata.uns[{activations_key!r}] does not hold the concepts of the SAE "
            f"adata.uns[{key!r}]: pass the activations_key of that SAE."
        )
    if "attribution" not in act or not act.get("genes"):
        raise KeyError(
            f"adata.uns[{activations_key!r}] has no gene attribution: run "
            f"`sct.tl.concept_attribution(adata, key={key!r})` first (with `encoder=` unless "
            "the SAE was trained on C2S's cell embedding)."
        )
    layer = Key.layer(SAE_LAYER)
    genes = act["genes"]
    n_cells = np.asarray(genes["n_cells"], dtype=np.int64)
    inv = np.divide(1.0, n_cells, out=np.zeros(len(n_cells)), where=n_cells > 0)
    signed = sparse.csr_matrix(act["attribution"]["signed_sums"][layer], dtype=np.float32)
    mean = sparse.csr_matrix(sparse.diags(inv.astype(np.float32)) @ signed, dtype=np.float32)
    mean.eliminate_zeros()
    return ad.AnnData(
        X=mean,
        obs=pd.DataFrame(
            {"n_cells": n_cells}, index=pd.Index(strings(genes["names"]), name="gene")
        ),
        var=pd.DataFrame(index=feature_names(SAE_LAYER, signed.shape[1])),
        layers={
            "count": sparse.csr_matrix(genes["counts"][layer]).astype(np.int32),
            "sum": sparse.csr_matrix(genes["sums"][layer]).astype(np.float32),
        },
    )
