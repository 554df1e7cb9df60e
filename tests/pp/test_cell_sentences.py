from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from scipy import sparse

from sctranscoder.core.model import C2SModel
from sctranscoder.core.sentences import C2S_CELL_TYPE_TEMPLATE, PromptSettings
from sctranscoder.pp import _cell_sentences, cell_sentences


def _sentences(adata: ad.AnnData, key: str = "cell_sentence") -> list[list[str]]:
    return [s.split(" ") for s in adata.obs[key].astype(str)]


def _raw_only(pbmc: ad.AnnData) -> ad.AnnData:
    """pbmc68k_reduced with its log-normalised .raw as X and no .raw."""
    return ad.AnnData(
        X=pbmc.raw.X.copy(), obs=pbmc.obs[[]].copy(), var=pd.DataFrame(index=pbmc.raw.var_names)
    )


def test_pbmc_default_uses_raw_and_ranks_by_expression(pbmc, sct_logs):
    assert cell_sentences(pbmc) is None

    assert "using adata.raw.X instead" in sct_logs.text
    params = pbmc.uns["cell_sentence"]["params"]
    assert params == {
        "n_genes": 200,
        "organism": "Homo sapiens",
        "template": C2S_CELL_TYPE_TEMPLATE,
        "seed": 0,
        "source": "raw",
        "data_kind": "log-normalised",
        "gene_symbols": "var_names",
    }
    raw = pbmc.raw.X.toarray()
    column = {g.upper(): j for j, g in enumerate(pbmc.raw.var_names)}
    sentences = _sentences(pbmc)
    for i, genes in enumerate(sentences):
        values = raw[i, [column[g] for g in genes]]
        assert (values > 0).all()
        assert (np.diff(values) <= 0).all(), "genes must be in descending expression order"
        assert len(genes) == len(set(genes)) == min(200, int((raw[i] > 0).sum()))
        # nothing left out is more expressed than what the sentence holds
        rest = np.delete(raw[i], [column[g] for g in genes])
        assert rest.max(initial=0) <= values.min()
    assert (pbmc.obs["cell_sentence_n_genes"].to_numpy() == [len(s) for s in sentences]).all()
    assert all(g == g.upper() for s in sentences for g in s)


def test_ties_are_broken_by_seed(pbmc):
    a = cell_sentences(pbmc, seed=0, copy=True)
    b = cell_sentences(pbmc, seed=0, copy=True)
    c = cell_sentences(pbmc, seed=1, copy=True)
    assert _sentences(a) == _sentences(b)
    assert _sentences(a) != _sentences(c)
    # a different seed only reorders genes of equal expression
    raw = pbmc.raw.X.toarray()
    column = {g.upper(): j for j, g in enumerate(pbmc.raw.var_names)}
    for i, (s0, s1) in enumerate(zip(_sentences(a), _sentences(c), strict=True)):
        np.testing.assert_array_equal(
            raw[i, [column[g] for g in s0]], raw[i, [column[g] for g in s1]]
        )


def test_ties_do_not_depend_on_chunking(pbmc, monkeypatch):
    whole = cell_sentences(pbmc, copy=True)
    monkeypatch.setattr(_cell_sentences, "_CHUNK_ROWS", 64)
    chunked = cell_sentences(pbmc, copy=True)
    assert _sentences(whole) == _sentences(chunked)


def test_n_genes_truncates(pbmc):
    full = cell_sentences(pbmc, copy=True)
    short = cell_sentences(pbmc, n_genes=10, copy=True)
    assert short.uns["cell_sentence"]["params"]["n_genes"] == 10
    assert (short.obs["cell_sentence_n_genes"] <= 10).all()
    assert _sentences(short) == [s[:10] for s in _sentences(full)]


def test_model_settings_are_the_defaults(pbmc):
    settings = PromptSettings(n_genes=17, organism="Mus musculus")
    model = C2SModel(model=torch.nn.Module(), tokenizer=None, settings=settings)

    from_model = cell_sentences(pbmc, model=model, copy=True)
    params = from_model.uns["cell_sentence"]["params"]
    assert (params["n_genes"], params["organism"]) == (17, "Mus musculus")
    assert from_model.obs["cell_sentence_n_genes"].max() == 17

    overridden = cell_sentences(pbmc, model=model, n_genes=5, organism="Homo sapiens", copy=True)
    params = overridden.uns["cell_sentence"]["params"]
    assert (params["n_genes"], params["organism"]) == (5, "Homo sapiens")
    assert overridden.obs["cell_sentence_n_genes"].max() == 5


