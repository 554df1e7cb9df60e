"""Bad input, function by function: every public tool refuses it with a clear error (its type and
what to do) before anything is written, so the AnnData is left exactly as it was.

Each case names the public function, the argument and the kind of mistake; the test checks the
error type, a fragment of the message, and that no key of ``uns``/``obs``/``obsm``/``varm``/
``obsp`` (nor the object of any existing ``uns`` record) changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import MARKERS

import sctranscoder as sct

if TYPE_CHECKING:
    from collections.abc import Callable

LAYER = 2


@dataclass(frozen=True)
class Case:
    """``call(adata, ctx)`` must raise ``error`` matching ``match``; ``ctx`` has the cell, a
    feature, the circuit key and ``tmp`` (a fresh temporary directory).
    """

    function: str
    kind: str
    call: Callable[[ad.AnnData, dict], Any]
    error: type[BaseException]
    match: str

    @property
    def id(self) -> str:
        return f"{self.function}-{self.kind}"


@pytest.fixture(scope="module")
def base(everything):
    return everything[0]


@pytest.fixture
def ctx(everything, tmp_path):
    adata, cell = everything
    X = adata.obsm[f"X_sct_L{LAYER}"]
    feature = int(np.asarray(X[0].todense()).ravel().argmax())
    return {
        "cell": cell,
        "circuit": f"circuit_{cell}",
        "feature": f"L{LAYER}F{feature}",
        "tmp": tmp_path,
    }


def _state(adata: ad.AnnData) -> dict:
    return {
        "uns": {k: id(v) for k, v in adata.uns.items()},
        "obs": list(adata.obs.columns),
        "obsm": sorted(adata.obsm),
        "varm": sorted(adata.varm),
        "obsp": sorted(adata.obsp),
        "var": list(adata.var.columns),
        "shape": adata.shape,
    }


pp, tl, get, pl = sct.pp, sct.tl, sct.get, sct.pl
BAD_KEYS = {
    "slash": "a/b",
    "backslash": "a\\b",
    "dot": ".",
    "empty": "",
    "newline": "a\nb",
    "zarr-metadata": ".zattrs",
    "anndata-index": "_index",
    "too-long": "k" * 201,
}
KEY_MATCH = r"contains '/'|contains '\\\\'|cannot be stored|non-empty string"

CASES: list[Case] = []


def case(function: str, kind: str, error: type[BaseException], match: str):
    def add(call):
        CASES.append(Case(function, kind, call, error, match))
        return call

    return add


def add(function, kind, call, error, match):
    CASES.append(Case(function, kind, call, error, match))


# -- key_added of every tool that writes: the same check everywhere --------------------------------
WRITERS = {
    "pp.cell_sentences": lambda a, c, k: pp.cell_sentences(a, key_added=k),
    "tl.train_transcoders": lambda a, c, k: tl.train_transcoders(
        a, n_tokens=256, batch_size=256, key_added=k, progress=False
    ),
    "tl.feature_activations": lambda a, c, k: tl.feature_activations(
        a, key_added=k, progress=False
    ),
    "tl.annotate_features": lambda a, c, k: tl.annotate_features(a, gene_sets=MARKERS, key_added=k),
    "tl.rank_features_groups": lambda a, c, k: tl.rank_features_groups(
        a, groupby="bulk_labels", key_added=k
    ),
    "tl.trace_circuit": lambda a, c, k: tl.trace_circuit(a, cell=c["cell"], key_added=k),
    "tl.circuit_enrichment": lambda a, c, k: tl.circuit_enrichment(
        a, circuit=c["circuit"], gene_sets=MARKERS, key_added=k
    ),
    "tl.score_circuit": lambda a, c, k: tl.score_circuit(a, circuit=c["circuit"], key_added=k),
    "tl.gene_attribution": lambda a, c, k: tl.gene_attribution(
        a, feature=c["feature"], key_added=k, progress=False
    ),
    "tl.feature_connections": lambda a, c, k: tl.feature_connections(a, c["feature"], key_added=k),
    "tl.random_model_baseline": lambda a, c, k: tl.random_model_baseline(
        a, key_added=k, progress=False
    ),
    "tl.neuron_baseline": lambda a, c, k: tl.neuron_baseline(a, key_added=k, progress=False),
    "tl.cell_embeddings": lambda a, c, k: tl.cell_embeddings(a, key_added=k, progress=False),
    "tl.train_sae": lambda a, c, k: tl.train_sae(
        a, use_rep="X_pca", n_steps=3, batch_size=32, key_added=k, progress=False
    ),
    "tl.sae_sweep": lambda a, c, k: tl.sae_sweep(
        a,
        use_rep="X_pca",
        expansion_factors=(1,),
        n_steps=3,
        batch_size=32,
        key_added=k,
        progress=False,
    ),
    "load_transcoders": lambda a, c, k: sct.load_transcoders(
        sct.save_transcoders(a, c["tmp"] / "tc"), a, key_added=k
    ),
}
for _name, _call in WRITERS.items():
    for _kind, _key in BAD_KEYS.items():
        add(
            _name,
            f"key_added-{_kind}",
            lambda a, c, f=_call, k=_key: f(a, c, k),
            ValueError,
            KEY_MATCH,
        )
    # a name taken by another kind of record (here scanpy's neighbors graph)
    add(
        _name,
        "key_added-taken",
        lambda a, c, f=_call: f(a, c, "neighbors"),
        ValueError,
        "would replace adata.uns\\['neighbors'\\]",
    )


# -- what a tool must never replace or misread ----------------------------------------------------
add(
    "pp.cell_sentences",
    "key_added-user-obs-column",
    lambda a, c: pp.cell_sentences(a, key_added="bulk_labels"),
    ValueError,
    r"would replace adata.obs column\(s\) \['bulk_labels'\]",
)
add(
    "tl.score_circuit",
    "key_added-user-obs-column",
    lambda a, c: tl.score_circuit(a, circuit=c["circuit"], key_added="n_genes"),
    ValueError,
    r"would replace adata.obs column\(s\) \['n_genes'\]",
)
add(
    "tl.train_transcoders",
    "sentence_key-labels",
    lambda a, c: _train(a, sentence_key="bulk_labels"),
    ValueError,
    "does not hold cell sentences",
)
add(
    "tl.feature_activations",
    "sentence_key-numbers",
    lambda a, c: tl.feature_activations(a, sentence_key="n_counts", progress=False),
    ValueError,
    "does not hold cell sentences",
)
add(
    "tl.trace_circuit",
    "obs_names-duplicated",
    lambda a, c: _trace(_duplicated_cells(a), c),
    ValueError,
    "obs_names_make_unique",
)
add(
    "tl.gene_attribution",
    "obs_names-duplicated",
    lambda a, c: _attr(_duplicated_cells(a), c, cells=[c["cell"]]),
    ValueError,
    "obs_names_make_unique",
)
add(
    "tl.trace_circuit",
    "cell-list",
    lambda a, c: _trace(a, c, cell=[c["cell"]]),
    TypeError,
    "one obs name",
)


add(
    "tl.trace_circuit",
    "subtract_mean-str",
    lambda a, c: _trace(a, c, subtract_mean="no"),
    TypeError,
    "subtract_mean must be True or False",
)
add(
    "save_transcoders",
    "link-str",
    lambda a, c: sct.save_transcoders(a, c["tmp"] / "x", link="yes"),
    TypeError,
    "link must be True or False",
)


def _duplicated_cells(a):
    b = a.copy()
    b.obs_names = [b.obs_names[0], *b.obs_names[:-1]]
    return b


# -- pp.cell_sentences ---------------------------------------------------------------------------
add(
    "pp.cell_sentences",
    "n_genes-zero",
    lambda a, c: pp.cell_sentences(a, n_genes=0),
    ValueError,
    "n_genes",
)
add(
    "pp.cell_sentences",
    "n_genes-str",
    lambda a, c: pp.cell_sentences(a, n_genes="100"),
    ValueError,
    "n_genes",
)
add(
    "pp.cell_sentences",
    "layer-missing",
    lambda a, c: pp.cell_sentences(a, layer="counts"),
    KeyError,
    "counts",
)
add(
    "pp.cell_sentences",
    "gene_symbols-missing",
    lambda a, c: pp.cell_sentences(a, gene_symbols="symbol"),
    KeyError,
    "symbol",
)
add(
    "pp.cell_sentences",
    "use_raw-without-raw",
    lambda a, c: pp.cell_sentences(_no_raw(a), use_raw=True),
    ValueError,
    "raw",
)
add(
    "pp.cell_sentences",
    "seed-negative",
    lambda a, c: pp.cell_sentences(a, seed=-1),
    ValueError,
    "seed",
)
add(
    "pp.cell_sentences",
    "chunk_size-zero",
    lambda a, c: pp.cell_sentences(a, chunk_size=0),
    ValueError,
    "chunk_size",
)
add(
    "pp.cell_sentences",
    "model-missing-dir",
    lambda a, c: pp.cell_sentences(a, model=str(c["tmp"] / "nope")),
    FileNotFoundError,
    "not a model directory",
)
add(
    "pp.cell_sentences",
    "duplicate-var_names",
    lambda a, c: pp.cell_sentences(_duplicated_genes(a), layer="positive"),
    ValueError,
    "duplicate",
)
add(
    "pp.cell_sentences",
    "negative-expression",
    lambda a, c: pp.cell_sentences(_negative(a), layer="neg"),
    ValueError,
    "negative",
)
add(
    "pp.cell_sentences",
    "no-cells",
    lambda a, c: pp.cell_sentences(a[:0].copy()),
    ValueError,
    "no cells|0 cells",
)


def _no_raw(a):
    b = a.copy()
    b.raw = None
    return b


def _duplicated_genes(a):
    """Symbols of ``adata.var`` with a duplicate, and a layer of expression that can be ranked."""
    b = a.copy()
    names = list(b.var_names)
    names[1] = names[0]
    b.var_names = names
    b.layers["positive"] = np.abs(np.asarray(b.X))
    return b


def _negative(a):
    a.layers["neg"] = -np.abs(np.asarray(a.X))  # a layer only: obs/uns stay
    return a


# -- tl.train_transcoders -------------------------------------------------------------------------
def _train(a, **kw):
    kw = {"n_tokens": 512, "batch_size": 256, "progress": False, **kw}
    return tl.train_transcoders(a, **kw)


add(
    "tl.train_transcoders",
    "layers-out-of-range",
    lambda a, c: _train(a, layers=[99]),
    ValueError,
    r"Layers \[99\] do not exist",
)
add(
    "tl.train_transcoders",
    "layers-empty",
    lambda a, c: _train(a, layers=[]),
    ValueError,
    "No layers given",
)
add(
    "tl.train_transcoders",
    "unknown-setting",
    lambda a, c: _train(a, expansion=4),
    TypeError,
    "expansion",
)
add("tl.train_transcoders", "k-zero", lambda a, c: _train(a, k=0), ValueError, "k must be")
add(
    "tl.train_transcoders",
    "activation-unknown",
    lambda a, c: _train(a, activation="gelu"),
    ValueError,
    "activation must be one of",
)
add(
    "tl.train_transcoders",
    "n_tokens-below-batch",
    lambda a, c: _train(a, n_tokens=10),
    ValueError,
    "at least one batch",
)
add(
    "tl.train_transcoders",
    "sentence_key-missing",
    lambda a, c: _train(a, sentence_key="nope"),
    KeyError,
    "cell_sentences",
)
add(
    "tl.train_transcoders",
    "weights_dir-exists",
    lambda a, c: _train(a, weights_dir=c["tmp"]),
    FileExistsError,
    "exists",
)
add(
    "tl.train_transcoders",
    "resume-without-checkpoint_dir",
    lambda a, c: _train(a, resume=True),
    ValueError,
    "checkpoint_dir",
)
add(
    "tl.train_transcoders",
    "copy-backed",
    lambda a, c: _train(_backed(a, c), copy=True),
    ValueError,
    "backed",
)
add(
    "tl.train_transcoders",
    "one-cell",
    lambda a, c: _train(a[:1].copy()),
    ValueError,
    "at least 2 cells",
)
add(
    "tl.train_transcoders",
    "model-hub-offline",
    lambda a, c: _train(a, model="sctranscoder-test/none"),
    OSError,
    "tiny_c2s",
)


def _backed(a, c):
    path = c["tmp"] / "backed.h5ad"
    a.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


# -- tl.feature_activations ---------------------------------------------------------------------
add(
    "tl.feature_activations",
    "aggregate-unknown",
    lambda a, c: tl.feature_activations(a, aggregate="sum", progress=False),
    ValueError,
    "aggregate",
)
add(
    "tl.feature_activations",
    "layers-untrained",
    lambda a, c: tl.feature_activations(a, layers=[9], progress=False),
    (KeyError, ValueError),
    "9",
)
add(
    "tl.feature_activations",
    "batch_size-zero",
    lambda a, c: tl.feature_activations(a, batch_size=0, progress=False),
    ValueError,
    "batch_size",
)
add(
    "tl.feature_activations",
    "n_top-negative",
    lambda a, c: tl.feature_activations(a, n_top=-1, progress=False),
    ValueError,
    "n_top",
)
add(
    "tl.feature_activations",
    "key-missing",
    lambda a, c: tl.feature_activations(a, key="nope", progress=False),
    KeyError,
    "train_transcoders",
)
add(
    "tl.feature_activations",
    "sentence_key-missing",
    lambda a, c: tl.feature_activations(a, sentence_key="nope", progress=False),
    KeyError,
    "cell_sentences",
)
add(
    "tl.feature_activations",
    "other-model",
    lambda a, c: tl.feature_activations(a, model=_other_model(), progress=False),
    ValueError,
    "fingerprint",
)


def _other_model():
    """A model that is not the one the transcoders were trained on (another fingerprint)."""
    from _models import tiny_neox, tiny_tokenizer

    return sct.load_model(tiny_neox(n_layers=4), tokenizer=tiny_tokenizer(), name="other")


# -- tl.annotate_features -------------------------------------------------------------------------
def _annotate(a, **kw):
    return tl.annotate_features(a, **{"gene_sets": MARKERS, **kw})


add(
    "tl.annotate_features",
    "gene_sets-missing-file",
    lambda a, c: _annotate(a, gene_sets=str(c["tmp"] / "x.gmt")),
    (FileNotFoundError, ValueError),
    "x.gmt",
)
add(
    "tl.annotate_features",
    "gene_sets-empty",
    lambda a, c: _annotate(a, gene_sets={}),
    ValueError,
    "gene set",
)
add(
    "tl.annotate_features",
    "gene_sets-unknown-library",
    lambda a, c: _annotate(a, gene_sets="No_Such_Library_2099"),
    ValueError,
    "No_Such_Library_2099",
)
add(
    "tl.annotate_features",
    "gene_sets-no-overlap",
    lambda a, c: _annotate(a, gene_sets={"x": ["NOTAGENE1", "NOTAGENE2"]}),
    ValueError,
    "min_size|background",
)
add(
    "tl.annotate_features",
    "method-unknown",
    lambda a, c: _annotate(a, method="gsea2"),
    ValueError,
    "method",
)
add("tl.annotate_features", "fdr-above-one", lambda a, c: _annotate(a, fdr=5), ValueError, "fdr")
add("tl.annotate_features", "n_top-zero", lambda a, c: _annotate(a, n_top=0), ValueError, "n_top")
add(
    "tl.annotate_features",
    "min-above-max",
    lambda a, c: _annotate(a, min_size=50, max_size=5),
    ValueError,
    "min_size",
)
add(
    "tl.annotate_features",
    "layers-not-computed",
    lambda a, c: _annotate(a, layers=[7]),
    (KeyError, ValueError),
    "7",
)
add(
    "tl.annotate_features",
    "activations_key-missing",
    lambda a, c: _annotate(a, activations_key="nope"),
    KeyError,
    "feature_activations",
)
add(
    "tl.annotate_features",
    "baseline-unknown",
    lambda a, c: _annotate(a, baseline="random"),
    ValueError,
    "baseline",
)
add(
    "tl.annotate_features",
    "permutations-zero",
    lambda a, c: _annotate(a, method="prerank", permutations=0),
    ValueError,
    "permutations",
)

# -- tl.rank_features_groups -----------------------------------------------------------------------
add(
    "tl.rank_features_groups",
    "groupby-missing",
    lambda a, c: tl.rank_features_groups(a, groupby="nope"),
    KeyError,
    "nope",
)
add(
    "tl.rank_features_groups",
    "groupby-numeric",
    lambda a, c: tl.rank_features_groups(a, groupby="n_counts"),
    ValueError,
    "categor",
)
add(
    "tl.rank_features_groups",
    "groups-unknown",
    lambda a, c: tl.rank_features_groups(a, groupby="bulk_labels", groups=["Martian"]),
    ValueError,
    "Martian",
)
add(
    "tl.rank_features_groups",
    "reference-unknown",
    lambda a, c: tl.rank_features_groups(a, groupby="bulk_labels", reference="Martian"),
    ValueError,
    "Martian",
)
add(
    "tl.rank_features_groups",
    "method-unknown",
    lambda a, c: tl.rank_features_groups(a, groupby="bulk_labels", method="anova"),
    ValueError,
    "(?i)method must be one of",
)
add(
    "tl.rank_features_groups",
    "layers-not-computed",
    lambda a, c: tl.rank_features_groups(a, groupby="bulk_labels", layers=[7]),
    (KeyError, ValueError),
    "7",
)


# -- tl.trace_circuit -----------------------------------------------------------------------------
def _trace(a, c, **kw):
    return tl.trace_circuit(a, **{"cell": c["cell"], "key_added": "t", "progress": False, **kw})


add(
    "tl.trace_circuit",
    "cell-missing",
    lambda a, c: _trace(a, c, cell="no-such-cell"),
    KeyError,
    "obs_names",
)
add("tl.trace_circuit", "cell-int", lambda a, c: _trace(a, c, cell=0), TypeError, "one obs name")
add(
    "tl.trace_circuit",
    "retrace-same-key",
    lambda a, c: _trace(a, c, key_added=c["circuit"]),
    ValueError,
    "overwrite=True",
)
add(
    "tl.trace_circuit",
    "target-loose-feature",
    lambda a, c: _trace(a, c, target="l2f17"),
    ValueError,
    "exactly as 'L2F17'",
)
add(
    "tl.trace_circuit",
    "target-unknown-label",
    lambda a, c: _trace(a, c, target="T cell"),
    ValueError,
    "not a label the model answers",
)
add(
    "tl.trace_circuit",
    "target-feature-out-of-range",
    lambda a, c: _trace(a, c, target="L2F99999"),
    ValueError,
    "does not exist",
)
add(
    "tl.trace_circuit",
    "target-layer-out-of-range",
    lambda a, c: _trace(a, c, target="L40F0"),
    ValueError,
    "does not exist",
)
add(
    "tl.trace_circuit",
    "label_token-unknown",
    lambda a, c: _trace(a, c, label_token="last"),
    ValueError,
    "label_token",
)
add(
    "tl.trace_circuit",
    "node_threshold-above-one",
    lambda a, c: _trace(a, c, node_threshold=80),
    ValueError,
    "node_threshold",
)
add(
    "tl.trace_circuit",
    "max_feature_nodes-zero",
    lambda a, c: _trace(a, c, max_feature_nodes=0),
    ValueError,
    "max_feature_nodes",
)
add(
    "tl.trace_circuit",
    "head_nodes-bad",
    lambda a, c: _trace(a, c, head_nodes=["L2F17"]),
    ValueError,
    "head_nodes",
)
add(
    "tl.trace_circuit",
    "key-missing",
    lambda a, c: _trace(a, c, key="nope"),
    KeyError,
    "train_transcoders",
)
add(
    "tl.trace_circuit",
    "copy-backed",
    lambda a, c: _trace(_backed(a, c), c, copy=True),
    ValueError,
    "backed",
)
add(
    "tl.trace_circuit",
    "other-model",
    lambda a, c: _trace(a, c, model=_other_model()),
    ValueError,
    "fingerprint",
)

# -- tl.circuit_enrichment, tl.score_circuit ------------------------------------------------------
add(
    "tl.circuit_enrichment",
    "circuit-missing",
    lambda a, c: tl.circuit_enrichment(a, circuit="nope", gene_sets=MARKERS),
    KeyError,
    "trace_circuit",
)
add(
    "tl.circuit_enrichment",
    "n_top-zero",
    lambda a, c: tl.circuit_enrichment(a, circuit=c["circuit"], gene_sets=MARKERS, n_top=0),
    ValueError,
    "n_top",
)
add(
    "tl.circuit_enrichment",
    "gene_sets-too-small",
    lambda a, c: tl.circuit_enrichment(a, circuit=c["circuit"], gene_sets={"s": ["CD74"]}),
    ValueError,
    "min_size",
)
add(
    "tl.score_circuit",
    "circuit-missing",
    lambda a, c: tl.score_circuit(a, circuit="nope"),
    KeyError,
    "trace_circuit",
)
add(
    "tl.score_circuit",
    "n_top-zero",
    lambda a, c: tl.score_circuit(a, circuit=c["circuit"], n_top=0),
    ValueError,
    "n_top",
)
add(
    "tl.score_circuit",
    "activations_key-missing",
    lambda a, c: tl.score_circuit(a, circuit=c["circuit"], activations_key="nope"),
    KeyError,
    "feature_activations",
)


# -- tl.gene_attribution ---------------------------------------------------------------------------
def _attr(a, c, **kw):
    return tl.gene_attribution(
        a, **{"feature": c["feature"], "progress": False, "key_added": "g", **kw}
    )


add(
    "tl.gene_attribution",
    "feature-loose",
    lambda a, c: _attr(a, c, feature="l2f3"),
    ValueError,
    "L2F3",
)
add(
    "tl.gene_attribution",
    "feature-out-of-range",
    lambda a, c: _attr(a, c, feature="L2F99999"),
    ValueError,
    "does not exist",
)
add(
    "tl.gene_attribution",
    "feature-untrained-layer",
    lambda a, c: _attr(a, c, feature="L30F1"),
    ValueError,
    "no transcoder for layer 30",
)
add(
    "tl.gene_attribution",
    "cells-missing",
    lambda a, c: _attr(a, c, cells=["no-such-cell"]),
    KeyError,
    "no-such-cell",
)
add(
    "tl.gene_attribution",
    "cells-empty",
    lambda a, c: _attr(a, c, cells=[]),
    ValueError,
    "No cells given",
)
add(
    "tl.gene_attribution",
    "mode-unknown",
    lambda a, c: _attr(a, c, mode="shuffle"),
    ValueError,
    "mode",
)
add(
    "tl.gene_attribution",
    "n_cells-zero",
    lambda a, c: _attr(a, c, n_cells=0),
    ValueError,
    "n_cells",
)
add(
    "tl.gene_attribution",
    "aggregate-unknown",
    lambda a, c: _attr(a, c, aggregate="mean"),
    ValueError,
    "aggregate",
)

# -- tl.feature_connections ------------------------------------------------------------------------
add(
    "tl.feature_connections",
    "feature-loose",
    lambda a, c: tl.feature_connections(a, "l2f3"),
    ValueError,
    "L2F3",
)
add(
    "tl.feature_connections",
    "feature-out-of-range",
    lambda a, c: tl.feature_connections(a, "L2F99999"),
    ValueError,
    "does not exist",
)
add(
    "tl.feature_connections",
    "features-empty",
    lambda a, c: tl.feature_connections(a, []),
    ValueError,
    "feature",
)
add(
    "tl.feature_connections",
    "n_top-zero",
    lambda a, c: tl.feature_connections(a, c["feature"], n_top=0),
    ValueError,
    "n_top",
)

# -- tl.random_model_baseline ---------------------------------------------------------------------
add(
    "tl.random_model_baseline",
    "annotation_key-missing",
    lambda a, c: tl.random_model_baseline(a, annotation_key="nope", progress=False),
    KeyError,
    "annotate_features",
)
add(
    "tl.random_model_baseline",
    "n_tokens-zero",
    lambda a, c: tl.random_model_baseline(a, n_tokens=0, progress=False),
    ValueError,
    "n_tokens",
)


# -- tl.feature_stability, tl.probe and their plots ------------------------------------------------
# (section stability-probe)
_COPY = object()


def _stab(a, other=_COPY, **kw):
    return tl.feature_stability(a, a.copy() if other is _COPY else other, progress=False, **kw)


def _on_other_model(a):
    b = a.copy()
    b.uns["sct"] = {**b.uns["sct"], "model": {**b.uns["sct"]["model"], "fingerprint": "0" * 16}}
    return b


def _without(a, key):
    b = a.copy()
    del b.uns[key]
    return b


def _without_raw(a):
    b = a.copy()
    del b.raw
    return b


def _unlabelled(a):
    b = a.copy()
    b.obs["partly"] = np.where(np.arange(b.n_obs) % 2, "x", None)
    return b


def _probe(a, **kw):
    return tl.probe(a, **{"groupby": "bulk_labels", "n_splits": 2, "progress": False, **kw})


for _name, _call in {
    "tl.feature_stability": lambda a, c, k: _stab(a, key_added=k),
    "tl.probe": lambda a, c, k: _probe(a, key_added=k),
}.items():
    for _kind, _key in BAD_KEYS.items():
        add(
            _name,
            f"key_added-{_kind}",
            lambda a, c, f=_call, k=_key: f(a, c, k),
            ValueError,
            KEY_MATCH,
        )
    add(
        _name,
        "key_added-taken",
        lambda a, c, f=_call: f(a, c, "neighbors"),
        ValueError,
        "would replace adata.uns\\['neighbors'\\]",
    )
for _kind, _call, _error, _match in (
    ("other-str", lambda a: _stab(a, other="x.h5ad"), TypeError, "other takes the AnnData"),
    ("other_key-none", lambda a: _stab(a, other=None), ValueError, "Name the second"),
    (
        "other_key-same",
        lambda a: _stab(a, other=None, other_key="sct"),
        ValueError,
        "matched to itself",
    ),
    ("other_key-missing", lambda a: _stab(a, other_key="nope"), KeyError, "train_transcoders"),
    (
        "other-model",
        lambda a: _stab(a, other=_on_other_model(a)),
        ValueError,
        "different base models",
    ),
    ("layers-absent", lambda a: _stab(a, layers=[7]), KeyError, "not in both sets"),
    ("layers-str", lambda a: _stab(a, layers=["2"]), TypeError, "layer numbers"),
    (
        "live_only-str",
        lambda a: _stab(a, live_only="yes"),
        TypeError,
        "live_only must be True, False or None",
    ),
    (
        "live_only-no-activations",
        lambda a: _stab(a, other=_without(a, "sct_activations"), live_only=True),
        KeyError,
        "live_only=True needs",
    ),
    (
        "n_baseline-zero",
        lambda a: _stab(a, n_baseline=0),
        ValueError,
        "n_baseline must be a positive integer",
    ),
    (
        "max_features-small",
        lambda a: _stab(a, max_features=10),
        ValueError,
        "exceed max_features=10",
    ),
    ("seed-negative", lambda a: _stab(a, seed=-1), ValueError, "seed must be a non-negative"),
    ("copy-str", lambda a: _stab(a, copy="yes"), TypeError, "copy must be True or False"),
):
    add("tl.feature_stability", _kind, lambda a, c, f=_call: f(a), _error, _match)
for _kind, _call, _error, _match in (
    ("groupby-missing", lambda a: _probe(a, groupby="nope"), KeyError, "No column 'nope'"),
    (
        "groupby-list",
        lambda a: _probe(a, groupby=["bulk_labels"]),
        TypeError,
        "groupby must be an adata.obs column",
    ),
    (
        "groupby-unlabelled",
        lambda a: _probe(_unlabelled(a), groupby="partly"),
        ValueError,
        "have no 'partly' label",
    ),
    (
        "groupby-small-groups",
        lambda a: _probe(a, n_splits=5),
        ValueError,
        "fewer than n_splits=5 cells",
    ),
    ("use_rep-unknown", lambda a: _probe(a, use_rep="X_nope"), KeyError, "not in adata.obsm"),
    ("use_rep-int", lambda a: _probe(a, use_rep=3), TypeError, "use_rep takes an obsm key"),
    ("use_rep-empty", lambda a: _probe(a, use_rep=[]), ValueError, "use_rep is empty"),
    (
        "use_rep-raw-absent",
        lambda a: _probe(_without_raw(a), use_rep="raw"),
        KeyError,
        "adata.raw is None",
    ),
    (
        "use_rep-default-no-activations",
        lambda a: _probe(_without(a, "sct_activations")),
        KeyError,
        "feature_activations",
    ),
    ("n_splits-one", lambda a: _probe(a, n_splits=1), ValueError, "at least 2"),
    ("C-zero", lambda a: _probe(a, C=0), ValueError, "C must be a positive finite"),
    ("C-inf", lambda a: _probe(a, C=float("inf")), ValueError, "C must be a positive finite"),
    (
        "n_nonzero-zero",
        lambda a: _probe(a, n_nonzero=0),
        ValueError,
        "n_nonzero must be a positive integer",
    ),
    (
        "max_iter-float",
        lambda a: _probe(a, max_iter=10.5),
        ValueError,
        "max_iter must be a positive integer",
    ),
    ("seed-str", lambda a: _probe(a, seed="0"), ValueError, "seed must be a non-negative"),
):
    add("tl.probe", _kind, lambda a, c, f=_call: f(a), _error, _match)
for _fn, _kind, _call, _error, _match in (
    (
        "pl.feature_stability",
        "key-missing",
        lambda a: pl.feature_stability(a, stability_key="nope", show=False),
        KeyError,
        "feature_stability",
    ),
    (
        "pl.feature_stability",
        "ax-str",
        lambda a: pl.feature_stability(a, ax="ax", show=False),
        TypeError,
        "ax must be a matplotlib Axes",
    ),
    (
        "pl.feature_stability",
        "bins-zero",
        lambda a: pl.feature_stability(a, bins=0, show=False),
        ValueError,
        "bins must be a positive integer",
    ),
    (
        "pl.feature_stability",
        "save-path",
        lambda a: pl.feature_stability(a, save="a/b.png"),
        ValueError,
        "path separator",
    ),
    (
        "pl.probe",
        "key-missing",
        lambda a: pl.probe(a, probe_key="nope", show=False),
        KeyError,
        "sct.tl.probe",
    ),
    (
        "pl.probe",
        "metric-unknown",
        lambda a: pl.probe(a, metric="f1", show=False),
        ValueError,
        "metric must be 'accuracy' or 'balanced_accuracy'",
    ),
):
    add(_fn, _kind, lambda a, c, f=_call: f(a), _error, _match)

# -- tl.neuron_baseline and its columns in get/pl.interpretability ---------------------------------
# (section neurons)
add(
    "tl.neuron_baseline",
    "annotation_key-missing",
    lambda a, c: tl.neuron_baseline(a, annotation_key="nope", progress=False),
    KeyError,
    "annotate_features",
)
add(
    "tl.neuron_baseline",
    "keep_activations-str",
    lambda a, c: tl.neuron_baseline(a, keep_activations="yes", progress=False),
    TypeError,
    "keep_activations must be True or False",
)
add(
    "tl.neuron_baseline",
    "batch_size-zero",
    lambda a, c: tl.neuron_baseline(a, batch_size=0, progress=False),
    ValueError,
    "batch_size must be a positive integer",
)
add(
    "tl.neuron_baseline",
    "model-int",
    lambda a, c: tl.neuron_baseline(a, 123, progress=False),
    TypeError,
    "model must be a C2SModel",
)
add(
    "tl.neuron_baseline",
    "copy-str",
    lambda a, c: tl.neuron_baseline(a, copy="yes", progress=False),
    TypeError,
    "copy must be True or False",
)
add(
    "get.interpretability",
    "neurons_key-annotation",
    lambda a, c: get.interpretability(a, neurons_key="sct_annotation"),
    ValueError,
    "not a neuron baseline",
)
add(
    "get.interpretability",
    "neurons_key-missing",
    lambda a, c: get.interpretability(a, neurons_key="nope"),
    KeyError,
    "neuron_baseline",
)
add(
    "pl.interpretability",
    "neurons_key-missing",
    lambda a, c: pl.interpretability(a, neurons_key="nope", show=False),
    KeyError,
    "neuron_baseline",
)

# -- reading results: sct.get ----------------------------------------------------------------------
add(
    "get.activations",
    "layer-not-computed",
    lambda a, c: get.activations(a, 9),
    (KeyError, ValueError),
    "9",
)
add(
    "get.activations",
    "layer-str",
    lambda a, c: get.activations(a, "L2"),
    (TypeError, ValueError),
    "layer",
)
add(
    "get.activations",
    "activations_key-missing",
    lambda a, c: get.activations(a, LAYER, activations_key="nope"),
    KeyError,
    "feature_activations",
)
add(
    "get.gene_activations",
    "layer-not-computed",
    lambda a, c: get.gene_activations(a, 9),
    (KeyError, ValueError),
    "9",
)
add(
    "get.feature_table",
    "layer-negative",
    lambda a, c: get.feature_table(a, -1),
    (KeyError, ValueError),
    "-1",
)
add(
    "get.feature_table",
    "annotation_key-missing",
    lambda a, c: get.feature_table(a, LAYER, annotation_key="nope"),
    KeyError,
    "annotate_features",
)
add(
    "get.circuit", "circuit-missing", lambda a, c: get.circuit(a, "nope"), KeyError, "trace_circuit"
)
add(
    "get.metrics",
    "key-missing",
    lambda a, c: get.metrics(a, key="nope"),
    KeyError,
    "train_transcoders",
)
add(
    "get.transcoders",
    "key-of-other-kind",
    lambda a, c: get.transcoders(a, key="neighbors"),
    (KeyError, ValueError),
    "neighbors",
)
add(
    "get.transcoders",
    "layers-missing",
    lambda a, c: get.transcoders(a, layers=[9]),
    KeyError,
    r"layer\(s\) \[9\]",
)
add(
    "get.interpretability",
    "annotation_key-missing",
    lambda a, c: get.interpretability(a, annotation_key="nope"),
    KeyError,
    "annotate_features",
)
add(
    "get.mudata",
    "layers-not-computed",
    lambda a, c: get.mudata(a, layers=[9]),
    (KeyError, ValueError),
    "9",
)

# -- plots: sct.pl ---------------------------------------------------------------------------------
add(
    "pl.activations",
    "features-out-of-range",
    lambda a, c: pl.activations(a, LAYER, features=[99999], show=False),
    (KeyError, ValueError, IndexError),
    "99999",
)
add(
    "pl.activations",
    "basis-missing",
    lambda a, c: pl.activations(a, LAYER, basis="tsne", show=False),
    KeyError,
    "tsne",
)
add(
    "pl.activations",
    "layer-not-computed",
    lambda a, c: pl.activations(a, 9, show=False),
    (KeyError, ValueError),
    "9",
)
add(
    "pl.feature",
    "feature-loose",
    lambda a, c: pl.feature(a, "l2f3", show=False),
    ValueError,
    "L2F3",
)
add(
    "pl.feature",
    "feature-out-of-range",
    lambda a, c: pl.feature(a, "L2F99999", show=False),
    (KeyError, ValueError, IndexError),
    "99999",
)
add(
    "pl.feature",
    "groupby-missing",
    lambda a, c: pl.feature(a, c["feature"], groupby="nope", show=False),
    KeyError,
    "nope",
)
add(
    "pl.circuit",
    "circuit-missing",
    lambda a, c: pl.circuit(a, "nope", show=False),
    KeyError,
    "trace_circuit",
)
add(
    "pl.circuit",
    "max_nodes-zero",
    lambda a, c: pl.circuit(a, c["circuit"], max_nodes=0, show=False),
    ValueError,
    "max_nodes",
)
add(
    "pl.circuit_genes",
    "n_top-zero",
    lambda a, c: pl.circuit_genes(a, c["circuit"], n_top=0, show=False),
    ValueError,
    "n_top",
)
add(
    "pl.circuit_heads",
    "node-unknown",
    lambda a, c: pl.circuit_heads(a, c["circuit"], node="L0F0@1", show=False),
    (KeyError, ValueError),
    "L0F0@1",
)
add(
    "pl.circuit_heads",
    "value-unknown",
    lambda a, c: pl.circuit_heads(a, c["circuit"], value="weight", show=False),
    ValueError,
    "value",
)
add(
    "pl.interpretability",
    "annotation_key-missing",
    lambda a, c: pl.interpretability(a, annotation_key="nope", show=False),
    KeyError,
    "annotate_features",
)
# the explorer (more cases in tests/pl/test_explorer.py, which also checks no file is written)
add(
    "pl.explorer",
    "activations-missing",
    lambda a, c: pl.explorer(a, c["tmp"] / "x.html", activations_key="nope"),
    KeyError,
    "feature_activations",
)
add(
    "pl.explorer",
    "not-html",
    lambda a, c: pl.explorer(a, c["tmp"] / "x.png"),
    ValueError,
    r"\.html",
)
add(
    "pl.explorer",
    "folder-missing",
    lambda a, c: pl.explorer(a, c["tmp"] / "nope" / "x.html"),
    FileNotFoundError,
    "does not exist",
)
add(
    "pl.explorer",
    "file-exists",
    lambda a, c: pl.explorer(a, _touch(c["tmp"] / "x.html")),
    FileExistsError,
    "overwrite=True",
)
add(
    "pl.explorer",
    "groupby-missing",
    lambda a, c: pl.explorer(a, c["tmp"] / "x.html", groupby="nope"),
    KeyError,
    "nope",
)

# -- files -------------------------------------------------------------------------------------------
add(
    "save_transcoders",
    "path-exists",
    lambda a, c: sct.save_transcoders(a, c["tmp"]),
    FileExistsError,
    "overwrite=True",
)
add(
    "save_transcoders",
    "key-missing",
    lambda a, c: sct.save_transcoders(a, c["tmp"] / "x", key="nope"),
    KeyError,
    "train_transcoders",
)
add(
    "load_transcoders",
    "path-missing",
    lambda a, c: sct.load_transcoders(c["tmp"] / "nope", a, key_added="x"),
    ValueError,
    "not a directory of transcoders",
)
add(
    "load_transcoders",
    "arguments-swapped",
    lambda a, c: sct.load_transcoders(a, c["tmp"], key_added="x"),
    TypeError,
    "path",
)
add(
    "load_transcoders",
    "other-model",
    lambda a, c: sct.load_transcoders(
        sct.save_transcoders(a, c["tmp"] / "tc"), a, model=_other_model(), key_added="x"
    ),
    ValueError,
    "fingerprint",
)
add(
    "export_circuit_tracer_graph",
    "circuit-missing",
    lambda a, c: sct.export_circuit_tracer_graph(a, c["tmp"] / "g.json", circuit="nope"),
    KeyError,
    "trace_circuit",
)
add(
    "export_circuit_tracer_graph",
    "path-is-a-file",
    lambda a, c: sct.export_circuit_tracer_graph(
        a, _touch(c["tmp"] / "g.json"), circuit=c["circuit"]
    ),
    ValueError,
    "names a file: pass the directory",
)
add(
    "export_circuit_tracer_transcoders",
    "topk-refused",
    lambda a, c: sct.export_circuit_tracer_transcoders(a, c["tmp"] / "ct", model_name="m"),
    ValueError,
    "allow_topk",
)


def _touch(path):
    path.write_text("{}")
    return path


# -- plots and getters: further cases -------------------------------------------------------------
# (section pl-get)
_SAVE_PATH = "path separator"
for _name, _plot in {
    "pl.circuit": lambda a, c, **k: pl.circuit(a, c["circuit"], show=False, **k),
    "pl.circuit_genes": lambda a, c, **k: pl.circuit_genes(a, c["circuit"], show=False, **k),
    "pl.circuit_heads": lambda a, c, **k: pl.circuit_heads(a, c["circuit"], show=False, **k),
    "pl.activations": lambda a, c, **k: pl.activations(a, LAYER, show=False, **k),
    "pl.feature": lambda a, c, **k: pl.feature(a, c["feature"], show=False, **k),
    "pl.interpretability": lambda a, c, **k: pl.interpretability(a, show=False, **k),
}.items():
    add(
        _name,
        "save-path",
        lambda a, c, p=_plot: p(a, c, save=str(c["tmp"] / "x.png")),
        ValueError,
        _SAVE_PATH,
    )
    add(
        _name,
        "save-backslash",
        lambda a, c, p=_plot: p(a, c, save="a\\b.png"),
        ValueError,
        _SAVE_PATH,
    )
add(
    "pl.circuit",
    "max_nodes-float",
    lambda a, c: pl.circuit(a, c["circuit"], max_nodes=2.5, show=False),
    ValueError,
    "max_nodes must be a positive integer",
)
add(
    "pl.circuit",
    "max_nodes-str",
    lambda a, c: pl.circuit(a, c["circuit"], max_nodes="10", show=False),
    ValueError,
    "max_nodes must be a positive integer",
)
add(
    "pl.circuit",
    "label_features-str",
    lambda a, c: pl.circuit(a, c["circuit"], label_features="yes", show=False),
    ValueError,
    "label_features takes True",
)
add(
    "pl.circuit",
    "label_features-negative",
    lambda a, c: pl.circuit(a, c["circuit"], label_features=-3, show=False),
    ValueError,
    "non-negative integer",
)
add(
    "pl.circuit",
    "min_edge_weight_fraction-str",
    lambda a, c: pl.circuit(a, c["circuit"], min_edge_weight_fraction="a", show=False),
    ValueError,
    r"must be in \[0, 1\]",
)
add(
    "pl.circuit",
    "figsize-int",
    lambda a, c: pl.circuit(a, c["circuit"], figsize=10, show=False),
    ValueError,
    r"figsize must be \(width, height\)",
)
add(
    "pl.circuit",
    "figsize-zero",
    lambda a, c: pl.circuit(a, c["circuit"], figsize=(0, 0), show=False),
    ValueError,
    r"figsize must be \(width, height\)",
)
add(
    "pl.circuit",
    "ax-str",
    lambda a, c: pl.circuit(a, c["circuit"], ax="axes", show=False),
    TypeError,
    "ax must be a matplotlib Axes",
)
add(
    "pl.circuit_genes",
    "ax-str",
    lambda a, c: pl.circuit_genes(a, c["circuit"], ax="axes", show=False),
    TypeError,
    "ax must be a matplotlib Axes",
)
add(
    "pl.activations",
    "features-float",
    lambda a, c: pl.activations(a, LAYER, features=[1.7], show=False),
    TypeError,
    "feature names .* or integer indices",
)
add(
    "pl.activations",
    "features-empty",
    lambda a, c: pl.activations(a, LAYER, features=[], show=False),
    ValueError,
    "features is empty",
)
add(
    "pl.activations",
    "n_top-zero",
    lambda a, c: pl.activations(a, LAYER, n_top=0, show=False),
    ValueError,
    "n_top must be a positive integer",
)
add(
    "pl.activations",
    "n_top-negative",
    lambda a, c: pl.activations(a, LAYER, n_top=-1, show=False),
    ValueError,
    "n_top must be a positive integer",
)
add(
    "pl.activations",
    "color-kwarg",
    lambda a, c: pl.activations(a, LAYER, color="bulk_labels", show=False),
    TypeError,
    "not color=",
)
add(
    "pl.feature",
    "basis-missing",
    lambda a, c: pl.feature(a, c["feature"], basis="nope", show=False),
    KeyError,
    "No embedding 'nope'.*basis=None",
)
add(
    "pl.feature",
    "n_top-zero",
    lambda a, c: pl.feature(a, c["feature"], n_top=0, show=False),
    ValueError,
    "n_top must be a positive integer",
)
add(
    "pl.feature",
    "n_top_cells-negative",
    lambda a, c: pl.feature(a, c["feature"], n_top_cells=-1, show=False),
    ValueError,
    "n_top_cells must be a positive integer",
)
add(
    "pl.feature",
    "figsize-str",
    lambda a, c: pl.feature(a, c["feature"], figsize="big", show=False),
    ValueError,
    r"figsize must be \(width, height\)",
)
add(
    "pl.interpretability",
    "method-unknown",
    lambda a, c: pl.interpretability(a, method="foo", show=False),
    ValueError,
    "method must be 'ora', 'gsea' or 'prerank'",
)
add(
    "get.feature_table",
    "n_top-zero",
    lambda a, c: get.feature_table(a, LAYER, n_top=0),
    ValueError,
    "n_top must be a positive integer",
)
add(
    "get.feature_table",
    "n_top-negative",
    lambda a, c: get.feature_table(a, LAYER, n_top=-1),
    ValueError,
    "n_top must be a positive integer",
)
add(
    "get.feature_table",
    "live_threshold-str",
    lambda a, c: get.feature_table(a, LAYER, live_threshold="a"),
    ValueError,
    "live_threshold must be a finite number",
)
add(
    "get.feature_table",
    "live_threshold-positive",
    lambda a, c: get.feature_table(a, LAYER, live_threshold=5),
    ValueError,
    "log10 firing rate, at most 0",
)
add(
    "get.interpretability",
    "random_model_key-annotation",
    lambda a, c: get.interpretability(a, random_model_key="sct_annotation"),
    ValueError,
    "not a random-model baseline",
)
add(
    "get.mudata",
    "modality-layer-name",
    lambda a, c: get.mudata(a, modality="L0"),
    ValueError,
    "name of a feature modality",
)
for _kind, _key in BAD_KEYS.items():
    add(
        "get.mudata",
        f"modality-{_kind}",
        lambda a, c, k=_key: get.mudata(a, modality=k),
        ValueError,
        KEY_MATCH,
    )
add(
    "get.mudata",
    "layers-empty",
    lambda a, c: get.mudata(a, layers=[]),
    ValueError,
    r"No layers given: pass some of \[0, 1, 2, 3\]",
)
add(
    "get.mudata",
    "layers-float",
    lambda a, c: get.mudata(a, layers=[1.5]),
    TypeError,
    "layers takes layer numbers",
)
add(
    "get.transcoders",
    "layers-empty",
    lambda a, c: get.transcoders(a, layers=[]),
    ValueError,
    r"No layers given: pass some of \[0, 1, 2, 3\]",
)
add(
    "get.transcoders",
    "layers-str",
    lambda a, c: get.transcoders(a, layers=["2"]),
    TypeError,
    "layers takes layer numbers",
)


# -- analysis tools: further cases ------------------------------------------------------------------
# (section tl)
def _rank_tl(a, **kw):
    return tl.rank_features_groups(a, **{"groupby": "bulk_labels", "layers": [LAYER], **kw})


for _kind, _n_top in {"zero": 0, "negative": -1, "float": 2.5, "str": "5"}.items():
    add(
        "tl.rank_features_groups",
        f"n_top-{_kind}",
        lambda a, c, n=_n_top: _rank_tl(a, n_top=n),
        ValueError,
        "n_top must be a positive integer",
    )
add(
    "tl.rank_features_groups",
    "groups-empty",
    lambda a, c: _rank_tl(a, groups=[]),
    ValueError,
    "groups is empty: pass 'all'",
)
add(
    "tl.rank_features_groups",
    "reference-unknown-checked-first",
    lambda a, c: _rank_tl(a, reference="nope"),
    ValueError,
    "reference 'nope' is not a group",
)
add(
    "tl.rank_features_groups",
    "reference-is-the-only-group",
    lambda a, c: _rank_tl(a, groups=["CD14+ Monocyte"], reference="CD14+ Monocyte"),
    ValueError,
    "only group to rank",
)
add(
    "tl.rank_features_groups",
    "method-checked-first",
    lambda a, c: _rank_tl(a, method="foo"),
    ValueError,
    r"method must be one of \('wilcoxon'",
)
add(
    "tl.rank_features_groups",
    "layers-empty",
    lambda a, c: _rank_tl(a, layers=[]),
    ValueError,
    "No layers given",
)
add(
    "tl.rank_features_groups",
    "groupby-integer",
    lambda a, c: _rank_tl(a, groupby="n_genes"),
    ValueError,
    r"holds integers .*astype\('category'\)",
)
add(
    "tl.rank_features_groups",
    "copy-str",
    lambda a, c: _rank_tl(a, copy="no"),
    TypeError,
    "copy must be True or False",
)
add(
    "tl.annotate_features",
    "backed-markers",
    lambda a, c: _annotate(_backed(a, c)),
    ValueError,
    r"adata\.to_memory\(\)",
)
add(
    "tl.annotate_features",
    "seed-negative",
    lambda a, c: _annotate(a, seed=-1),
    ValueError,
    "seed must be a non-negative integer",
)
add(
    "tl.annotate_features",
    "seed-str",
    lambda a, c: _annotate(a, seed="a"),
    ValueError,
    "seed must be a non-negative integer",
)
add(
    "tl.annotate_features",
    "live_threshold-str",
    lambda a, c: _annotate(a, live_threshold="a"),
    ValueError,
    "live_threshold must be a finite number",
)
add(
    "tl.annotate_features",
    "live_threshold-positive",
    lambda a, c: _annotate(a, live_threshold=0.5),
    ValueError,
    "log10 firing rate, at most 0",
)
add(
    "tl.annotate_features",
    "layers-empty",
    lambda a, c: _annotate(a, layers=[]),
    ValueError,
    "No layers given",
)
add(
    "tl.annotate_features",
    "allow_network-str",
    lambda a, c: _annotate(a, allow_network="no"),
    TypeError,
    "allow_network must be True or False",
)


def _enrich_tl(a, c, **kw):
    return tl.circuit_enrichment(a, **{"circuit": c["circuit"], "gene_sets": MARKERS, **kw})


add(
    "tl.circuit_enrichment",
    "min_size-zero",
    lambda a, c: _enrich_tl(a, c, min_size=0),
    ValueError,
    "min_size must be a positive integer",
)
add(
    "tl.circuit_enrichment",
    "min_size-negative",
    lambda a, c: _enrich_tl(a, c, min_size=-3),
    ValueError,
    "min_size must be a positive integer",
)
add(
    "tl.circuit_enrichment",
    "min-above-max",
    lambda a, c: _enrich_tl(a, c, min_size=10, max_size=5),
    ValueError,
    r"min_size \(10\) is above max_size \(5\)",
)
add(
    "tl.circuit_enrichment",
    "backed-markers",
    lambda a, c: _enrich_tl(_backed(a, c), c),
    ValueError,
    r"adata\.to_memory\(\)",
)
add(
    "tl.feature_connections",
    "features-int",
    lambda a, c: tl.feature_connections(a, 123),
    TypeError,
    "features takes feature names such as 'L2F17'",
)
add(
    "tl.feature_connections",
    "features-none",
    lambda a, c: tl.feature_connections(a, None),
    TypeError,
    "features takes feature names such as 'L2F17'",
)
add(
    "tl.gene_attribution",
    "cells-duplicated",
    lambda a, c: _attr(a, c, cells=[c["cell"], c["cell"]]),
    ValueError,
    "more than once: pass each cell once",
)
add(
    "tl.gene_attribution",
    "seed-str",
    lambda a, c: _attr(a, c, cells=[c["cell"]], seed="a"),
    ValueError,
    "seed must be a non-negative integer",
)
add(
    "tl.gene_attribution",
    "keep_n_genes-str",
    lambda a, c: _attr(a, c, cells=[c["cell"]], keep_n_genes="no"),
    TypeError,
    "keep_n_genes must be True or False",
)
add(
    "tl.score_circuit",
    "backed-gene_score",
    lambda a, c: tl.score_circuit(_backed(a, c), circuit=c["circuit"], key_added="s"),
    ValueError,
    r"adata\.to_memory\(\)` first, or pass gene_score=False",
)
add(
    "tl.score_circuit",
    "gene_score-str",
    lambda a, c: tl.score_circuit(a, circuit=c["circuit"], gene_score="no", key_added="s"),
    TypeError,
    "gene_score must be True or False",
)
for _kind, _value in {"str": "a", "none": None}.items():
    add(
        "tl.feature_activations",
        f"live_threshold-{_kind}",
        lambda a, c, v=_value: tl.feature_activations(a, live_threshold=v, progress=False),
        ValueError,
        "live_threshold must be a finite number",
    )
add(
    "tl.feature_activations",
    "live_threshold-positive",
    lambda a, c: tl.feature_activations(a, live_threshold=0.5, progress=False),
    ValueError,
    "log10 firing rate, at most 0",
)
add(
    "tl.feature_activations",
    "layers-empty",
    lambda a, c: tl.feature_activations(a, layers=[], progress=False),
    ValueError,
    r"No layers given: pass some of \[0, 1, 2, 3\]",
)
add(
    "tl.feature_activations",
    "genes-str",
    lambda a, c: tl.feature_activations(a, genes="no", progress=False),
    TypeError,
    "genes must be True or False",
)
add(
    "pp.cell_sentences",
    "use_raw-str",
    lambda a, c: pp.cell_sentences(a, use_raw="yes", key_added="cs"),
    TypeError,
    "use_raw must be True, False or None",
)
add(
    "pp.cell_sentences",
    "copy-str",
    lambda a, c: pp.cell_sentences(a, copy="yes", key_added="cs"),
    TypeError,
    "copy must be True or False",
)


# -- models and files: further cases ----------------------------------------------------------------
# (section files)
def _no_new_dir(call, path):
    """``call()``, then check (also when it raises) that it created no ``path``."""
    try:
        call()
    finally:
        assert not path.exists(), f"{path} was created before the error"


_lm = sct.load_model
for _kind, _call, _error, _match in [
    ("model-int", lambda a, c: _lm(123), TypeError, "model must be a C2SModel"),
    ("model-dir-without-config", lambda a, c: _lm(c["tmp"]), FileNotFoundError, "no config.json"),
    ("settings-str", lambda a, c: _lm(settings="x"), TypeError, "PromptSettings or a dict"),
    ("settings-unknown-key", lambda a, c: _lm(settings={"foo": 1}), ValueError, "'foo'"),
    ("dtype-int", lambda a, c: _lm(dtype="int64"), ValueError, "floating-point"),
    ("dtype-unknown-str", lambda a, c: _lm(dtype="half16"), ValueError, "floating-point"),
    ("name-int", lambda a, c: _lm(name=123), ValueError, "non-empty str"),
    ("name-empty", lambda a, c: _lm(name=""), ValueError, "non-empty str"),
    ("device-gpu", lambda a, c: _lm(device="gpu"), ValueError, "torch calls a GPU 'cuda'"),
    ("device-missing-cuda", lambda a, c: _lm(device="cuda:99"), ValueError, "Available: 'cpu'"),
]:
    add("load_model", _kind, _call, _error, _match)
add(
    "datasets.tiny_c2s",
    "device-gpu",
    lambda a, c: sct.datasets.tiny_c2s(device="gpu"),
    ValueError,
    "not a device of this machine",
)
add(
    "datasets.tiny_c2s",
    "device-missing-cuda",
    lambda a, c: sct.datasets.tiny_c2s(device="cuda:99"),
    ValueError,
    "Available: 'cpu'",
)
add(
    "tl.train_transcoders",
    "device-gpu",
    lambda a, c: tl.train_transcoders(a, device="gpu", key_added="t2", progress=False),
    ValueError,
    "not a device of this machine",
)
add(
    "tl.train_transcoders",
    "config-str",
    lambda a, c: tl.train_transcoders(a, config="topk", key_added="t2", progress=False),
    TypeError,
    "must be a TrainingConfig or a dict",
)
add(
    "tl.train_transcoders",
    "config-dict-unknown-field",
    lambda a, c: tl.train_transcoders(a, config={"kk": 4}, key_added="t2", progress=False),
    TypeError,
    r"Unknown training setting\(s\) \['kk'\]",
)
add(
    "tl.train_transcoders",
    "weights_dir-empty",
    lambda a, c: tl.train_transcoders(a, weights_dir="", key_added="t2", progress=False),
    ValueError,
    "weights_dir is empty",
)
add(
    "get.transcoders",
    "device-missing-cuda",
    lambda a, c: get.transcoders(a, device="cuda:99"),
    ValueError,
    "not a device of this machine",
)
add(
    "save_transcoders",
    "arguments-swapped",
    lambda a, c: sct.save_transcoders(str(c["tmp"] / "tc"), a),
    TypeError,
    r"save_transcoders\(adata, path\)",
)
add(
    "save_transcoders",
    "path-none",
    lambda a, c: sct.save_transcoders(a, None),
    TypeError,
    "directory path",
)
add(
    "save_transcoders",
    "path-empty",
    lambda a, c: sct.save_transcoders(a, ""),
    ValueError,
    "path is empty",
)
add(
    "load_transcoders",
    "path-none",
    lambda a, c: sct.load_transcoders(None, a, key_added="x"),
    TypeError,
    "directory path",
)
add(
    "load_transcoders",
    "model-int",
    lambda a, c: sct.load_transcoders(
        sct.save_transcoders(a, c["tmp"] / "tc"), a, model=123, key_added="x"
    ),
    TypeError,
    "model must be a C2SModel",
)
add(
    "export_circuit_tracer_graph",
    "slug-too-long",
    lambda a, c: _no_new_dir(
        lambda: sct.export_circuit_tracer_graph(
            a, c["tmp"] / "g", circuit=c["circuit"], slug="x" * 300
        ),
        c["tmp"] / "g",
    ),
    ValueError,
    "at most 200",
)


# -- tl.cell_embeddings, tl.train_sae, tl.sae_sweep, tl.concept_attribution and their get/pl ------
# (section sae)
def _on_sae(a, call):
    """``call(b)`` on a copy ``b`` of ``a`` with a small SAE on ``X_pca``; ``b`` must be left as
    it was when the call raises (the copy keeps ``a`` itself unchanged for the common check).
    """
    b = a.copy()
    tl.train_sae(
        b, use_rep="X_pca", expansion_factor=1, k=2, n_steps=3, batch_size=32, progress=False
    )
    before = _state(b)
    try:
        call(b)
    finally:
        assert _state(b) == before, "the call changed the AnnData before failing"


def _nan_pca(a):
    b = a.copy()
    b.obsm["X_pca"] = b.obsm["X_pca"].copy()
    b.obsm["X_pca"][3, 0] = np.nan
    return b


def _pca_encoder(a):
    return np.zeros((a.n_obs, 50), dtype=np.float32)


_ce, _sae, _sweep, _ca = tl.cell_embeddings, tl.train_sae, tl.sae_sweep, tl.concept_attribution
_SAE = {"n_steps": 3, "batch_size": 32, "progress": False}
for _fn, _kind, _call, _error, _match in (
    ("tl.cell_embeddings", "pool-max", lambda a: _ce(a, pool="max"), ValueError, "pool must be"),
    ("tl.cell_embeddings", "layer-9", lambda a: _ce(a, layer=9), ValueError, "does not exist"),
    ("tl.cell_embeddings", "layer-str", lambda a: _ce(a, layer="2"), TypeError, "layer number"),
    (
        "tl.cell_embeddings",
        "batch_size-0",
        lambda a: _ce(a, batch_size=0),
        ValueError,
        "batch_size",
    ),
    (
        "tl.cell_embeddings",
        "key_added-user-obsm",
        lambda a: _ce(a, key_added="umap"),
        ValueError,
        r"would replace adata.obsm\['X_umap'\]",
    ),
    (
        "tl.cell_embeddings",
        "sentence_key-missing",
        lambda a: _ce(a, sentence_key="nope", progress=False),
        KeyError,
        "cell_sentences",
    ),
    ("tl.train_sae", "use_rep-missing", lambda a: _sae(a, use_rep="X_scVI"), KeyError, "not found"),
    ("tl.train_sae", "use_rep-none", lambda a: _sae(a, use_rep=None), TypeError, "name an entry"),
    (
        "tl.train_sae",
        "use_rep-nan",
        lambda a: _sae(_nan_pca(a), use_rep="X_pca", **_SAE),
        ValueError,
        "NaN or infinite values in 1 cells",
    ),
    (
        "tl.train_sae",
        "k-above-concepts",
        lambda a: _sae(a, use_rep="X_pca", expansion_factor=1, k=51, **_SAE),
        ValueError,
        "smaller k or a larger expansion_factor",
    ),
    (
        "tl.train_sae",
        "expansion_factor-0",
        lambda a: _sae(a, use_rep="X_pca", expansion_factor=0, **_SAE),
        ValueError,
        "expansion_factor",
    ),
    (
        "tl.train_sae",
        "n_steps-0",
        lambda a: _sae(a, use_rep="X_pca", n_steps=0),
        ValueError,
        "n_steps",
    ),
    (
        "tl.train_sae",
        "validation_fraction-1",
        lambda a: _sae(a, use_rep="X_pca", validation_fraction=1.0, **_SAE),
        ValueError,
        "validation_fraction",
    ),
    ("tl.train_sae", "lr-negative", lambda a: _sae(a, use_rep="X_pca", lr=-1.0), ValueError, "lr"),
    (
        "tl.train_sae",
        "device-gpu",
        lambda a: _sae(a, use_rep="X_pca", device="gpu"),
        ValueError,
        "not a device of this machine",
    ),
    (
        "tl.train_sae",
        "key_added-over-use_rep",
        lambda a: _sae(a, use_rep="X_umap", k=2, key_added="umap", **_SAE),
        ValueError,
        "over the embedding",
    ),
    (
        "tl.train_sae",
        "key_added-user-obsm",
        lambda a: _sae(a, use_rep="X_pca", key_added="umap", **_SAE),
        ValueError,
        r"would replace adata.obsm\['X_umap'\]",
    ),
    (
        "tl.sae_sweep",
        "expansion_factors-empty",
        lambda a: _sweep(a, use_rep="X_pca", expansion_factors=()),
        ValueError,
        "distinct positive integers",
    ),
    (
        "tl.sae_sweep",
        "expansion_factors-repeated",
        lambda a: _sweep(a, use_rep="X_pca", expansion_factors=(2, 2)),
        ValueError,
        "distinct positive integers",
    ),
    (
        "tl.sae_sweep",
        "k-above-concepts",
        lambda a: _sweep(a, use_rep="X_pca", expansion_factors=(1, 2), k=60),
        ValueError,
        "smaller k",
    ),
    (
        "tl.sae_sweep",
        "use_rep-missing",
        lambda a: _sweep(a, use_rep="X_c2s"),
        KeyError,
        "not found",
    ),
    ("tl.concept_attribution", "no-sae", lambda a: _ca(a), KeyError, "sct.tl.train_sae"),
    (
        "tl.concept_attribution",
        "encoder-missing",
        lambda a: _on_sae(a, lambda b: _ca(b)),
        ValueError,
        "pass `encoder=`",
    ),
    (
        "tl.concept_attribution",
        "encoder-str",
        lambda a: _on_sae(a, lambda b: _ca(b, encoder="scvi")),
        TypeError,
        "encoder must be a function",
    ),
    (
        "tl.concept_attribution",
        "encoder-wrong-shape",
        lambda a: _on_sae(a, lambda b: _ca(b, encoder=lambda x: np.zeros((x.n_obs, 3)))),
        ValueError,
        "encoder returned shape",
    ),
    (
        "tl.concept_attribution",
        "model-and-encoder",
        lambda a: _on_sae(a, lambda b: _ca(b, "m", encoder=_pca_encoder)),
        ValueError,
        "not both",
    ),
    (
        "tl.concept_attribution",
        "cells-unknown",
        lambda a: _on_sae(a, lambda b: _ca(b, encoder=_pca_encoder, cells=["nope"])),
        KeyError,
        "not in adata.obs_names",
    ),
    (
        "tl.concept_attribution",
        "genes-empty",
        lambda a: _on_sae(a, lambda b: _ca(b, encoder=_pca_encoder, genes=[])),
        ValueError,
        "non-empty list of gene names",
    ),
    (
        "tl.concept_attribution",
        "genes-unknown",
        lambda a: _on_sae(a, lambda b: _ca(b, encoder=_pca_encoder, genes=["NOTAGENE"])),
        KeyError,
        "adata.var_names",
    ),
    (
        "tl.concept_attribution",
        "n_top_genes-0",
        lambda a: _on_sae(a, lambda b: _ca(b, encoder=_pca_encoder, n_top_genes=0)),
        ValueError,
        "n_top_genes",
    ),
    (
        "tl.concept_attribution",
        "layer-missing",
        lambda a: _on_sae(a, lambda b: _ca(b, encoder=_pca_encoder, layer="counts")),
        KeyError,
        "counts",
    ),
    (
        "tl.concept_attribution",
        "key_added-slash",
        lambda a: _on_sae(a, lambda b: _ca(b, encoder=_pca_encoder, key_added="a/b")),
        ValueError,
        KEY_MATCH,
    ),
    (
        "get.concept_attribution",
        "before-attribution",
        lambda a: _on_sae(a, lambda b: get.concept_attribution(b)),
        KeyError,
        "run `sct.tl.concept_attribution",
    ),
    (
        "get.concept_attribution",
        "no-sae",
        lambda a: get.concept_attribution(a),
        KeyError,
        "train_sae",
    ),
    ("pl.sae_sweep", "keys-missing", lambda a: pl.sae_sweep(a, show=False), KeyError, "sae_sweep"),
    (
        "pl.sae_sweep",
        "keys-empty",
        lambda a: pl.sae_sweep(a, [], show=False),
        ValueError,
        "one or more",
    ),
    (
        "pl.sae_sweep",
        "labels-mismatch",
        lambda a: _on_sweep(a, lambda b: pl.sae_sweep(b, labels=["a", "b"], show=False)),
        ValueError,
        "one each",
    ),
):
    add(_fn, _kind, lambda a, c, f=_call: f(a), _error, _match)


def _on_sweep(a, call):
    """``call(b)`` on a copy ``b`` of ``a`` with a one-SAE sweep on ``X_pca``."""
    b = a.copy()
    tl.sae_sweep(b, use_rep="X_pca", expansion_factors=(1,), k=2, **_SAE)
    call(b)


# -- get.enrichment, and annotate_features' methods, tables and weighted nets ---------------------
# (section enrichment)
def _without_tables(a):
    """A copy of ``a`` whose annotation keeps only the best terms (``tables=False``)."""
    return tl.annotate_features(a, gene_sets=MARKERS, layers=[LAYER], tables=False, copy=True)


_NET = pd.DataFrame(
    {"source": ["s"] * 6, "target": ["CD3D", "CD3E", "LCK", "CD2", "IL7R", "CD79A"]}
)
for _fn, _kind, _call, _error, _match in (
    ("get.enrichment", "layer-not-computed", lambda a: get.enrichment(a, 9), KeyError, "9"),
    ("get.enrichment", "layer-str", lambda a: get.enrichment(a, "L2"), TypeError, "layer"),
    (
        "get.enrichment",
        "method-unknown",
        lambda a: get.enrichment(a, LAYER, method="fisher"),
        ValueError,
        "method must be",
    ),
    (
        "get.enrichment",
        "method-not-run",
        lambda a: get.enrichment(a, LAYER, method="gsea"),
        KeyError,
        "no 'gsea' results",
    ),
    (
        "get.enrichment",
        "annotation_key-missing",
        lambda a: get.enrichment(a, LAYER, annotation_key="nope"),
        KeyError,
        "annotate_features",
    ),
    (
        "get.enrichment",
        "annotation_key-other-kind",
        lambda a: get.enrichment(a, LAYER, annotation_key="sct_activations"),
        KeyError,
        "annotation record",
    ),
    (
        "get.enrichment",
        "no-tables",
        lambda a: get.enrichment(_without_tables(a), LAYER),
        KeyError,
        "tables=True",
    ),
    (
        "tl.annotate_features",
        "method-list-unknown",
        lambda a: _annotate(a, method=["ora", "gsea"]),
        ValueError,
        "list of",
    ),
    (
        "tl.annotate_features",
        "method-list-empty",
        lambda a: _annotate(a, method=[]),
        ValueError,
        "method must be",
    ),
    (
        "tl.annotate_features",
        "tables-str",
        lambda a: _annotate(a, tables="yes"),
        TypeError,
        "tables must be True or False",
    ),
    (
        "tl.annotate_features",
        "net-weight-nan",
        lambda a: _annotate(a, gene_sets=_NET.assign(weight=[1, 1, float("nan"), 1, 1, 1])),
        ValueError,
        "finite numbers",
    ),
    (
        "tl.annotate_features",
        "net-weight-str",
        lambda a: _annotate(a, gene_sets=_NET.assign(weight=["up"] * 6), method="ulm"),
        ValueError,
        "finite numbers",
    ),
):
    add(_fn, _kind, lambda a, c, f=_call: f(a), _error, _match)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_before_anything_is_written(case, base, ctx):
    adata = base.copy()
    before = _state(adata)
    with pytest.raises(case.error, match=case.match):
        case.call(adata, ctx)
    assert _state(adata) == before, f"{case.function} changed the AnnData before failing"


def test_every_public_function_has_bad_input_cases():
    public = {f"{m}.{n}" for m in ("pp", "tl", "get", "pl") for n in getattr(sct, m).__all__}
    public |= {"save_transcoders", "load_transcoders", "export_circuit_tracer_graph"}
    public |= {"export_circuit_tracer_transcoders"}
    assert public <= {c.function for c in CASES}
