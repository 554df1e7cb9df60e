"""The embedded default model: what its model card claims, re-measured from the shipped weights."""

from __future__ import annotations

import numpy as np
import pytest

import sctranscoder as sct
from sctranscoder.core.sentences import cell_ids, rank_genes


def test_architecture_is_pythia_like(model):
    cfg = model.model.config
    assert cfg.model_type == "gpt_neox"
    assert cfg.use_parallel_residual
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    assert not cfg.tie_word_embeddings
    assert model.n_layers == 4
    assert model.d_model == 128
    # gene symbols are split into subwords, as by Pythia's tokenizer
    assert len(model.tokenizer.tokenize(" HLA-DRB1")) > 1


def test_records_its_prompt_settings(model):
    assert model.settings.n_genes == 100
    assert "{genes}" in model.settings.template
    assert model.labels
    assert "CD14+ Monocyte" in model.labels
    assert model.name == sct.datasets.TINY_C2S_NAME


def test_heldout_accuracy_matches_the_model_card(model, pbmc):
    heldout = sct.datasets.tiny_c2s_heldout_cells()
    cells = pbmc[heldout]
    truth = cells.obs["bulk_labels"].astype(str).to_numpy()
    genes = [g.upper() for g in cells.raw.var_names]
    sentences = rank_genes(
        cells.raw.X, genes, n_genes=model.settings.n_genes, seed=0, row_ids=cell_ids(heldout)
    )
    pred = np.asarray(model.predict(sentences))
    accuracy = float(np.mean(pred == truth))
    recorded = model.info["heldout_accuracy"][str(model.settings.n_genes)]
    assert accuracy == pytest.approx(recorded, abs=0.015)
    majority = model.info["majority_class_accuracy"]
    assert accuracy > majority + 0.2, (accuracy, majority)
    # no held-out cell was used in training
    assert model.info["n_heldout_cells"] == len(heldout)


def test_pp_uses_the_model_settings_and_gives_the_card_sentences(model, pbmc):
    adata = pbmc[sct.datasets.tiny_c2s_heldout_cells()[:5]].copy()
    sct.pp.cell_sentences(adata, model=model)
    genes = [g.upper() for g in adata.raw.var_names]
    card = rank_genes(adata.raw.X, genes, n_genes=100, seed=0, row_ids=cell_ids(adata.obs_names))
    assert adata.obs["cell_sentence"].tolist() == [" ".join(g) for g in card]
    assert adata.obs["cell_sentence_n_genes"].max() == 100
    assert adata.uns["cell_sentence"]["params"]["n_genes"] == 100
