from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Key
from .._store import circuit_record, sct_uns
from ._circuit_enrichment import circuit_genes

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


def _expression(adata: AnnData):
    """Non-negative expression to rank genes per cell: ``X`` or, if ``X`` is scaled, ``.raw``."""
    X = adata.X
    lowest = X.min() if not sparse.issparse(X) else (X.data.min() if X.nnz else 0)
    if lowest >= 0:
        return X, adata.var_names
    if adata.raw is not None:
        return adata.raw.X, adata.raw.var_names
    raise ValueError(
        "adata.X has negative values (scaled) and there is no .raw: gene scores need expression "
        "that can be ranked. Pass gene_score=False, or keep log-normalised data in .raw."
    )


def score_circuit(
    adata: AnnData,
    key: str,
    *,
    gene_score: bool = True,
    n_top_genes: int = 25,
    circuits_key: str = Key.circuits,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Score every cell by a circuit: by its features and by its genes.

    The *feature score* of a cell is the influence-weighted mean of the activations (from
    :func:`sctranscoder.tl.feature_activations`) of the circuit's kept features, each feature
    counted once with the summed influence of its nodes. The *gene score* is decoupler's AUCell
    of the circuit's top ``n_top_genes`` genes in the cell's expression ranking (``X``, or
    ``.raw`` when ``X`` is scaled).

    Parameters
    ----------
    adata
        Annotated data with a traced circuit and feature activations of its layers.
    key
        The circuit's key.
    gene_score
        Also compute the gene score.
    n_top_genes
        Genes in the circuit's gene set.
    circuits_key
        ``adata.uns`` key holding circuits.
    key_added
        Prefix of the obs columns (default: ``key``).
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets:

    ``adata.obs[f"{key_added}_score"]`` : float
        Feature score.
    ``adata.obs[f"{key_added}_gene_score"]`` : float
        Gene score (AUCell), when ``gene_score``.
    ``adata.uns[circuits_key][key]["cell_scores"]`` : dict
        The features and weights used, and the gene set.
    """
    record = circuit_record(adata, key, circuits_key)
    nodes = pd.DataFrame(record["nodes"])
    feats = nodes[(nodes["type"] == "feature") & (nodes["influence"] > 0)]
    if feats.empty:
        raise ValueError(
            f"Circuit {key!r} keeps no feature; trace it with a larger node_threshold."
        )
    weights = feats.groupby(["layer", "feature"])["influence"].sum()
    tc_key = str(record["params"].get("transcoders_key", Key.uns))
    acts = sct_uns(adata, tc_key).get("activations")
    if acts is None:
        raise KeyError("No feature activations: run `sct.tl.feature_activations(adata)` first.")
    obsm_keys = acts["obsm_keys"]
    score = np.zeros(adata.n_obs)
    for (layer, feature), w in weights.items():
        name = Key.layer(int(layer))
        if name not in obsm_keys:
            raise KeyError(
                f"No activations for layer {layer}: run `sct.tl.feature_activations(adata)` "
                "(all layers)."
            )
        X = adata.obsm[obsm_keys[name]]
        col = X[:, int(feature)]
        score += w * (col.toarray().ravel() if sparse.issparse(col) else np.asarray(col).ravel())
    score /= weights.sum()
    genes = circuit_genes(record, n_top_genes)
    gene_values = None
    if gene_score:
        import anndata as ad
        import decoupler as dc

        X, names = _expression(adata)
        upper = pd.Index([str(n).upper() for n in names])
        present = [g for g in genes if g in set(upper)]
        if not present:
            raise ValueError(
                f"None of the circuit's genes {genes[:5]}... is in the expression matrix."
            )
        tmp = ad.AnnData(
            X=sparse.csr_matrix(X) if sparse.issparse(X) else np.asarray(X),
            obs=pd.DataFrame(index=adata.obs_names.astype(str)),
        )
        tmp.var_names = upper
        tmp.var_names_make_unique()
        net = pd.DataFrame({"source": key, "target": present, "weight": 1.0})
        dc.mt.aucell(tmp, net, tmin=1, verbose=False)
        gene_values = np.asarray(tmp.obsm["score_aucell"][key], dtype=np.float64)

    prefix = key_added or key
    if copy:
        adata = adata.copy()
        record = circuit_record(adata, key, circuits_key)
    adata.obs[f"{prefix}_score"] = score
    if gene_values is not None:
        adata.obs[f"{prefix}_gene_score"] = gene_values
    record["cell_scores"] = {
        "layers": weights.index.get_level_values(0).to_numpy(dtype=np.int64),
        "features": weights.index.get_level_values(1).to_numpy(dtype=np.int64),
        "weights": weights.to_numpy(dtype=np.float64),
        "genes": np.asarray(genes, dtype=object).astype(str),
    }
    logger.info(
        "scored %d cells by circuit %s (%d features%s)\n    added %r%s (adata.obs)",
        adata.n_obs,
        key,
        len(weights),
        f", {len(genes)} genes" if gene_score else "",
        f"{prefix}_score",
        f", {prefix + '_gene_score'!r}" if gene_score else "",
    )
    return adata if copy else None
