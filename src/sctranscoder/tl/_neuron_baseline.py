"""Baseline of interpretability: the same pipeline on the MLP's own neurons."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
from scanpy import logging as logg

from .._constants import Key, neuron_names
from .._genesets import gene_sets as load_gene_sets
from .._genesets import source_name
from .._records import (
    activations_record,
    cell_prompts,
    check_key,
    record,
    record_kind,
    resolve_model,
    transcoder_record,
)
from .._validate import (
    check_bool,
    check_copy_backed,
    check_positive_int,
    check_sentences_unique,
)
from ..core.activations import collect_activations
from ..core.neurons import mlp_parts, neuron_bases
from ..get._features import feature_table
from ._annotate_features import annotate_features
from ._random_model_baseline import _ANNOTATION_PARAMS, _recorded_gene_sets

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Mapping

    from anndata import AnnData

    from ..core.model import C2SModel

#: Where the neurons' activations and annotation go on the scratch AnnData.
_SCRATCH_ACTIVATIONS = "neurons_activations"
_SCRATCH_ANNOTATION = "neurons_annotation"


def neuron_baseline(
    adata: AnnData,
    model: C2SModel | str | None = None,
    *,
    gene_sets: Mapping[str, Iterable[str]] | str | os.PathLike | pd.DataFrame | None = None,
    annotation_key: str = Key.derived(Key.activations(Key.transcoders), "annotation"),
    keep_activations: bool = False,
    batch_size: int = 32,
    allow_network: bool = False,
    key_added: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Interpretability of the MLP's own neurons, with the settings of an annotation.

    Are transcoder features easier to read than the units they replace? This runs the pipeline
    of :func:`feature_activations` and :func:`annotate_features` on the neurons of each
    annotated layer's MLP: its hidden units after the activation function
    (:class:`~sctranscoder.core.neurons.NeuronBasis`; GPT-NeoX ``act(dense_h_to_4h(x))``,
    gated MLPs ``act(gate_proj(x)) * up_proj(x)``), computed from the MLP's input with the
    model's own weights. Same cells, sentences and layers, the recorded activation settings
    (``aggregate``, ``n_top``, ``live_threshold``) and annotation settings (``method``,
    ``n_top``, ``fdr``, set sizes, ``seed``, ``n_shuffles``, ``permutations``,
    ``gsea_weight``), and the shuffled-gene-label baseline, so the neurons get their own chance
    level. ``adata``'s own results are not changed; read both side by side with
    :func:`sctranscoder.get.interpretability` or :func:`sctranscoder.pl.interpretability`.

    A neuron *fires* on a token where its value is positive. GELU and gated units also take
    negative values; as for transcoder features, the activation tables (firing rate, per-cell
    and per-gene activations) keep the positive part only.

    Neurons are dense: every one has a value at every token, and about half of them are
    positive. The genes x neurons tables (counts and sums, two per layer) take up to
    ``n_genes x hidden width x 8`` bytes per layer, and one batch's per-gene maxima
    ``batch_size x genes per sentence x hidden width x 12`` bytes; lower ``batch_size`` for wide
    MLPs. The cells x neurons matrices (``n_cells x hidden width``, about half non-zero) are
    only kept with ``keep_activations``.

    Parameters
    ----------
    adata
        Annotated data after :func:`annotate_features`.
    model
        The base model (default: the one recorded with the transcoders; its fingerprint must
        match).
    gene_sets
        The gene sets given to :func:`annotate_features`. Default: the recorded source when it was
        a name, path or ``"markers:<obs column>"``; a dict or DataFrame must be passed again.
    annotation_key
        ``adata.uns`` key of the annotation to repeat on the neurons.
    keep_activations
        Also write each layer's cells x neurons activations into ``adata.obsm``.
    batch_size
        Cells per forward pass.
    allow_network
        Let a named gene set library be downloaded.
    key_added
        ``adata.uns`` key of the result; default ``"<stem>_neurons"`` of the annotation
        (``"sct_neurons"`` for ``"sct_annotation"``).
    progress
        Show a progress bar.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``adata.uns[key_added]``, a dict:

    ``summary`` : :class:`~pandas.DataFrame`
        The neurons' per-layer summary, with the columns of the annotation's (``layer``,
        ``total_live``, ``ora_*`` and/or ``gsea_*``, with the shuffled-label baseline).
    ``features`` : dict of :class:`~pandas.DataFrame`
        Per ``"layer_<i>"``, one row per neuron (index ``"L<i>N<j>"``): the columns of
        :func:`sctranscoder.get.feature_table` (``firing_rate``, ``log10_firing_rate``,
        ``live``, ``n_genes``, ``top_genes``, ``top_gene_counts``, and the ``ora_*``/``gsea_*``
        columns of :func:`annotate_features`).
    ``model`` : dict
        The base model's record, with its fingerprint.
    ``params`` : dict
        ``annotation_key``, ``activations_key``, ``layers``, ``n_neurons`` (int array, hidden
        width per layer), ``aggregate``, ``n_top`` and ``live_threshold`` (the activation
        settings used), ``gene_sets``, ``model_name``, ``model_fingerprint``, ``n_tokens``,
        ``n_cells``, ``obsm_keys`` (per ``"layer_<i>"``, the ``obsm`` key below; empty without
        ``keep_activations``) and ``seconds``.

    With ``keep_activations``, also

    ``adata.obsm[f"X_{key_added}_L{layer}"]`` : :class:`scipy.sparse.csr_matrix`, float32
        Cells x neurons activations of each layer (aggregated as the transcoder activations
        were; positive parts only), e.g. ``"X_sct_neurons_L2"``.
    """
    ann = record(adata, annotation_key, kind="annotation", hint="run `sct.tl.annotate_features`.")
    if "summary" not in ann:
        raise KeyError(f"adata.uns[{annotation_key!r}] is not an annotation record.")
    params = dict(ann["params"])
    acts_key = str(params["activations_key"])
    acts = dict(activations_record(adata, acts_key)["params"])
    tc_key = str(acts["transcoders_key"])
    keep_activations = check_bool(keep_activations, "keep_activations")
    check_positive_int(batch_size, "batch_size")
    allow_network = check_bool(allow_network, "allow_network")
    progress = check_bool(progress, "progress")
    copy = check_bool(copy, "copy")
    record_key = check_key(
        key_added if key_added is not None else Key.derived(annotation_key, "neurons"),
        adata=adata,
        kind="neuron baseline",
    )
    check_copy_backed(adata, copy)
    layers = [int(x) for x in ann["summary"]["layer"]]
    obsm_keys = (
        {Key.layer(la): Key.obsm_activations(record_key, la) for la in layers}
        if keep_activations
        else {}
    )
    _check_obsm_free(adata, record_key, obsm_keys)
    gene_sets = _recorded_gene_sets(gene_sets, params)
    model = resolve_model(adata, tc_key, model)
    mlp_parts(model.model)  # a family whose neurons we cannot read is refused before the work
    sentence_key = str(acts["sentence_key"])
    cells, model = cell_prompts(
        adata, sentence_key, model, trained=transcoder_record(adata, tc_key)["model"]
    )
    check_sentences_unique(cells, adata.obs_names, sentence_key)
    # resolved on the real data once ("markers:" needs its expression values)
    sets = load_gene_sets(
        gene_sets, adata=adata, min_size=1, max_size=10**9, allow_network=allow_network
    )

    start = logg.info(f"neuron baseline: the MLP neurons of layers {layers}")
    t0 = time.perf_counter()
    bases = neuron_bases(model.model, layers)
    tables = collect_activations(
        model,
        bases,
        cells,
        batch_size=int(batch_size),
        aggregate=str(acts["aggregate"]),
        genes=True,
        cells=keep_activations,
        progress=progress,
    )
    scratch = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    scratch.uns[_SCRATCH_ACTIVATIONS] = {
        "params": {
            "aggregate": str(acts["aggregate"]),
            "live_threshold": float(acts["live_threshold"]),
            "n_top": int(acts["n_top"]),
            "genes": True,
        },
        "obsm_keys": {Key.layer(la): Key.obsm_activations("neurons", la) for la in layers},
        "firing_rate": {Key.layer(la): tables.firing_rate[la] for la in layers},
        "genes": {
            "names": np.asarray(tables.genes, dtype=str),
            "n_cells": tables.gene_cells,
            "counts": {Key.layer(la): tables.gene_counts[la] for la in layers},
            "sums": {Key.layer(la): tables.gene_sums[la] for la in layers},
        },
    }
    annotate_features(
        scratch,
        gene_sets=sets,
        activations_key=_SCRATCH_ACTIVATIONS,
        key_added=_SCRATCH_ANNOTATION,
        baseline="shuffled",
        n_shuffles=int(params.get("n_shuffles", 1)),
        tables=False,  # only the summary and each neuron's best set are kept
        permutations=int(params.get("permutations", 1000)),
        gsea_weight=float(params.get("gsea_weight", 0.0)),
        **{k: params[k] for k in _ANNOTATION_PARAMS},
    )
    features = {}
    for la in layers:
        table = feature_table(
            scratch,
            la,
            activations_key=_SCRATCH_ACTIVATIONS,
            annotation_key=_SCRATCH_ANNOTATION,
        )
        table.index = pd.Index(neuron_names(la, len(table)))
        features[Key.layer(la)] = table
    out = {
        "params": {
            "annotation_key": annotation_key,
            "activations_key": acts_key,
            "layers": np.asarray(layers, dtype=np.int64),
            "n_neurons": np.asarray([bases[la].config.n_features for la in layers], np.int64),
            "aggregate": str(acts["aggregate"]),
            "n_top": int(acts["n_top"]),
            "live_threshold": float(acts["live_threshold"]),
            "gene_sets": source_name(gene_sets),
            "model_name": str(model.name),
            "model_fingerprint": str(model.fingerprint),
            "n_tokens": int(tables.n_tokens),
            "n_cells": int(adata.n_obs),
            "obsm_keys": obsm_keys,
            "seconds": float(time.perf_counter() - t0),
        },
        "model": model.record(),
        "features": features,
        "summary": scratch.uns[_SCRATCH_ANNOTATION]["summary"].copy(),
    }
    if copy:
        adata = adata.copy()
    old = adata.uns.get(record_key)
    if record_kind(old) == "neuron baseline":  # replaced: drop the matrices it wrote and we do not
        for stale in set(_obsm_keys_of(old).values()) - set(obsm_keys.values()):
            adata.obsm.pop(stale, None)
    for la in layers if keep_activations else []:
        adata.obsm[obsm_keys[Key.layer(la)]] = tables.cells[la]
    adata.uns[record_key] = out
    added = f"    {list(obsm_keys.values())}, cells x neurons activations (adata.obsm)\n"
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n{added if obsm_keys else ''}    {record_key!r}, the neurons' summary "
        "and per-neuron tables (adata.uns)",
    )
    return adata if copy else None


def _obsm_keys_of(rec: dict) -> dict[str, str]:
    """The ``obsm`` keys a neuron baseline record wrote."""
    return {str(k): str(v) for k, v in dict(rec.get("params", {}).get("obsm_keys", {})).items()}


def _check_obsm_free(adata: AnnData, record_key: str, obsm_keys: dict[str, str]) -> None:
    """Refuse to replace ``obsm`` matrices that the record of this name did not write."""
    old = adata.uns.get(record_key)
    ours = set(_obsm_keys_of(old).values()) if record_kind(old) == "neuron baseline" else set()
    taken = [k for k in obsm_keys.values() if k in adata.obsm and k not in ours]
    if taken:
        raise ValueError(
            f"keep_activations would replace adata.obsm entries {taken}, which "
            f"adata.uns[{record_key!r}] did not write: choose another key_added."
        )
