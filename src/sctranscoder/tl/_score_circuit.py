"""Score every cell by a traced circuit: its features' activations and its genes' expression."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy import sparse

from .._constants import Key, NodeType
from .._genesets import clean_symbol
from .._records import (
    activation_layers,
    activations_record,
    check_key,
    check_same_transcoders,
    circuit_record,
    obsm_activations,
)
from .._validate import (
    check_bool,
    check_copy_backed,
    check_in_memory,
    check_positive_int,
    check_unique_symbols,
)
from ._circuit_enrichment import circuit_genes

if TYPE_CHECKING:
    from anndata import AnnData


def _expression(adata: AnnData, sentence_key: str):
    """Expression to rank genes per cell, with its gene symbols: the matrix and symbols the cell
    sentences were built from (their record in ``adata.uns[sentence_key]``), else ``X`` or, if
    ``X`` is scaled, ``.raw``.
    """
    params = adata.uns.get(sentence_key, {}).get("params", {})
    source, column = str(params.get("source", "")), str(params.get("gene_symbols", "var_names"))
    where = None
    if source == "raw" and adata.raw is not None:
        X, var, where = adata.raw.X, adata.raw.var, "adata.raw.var"
    elif source.startswith("layers/") and source[7:] in adata.layers:
        X, var, where = adata.layers[source[7:]], adata.var, "adata.var"
    elif source == "X":
        X, var, where = adata.X, adata.var, "adata.var"
    if where is not None and (column == "var_names" or column in var):
        names = var.index if column == "var_names" else var[column].astype(str)
        return X, pd.Index(names)
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
    *,
    circuit: str,
    gene_score: bool = True,
    n_top: int = 25,
    activations_key: str | None = None,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Score every cell by a circuit: by its features and by its genes.

    The *feature score* of a cell is the influence-weighted mean of the activations (from
    :func:`sctranscoder.tl.feature_activations`) of the circuit's kept features, each feature
    counted once with the summed influence of its nodes. The *gene score* is decoupler's AUCell
    of the circuit's top ``n_top`` genes in the cell's expression ranking (``X``, or ``.raw``
    when ``X`` is scaled).

    Parameters
    ----------
    adata
        Annotated data with a traced circuit and feature activations of its layers.
    circuit
        The circuit's key in ``adata.uns`` (or its cell's name).
    gene_score
        Also compute the gene score (reads the expression matrix: not for a backed ``adata``,
        where ``gene_score=False`` gives the feature score).
    n_top
        Genes in the circuit's gene set.
    activations_key
        ``adata.uns`` key of the activation record (default: the default record of the
        circuit's transcoders, ``"sct_activations"``).
    key_added
        ``adata.uns`` key of the record, which is also the ``adata.obs`` column of the feature
        score (default ``f"{circuit}_score"``).
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets:

    ``adata.obs[key_added]`` : float
        Feature score.
    ``adata.obs[f"{key_added}_genes"]`` : float
        Gene score (AUCell), when ``gene_score``.
    ``adata.uns[key_added]`` : dict
        ``params`` (``circuit``, ``activations_key``, ``n_top``); the ``layers``, ``features``
        and ``influence`` (their weights) of the features used; the ``genes`` of the gene set.
    """
    name, rec = circuit_record(adata, circuit)
    check_positive_int(n_top, "n_top")
    gene_score = check_bool(gene_score, "gene_score")
    copy = check_bool(copy, "copy")
    if gene_score:
        check_in_memory(adata, "gene_score=True", otherwise="pass gene_score=False")
    check_copy_backed(adata, copy)
    score_col = key_added if key_added is not None else Key.circuit_score(name)
    check_key(
        score_col,
        adata=adata,
        kind="circuit score",
        obs_columns=[score_col, Key.gene_score(score_col)],
    )
    transcoders_key = str(rec["params"].get("transcoders_key", Key.transcoders))
    activations_key = activations_key or Key.activations(transcoders_key)
    check_same_transcoders(adata, activations_key, transcoders_key)
    nodes = pd.DataFrame(rec["nodes"])
    feats = nodes[(nodes["type"] == NodeType.FEATURE.label) & (nodes["influence"] > 0)]
    if feats.empty:
        raise ValueError(
            f"Circuit {name!r} keeps no feature; trace it with a larger node_threshold."
        )
    weights = feats.groupby(["layer", "feature"])["influence"].sum()
    score = _feature_score(adata, weights, activations_key)
    genes = circuit_genes(rec, n_top)
    sentence_key = str(rec["params"].get("sentence_key", Key.sentence))
    gene_values = _gene_score(adata, genes, sentence_key) if gene_score else None

    if copy:
        adata = adata.copy()
    gene_col = Key.gene_score(score_col)
    adata.obs[score_col] = score
    if gene_values is not None:
        adata.obs[gene_col] = gene_values
    adata.uns[score_col] = {
        "params": {"circuit": name, "activations_key": activations_key, "n_top": int(n_top)},
        "layers": weights.index.get_level_values(0).to_numpy(dtype=np.int64),
        "features": weights.index.get_level_values(1).to_numpy(dtype=np.int64),
        "influence": weights.to_numpy(dtype=np.float64),
        "genes": np.asarray(genes, dtype=str),
    }
    logg.info(
        f"scored {adata.n_obs} cells by circuit {name} ({len(weights)} features"
        f"{f', {len(genes)} genes' if gene_score else ''})",
        deep=f"added\n    {score_col!r}{f', {gene_col!r}' if gene_score else ''} (adata.obs)\n"
        f"    {score_col!r}, the features and genes used (adata.uns)",
    )
    return adata if copy else None


def _feature_score(adata: AnnData, weights: pd.Series, activations_key: str) -> np.ndarray:
    """Influence-weighted mean activation of the circuit's features in every cell."""
    rec = activations_record(adata, activations_key)
    activation_layers(
        rec, sorted({int(x) for x in weights.index.get_level_values(0)}), activations_key
    )
    score = np.zeros(adata.n_obs)
    for (layer, feature), w in weights.items():
        col = obsm_activations(adata, rec, int(layer), activations_key)[:, int(feature)]
        score += w * (col.toarray().ravel() if sparse.issparse(col) else np.asarray(col).ravel())
    return score / weights.sum()


def _gene_score(adata: AnnData, genes: list[str], sentence_key: str) -> np.ndarray:
    """Decoupler's AUCell of ``genes`` in every cell's expression ranking."""
    import anndata as ad
    import decoupler as dc

    X, names = _expression(adata, sentence_key)
    upper = pd.Index([clean_symbol(n) for n in names])
    check_unique_symbols(
        upper,
        described="the genes of the expression matrix",
        fix="Keep one row per symbol (`adata = adata[:, ~adata.var_names.duplicated()]`), or "
        "pass gene_score=False.",
    )
    present = [g for g in genes if g in set(upper)]
    if not present:
        raise ValueError(f"None of the circuit's genes {genes[:5]}... is in the expression matrix.")
    tmp = ad.AnnData(
        X=sparse.csr_matrix(X) if sparse.issparse(X) else np.asarray(X),
        obs=pd.DataFrame(index=adata.obs_names.astype(str)),
    )
    tmp.var_names = upper
    net = pd.DataFrame({"source": "circuit", "target": present, "weight": 1.0})
    dc.mt.aucell(tmp, net, tmin=1, verbose=False)
    return np.asarray(tmp.obsm["score_aucell"]["circuit"], dtype=np.float64)
