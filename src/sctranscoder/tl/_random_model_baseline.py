"""Chance baseline of interpretability: the same pipeline on a randomly initialised model."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import pandas as pd

from .._constants import Key
from .._genesets import gene_sets as load_gene_sets
from .._genesets import source_name
from .._store import model_record, resolve_model, sct_uns
from ..core.model import random_like
from ._annotate_features import INTERPRETABILITY, annotate_features
from ._feature_genes import feature_genes, features_record
from ._train_transcoders import train_transcoders

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.model import C2SModel

logger = logging.getLogger(__name__)

#: ``adata.uns[key]`` entry written by :func:`random_model_baseline`.
RANDOM_MODEL = "random_model_baseline"
#: Training parameters copied from the real transcoders.
_TRAIN_PARAMS = (
    "activation",
    "expansion_factor",
    "k",
    "skip",
    "l1_coefficient",
    "lr",
    "batch_size",
    "n_tokens",
    "prompt_batch_size",
    "validation_fraction",
    "seed",
)
#: Summary columns copied from the random model's summary, with a ``random_model_`` prefix.
_COPIED = {
    "total_live": "random_model_live",
    "interpretable": "random_model_interpretable",
    "fraction": "random_model_fraction",
    "gsea_interpretable": "random_model_gsea_interpretable",
    "gsea_fraction": "random_model_gsea_fraction",
}
#: What ``annotate_features`` records for a gene-set source it cannot store.
_UNSTORED_SOURCES = {"dict", "DataFrame", "OrderedDict", "defaultdict", "MappingProxyType"}


def random_model_baseline(
    adata: AnnData,
    gene_sets: Mapping[str, Iterable[str]] | str | os.PathLike | pd.DataFrame | None = None,
    *,
    model: C2SModel | str | None = None,
    seed: int = 0,
    n_tokens: int | None = None,
    allow_network: bool = False,
    key: str = Key.uns,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Interpretability of transcoders trained on a randomly initialised copy of the model.

    "X% of live features are interpretable" means little until it is read against a model that
    learned nothing. This runs the whole pipeline again, with the parameters recorded by
    :func:`train_transcoders`, :func:`feature_genes` and :func:`annotate_features`, on the same
    cells and sentences, but with a model of the same architecture and tokenizer whose weights are
    freshly initialised (:func:`~sctranscoder.core.model.random_like`): transcoders are trained
    on its MLPs, the genes of their features are collected and enriched in the same gene sets.
    What a random model reaches comes from the embeddings of gene symbols and from the sentences
    themselves, not from anything the model learned. ``adata``'s own results are not changed;
    only the summary gains columns.

    Parameters
    ----------
    adata
        Annotated data after :func:`annotate_features`.
    gene_sets
        The gene sets given to :func:`annotate_features`. Default: the recorded source when it was
        a name, path or ``"markers:<obs column>"``; a dict or DataFrame must be passed again.
    model
        The trained base model (default: the one recorded with the transcoders); only its
        architecture, tokenizer and prompt settings are used.
    seed
        Seed of the random initialisation.
    n_tokens
        Training tokens per layer (default: those of the real transcoders).
    allow_network
        Let a named gene set library be downloaded.
    key
        ``adata.uns`` key of the transcoders.
    progress
        Show progress bars.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets:

    ``adata.uns[key]["interpretability"]`` : :class:`~pandas.DataFrame`
        Gains ``random_model_live`` (live features), ``random_model_interpretable`` and
        ``random_model_fraction`` (and, when :func:`annotate_features` ran preranked GSEA,
        ``random_model_gsea_interpretable`` and ``random_model_gsea_fraction``) per layer.
    ``adata.uns[key]["random_model_baseline"]`` : dict
        ``params`` (``seed``, ``n_tokens``, ``gene_sets``, ``model_name``, ``seconds``), ``model``
        (the random model's record, with its fingerprint), ``metrics`` (per-layer ``fvu``, ``l0``
        and ``dead_fraction`` of its transcoders on the validation cells) and ``summary`` (the
        random model's own interpretability table).
    """
    record = sct_uns(adata, key)
    features = features_record(adata, key)
    if "annotation" not in features or INTERPRETABILITY not in record:
        raise KeyError(
            f"No interpretability summary under adata.uns[{key!r}]: run "
            "`sct.tl.annotate_features(adata, gene_sets)` first; the baseline repeats it."
        )
    ann = dict(features["annotation"]["params"])
    if gene_sets is None:
        stored = str(ann.get("gene_sets", ""))
        if not stored or stored in _UNSTORED_SOURCES:
            raise ValueError(
                "annotate_features was given gene sets as a "
                f"{stored or 'non-storable object'}, which is not recorded: pass the same "
                "gene_sets to random_model_baseline."
            )
        gene_sets = stored
    if n_tokens is not None and n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}.")
    train = dict(record["params"])
    missing = [p for p in _TRAIN_PARAMS if p not in train and p != "lr"]
    if missing:
        raise KeyError(
            f"adata.uns[{key!r}]['params'] lacks {missing}: retrain with sct.tl.train_transcoders."
        )
    summary = record[INTERPRETABILITY]
    layers = [int(x) for x in summary["layer"]]
    real = resolve_model(adata, key, model)
    # resolve the sets on the real data once ("markers:" needs its expression values)
    sets = load_gene_sets(
        gene_sets, adata=adata, min_size=1, max_size=10**9, allow_network=allow_network
    )

    # --- compute, on a scratch AnnData that holds only the sentences
    import anndata as ad

    start = time.perf_counter()
    random = random_like(real, seed=seed)
    sentence_key = str(train.get("sentence_key", Key.sentence))
    scratch = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    scratch.obs[sentence_key] = adata.obs[sentence_key].to_numpy()
    kwargs = {p: train[p] for p in _TRAIN_PARAMS if p in train}
    kwargs["n_tokens"] = int(n_tokens if n_tokens is not None else train["n_tokens"])
    for p in ("expansion_factor", "k", "batch_size", "n_tokens", "prompt_batch_size", "seed"):
        kwargs[p] = int(kwargs[p])
    for p in ("l1_coefficient", "lr", "validation_fraction"):
        if p in kwargs:
            kwargs[p] = float(kwargs[p])
    kwargs["skip"] = bool(kwargs["skip"])
    kwargs["activation"] = str(kwargs["activation"])
    logger.info("random-model baseline: training transcoders on %s", random.name)
    train_transcoders(
        scratch,
        random,
        layers=layers,
        sentence_key=sentence_key,
        progress=progress,
        **kwargs,
    )
    fparams = features["params"]
    feature_genes(
        scratch,
        random,
        layers=layers,
        n_top=int(fparams["n_top"]),
        live_threshold=float(fparams["live_threshold"]),
        progress=progress,
    )
    annotate_kwargs = {
        "n_top_genes": int(ann["n_top_genes"]),
        "fdr": float(ann["fdr"]),
        "live_threshold": float(ann["live_threshold"]),
        "min_size": int(ann["min_size"]),
        "max_size": int(ann["max_size"]),
        "baseline": None,
        "seed": int(ann["seed"]),
    }
    if "method" in ann:
        annotate_kwargs["method"] = str(ann["method"])
    if "permutations" in ann:
        annotate_kwargs["permutations"] = int(ann["permutations"])
    if "gsea_weight" in ann:
        annotate_kwargs["gsea_weight"] = float(ann["gsea_weight"])
    annotate_features(scratch, sets, **annotate_kwargs)
    theirs = scratch.uns[Key.uns][INTERPRETABILITY].set_index("layer")
    seconds = time.perf_counter() - start

    table = summary.copy()
    for src, dst in _COPIED.items():
        if src in theirs.columns:
            table[dst] = theirs.loc[table["layer"].to_numpy(), src].to_numpy(dtype=float)
    metrics = scratch.uns[Key.uns]["metrics"]["layers"][["layer", "fvu", "l0", "dead_fraction"]]
    out = {
        "params": {
            "seed": int(seed),
            "n_tokens": int(kwargs["n_tokens"]),
            "gene_sets": source_name(gene_sets),
            "model_name": str(random.name),
            "seconds": float(seconds),
        },
        "model": model_record(random),
        "metrics": metrics.copy(),
        "summary": scratch.uns[Key.uns][INTERPRETABILITY].copy(),
    }

    if copy:
        adata = adata.copy()
    adata.uns[key][INTERPRETABILITY] = table
    adata.uns[key][RANDOM_MODEL] = out
    for layer, frac, base in zip(
        table["layer"], table["fraction"], table["random_model_fraction"], strict=True
    ):
        logger.info(
            "layer %d: %.1f%% interpretable, random-init model %.1f%%",
            layer,
            100 * frac,
            100 * base,
        )
    logger.info(
        "random-model baseline in %.0fs\n    added columns %s to adata.uns[%r]['interpretability'] "
        "and 'random_model_baseline' (adata.uns[%r])",
        seconds,
        [c for c in _COPIED.values() if c in table.columns],
        key,
        key,
    )
    return adata if copy else None
