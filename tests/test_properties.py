"""Property-based tests (hypothesis) of cell sentences and of the token-to-gene map.

Cell sentences: random dense and sparse matrices with many ties and zeros, all-zero rows,
duplicated symbols and invalid values, through :func:`sctranscoder.pp.cell_sentences`.
Token-to-gene map: random lists of realistic gene symbols through the real Pythia tokenizer and a
SentencePiece-style one (:func:`_models.gene_sentencepiece_tokenizer`).

Every property runs a fixed, derandomised set of examples (no database), so the file is
deterministic and takes seconds.
"""

from __future__ import annotations

import string

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import sparse

from sctranscoder.core.sentences import PromptSettings, format_prompt, rank_genes
from sctranscoder.core.tokens import PADDING, PROMPT_TEXT, token_gene_index, tokenize_prompts
from sctranscoder.pp import cell_sentences

#: Deterministic and fast: derandomised, no example database, no deadline (first calls import).
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies -----------------------------------------------------------------------------------

#: Values exactly representable in float16/32/64, few of them: many ties, many zeros.
VALUES = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.25, 3.0, 7.5]

#: Human symbols: HLA-DRB1, MT-CO1, RP11-34P13.7, S100A8, C1orf112; mouse: Cd8a, Gm42418, mt-Co1.
HUMAN = st.from_regex(r"[A-Z][A-Z0-9]{0,6}([-.][A-Z0-9]{1,5}){0,2}", fullmatch=True)
ORF = st.from_regex(r"C[1-9][0-9]?orf[1-9][0-9]{0,2}", fullmatch=True)
MOUSE = st.from_regex(r"(mt-)?[A-Z][a-z][a-z0-9]{0,6}", fullmatch=True)
SYMBOLS = st.one_of(HUMAN, ORF, MOUSE)


@st.composite
def expression(draw, *, min_cells=1, max_cells=6, max_genes=12, expressed=True):
    """``(X, symbols, obs_names)``: a dense float64 matrix (every row expressed when
    ``expressed``), unique symbols (also when upper-cased) and unique cell names.
    """
    n_cells = draw(st.integers(min_cells, max_cells))
    n_genes = draw(st.integers(1, max_genes))
    X = draw(hnp.arrays(np.float64, (n_cells, n_genes), elements=st.sampled_from(VALUES)))
    if expressed:
        empty = np.flatnonzero((X == 0).all(1))
        X[empty, draw(st.integers(0, n_genes - 1))] = 1.0
    symbols = draw(
        st.lists(SYMBOLS, min_size=n_genes, max_size=n_genes, unique_by=lambda s: s.upper())
    )
    names = draw(
        st.lists(
            st.text("abcdefghACGT-_0123456789", min_size=1, max_size=12),
            min_size=n_cells,
            max_size=n_cells,
            unique=True,
        )
    )
    return X, symbols, names


def _no():
    """A context that expects nothing."""
    import contextlib

    return contextlib.nullcontext()


def _adata(X, symbols, names) -> ad.AnnData:
    return ad.AnnData(
        X=X, obs=pd.DataFrame(index=pd.Index(names, dtype=str)), var=pd.DataFrame(index=symbols)
    )


def _sentences(X, symbols, names, **kw) -> dict[str, list[str]]:
    """Sentences by cell name."""
    out = cell_sentences(_adata(X, symbols, names), copy=True, **kw)
    return {
        n: str(s).split(" ") for n, s in zip(out.obs_names, out.obs["cell_sentence"], strict=True)
    }


# -- cell sentences -------------------------------------------------------------------------------


@PROPERTY
@given(data=expression(), n_genes=st.integers(1, 15), seed=st.integers(0, 2**32))
def test_a_sentence_is_the_expressed_genes_by_non_increasing_value(data, n_genes, seed):
    X, symbols, names = data
    got = _sentences(X, symbols, names, n_genes=n_genes, seed=seed)
    column = {s.upper(): j for j, s in enumerate(symbols)}
    for i, name in enumerate(names):
        genes = got[name]
        values = X[i, [column[g] for g in genes]]
        assert len(genes) == len(set(genes)) == min(n_genes, np.count_nonzero(X[i]))
        assert all(g == g.upper() for g in genes)
        assert (values > 0).all()
        assert (np.diff(values) <= 0).all()
        # the genes left out are at most as expressed as the least expressed gene kept
        left_out = np.delete(X[i], [column[g] for g in genes])
        assert left_out.max(initial=0) <= values.min()


