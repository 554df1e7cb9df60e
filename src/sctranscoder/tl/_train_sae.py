"""Sparse autoencoders on any cell embedding (Claye et al. 2025), and their size sweep."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg

from .._constants import Key
from .._records import check_key
from .._sae import check_obsm_free, embedding, embedding_record
from .._validate import (
    check_bool,
    check_copy_backed,
    check_device,
    check_finite,
    check_fraction,
    check_live_threshold,
    check_positive_int,
    check_seed,
)
from ..core.prompts import split_cells
from ..core.sae import SAE_LAYER, encode, fit_sae
from ..core.training import TrainingConfig

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from anndata import AnnData

#: ``n_top`` stored in an SAE's activation record (genes listed per concept by default).
N_TOP = 50


def _settings(
    adata: AnnData,
    use_rep: str,
    *,
    k: int,
    n_steps: int,
    batch_size: int,
    lr: float | None,
    auxk_alpha: float,
    validation_fraction: float,
    seed: int,
    device,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, int, torch.device, bool]:
    """Checked arguments shared by :func:`train_sae` and :func:`sae_sweep`: the embedding, the
    validation mask, the batch size (at most the training cells) and the device.
    """
    import torch

    check_positive_int(k, "k")
    check_positive_int(n_steps, "n_steps")
    check_positive_int(batch_size, "batch_size")
    check_fraction(validation_fraction, "validation_fraction", closed=False)
    check_seed(seed)
    if lr is not None and not (check_finite(lr, "lr") > 0):
        raise ValueError(f"lr must be positive (or None for the default), got {lr}.")
    if not check_finite(auxk_alpha, "auxk_alpha") >= 0:
        raise ValueError(f"auxk_alpha must be >= 0, got {auxk_alpha}.")
    progress = check_bool(progress, "progress")
    device = check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    X = embedding(adata, use_rep)
    is_val = split_cells(adata.n_obs, validation_fraction, seed)
    n_train = int((~is_val).sum())
    if batch_size > n_train:
        logg.info(
            f"    batch_size {batch_size} is more than the {n_train} training cells: using {n_train}"
        )
        batch_size = n_train
    return X, is_val, batch_size, device, progress


def _config(expansion_factor, k, n_steps, batch_size, lr, auxk_alpha, seed, validation_fraction):
    return TrainingConfig(
        activation="topk",
        expansion_factor=int(expansion_factor),
        k=int(k),
        lr=None if lr is None else float(lr),
        batch_size=int(batch_size),
        n_tokens=int(n_steps) * int(batch_size),
        auxk_alpha=float(auxk_alpha),
        seed=int(seed),
        validation_fraction=float(validation_fraction),
    )


def _check_k(k: int, expansion_factor: int, d: int, use_rep: str) -> None:
    if k > expansion_factor * d:
        raise ValueError(
            f"k ({k}) is more than the {expansion_factor * d} concepts of expansion factor "
            f"{expansion_factor} on the {d} dimensions of adata.obsm[{use_rep!r}]: pass a smaller "
            "k or a larger expansion_factor."
        )


def train_sae(
    adata: AnnData,
    *,
    use_rep: str,
    expansion_factor: int = 8,
    k: int = 8,
    n_steps: int = 2000,
    batch_size: int = 256,
    lr: float | None = None,
    auxk_alpha: float = 1 / 32,
    validation_fraction: float = 0.1,
    seed: int = 0,
    live_threshold: float = -3.0,
    device: str | None = None,
    key_added: str = Key.sae,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """A TopK sparse autoencoder on a cell embedding: its concepts in every cell (Claye et al.).

    The SAE encodes a cell's embedding ``x`` into ``expansion_factor * d`` concepts, of which
    the ``k`` largest ReLU pre-activations are kept, and decodes them back to ``x``. It is
    trained by the transcoders' trainer (:class:`~sctranscoder.core.training.Trainer`: TopK
    with sparse kernels, AuxK for dead concepts, Adam, initialisation at the mean) on one
    pseudo-layer whose input and target are the embedding, a cell being a token: ``n_steps``
    steps of ``batch_size`` training cells, drawn epoch by epoch in a seeded order. Cells are
    split (seeded) into training and validation; the quality is measured on both. The
    embedding is multiplied by one scalar, stored as ``params["scale"]``, so that its mean
    squared distance to the mean equals its width: the default learning rate then suits
    embeddings of any units, and the geometry (hence R^2) is unchanged.

    Any embedding works: ``"X_pca"``, C2S's own (:func:`cell_embeddings`), or one computed
    elsewhere, e.g. ``adata.obsm["X_scVI"] = scvi_model.get_latent_representation()``
    (scGPT, Geneformer: their cell embeddings, stored the same way).

    The concepts' activations are written as an activation record of one pseudo-layer 0
    (concepts named ``"L0F<j>"``), so that :func:`rank_features_groups`,
    :func:`sctranscoder.get.activations`, :func:`sctranscoder.get.feature_table` and
    :func:`sctranscoder.pl.feature` read them with ``activations_key=f"{key_added}_activations"``;
    after :func:`concept_attribution` (the genes of each concept), so do
    :func:`annotate_features` and :func:`sctranscoder.get.gene_activations`.

    Parameters
    ----------
    adata
        Annotated data with the embedding in ``adata.obsm[use_rep]``.
    use_rep
        ``adata.obsm`` key of the embedding: cells x dimensions, dense or sparse, finite.
    expansion_factor
        Concepts per embedding dimension.
    k
        Concepts active per cell (TopK).
    n_steps
        Optimiser steps.
    batch_size
        Cells per step (at most the training cells; more is cut to them).
    lr
        Adam learning rate; ``None``: ``2e-4 / sqrt(n_concepts / 2**14)`` (the transcoders'
        default, Gao et al. 2024).
    auxk_alpha
        Weight of the AuxK loss that trains dead concepts on the residual.
    validation_fraction
        Fraction of cells held out, in ``(0, 1)``.
    seed
        Seed of the split, the initialisation and the order of cells.
    live_threshold
        A concept is *live* when ``log10`` of the fraction of cells it is active in is at
        least this (a finite number at most 0); stored in the activation record.
    device
        ``"cpu"``, ``"cuda"``, ...; default: a GPU when there is one.
    key_added
        ``adata.uns`` key of the SAE record; the concepts go to ``adata.obsm[f"X_{key_added}"]``,
        their activation record to ``adata.uns[f"{key_added}_activations"]`` and the split to
        ``adata.obs[f"{key_added}_split"]``.
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets these fields:

    ``adata.uns[key_added]["sae"]`` : dict
        ``config`` (``d_in``, ``d_out``, ``n_features``, ``activation``, ``k``, ``skip``) and the
        weights ``W_enc`` (concepts x d), ``b_enc``, ``W_dec`` (concepts x d), ``b_dec``,
        float32 arrays, in scaled units (``x * scale``).
    ``adata.uns[key_added]["metrics"]`` : dict
        Floats: ``train_fvu``, ``train_r2``, ``train_l0``, ``validation_fvu``,
        ``validation_r2`` (``1 - fvu``: the fraction of the embedding's variance around its
        mean that the reconstruction explains), ``validation_l0`` (mean active concepts per
        cell), ``dead_fraction`` (concepts active in no cell) and ``train_dead_fraction``
        (not active in the last tenth of training).
    ``adata.uns[key_added]["params"]`` : dict
        ``use_rep``, ``embedding_key`` (the :func:`cell_embeddings` record of ``use_rep``, or
        ``""``), ``config`` (the :class:`~sctranscoder.core.training.TrainingConfig`,
        ``to_dict()``), ``scale``, ``lr``, ``steps``, ``cells_seen``, ``train_seconds``,
        ``n_train``, ``n_validation``, ``device`` and ``activations_key``.
    ``adata.uns[key_added]["weights_id"]`` : str
        A new id for these weights, recorded by the activation record as ``params["sae_id"]``.
    ``adata.obs[f"{key_added}_split"]`` : categorical
        ``"train"`` or ``"validation"``.
    ``adata.obsm[f"X_{key_added}"]`` : :class:`scipy.sparse.csr_matrix`, float32
        Cells x concepts activations.
    ``adata.uns[f"{key_added}_activations"]`` : dict
        The activation record: ``obsm_keys`` (``{"layer_0": f"X_{key_added}"}``),
        ``firing_rate`` (``{"layer_0": fraction of cells in which each concept is active}``)
        and ``params`` (``sae_key``, ``sae_id``, ``use_rep``, ``layers`` ``[0]``,
        ``live_threshold``, ``n_top``, ``genes`` (False until :func:`concept_attribution`),
        ``n_tokens`` and ``n_cells``: the number of cells).

    Examples
    --------
    >>> sct.tl.train_sae(adata, use_rep="X_pca", expansion_factor=8, k=8)
    >>> sct.tl.rank_features_groups(adata, groupby="bulk_labels", activations_key="sae_activations")
    """
    X, is_val, batch, device, progress = _settings(
        adata,
        use_rep,
        k=k,
        n_steps=n_steps,
        batch_size=batch_size,
        lr=lr,
        auxk_alpha=auxk_alpha,
        validation_fraction=validation_fraction,
        seed=seed,
        device=device,
        progress=progress,
    )
    check_positive_int(expansion_factor, "expansion_factor")
    _check_k(k, expansion_factor, X.shape[1], use_rep)
    live_threshold = check_live_threshold(live_threshold)
    copy = check_bool(copy, "copy")
    check_copy_backed(adata, copy)
    split = Key.split(key_added)
    check_key(key_added, adata=adata, kind="sae", obs_columns=[split])
    activations_key = check_key(
        Key.activations(key_added), "key_added", adata=adata, kind="activations"
    )
    obsm_key = Key.obsm(key_added)
    if obsm_key == use_rep:
        raise ValueError(
            f"key_added={key_added!r} would write the concepts over the embedding "
            f"adata.obsm[{use_rep!r}] they are trained on: choose another key_added."
        )
    check_obsm_free(adata, obsm_key, key_added, "sae")
    config = _config(expansion_factor, k, n_steps, batch, lr, auxk_alpha, seed, validation_fraction)
    start = logg.info(
        f"training an SAE on adata.obsm[{use_rep!r}] ({X.shape[1]} dimensions, "
        f"{config.expansion_factor * X.shape[1]} concepts, k={k}) on {int((~is_val).sum())} cells"
    )
    fit = fit_sae(X, is_val, config, device=device, progress=progress)
    acts = encode(fit.sae, X, fit.scale)
    weights_id = uuid.uuid4().hex
    found = embedding_record(adata, use_rep)
    rec = {
        "params": {
            "use_rep": use_rep,
            "embedding_key": found[0] if found else "",
            "config": config.to_dict(),
            "scale": float(fit.scale),
            "lr": float(fit.log.lr),
            "steps": int(fit.log.steps),
            "cells_seen": int(fit.log.tokens),
            "train_seconds": float(fit.log.seconds),
            "n_train": int((~is_val).sum()),
            "n_validation": int(is_val.sum()),
            "device": str(device),
            "activations_key": activations_key,
        },
        "sae": {"config": fit.sae.config.to_dict(), **fit.sae.to_numpy()},
        "metrics": {name: float(value) for name, value in fit.metrics.items()},
        "weights_id": weights_id,
    }
    layer = Key.layer(SAE_LAYER)
    act_rec = {
        "params": {
            "sae_key": key_added,
            "sae_id": weights_id,
            "use_rep": use_rep,
            "layers": np.asarray([SAE_LAYER], dtype=np.int64),
            "live_threshold": float(live_threshold),
            "n_top": N_TOP,
            "genes": False,
            "n_tokens": int(adata.n_obs),
            "n_cells": int(adata.n_obs),
        },
        "obsm_keys": {layer: obsm_key},
        "firing_rate": {layer: np.asarray((acts > 0).mean(0), dtype=np.float64).ravel()},
    }
    if copy:
        adata = adata.copy()
    adata.uns[key_added] = rec
    adata.uns[activations_key] = act_rec
    adata.obsm[obsm_key] = acts
    adata.obs[split] = pd.Categorical(
        np.where(is_val, "validation", "train"), categories=["train", "validation"]
    )
    m = fit.metrics
    logg.info(
        f"    finished: validation R^2 {m['validation_r2']:.3f}, L0 {m['validation_l0']:.1f}, "
        f"dead {m['dead_fraction']:.1%}",
        time=start,
        deep=f"added\n    {key_added!r}, SAE weights, params, metrics (adata.uns)\n"
        f"    {activations_key!r}, activation record of the concepts (adata.uns)\n"
        f"    {obsm_key!r}, cells x concepts activations (adata.obsm)\n"
        f"    {split!r}, train/validation split (adata.obs)",
    )
    return adata if copy else None


def sae_sweep(
    adata: AnnData,
    *,
    use_rep: str,
    expansion_factors: Sequence[int] = (1, 2, 4, 8, 16),
    k: int = 8,
    n_steps: int = 2000,
    batch_size: int = 256,
    lr: float | None = None,
    auxk_alpha: float = 1 / 32,
    validation_fraction: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    key_added: str = Key.sae_sweep,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Reconstruction R^2 of SAEs of growing width on one embedding (Claye et al., Figure 2).

    One SAE per expansion factor, each trained as :func:`train_sae` trains one (same split,
    seed, ``k`` and steps), evaluated on the training and validation cells; only the table is
    kept. Plot it with :func:`sctranscoder.pl.sae_sweep`, which draws several sweeps (say
    ``X_pca`` beside ``X_c2s``) side by side.

    Parameters
    ----------
    adata
        Annotated data with the embedding in ``adata.obsm[use_rep]``.
    use_rep
        ``adata.obsm`` key of the embedding.
    expansion_factors
        Concepts per embedding dimension, one SAE each (distinct positive integers; the
        smallest times the width must be at least ``k``).
    k, n_steps, batch_size, lr, auxk_alpha, validation_fraction, seed, device
        As in :func:`train_sae`.
    key_added
        ``adata.uns`` key of the result.
    progress
        Show a progress bar per SAE.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``adata.uns[key_added]``:

    ``sweep`` : :class:`pandas.DataFrame`
        One row per expansion factor: ``expansion_factor``, ``n_concepts``, ``k``,
        ``train_r2``, ``validation_r2``, ``train_fvu``, ``validation_fvu``, ``validation_l0``,
        ``dead_fraction`` (concepts active in no cell), ``seconds`` (training).
    ``params`` : dict
        ``use_rep``, ``expansion_factors`` (int array), ``k``, ``n_steps``, ``batch_size``,
        ``lr`` (or ``"default"``), ``auxk_alpha``, ``validation_fraction``, ``seed``,
        ``n_cells``, ``n_dims``, ``device``.
    """
    X, is_val, batch, device, progress = _settings(
        adata,
        use_rep,
        k=k,
        n_steps=n_steps,
        batch_size=batch_size,
        lr=lr,
        auxk_alpha=auxk_alpha,
        validation_fraction=validation_fraction,
        seed=seed,
        device=device,
        progress=progress,
    )
    factors = [expansion_factors] if isinstance(expansion_factors, int) else expansion_factors
    factors = [check_positive_int(f, "expansion_factors") for f in factors]
    if not factors or len(set(factors)) != len(factors):
        raise ValueError(
            f"expansion_factors must be distinct positive integers, e.g. (1, 2, 4, 8), got "
            f"{expansion_factors!r}."
        )
    factors = sorted(factors)
    _check_k(k, factors[0], X.shape[1], use_rep)
    copy = check_bool(copy, "copy")
    check_copy_backed(adata, copy)
    check_key(key_added, adata=adata, kind="sae sweep")
    start = logg.info(f"SAE sweep on adata.obsm[{use_rep!r}]: expansion factors {factors}")
    rows = []
    for factor in factors:
        config = _config(factor, k, n_steps, batch, lr, auxk_alpha, seed, validation_fraction)
        t0 = time.perf_counter()
        fit = fit_sae(X, is_val, config, device=device, progress=progress)
        m = fit.metrics
        rows.append(
            {
                "expansion_factor": factor,
                "n_concepts": fit.sae.config.n_features,
                "k": int(k),
                "train_r2": m["train_r2"],
                "validation_r2": m["validation_r2"],
                "train_fvu": m["train_fvu"],
                "validation_fvu": m["validation_fvu"],
                "validation_l0": m["validation_l0"],
                "dead_fraction": m["dead_fraction"],
                "seconds": time.perf_counter() - t0,
            }
        )
        logg.info(f"    expansion {factor}: validation R^2 {m['validation_r2']:.3f}")
    table = pd.DataFrame(rows)
    table.index = [f"x{f}" for f in factors]
    params = {
        "use_rep": use_rep,
        "expansion_factors": np.asarray(factors, dtype=np.int64),
        "k": int(k),
        "n_steps": int(n_steps),
        "batch_size": int(batch),
        "lr": "default" if lr is None else float(lr),
        "auxk_alpha": float(auxk_alpha),
        "validation_fraction": float(validation_fraction),
        "seed": int(seed),
        "n_cells": int(adata.n_obs),
        "n_dims": int(X.shape[1]),
        "device": str(device),
    }
    if copy:
        adata = adata.copy()
    adata.uns[key_added] = {"params": params, "sweep": table}
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, R^2 by expansion factor (adata.uns)",
    )
    return adata if copy else None