def test_scaled_values_are_refused(pbmc):
    with pytest.raises(ValueError, match=r"negative values.*use_raw=True"):
        cell_sentences(pbmc, use_raw=False)
    del pbmc.raw
    with pytest.raises(ValueError, match=r"scaled.*use_raw=True.*layer="):
        cell_sentences(pbmc)
    assert "cell_sentence" not in pbmc.obs


@pytest.mark.parametrize(("bad", "message"), [(np.nan, "NaN"), (-0.5, "negative values")])
def test_invalid_values_anywhere_are_refused(pbmc, bad, message):
    adata = _raw_only(pbmc)
    adata.X.data[-1] = bad  # in the last cell: every value is checked, not a sample
    with pytest.raises(ValueError, match=message):
        cell_sentences(adata)


def test_ensembl_ids_are_refused_and_gene_symbols_column_is_used(pbmc):
    adata = _raw_only(pbmc)
    symbols = adata.var_names.str.lower()  # symbols are upper-cased for the sentence
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    adata.var["symbol"] = symbols

    with pytest.raises(ValueError, match="gene_symbols="):
        cell_sentences(adata)
    with pytest.raises(KeyError, match="symbol"):
        cell_sentences(adata, gene_symbols="feature_name")

    cell_sentences(adata, gene_symbols="symbol")
    assert adata.uns["cell_sentence"]["params"]["gene_symbols"] == "symbol"
    expected = cell_sentences(pbmc, copy=True)
    assert _sentences(adata) == _sentences(expected)


def test_empty_cell_is_refused_and_nothing_written(pbmc):
    lognorm = pbmc.raw.X.tolil()
    lognorm[3] = 0
    pbmc.layers["lognorm"] = sparse.csr_matrix(lognorm)
    obs_before, uns_before = pbmc.obs.copy(), set(pbmc.uns)

    with pytest.raises(ValueError, match=r"1 cells have no expressed gene.*filter_cells") as err:
        cell_sentences(pbmc, layer="lognorm")

    assert pbmc.obs_names[3] in str(err.value)
    pd.testing.assert_frame_equal(pbmc.obs, obs_before)
    assert set(pbmc.uns) == uns_before


def test_counts_and_log_normalised_give_the_same_sentences():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(0.3, 2.0, size=(300, 400))).astype(np.float32)
    counts[:, 0] += 1  # every cell expresses something
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts),
        var=pd.DataFrame(index=[f"GENE{i}" for i in range(counts.shape[1])]),
    )
    adata.layers["counts"] = counts  # dense: the storage must not matter either
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata, base=10)  # the C2S convention

    from_counts = cell_sentences(adata, layer="counts", n_genes=50, copy=True)
    from_lognorm = cell_sentences(adata, n_genes=50, copy=True)

    assert from_counts.uns["cell_sentence"]["params"]["data_kind"] == "counts"
    assert from_counts.uns["cell_sentence"]["params"]["source"] == "layers/counts"
    assert from_lognorm.uns["cell_sentence"]["params"]["data_kind"] == "log-normalised"
    assert _sentences(from_counts) == _sentences(from_lognorm)


def test_copy_leaves_input_untouched(pbmc):
    obs_before, uns_before = pbmc.obs.copy(), set(pbmc.uns)
    result = cell_sentences(pbmc, key_added="c2s", copy=True)

    pd.testing.assert_frame_equal(pbmc.obs, obs_before)
    assert set(pbmc.uns) == uns_before
    assert {"c2s", "c2s_n_genes"} <= set(result.obs.columns)
    assert "c2s" in result.uns


def test_h5ad_round_trip(pbmc, tmp_path):
    cell_sentences(pbmc, n_genes=50)
    pbmc.write_h5ad(tmp_path / "pbmc.h5ad")
    back = ad.read_h5ad(tmp_path / "pbmc.h5ad")

    assert _sentences(back) == _sentences(pbmc)
    np.testing.assert_array_equal(
        back.obs["cell_sentence_n_genes"], pbmc.obs["cell_sentence_n_genes"]
    )
    assert back.uns["cell_sentence"]["params"] == pbmc.uns["cell_sentence"]["params"]