@PROPERTY
@given(
    data=expression(),
    n_genes=st.integers(1, 15),
    dtype=st.sampled_from([np.float16, np.float32, np.int64, np.uint8]),
    layout=st.sampled_from(
        ["dense", "csr", "csc", "csr_array", "csr_unsorted", "csr_explicit_zeros"]
    ),
)
def test_storage_and_dtype_do_not_change_the_sentences(data, n_genes, dtype, layout):
    X, symbols, names = data
    if np.issubdtype(dtype, np.integer):
        X = np.ceil(X)  # counts
    if dtype == np.float16:  # scipy.sparse has no float16: only dense matrices hold it
        layout = "dense"
    expected = _sentences(X, symbols, names, n_genes=n_genes)
    stored = X.astype(dtype)
    if layout == "dense":
        pass
    elif layout == "csc":
        stored = sparse.csc_matrix(stored)
    elif layout == "csr_array":
        stored = sparse.csr_array(stored)
    else:
        stored = sparse.csr_matrix(stored)
    if layout == "csr_unsorted":  # same matrix, the entries of each row stored in reverse
        reverse = np.concatenate(
            [
                np.arange(b - 1, a - 1, -1)
                for a, b in zip(stored.indptr[:-1], stored.indptr[1:], strict=True)
            ]
        ).astype(np.int64)
        stored = sparse.csr_matrix(
            (stored.data[reverse], stored.indices[reverse], stored.indptr), shape=stored.shape
        )
    if layout == "csr_explicit_zeros":  # every entry stored, zeros too: those are not expressed
        rows, cols = np.indices(X.shape).reshape(2, -1)
        stored = sparse.csr_matrix((X.ravel().astype(dtype), (rows, cols)), shape=X.shape)
        assert stored.nnz == X.size
    assert _sentences(stored, symbols, names, n_genes=n_genes) == expected


