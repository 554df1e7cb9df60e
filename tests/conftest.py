"""Shared fixtures: the embedded model, and transcoders trained once for the whole session.

Training takes most of a test's setup, so every module that needs "transcoders on the embedded
model" shares one session fixture (:func:`trained_base`) and works on a copy of it
(:func:`trained`), instead of training its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scanpy as sc

import sctranscoder as sct

#: The real GPT-NeoX-20B tokenizer of Pythia (and so of C2S-Pythia), kept beside the repository.
PYTHIA_TOKENIZER = (
    Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "pythia_20B_tokenizer.json"
)
#: The shared training run: cells, tokens per layer and tokens per step.
N_CELLS, N_TOKENS, BATCH = 150, 8192, 1024
#: Marker sets computed from the data: the offline gene sets of the tests.
MARKERS = "markers:bulk_labels"


@pytest.fixture
def pbmc():
    """700 PBMCs x 765 genes; ``.X`` is scaled, ``.raw`` log-normalised (shipped with scanpy)."""
    return sc.datasets.pbmc68k_reduced()


@pytest.fixture(scope="session")
def model():
    """The embedded model (read-only: tests must not change it)."""
    return sct.datasets.tiny_c2s()


@pytest.fixture(scope="session")
def trained_base(model):
    """150 PBMCs with sentences, transcoders on every layer and their activations (read-only)."""
    adata = sc.datasets.pbmc68k_reduced()[:N_CELLS].copy()
    sct.pp.cell_sentences(adata, model=model)
    sct.tl.train_transcoders(adata, model, n_tokens=N_TOKENS, batch_size=BATCH, progress=False)
    sct.tl.feature_activations(adata, progress=False)
    return adata


@pytest.fixture
def trained(trained_base):
    """A copy of :func:`trained_base` that a test may change."""
    return trained_base.copy()


@pytest.fixture(scope="session")
def annotated_base(trained_base):
    """:func:`trained_base` with its features annotated by the data's markers (ORA, read-only)."""
    adata = trained_base.copy()
    sct.tl.annotate_features(adata, gene_sets=MARKERS, n_top=20, seed=0)
    return adata


@pytest.fixture(scope="session")
def pythia_tokenizer():
    if not PYTHIA_TOKENIZER.exists():
        pytest.skip(
            "shared/assets/pythia_20B_tokenizer.json not found: the real Pythia tokenizer lives "
            "in ../shared beside the repo"
        )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(PYTHIA_TOKENIZER), eos_token="<|endoftext|>")


@pytest.fixture
def sct_logs(caplog):
    """Pytest's caplog seeing every sctranscoder message at verbosity "info".

    Tools log through scanpy's logger (its own hierarchy, which pytest does not capture) and the
    torch core through the standard library's ``"sctranscoder"`` logger (which does not
    propagate); both are routed to caplog here, and ``sc.settings.verbosity`` is "info".
    """
    import logging

    logger = logging.getLogger("sctranscoder")
    scanpy_root = sc.settings._root_logger
    verbosity = sc.settings.verbosity
    sc.settings.verbosity = "info"
    logger.propagate = True
    scanpy_root.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG):
            yield caplog
    finally:
        scanpy_root.removeHandler(caplog.handler)
        logger.propagate = False
        sc.settings.verbosity = verbosity


#: The layer of the feature ranking and gene attribution in :func:`everything`.
EVERYTHING_LAYER = 2


@pytest.fixture(scope="session")
def everything(annotated_base, model):
    """Every tool's record on one AnnData: transcoders, activations, annotation, a circuit with
    its enrichment and score, a feature ranking and a gene attribution.
    """
    adata = annotated_base.copy()
    cell = str(adata.obs_names[0])
    sct.tl.trace_circuit(adata, model, cell=cell, max_feature_nodes=32)
    sct.tl.circuit_enrichment(adata, circuit=cell, gene_sets=MARKERS, min_size=1)
    sct.tl.score_circuit(adata, circuit=cell)
    sct.tl.rank_features_groups(adata, groupby="bulk_labels", layers=[EVERYTHING_LAYER])
    X = adata.obsm[f"X_sct_L{EVERYTHING_LAYER}"]
    feature = int(np.asarray(X[0].todense()).ravel().argmax())
    sct.tl.gene_attribution(
        adata,
        model,
        feature=f"L{EVERYTHING_LAYER}F{feature}",
        cells=[cell],
        key_added="ga",
        progress=False,
    )
    return adata, cell
