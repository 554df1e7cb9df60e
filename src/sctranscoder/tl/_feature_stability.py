"""Stability across datasets: the features of two transcoder sets matched by decoder direction."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg
from tqdm.auto import tqdm

from .._constants import Key
from .._records import (
    check_key,
    check_same_transcoders,
    transcoder_record,
    transcoder_set,
    transcoders_id,
)
from .._validate import (
    check_bool,
    check_copy_backed,
    check_layer_list,
    check_positive_int,
    check_seed,
)
from ..core.stability import (
    MAX_FEATURES,
    MIN_NORM,
    covariance_baseline,
    init_baseline,
    match_dictionaries,
    summarise,
    trained_vs_init,
)
from ..get._features import live_mask

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

#: Thresholds of the summary's ``fraction_above_<t>`` columns.
THRESHOLDS = (0.5, 0.7)


def feature_stability(
    adata: AnnData,
    other: AnnData | None = None,
    *,
    key: str = Key.transcoders,
    other_key: str | None = None,
    layers: int | Sequence[int] | None = None,
    live_only: bool | None = None,
    activations_key: str | None = None,
    other_activations_key: str | None = None,
    n_baseline: int = 3,
    max_features: int = MAX_FEATURES,
    seed: int = 0,
    key_added: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Do two transcoder sets learn the same features? Hungarian matching of decoder directions.

    Claye et al. (2025, Figure 4): the features of two sets trained on different cells (two
    disjoint halves of one dataset, or two datasets) on the same base model are matched one to
    one, per layer, by the Hungarian algorithm on the cosine similarity of their decoder rows
    (:func:`sctranscoder.core.stability.match_dictionaries`, :func:`scipy.optimize.
    linear_sum_assignment`); a feature that recurs is matched with a cosine near 1. Chance is
    not 0: the same matching of independently initialised, untrained decoders of the same shapes
    (``n_baseline`` pairs with different seeds) is the baseline, and each trained set is also
    matched to an untrained decoder shaped like the other (``trained_vs_init``), so a reader sees
    how far training moved both above chance. Trained decoders span few dimensions, which alone
    lifts matched cosines above the isotropic baseline, so a third chance level draws random
    directions with each trained set's own covariance (``covariance_baseline``): the same
    subspace, no shared features (:func:`sctranscoder.core.stability.covariance_baseline`).

    Dead features have no learned direction (a TopK decoder row starts at zero and moves only
    when the feature fires), so they match at chance and pull the distribution down. With
    ``live_only=None`` (default), only live features are matched when both sets have an activation
    record (:func:`sctranscoder.tl.feature_activations`: live means ``log10(firing rate) >=`` its
    ``live_threshold``; each set's firing rates measured on its own AnnData's cells), and all
    features otherwise; rows of zero norm are always left out. The baseline has the shapes of the
    features compared. Matching costs ~1.5 s at 4,096 features and ~6.5 s at 8,192 per pair (see
    :mod:`sctranscoder.core.stability`); more than ``max_features`` per side are refused.

    Parameters
    ----------
    adata
        Annotated data with a transcoder record ``adata.uns[key]``.
    other
        Another AnnData holding the second set (e.g. trained on other cells), or ``None`` when
        both sets are in ``adata`` (then ``other_key`` names the second).
    key
        ``adata.uns`` key of the first transcoder set.
    other_key
        Key of the second set: in ``other`` (default ``key``) or in ``adata`` (required when
        ``other`` is ``None``).
    layers
        Layers to compare (default: every layer both sets have).
    live_only
        Match only live features (``True``: needs both activation records), all features with a
        decoder direction (``False``), or live ones when both records exist (``None``).
    activations_key, other_activations_key
        Activation records of the two sets, for the live features (default
        ``f"{key}_activations"`` and ``f"{other_key}_activations"`` where each set lives).
    n_baseline
        Pairs of untrained decoders matched for the baseline (seeds ``seed``, ``seed + 1``, ...).
    max_features
        Largest number of features per side matched (the cost grows roughly as its cube).
    seed
        Seed of the untrained decoders.
    key_added
        ``adata.uns`` key of the result (default ``f"{key}_stability"``).
    progress
        Show a progress bar over layers.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``adata.uns[key_added]``, a dict:

    ``summary`` : :class:`pandas.DataFrame`
        One row per layer (index ``"layer_<i>"``): ``layer``; ``n_features``,
        ``other_n_features`` (each set's width); ``n_compared``, ``other_n_compared`` (features
        matched from: live ones or all with a direction); ``n_matched``; ``median``, ``mean``,
        ``fraction_above_0.5``, ``fraction_above_0.7`` of the matched cosines; the same four
        of the untrained baseline as ``baseline_*``, of the trained sets against untrained
        decoders as ``trained_vs_init_*`` and of the covariance-matched random directions as
        ``covariance_baseline_*``; ``seconds``.
    ``layers`` : dict
        Per ``"layer_<i>"``: ``cosine`` (float32, the matched cosines), ``index`` and
        ``other_index`` (int64, the matched features of the first and second set: feature
        ``index[j]`` of ``key`` is matched to feature ``other_index[j]`` of ``other_key``),
        ``baseline`` (float32, ``n_baseline x n_matched``: one row per untrained pair) and
        ``trained_vs_init`` (float32, ``2 x n_matched``: the first set against an untrained
        decoder shaped like the second, then the second against one shaped like the first) and
        ``covariance_baseline`` (float32, ``n_baseline x n_matched``).
    ``params`` : dict
        ``transcoders_key``, ``other_key``, ``other`` (``"adata"`` or ``"other AnnData"``),
        ``layers``, ``live_only`` (as applied), ``activations_key``, ``other_activations_key``
        (``""`` when not used), ``n_baseline``, ``max_features``, ``seed``, ``model_fingerprint``,
        ``training_seeds`` (of the two sets), ``transcoders_id`` and ``other_transcoders_id``.
    """
    from anndata import AnnData

    copy = check_bool(copy, "copy")
    progress = check_bool(progress, "progress")
    live_only = check_bool(live_only, "live_only", none=True)
    check_copy_backed(adata, copy)
    if other is not None and not isinstance(other, AnnData):
        raise TypeError(
            f"other takes the AnnData holding the second transcoder set (or None when both are "
            f"in adata, with other_key=), got {type(other).__name__}."
        )
    source = adata if other is None else other
    if other_key is None:
        if other is None:
            raise ValueError(
                "Name the second transcoder set: other_key='...' (a key of adata.uns), or pass "
                "the AnnData that holds it as other."
            )
        other_key = key
    for name, value in (("key", key), ("other_key", other_key)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be an adata.uns key (a string), got {value!r}.")
    if other is None and other_key == key:
        raise ValueError(
            f"key and other_key both name adata.uns[{key!r}]: a set matched to itself is "
            "stable by construction. Pass the second set's key, or its AnnData as other."
        )
    n_baseline = check_positive_int(n_baseline, "n_baseline")
    max_features = check_positive_int(max_features, "max_features")
    seed = check_seed(seed)
    if key_added is None:
        key_added = Key.derived(key, "stability")
    key_added = check_key(key_added, adata=adata, kind="feature stability")

    rec, other_rec = transcoder_record(adata, key), transcoder_record(source, other_key)
    fingerprints = (str(rec["model"]["fingerprint"]), str(other_rec["model"]["fingerprint"]))
    if fingerprints[0] != fingerprints[1]:
        raise ValueError(
            f"The two sets were trained on different base models (fingerprints {fingerprints[0]} "
            f"and {fingerprints[1]}): decoder directions of different models live in different "
            "spaces. Train both on the same model."
        )
    tset, other_tset = transcoder_set(adata, key), transcoder_set(source, other_key)
    common = sorted(set(tset.layers) & set(other_tset.layers))
    if not common:
        raise ValueError(
            f"The sets share no layer ({tset.layers} and {other_tset.layers}): train the same "
            "layers in both."
        )
    if layers is None:
        layers = common
    else:
        layers = check_layer_list(layers, common)
        missing = sorted(set(layers) - set(common))
        if missing:
            raise KeyError(
                f"Layer(s) {missing} are not in both sets; layers of both: {common}. Pass some "
                "of those, or None for all."
            )

    akeys = (
        activations_key or Key.activations(key),
        other_activations_key or Key.activations(other_key),
    )
    for name, value in (("activations_key", akeys[0]), ("other_activations_key", akeys[1])):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be an adata.uns key (a string), got {value!r}.")
    present = (akeys[0] in adata.uns, akeys[1] in source.uns)
    if live_only is None:
        live_only = all(present)
    live_recs: tuple[dict, dict] | None = None
    if live_only:
        where = ("adata", "adata" if other is None else "other")
        for has, k, w in zip(present, akeys, where, strict=True):
            if not has:
                raise KeyError(
                    f"live_only=True needs the activation record {w}.uns[{k!r}]: run "
                    f"`sct.tl.feature_activations({w}, key=...)` first, pass its "
                    "activations_key, or live_only=False to match every feature."
                )
        live_recs = (
            check_same_transcoders(adata, akeys[0], key),
            check_same_transcoders(source, akeys[1], other_key),
        )

    # what is compared, layer by layer, checked (sizes) before anything is computed
    chosen = {}
    for layer in layers:
        W, V = tset[layer].W_dec.detach().cpu().numpy(), other_tset[layer].W_dec.detach().cpu()
        V = V.numpy()
        if W.shape[1] != V.shape[1]:
            raise ValueError(
                f"Layer {layer}: decoders of width {W.shape[1]} and {V.shape[1]} cannot be "
                "compared (different models or layers)."
            )
        masks = [np.linalg.norm(M, axis=1) >= MIN_NORM for M in (W, V)]
        if live_recs is not None:
            masks = [m & live_mask(r, layer) for m, r in zip(masks, live_recs, strict=True)]
        idx = [np.flatnonzero(m) for m in masks]
        if min(len(i) for i in idx) == 0:
            raise ValueError(
                f"Layer {layer}: no feature to match in "
                f"{'the first' if len(idx[0]) == 0 else 'the second'} set "
                f"({'live ' if live_only else ''}with a decoder direction). Pass other layers"
                f"{', or live_only=False' if live_only else ''}."
            )
        if max(len(i) for i in idx) > max_features:
            raise ValueError(
                f"Layer {layer}: {len(idx[0])} x {len(idx[1])} features exceed "
                f"max_features={max_features}. The Hungarian algorithm is roughly cubic "
                "(about 6.5 s and 2 GB at 8,192 per side, minutes and over 12 GB at 32,768, for "
                "each matching and again for each baseline pair): match only live features "
                "(run `sct.tl.feature_activations` on both, live_only=True), or raise "
                "max_features knowing the cost."
            )
        chosen[layer] = (W[idx[0]], V[idx[1]], idx[0], idx[1], len(W), len(V))

    seeds = [int(r["params"].get("config", {}).get("seed", -1)) for r in (rec, other_rec)]
    if seeds[0] == seeds[1] and seeds[0] >= 0:
        logg.warning(
            f"both sets were trained with seed={seeds[0]}: they started from the same encoder "
            "(and, for ReLU transcoders, decoder), so part of their similarity may come from "
            "the shared start. Train one with another seed (`seed=`) for a clean comparison."
        )
    start = logg.info(
        f"matching the features of {key!r} and {other_key!r} in {len(layers)} layer(s) "
        f"({'live' if live_only else 'all'} features)"
    )
    rows, per_layer = [], {}
    for i, layer in enumerate(tqdm(layers, desc="layers", disable=not progress)):
        t0 = time.perf_counter()
        A, B, ia, ib, n_a, n_b = chosen[layer]
        matching = match_dictionaries(A, B, max_features=max_features)
        d = A.shape[1]
        layer_seed = seed + 1000 * i  # distinct draws per layer, reproducible from seed
        base = init_baseline(
            len(A), len(B), d, n_repeats=n_baseline, seed=layer_seed, max_features=max_features
        )
        vs_init = np.stack(
            [
                trained_vs_init(A, len(B), seed=layer_seed + 500, max_features=max_features)[0],
                trained_vs_init(B, len(A), seed=layer_seed + 501, max_features=max_features)[0],
            ]
        )
        cov = covariance_baseline(
            A, B, n_repeats=n_baseline, seed=layer_seed + 700, max_features=max_features
        )
        per_layer[Key.layer(layer)] = {
            "cosine": matching.cosine.astype(np.float32),
            "index": ia[matching.index_a].astype(np.int64),
            "other_index": ib[matching.index_b].astype(np.int64),
            "baseline": base.astype(np.float32),
            "trained_vs_init": vs_init.astype(np.float32),
            "covariance_baseline": cov.astype(np.float32),
        }
        row = {
            "layer": int(layer),
            "n_features": int(n_a),
            "other_n_features": int(n_b),
            "n_compared": len(A),
            "other_n_compared": len(B),
            "n_matched": len(matching.cosine),
        }
        row |= summarise(matching.cosine, THRESHOLDS)
        row |= {f"baseline_{k}": v for k, v in summarise(base, THRESHOLDS).items()}
        row |= {f"trained_vs_init_{k}": v for k, v in summarise(vs_init, THRESHOLDS).items()}
        row |= {f"covariance_baseline_{k}": v for k, v in summarise(cov, THRESHOLDS).items()}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    summary = pd.DataFrame(rows, index=[Key.layer(la) for la in layers])
    result = {
        "summary": summary,
        "layers": per_layer,
        "params": {
            "transcoders_key": key,
            "other_key": other_key,
            "other": "adata" if other is None else "other AnnData",
            "layers": np.asarray(layers, dtype=np.int64),
            "live_only": bool(live_only),
            "activations_key": akeys[0] if live_only else "",
            "other_activations_key": akeys[1] if live_only else "",
            "n_baseline": n_baseline,
            "max_features": max_features,
            "seed": seed,
            "model_fingerprint": fingerprints[0],
            "training_seeds": np.asarray(seeds, dtype=np.int64),
            "transcoders_id": transcoders_id(adata, key),
            "other_transcoders_id": transcoders_id(source, other_key),
        },
    }
    if copy:
        adata = adata.copy()
    adata.uns[key_added] = result
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, matched features per layer and baselines (adata.uns)",
    )
    return adata if copy else None
