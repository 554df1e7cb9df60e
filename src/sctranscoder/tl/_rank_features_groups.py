"""Which transcoder features mark which cell populations: scanpy's rank_genes_groups on features."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy import sparse

from .._constants import Key, feature_names
from .._logging import quiet_scanpy
from .._records import activation_layers, activations_record, check_key, obsm_activations
from .._validate import check_bool, check_copy_backed, check_layer_list, check_positive_int

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

#: Tests of :func:`scanpy.tl.rank_genes_groups`.
METHODS = ("wilcoxon", "t-test", "t-test_overestim_var", "logreg")
#: Stands in for ``/`` in group names used as keys (``.h5ad`` and ``.zarr`` read ``/`` as a path):
#: U+2215 DIVISION SLASH, which looks the same.
SLASH = "\u2215"


def storable_group(name: str) -> str:
    """A group name usable as a key in every storage backend (``/`` replaced by :data:`SLASH`)."""
    return str(name).replace("/", SLASH)


def feature_matrix(
    adata: AnnData, layers: Sequence[int] | None, activations_key: str
) -> tuple[sparse.csr_matrix, list[str], np.ndarray, np.ndarray]:
    """Cells x features activations of ``layers`` side by side, with names ``"L<l>F<j>"``.

    Returns the CSR matrix, the feature names, and each column's layer and feature index.
    """
    rec = activations_record(adata, activations_key)
    if layers is not None:  # an empty list would give a matrix without columns
        available = [Key.parse_layer(k) for k in rec["obsm_keys"]]
        layers = check_layer_list(layers, available)
    blocks, names, layer_of, index_of = [], [], [], []
    for layer in activation_layers(rec, layers, activations_key):
        X = sparse.csr_matrix(
            obsm_activations(adata, rec, layer, activations_key), dtype=np.float32
        )
        blocks.append(X)
        names += feature_names(layer, X.shape[1])
        layer_of.append(np.full(X.shape[1], layer, dtype=np.int64))
        index_of.append(np.arange(X.shape[1], dtype=np.int64))
    X = sparse.hstack(blocks, format="csr").astype(np.float32)
    return X, names, np.concatenate(layer_of), np.concatenate(index_of)


def _group_means(features: AnnData, groupby: str) -> pd.DataFrame:
    """Features x groups mean activation (:func:`scanpy.get.aggregate`; empty groups left out)."""
    import scanpy as sc

    with quiet_scanpy():
        means = sc.get.aggregate(features, by=groupby, func="mean")
    return pd.DataFrame(
        np.asarray(means.layers["mean"], dtype=np.float32).T,
        index=features.var_names.copy(),
        columns=pd.Index([str(c) for c in means.obs_names]),
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
    *,
    groupby: str,
    layers: Sequence[int] | None = None,
    method: Literal["wilcoxon", "t-test", "t-test_overestim_var", "logreg"] = "wilcoxon",
    groups: Literal["all"] | Sequence[str] = "all",
    reference: str = "rest",
    n_top: int | None = None,
    activations_key: str = Key.activations(Key.transcoders),
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
    Group names are keys of the stored result, and ``.h5ad``/``.zarr`` files read ``/`` in a key
    as a path: a ``/`` in a group name (``"CD4+/CD25 T Reg"``) is stored as the look-alike
    ``"∕"`` (U+2215), with a note in the log; ``groups`` and ``reference`` accept either.

    Per feature, its association with ``adata.obs[groupby]`` is stored too: its mean activation
    in every group, the group where it is highest and how specific it is to that group.

    Parameters
    ----------
    adata
        Annotated data after :func:`feature_activations`.
    groupby
        Categorical ``adata.obs`` column (e.g. ``"bulk_labels"``); strings and bools are read as
        groups, numbers are refused (make cluster ids categorical first). Cells without a group
        (NaN) are left out, with a warning.
    layers
        Layers whose features are ranked (default: every layer with activations).
    method
        Test of :func:`scanpy.tl.rank_genes_groups`; ``"wilcoxon"`` (default) suits the many
        zeros of sparse activations.
    groups
        Groups to rank (default: all with at least two cells); a non-empty list.
    reference
        ``"rest"`` or a group with at least two cells to compare with, not the only group
        ranked.
    n_top
        Features reported per group, a positive integer (default: all).
    activations_key
        ``adata.uns`` key of the activation record.
    key_added
        ``adata.uns`` key of the result (default: ``"rank_features_groups"``).
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets
    ``adata.uns[key_added]`` : dict, with scanpy's rank_genes_groups fields

        ``names``, ``scores``, ``logfoldchanges``, ``pvals``, ``pvals_adj`` : record arrays
            One field per group, ``n_top`` rows, best first (feature names
            ``"L<layer>F<index>"``).
        ``pts``, ``pts_rest`` : :class:`pandas.DataFrame`
            Features x groups: fraction of cells of the group (of the rest) where it fires.
        ``params`` : dict
            scanpy's (``groupby``, ``reference``, ``method``, ``use_raw``, ``corr_method``) plus
            ``activations_key`` and ``layers`` (int array).

    and sctranscoder's

        ``group_means`` : :class:`pandas.DataFrame`
            Features x groups (every group of ``groupby`` with cells): mean activation.
        ``specificity`` : :class:`pandas.DataFrame`
            Per feature: ``layer``, ``feature``, ``top_group`` (group with the highest mean),
            ``top_mean``, ``specificity`` (top mean / sum of group means) and ``tau`` (see
            :func:`specificity`); NaN for features that never fire.

    Examples
    --------
    >>> sct.tl.rank_features_groups(adata, groupby="bulk_labels", layers=[2])
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
    if pd.api.types.is_float_dtype(adata.obs[groupby]):
        raise ValueError(
            f"adata.obs[{groupby!r}] holds floats, not groups: pass a categorical column (cell "
            f"types, clusters), or bin this one first, e.g. `adata.obs['{groupby}_bin'] = "
            f"pd.qcut(adata.obs[{groupby!r}], 4)`."
        )
    if pd.api.types.is_integer_dtype(adata.obs[groupby]):
        raise ValueError(
            f"adata.obs[{groupby!r}] holds integers ({adata.obs[groupby].nunique()} distinct "
            "values), not groups: if they label groups (cluster ids), make the column "
            f"categorical first, `adata.obs[{groupby!r}] = adata.obs[{groupby!r}]"
            ".astype('category')`; if they count something, bin them, e.g. "
            f"`adata.obs['{groupby}_bin'] = pd.qcut(adata.obs[{groupby!r}], 4)`."
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if n_top is not None:
        n_top = check_positive_int(n_top, "n_top")
    copy = check_bool(copy, "copy")
    key_added = check_key(
        key_added if key_added is not None else Key.rank_features_groups,
        adata=adata,
        kind="feature ranking",
    )
    check_copy_backed(adata, copy)
    X, names, layer_of, index_of = feature_matrix(adata, layers, activations_key)
    column = adata.obs[groupby]
    labels = pd.Categorical(column.astype(str).map(storable_group).where(column.notna()))
    has_group = np.asarray(column.notna())
    if not has_group.all():  # scanpy cannot rank cells without a group: they are left out
        logg.warning(
            f"{int((~has_group).sum())} cells have no group (NaN) in adata.obs[{groupby!r}]: "
            "they are left out of the ranking, the rest and the group means"
        )
        X, labels = X[has_group], labels[has_group]
    labels = labels.remove_unused_categories()
    rank_groups = _groups_to_rank(labels, groups, storable_group(reference), groupby)
    tmp = ad.AnnData(
        X=X,
        obs=pd.DataFrame({groupby: labels}, index=adata.obs_names[has_group].copy()),
        var=pd.DataFrame(index=pd.Index(names)),
    )
    start = logg.info(f"ranking {len(names)} features for the groups of {groupby!r}")
    with quiet_scanpy():
        sc.tl.rank_genes_groups(
            tmp,
            groupby,
            groups=rank_groups,
            reference=storable_group(reference),
            method=method,
            n_genes=X.shape[1] if n_top is None else n_top,
            use_raw=False,
            pts=True,
            key_added="result",
        )
    result = dict(tmp.uns["result"])
    params = {k: v for k, v in dict(result["params"]).items() if v is not None}
    params["activations_key"] = activations_key
    params["layers"] = np.unique(layer_of)
    result["params"] = params
    means = _group_means(tmp, groupby)
    spec = specificity(means)
    spec.insert(0, "feature", index_of)
    spec.insert(0, "layer", layer_of)
    result["group_means"] = means
    result["specificity"] = spec

    if copy:
        adata = adata.copy()
    adata.uns[key_added] = result
    logg.info(
        "    finished", time=start, deep=f"added\n    {key_added!r}, feature ranking (adata.uns)"
    )
    return adata if copy else None


def _groups_to_rank(labels: pd.Categorical, groups, reference: str, groupby: str) -> list[str]:
    """The groups to rank: all with at least two cells, or those asked for (checked)."""
    counts = pd.Series(labels).value_counts()
    renamed = [str(g) for g in labels.categories if SLASH in str(g)]
    if renamed:
        logg.info(f"    groups {renamed} of {groupby!r} are stored with '{SLASH}' for '/'")
    known = [str(g) for g in counts.index[counts > 0]]
    if reference != "rest" and reference not in known:
        raise ValueError(
            f"reference {reference!r} is not a group of adata.obs[{groupby!r}]: pass 'rest' or "
            f"one of {known}."
        )
    if not (isinstance(groups, str) and groups == "all"):
        wanted = [storable_group(g) for g in ([groups] if isinstance(groups, str) else groups)]
        if not wanted:
            raise ValueError(f"groups is empty: pass 'all' or some of {known}.")
        unknown = [g for g in wanted if g not in counts.index]
        if unknown:
            raise ValueError(
                f"groups {unknown} not in adata.obs[{groupby!r}]; groups: {list(counts.index)}."
            )
        _check_not_only_reference(wanted, reference, known)
        return wanted
    tested = [str(g) for g in labels.categories if counts.get(g, 0) >= 2]
    small = [str(g) for g in labels.categories if 0 < counts.get(g, 0) < 2]
    if small:
        logg.warning(
            f"groups {small} of {groupby!r} have fewer than 2 cells: they are not ranked (but "
            "count in the rest)"
        )
    if reference != "rest" and reference not in tested:
        tested.append(reference)
    if not tested:
        raise ValueError(f"No group of {groupby!r} has at least 2 cells.")
    _check_not_only_reference(tested, reference, known)
    return tested


def _check_not_only_reference(groups: list[str], reference: str, known: list[str]) -> None:
    """Refuse ranking the reference alone: it is compared with itself, which scanpy skips."""
    if reference != "rest" and set(groups) <= {reference}:
        others = [g for g in known if g != reference]
        raise ValueError(
            f"reference {reference!r} is the only group to rank, and a group is not compared "
            f"with itself: pass other groups (some of {others}), or reference='rest'."
        )