def test_backed_file_is_read_in_chunks(pbmc, tmp_path, monkeypatch):
    path = tmp_path / "backed.h5ad"
    _raw_only(pbmc).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    monkeypatch.setattr(_cell_sentences, "_CHUNK_ROWS", 128)

    with pytest.raises(ValueError, match="to_memory"):
        cell_sentences(backed, copy=True)
    cell_sentences(backed)

    assert backed.isbacked
    assert backed.uns["cell_sentence"]["params"]["source"] == "X"
    expected = cell_sentences(pbmc, use_raw=True, copy=True)
    assert _sentences(backed) == _sentences(expected)
    # as documented, the results held in memory are saved with adata.write()
    backed.write()
    assert _sentences(ad.read_h5ad(path)) == _sentences(expected)


def test_argument_errors(pbmc):
    with pytest.raises(KeyError, match="available layers"):
        cell_sentences(pbmc, layer="counts")
    pbmc.layers["lognorm"] = pbmc.raw.X.copy()
    with pytest.raises(ValueError, match="not both"):
        cell_sentences(pbmc, layer="lognorm", use_raw=True)
    with pytest.raises(ValueError, match="n_genes"):
        cell_sentences(pbmc, n_genes=0)
    with pytest.raises(TypeError, match="C2SModel"):
        cell_sentences(pbmc, model=42)
    # a name or path is loaded like any model (here: a directory that is not there)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        cell_sentences(pbmc, "./no_such_model")


def _suggested_fix(message: str) -> str:
    """The code the error suggests, between the backticks after "e.g. the first:"."""
    return message.split("e.g. the first: `", 1)[1].split("`", 1)[0]


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("where", ["var_names", "column", "raw"])
def test_duplicated_symbols_are_refused_and_the_suggested_fix_works(pbmc, where):
    # issue 12: a duplicated symbol made sentences that name a gene twice
    adata = _raw_only(pbmc)
    names = list(adata.var_names)
    names[10] = names[3].lower()  # the same gene once upper-cased
    names[20] = names[3]
    if where == "column":
        adata.var["symbol"] = names
        adata.var_names = [f"id{j}" for j in range(adata.n_vars)]
    elif where == "raw":
        adata.var_names = names
        adata.raw = adata
        adata.X = sc.pp.scale(adata.X.toarray())  # X scaled: .raw is read
    else:
        adata.var_names = names
    kw = {"gene_symbols": "symbol"} if where == "column" else {}
    obs_before, uns_before = adata.obs.copy(), set(adata.uns)

    with pytest.raises(ValueError, match="1 gene symbols occur more than once") as err:
        cell_sentences(adata, **kw)
    message = str(err.value)
    assert f"{names[3].upper()!r} x3" in message
    assert "var_names_make_unique" in message
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    assert set(adata.uns) == uns_before

    exec(_suggested_fix(message), {}, scope := {"adata": adata})
    fixed = scope["adata"]
    cell_sentences(fixed, **kw)
    n_vars = (fixed.raw if where == "raw" else fixed).n_vars
    assert n_vars == pbmc.raw.n_vars - 2
    assert all(len(s) == len(set(s)) for s in _sentences(fixed))


def test_organism_is_what_the_training_prompts_name(pbmc, model, monkeypatch, sct_logs):
    # issue 12: `organism=` was stored but every prompt said "Homo sapiens"
    adata = pbmc[:24].copy()
    cell_sentences(adata, model=model, organism="Mus musculus")
    assert adata.uns["cell_sentence"]["params"]["organism"] == "Mus musculus"
    prompts = []
    tokenize = C2SModel.tokenize

    def spy(self, gene_lists, **kwargs):
        batch = tokenize(self, gene_lists, **kwargs)
        prompts.extend(batch.prompts)
        return batch

    monkeypatch.setattr(C2SModel, "tokenize", spy)
    import sctranscoder as sct

    sct.tl.train_transcoders(adata, model, layers=[0], n_tokens=512, batch_size=256, progress=False)
    assert prompts
    assert all("in a Mus musculus cell." in p for p in prompts)
    assert adata.uns["sct"]["model"]["organism"] == "Mus musculus"
    assert model.settings.organism == "Homo sapiens"  # the caller's model is left as it was
    assert "prompts name 'Mus musculus'" in sct_logs.text
