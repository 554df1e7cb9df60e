"""Chance baseline of interpretability: the same pipeline on a randomly initialised model."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pandas as pd
from scanpy import logging as logg

from .._constants import Key
from .._genesets import gene_sets as load_gene_sets
from .._genesets import source_name
from .._records import (
    activations_record,
    check_key,
    record,
    resolve_model,
    training_config,
    transcoder_record,
)
from .._validate import check_copy_backed, check_positive_int
from ..core.model import random_like
from ._annotate_features import annotate_features
from ._feature_activations import feature_activations
from ._train_transcoders import train_transcoders

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Mapping

    from anndata import AnnData

    from ..core.model import C2SModel

#: What annotations of sctranscoder 0.1 recorded for sources they could not store.
_UNSTORED_SOURCES = {"dict", "DataFrame", "OrderedDict", "defaultdict", "MappingProxyType"}
#: Annotation parameters passed again, as recorded.
_ANNOTATION_PARAMS = ("method", "n_top", "fdr", "live_threshold", "min_size", "max_size", "seed")


def random_model_baseline(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    gene_sets: Mapping[str, Iterable[str]] | str | os.PathLike | pd.DataFrame | None = None,
    annotation_key: str = Key.derived(Key.activations(Key.transcoders), "annotation"),
    seed: int = 0,
    n_tokens: int | None = None,
    allow_network: bool = False,
    key_added: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Interpretability of transcoders trained on a randomly initialised copy of the model.

    "X% of live features are interpretable" means little until it is read against a model that
    learned nothing. This runs the whole pipeline again, with the recorded settings of
    :func:`train_transcoders` (its :class:`~sctranscoder.core.training.TrainingConfig`),
    :func:`feature_activations` and :func:`annotate_features`, on the same cells and sentences,
    but with a model of the same architecture and tokenizer whose weights are freshly initialised
    (:func:`~sctranscoder.core.model.random_like`). What a random model reaches comes from the
    embeddings of gene symbols and from the sentences themselves, not from anything the model
    learned. ``adata``'s own results are not changed; read both side by side with
    :func:`sctranscoder.get.interpretability` or :func:`sctranscoder.pl.interpretability`.

    Parameters
    ----------
    adata
        Annotated data after :func:`annotate_features`.
    model
        The trained base model (default: the one recorded with the transcoders); only its
        architecture, tokenizer and prompt settings are used.
    gene_sets
        The gene sets given to :func:`annotate_features`. Default: the recorded source when it was
        a name, path or ``"markers:<obs column>"``; a dict or DataFrame must be passed again.
    annotation_key
        ``adata.uns`` key of the annotation to repeat.
    seed
        Seed of the random initialisation.
    n_tokens
        Training tokens per layer (default: those of the real transcoders).
    allow_network
        Let a named gene set library be downloaded.
    key_added
        ``adata.uns`` key of the result; default ``"<stem>_random_model"`` of the annotation
        (``"sct_random_model"`` for ``"sct_annotation"``).
    progress
        Show progress bars.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``adata.uns[key_added]``, a dict:

    ``summary`` : :class:`~pandas.DataFrame`
        The random model's per-layer summary, with the columns of the annotation's.
    ``metrics`` : :class:`~pandas.DataFrame`
        Per layer ``layer``, ``fvu``, ``l0`` and ``dead_fraction`` of its transcoders on the
        validation cells.
    ``model`` : dict
        The random model's record, with its fingerprint.
    ``params`` : dict
        ``annotation_key``, ``seed``, ``n_tokens``, ``gene_sets``, ``model_name``, ``seconds``.
    """
    ann = record(adata, annotation_key, kind="annotation", hint="run `sct.tl.annotate_features`.")
    if "summary" not in ann:
        raise KeyError(f"adata.uns[{annotation_key!r}] is not an annotation record.")
    params = dict(ann["params"])
    acts_key = str(params["activations_key"])
    acts = activations_record(adata, acts_key)
    tc_key = str(acts["params"]["transcoders_key"])
    config = training_config(transcoder_record(adata, tc_key))
    if n_tokens is not None:
        config = config.replace(n_tokens=check_positive_int(n_tokens, "n_tokens"))
    record_key = check_key(
        key_added if key_added is not None else Key.derived(annotation_key, "random_model"),
        adata=adata,
        kind="random model baseline",
    )
    check_copy_backed(adata, copy)
    gene_sets = _recorded_gene_sets(gene_sets, params)
    real = resolve_model(adata, tc_key, model)
    # resolved on the real data once ("markers:" needs its expression values)
    sets = load_gene_sets(
        gene_sets, adata=adata, min_size=1, max_size=10**9, allow_network=allow_network
    )

    start = logg.info("random-model baseline: training transcoders on a random-init model")
    t0 = time.perf_counter()
    random = random_like(real, seed=seed)
    scratch = _scratch(adata, str(acts["params"]["sentence_key"]))
    layers = [int(x) for x in ann["summary"]["layer"]]
    train_transcoders(
        scratch,
        random,
        config=config,
        layers=layers,
        sentence_key=str(acts["params"]["sentence_key"]),
        progress=progress,
    )
    feature_activations(
        scratch,
        random,
        aggregate=str(acts["params"]["aggregate"]),
        progress=progress,
        live_threshold=float(acts["params"]["live_threshold"]),
        n_top=int(acts["params"]["n_top"]),
    )
    annotate_features(
        scratch,
        gene_sets=sets,
        baseline=None,
        tables=False,  # only the summary (and best sets) are kept
        permutations=int(params.get("permutations", 1000)),
        gsea_weight=float(params.get("gsea_weight", 0.0)),
        **{k: params[k] for k in _ANNOTATION_PARAMS},
    )
    theirs = scratch.uns[Key.derived(Key.activations(Key.transcoders), "annotation")]
    metrics = scratch.uns[Key.transcoders]["metrics"]["layers"]
    out = {
        "params": {
            "annotation_key": annotation_key,
            "seed": int(seed),
            "n_tokens": int(config.n_tokens),
            "gene_sets": source_name(gene_sets),
            "model_name": str(random.name),
            "seconds": float(time.perf_counter() - t0),
        },
        "model": random.record(),
        "metrics": metrics[["layer", "fvu", "l0", "dead_fraction"]].copy(),
        "summary": theirs["summary"].copy(),
    }
    if copy:
        adata = adata.copy()
    adata.uns[record_key] = out
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {record_key!r}, the random model's summary and metrics (adata.uns)",
    )
    return adata if copy else None


def _recorded_gene_sets(gene_sets, params: dict):
    """``gene_sets``, or the source recorded by the annotation when it can be loaded again."""
    if gene_sets is not None:
        return gene_sets
    stored = str(params.get("gene_sets", ""))
    reloadable = bool(params.get("gene_sets_reloadable", stored not in _UNSTORED_SOURCES))
    if not stored or not reloadable:
        raise ValueError(
            f"annotate_features was given gene sets as a {stored or 'non-storable object'}, "
            "which is not recorded: pass the same gene_sets to random_model_baseline."
        )
    return stored


def _scratch(adata: AnnData, sentence_key: str) -> AnnData:
    """An AnnData holding only the cells' sentences: where the random model's results go."""
    import anndata as ad

    scratch = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    scratch.obs[sentence_key] = adata.obs[sentence_key].to_numpy()
    if sentence_key in adata.uns:  # their record: prompts name the sentences' organism
        scratch.uns[sentence_key] = adata.uns[sentence_key]
    return scratch
