"""Which transcoder features mark which cell populations: scanpy's rank_genes_groups on features."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Key
from .._store import sct_uns
from ..get._activations import feature_names

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: Default ``adata.uns`` key of :func:`rank_features_groups` results.
DEFAULT_KEY = "rank_features_groups"


def _activation_keys(adata: AnnData, key: str, layers: Sequence[int] | None) -> dict[int, str]:
    """``{layer: obsm key}`` of the stored activations of ``layers`` (default: all)."""
    record = sct_uns(adata, key)
    if "activations" not in record:
        raise KeyError(
            f"No activations under adata.uns[{key!r}]: run `sct.tl.feature_activations(adata)` "
            "first."
        )
    obsm_keys = record["activations"]["obsm_keys"]
    available = sorted(int(k.split("_", 1)[1]) for k in obsm_keys)
    if layers is None:
        layers = available
    layers = [int(x) for x in layers]
    missing = [x for x in layers if x not in available]
    if missing:
        raise KeyError(
            f"No activations for layer(s) {missing} in adata.uns[{key!r}]; available layers: "
            f"{available}. Run `sct.tl.feature_activations(adata, layers=...)`."
        )
    out = {}
    for layer in layers:
        obsm_key = str(obsm_keys[Key.layer(layer)])
        if obsm_key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{obsm_key!r}] is missing: rerun `sct.tl.feature_activations(adata)`."
            )
        out[layer] = obsm_key
    return out


def feature_matrix(
    adata: AnnData, layers: Sequence[int] | None = None, *, key: str = Key.uns
) -> tuple[sparse.csr_matrix, list[str], np.ndarray, np.ndarray]:
    """Cells x features activations of ``layers`` side by side, with names ``"L<l>F<j>"``.

    Returns the CSR matrix, the feature names, and each column's layer and feature index.
    """
    keys = _activation_keys(adata, key, layers)
    blocks, names, layer_of, index_of = [], [], [], []
    for layer, obsm_key in keys.items():
        X = sparse.csr_matrix(adata.obsm[obsm_key], dtype=np.float32)
        blocks.append(X)
        names += feature_names(layer, X.shape[1])
        layer_of.append(np.full(X.shape[1], layer, dtype=np.int64))
        index_of.append(np.arange(X.shape[1], dtype=np.int64))
    X = sparse.hstack(blocks, format="csr").astype(np.float32)
    return X, names, np.concatenate(layer_of), np.concatenate(index_of)


def _group_means(X: sparse.csr_matrix, labels: pd.Categorical, names: list[str]) -> pd.DataFrame:
    """Features x groups mean activation (groups with no cell are left out)."""
    codes = np.asarray(labels.codes)
    keep = codes >= 0
    cats = list(labels.categories)
    onehot = sparse.csr_matrix(
        (np.ones(keep.sum(), dtype=np.float64), (codes[keep], np.flatnonzero(keep))),
        shape=(len(cats), X.shape[0]),
    )
    counts = np.asarray(onehot.sum(1)).ravel()
    sums = np.asarray((onehot @ X.astype(np.float64)).todense())  # groups x features
    present = counts > 0
    means = sums[present] / counts[present, None]
    return pd.DataFrame(
        means.T.astype(np.float32),
        index=pd.Index(names),
        columns=pd.Index([str(c) for c, p in zip(cats, present, strict=True) if p]),
    )


def specificity(group_means: pd.DataFrame) -> pd.DataFrame:
    """Per feature: the group where it is most active, and how specific it is to that group.

    ``specificity`` is the top group's share of the summed group means (``1 / n_groups`` for a
    feature equally active everywhere, 1 for one active in a single group). ``tau`` is the tissue
    specificity index of Yanai et al. (2005), ``sum_g (1 - m_g / max_g m) / (n_groups - 1)``:
    0 when equally active everywhere, 1 when active in one group only. Both are NaN for a feature
    that never fires (and ``top_group`` is ``""``).
    """
    M = group_means.to_numpy(dtype=np.float64)
    n_groups = M.shape[1]
    top = M.max(1) if n_groups else np.zeros(M.shape[0])
    total = M.sum(1)
    live = top > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        spec = np.where(live, top / total, np.nan)
        tau = (
            np.where(live, (1.0 - M / top[:, None]).sum(1) / (n_groups - 1), np.nan)
            if n_groups > 1
            else np.full(M.shape[0], np.nan)
        )
    groups = np.asarray(group_means.columns, dtype=object)
    top_group = (
        np.where(live, groups[M.argmax(1)], "") if n_groups else np.full(M.shape[0], "")
    ).astype(str)
    return pd.DataFrame(
        {"top_group": top_group, "top_mean": top, "specificity": spec, "tau": tau},
        index=group_means.index,
    )


def rank_features_groups(
    adata: AnnData,
    groupby: str,
    *,
    layers: Sequence[int] | None = None,
    key: str = Key.uns,
    method: Literal["wilcoxon", "t-test", "t-test_overestim_var", "logreg"] = "wilcoxon",
    groups: Literal["all"] | Sequence[str] = "all",
    reference: str = "rest",
    n_features: int | None = None,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Rank transcoder features for characterising groups of cells (features as marker genes).

    The stored activations of the requested layers (:func:`feature_activations`) are put side by
    side as a cells x features matrix (features named ``"L<layer>F<index>"``) and ranked with
    :func:`scanpy.tl.rank_genes_groups` (``use_raw=False``, ``pts=True``). The result has
    scanpy's layout, so scanpy's getters and plots read it. Activations are not log-expression:
    the ``logfoldchanges`` scanpy computes (as if they were) are not meaningful; use ``scores``,
    ``pvals_adj``, ``pts`` and the group means below. Groups with fewer than two cells cannot be
    tested: with ``groups="all"`` they are left out (with a warning) and count as "rest".

    Per feature, its association with ``adata.obs[groupby]`` is stored too: its mean activation
    in every group, the group where it is highest and how specific it is to that group.

    Parameters
    ----------
    adata
        Annotated data after :func:`feature_activations`.
    groupby
        Categorical ``adata.obs`` column (e.g. ``"bulk_labels"``).
    layers
        Layers whose features are ranked (default: every layer with activations).
    key
        ``adata.uns`` key of the transcoders.
    method
        Test of :func:`scanpy.tl.rank_genes_groups`; ``"wilcoxon"`` (default) suits the many
        zeros of sparse activations.
    groups
        Groups to rank (default: all with at least two cells).
    reference
        ``"rest"`` or a group to compare with.
    n_features
        Features reported per group (default: all).
    key_added
        ``adata.uns`` key of the result (default: ``"rank_features_groups"``).
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets
    ``adata.uns[key_added]`` : dict, with scanpy's rank_genes_groups fields

        ``names``, ``scores``, ``logfoldchanges``, ``pvals``, ``pvals_adj`` : record arrays
            One field per group, ``n_features`` rows, best first (feature names
            ``"L<layer>F<index>"``).
        ``pts``, ``pts_rest`` : :class:`pandas.DataFrame`
            Features x groups: fraction of cells of the group (of the rest) where it fires.
        ``params`` : dict
            scanpy's (``groupby``, ``reference``, ``method``, ``use_raw``, ``corr_method``) plus
            ``sct_key`` and ``layers`` (int array).

    and sctranscoder's

        ``group_means`` : :class:`pandas.DataFrame`
            Features x groups (every group of ``groupby`` with cells): mean activation.
        ``specificity`` : :class:`pandas.DataFrame`
            Per feature: ``layer``, ``feature``, ``top_group`` (group with the highest mean),
            ``top_mean``, ``specificity`` (top mean / sum of group means) and ``tau`` (see
            :func:`specificity`); NaN for features that never fire.

    Examples
    --------
    >>> sct.tl.rank_features_groups(adata, "bulk_labels", layers=[2])
    >>> sc.get.rank_genes_groups_df(adata, "CD19+ B", key="rank_features_groups")

    For a dot plot, rank one layer and plot on that layer's feature AnnData (which carries the
    ranking along):

    >>> fa = sct.get.activations(adata, 2)
    >>> sc.pl.rank_genes_groups_dotplot(
    ...     fa, key="rank_features_groups", groupby="bulk_labels", n_genes=3
    ... )
    """
    import anndata as ad
    import scanpy as sc

    if groupby not in adata.obs:
        raise KeyError(f"adata.obs[{groupby!r}] not found; columns: {list(adata.obs.columns)}.")
    key_added = DEFAULT_KEY if key_added is None else str(key_added)
    start = time.perf_counter()
    X, names, layer_of, index_of = feature_matrix(adata, layers, key=key)
    labels = pd.Categorical(adata.obs[groupby].astype(str).where(adata.obs[groupby].notna()))

    counts = pd.Series(labels).value_counts()
    if isinstance(groups, str) and groups == "all":
        tested = [str(g) for g in labels.categories if counts.get(g, 0) >= 2]
        small = [str(g) for g in labels.categories if 0 < counts.get(g, 0) < 2]
        if small:
            logger.warning(
                "groups %s of %r have fewer than 2 cells: they are not ranked (but count in the "
                "rest)",
                small,
                groupby,
            )
        if reference != "rest" and reference not in tested:
            tested.append(reference)
        if not tested:
            raise ValueError(f"No group of {groupby!r} has at least 2 cells.")
        rank_groups: str | list[str] = tested
    else:
        rank_groups = [str(g) for g in groups]
        unknown = [g for g in rank_groups if g not in counts.index]
        if unknown:
            raise ValueError(
                f"groups {unknown} not in adata.obs[{groupby!r}]; groups: {list(counts.index)}."
            )

    tmp = ad.AnnData(
        X=X,
        obs=pd.DataFrame({groupby: labels}, index=adata.obs_names.copy()),
        var=pd.DataFrame(index=pd.Index(names)),
    )
    sc.tl.rank_genes_groups(
        tmp,
        groupby,
        groups=rank_groups,
        reference=reference,
        method=method,
        n_genes=X.shape[1] if n_features is None else int(n_features),
        use_raw=False,
        pts=True,
        key_added="result",
    )
    result = dict(tmp.uns["result"])
    params = {k: v for k, v in dict(result["params"]).items() if v is not None}
    params["sct_key"] = key
    params["layers"] = np.unique(layer_of)
    result["params"] = params

    means = _group_means(X, labels, names)
    spec = specificity(means)
    spec.insert(0, "feature", index_of)
    spec.insert(0, "layer", layer_of)
    result["group_means"] = means
    result["specificity"] = spec

    if copy:
        adata = adata.copy()
    adata.uns[key_added] = result
    logger.info(
        "ranked %d features of layers %s for %d groups of %r in %.1fs\n    added %r (adata.uns)",
        len(names),
        params["layers"].tolist(),
        len(result["names"].dtype.names),
        groupby,
        time.perf_counter() - start,
        key_added,
    )
    return adata if copy else None