@PROPERTY
@given(data=expression(min_cells=2), seed=st.integers(0, 1000), order=st.randoms())
def test_a_cell_keeps_its_sentence_when_cells_are_subset_reordered_or_chunked(data, seed, order):
    X, symbols, names = data
    whole = _sentences(X, symbols, names, seed=seed)
    perm = list(range(len(names)))
    order.shuffle(perm)
    keep = perm[: max(1, len(perm) // 2 + 1)]
    part = _sentences(X[keep], symbols, [names[i] for i in keep], seed=seed, chunk_size=1)
    assert part == {names[i]: whole[names[i]] for i in keep}


@PROPERTY
@given(data=expression(), seeds=st.tuples(st.integers(0, 1000), st.integers(0, 1000)))
def test_the_seed_only_reorders_genes_of_equal_expression(data, seeds):
    X, symbols, names = data
    a = _sentences(X, symbols, names, seed=seeds[0])
    b = _sentences(X, symbols, names, seed=seeds[1])
    column = {s.upper(): j for j, s in enumerate(symbols)}
    for i, name in enumerate(names):
        assert sorted(a[name]) == sorted(b[name])
        np.testing.assert_array_equal(
            X[i, [column[g] for g in a[name]]], X[i, [column[g] for g in b[name]]]
        )


@PROPERTY
@given(data=expression(expressed=False), sparse_input=st.booleans())
def test_cells_without_an_expressed_gene_are_refused_and_nothing_is_written(data, sparse_input):
    X, symbols, names = data
    X[0] = 0
    adata = _adata(sparse.csr_matrix(X) if sparse_input else X, symbols, names)
    n_empty = int((X == 0).all(1).sum())
    with pytest.raises(ValueError, match=f"{n_empty} cells have no expressed gene") as err:
        cell_sentences(adata)
    assert f"(first: {names[0]}" in str(err.value)
    assert "cell_sentence" not in adata.obs
    assert "cell_sentence" not in adata.uns
    # the core leaves such a row empty
    assert rank_genes(X[:1], symbols, n_genes=None) == [[]]


@PROPERTY
@given(
    data=expression(max_genes=8),
    copies=st.integers(1, 3),
    lower=st.booleans(),
    column=st.booleans(),
)
def test_duplicated_symbols_are_refused_and_nothing_is_written(data, copies, lower, column):
    X, symbols, names = data
    twin = symbols[0].lower() if lower else symbols[0]  # the same gene once upper-cased
    X = np.hstack([X, np.ones((X.shape[0], copies))])
    with_twins = [*symbols, *[twin] * copies]
    if column:  # symbols in a var column, unique ids as var_names
        adata = _adata(X, [f"id{j}" for j in range(X.shape[1])], names)
        adata.var["symbol"] = with_twins
    else:
        with pytest.warns(UserWarning, match="not unique") if not lower or copies > 1 else _no():
            adata = _adata(X, with_twins, names)
    with pytest.raises(ValueError, match=r"1 gene symbols occur more than once") as err:
        cell_sentences(adata, gene_symbols="symbol" if column else None)
    message = str(err.value)
    assert f"{symbols[0].upper()!r} x{copies + 1}" in message
    assert "var_names_make_unique" in message  # the tempting fix, and why it is none
    assert (".var['symbol']" if column else ".var_names") + ".str.upper().duplicated()" in message
    assert "cell_sentence" not in adata.obs
    assert "cell_sentence" not in adata.uns


@PROPERTY
@given(
    data=expression(),
    bad=st.sampled_from([-0.5, -1e-8, np.nan, np.inf, -np.inf]),
    where=st.integers(0, 10**6),
    sparse_input=st.booleans(),
)
def test_negative_and_non_finite_values_are_refused(data, bad, where, sparse_input):
    X, symbols, names = data
    X.flat[where % X.size] = bad
    adata = _adata(sparse.csr_matrix(X) if sparse_input else X, symbols, names)
    message = "negative values" if bad < 0 and np.isfinite(bad) else "NaN or infinite"
    with pytest.raises(ValueError, match=message):
        cell_sentences(adata)
    assert "cell_sentence" not in adata.obs


@PROPERTY
@given(data=expression())
def test_a_boolean_matrix_ranks_like_counts(data):
    X, symbols, names = data
    binary = X > 0
    assert _sentences(binary, symbols, names) == _sentences(binary.astype(np.int64), symbols, names)


def test_boolean_and_float16_matrix_regression():
    # a dense float16 matrix failed in scipy.sparse ("does not support dtype float16"), found
    # by the storage property above; `-values` of a boolean array raised a TypeError
    X = np.array([[2.0, 0.0, 3.0], [0.0, 1.0, 0.0]])
    expected = [["C", "A"], ["B"]]
    assert rank_genes(X.astype(np.float16), ["A", "B", "C"], n_genes=None) == expected
    assert rank_genes(X > 0, ["A", "B", "C"], n_genes=None, seed=0) == rank_genes(
        (X > 0).astype(np.int64), ["A", "B", "C"], n_genes=None, seed=0
    )


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_seed_must_be_a_non_negative_integer(seed):
    # a negative seed failed inside numpy ("expected non-negative integer") after the matrix
    # had been checked
    adata = _adata(np.eye(3), ["A", "B", "C"], ["c1", "c2", "c3"])
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        cell_sentences(adata, seed=seed)
    assert "cell_sentence" not in adata.obs


# -- the token-to-gene map ------------------------------------------------------------------------

#: Mouse symbols besides pbmc68k_reduced's, so that the SentencePiece vocabulary has every letter.
_MOUSE_CORPUS = "Cd8a Gja1 Sqle Lyz2 Cxcl12 Vwf Hbb-bs Ptprc Kdr Fos Mki67 mt-Co1 Rpl13a".split()


@pytest.fixture(scope="module")
def sentencepiece():
    import scanpy as sc
    from _models import gene_sentencepiece_tokenizer

    genes = list(sc.datasets.pbmc68k_reduced().raw.var_names) + _MOUSE_CORPUS
    tok = gene_sentencepiece_tokenizer(genes, vocab_size=600)
    alphabet = " ".join(string.ascii_letters + string.digits + "-.")  # that of SYMBOLS
    assert tok.unk_token_id not in tok(alphabet)["input_ids"]
    return tok


def _check_token_map(tokenizer, gene_lists, text_of) -> None:
    """The invariants of :func:`tokenize_prompts` for one batch (``text_of``: the text of a list
    of token ids, as the tokenizer writes it).
    """
    settings = PromptSettings()
    batch = tokenize_prompts(tokenizer, gene_lists, settings)
    assert ((batch.gene_index == PADDING) == (batch.attention_mask == 0)).all()
    for row, genes in enumerate(gene_lists):
        L = int(batch.lengths[row])
        ids = batch.input_ids[row, :L].tolist()
        gidx = batch.gene_index[row, :L].numpy()
        assert set(np.unique(gidx)) <= {PROMPT_TEXT, *range(len(genes))}
        # tokens of a gene are contiguous, non-empty, and genes come in sentence order
        last_end = -1
        for g, gene in enumerate(genes):
            positions = np.flatnonzero(gidx == g)
            assert positions.size, f"{gene} has no token"
            assert (np.diff(positions) == 1).all(), f"tokens of {gene} are not contiguous"
            assert positions[0] > last_end, f"{gene} overlaps or precedes the gene before it"
            last_end = positions[-1]
            text = text_of([ids[p] for p in positions]).strip()
            # a piece may carry the sentence's final "." with the last gene, never another gene
            assert text == gene or (g == len(genes) - 1 and text == gene + "."), (gene, text)
        # before the first gene and after the last one: prompt text only
        first = int(np.flatnonzero(gidx == 0)[0])
        assert (gidx[:first] == PROMPT_TEXT).all()
        assert (gidx[last_end + 1 :] == PROMPT_TEXT).all()
        assert text_of(ids[:first]).rstrip().endswith("Cell sentence:")
        # a prompt's map does not depend on the batch it is padded in
        alone = tokenize_prompts(tokenizer, [genes], settings)
        np.testing.assert_array_equal(alone.gene_index[0].numpy(), gidx)


GENE_LISTS = st.lists(st.lists(SYMBOLS, min_size=1, max_size=12), min_size=1, max_size=3)


@PROPERTY
@given(gene_lists=GENE_LISTS)
def test_pythia_maps_every_gene_to_its_own_tokens(pythia_tokenizer, gene_lists):
    _check_token_map(pythia_tokenizer, gene_lists, pythia_tokenizer.decode)
    # byte-level BPE is lossless: the tokens are the prompt
    settings = PromptSettings()
    batch = tokenize_prompts(pythia_tokenizer, gene_lists[:1], settings)
    assert pythia_tokenizer.decode(batch.input_ids[0].tolist()) == format_prompt(
        gene_lists[0], settings
    )


@PROPERTY
@given(gene_lists=GENE_LISTS)
def test_sentencepiece_maps_every_gene_to_its_own_tokens(sentencepiece, gene_lists):
    def pieces(ids):
        return "".join(sentencepiece.convert_ids_to_tokens(ids)).replace("▁", " ")

    assert "<unk>" not in pieces(
        tokenize_prompts(sentencepiece, gene_lists, PromptSettings()).input_ids.ravel().tolist()
    ), "the strategy drew a character the vocabulary lacks"
    _check_token_map(sentencepiece, gene_lists, pieces)


@st.composite
def offsets_and_spans(draw):
    """Gene spans separated by one space, and tokens that partition the text, each within one
    word (as a whitespace pre-tokenizer makes them), some with the space before them.
    """
    lengths = draw(st.lists(st.integers(1, 8), min_size=0, max_size=8))
    prefix = draw(st.integers(0, 5))
    spans, pos = [], prefix
    for n in lengths:
        spans.append((pos, pos + n))
        pos += n + 1
    offsets, start = [], 0
    # every gene ends a token; its first token starts at the gene or at the space before it
    boundaries = {e for _, e in spans} | {s - draw(st.integers(0, 1)) for s, _ in spans}
    cuts = sorted(set(draw(st.lists(st.integers(1, max(pos, 1)), max_size=20))) | boundaries)
    for cut in cuts:
        if cut > start:
            offsets.append((start, cut))
            start = cut
    if draw(st.booleans()):
        offsets.insert(draw(st.integers(0, len(offsets))), (start, start))  # a special token
    return offsets, spans


@PROPERTY
@given(case=offsets_and_spans())
def test_token_gene_index_is_the_gene_each_token_overlaps(case):
    offsets, spans = case
    got = token_gene_index(offsets, spans)
    for (s, e), g in zip(offsets, got, strict=True):
        overlapping = [j for j, (a, b) in enumerate(spans) if s < b and a < e and e > s]
        assert len(overlapping) <= 1
        assert g == (overlapping[0] if overlapping else PROMPT_TEXT)
