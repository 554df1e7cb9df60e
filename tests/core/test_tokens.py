"""Token-to-gene mapping of prompts, on the real Pythia tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sctranscoder.core.sentences import PromptSettings, format_prompt, rank_genes
from sctranscoder.core.tokens import PADDING, PROMPT_TEXT, token_gene_index, tokenize_prompts

#: Subword splits (HLA - DR B 1), shared prefixes (CD7/CD74, RPL13/RPL13A, S100A8/S100A9) and a
#: gene ending in a digit after a dot, right before the sentence's final ".".
GENES = "HLA-DRB1 MT-ND4 S100A8 S100A9 CD7 CD74 RPL13 RPL13A RP11-291B21.2".split()


def _gene_tokens(tokenizer, batch, row: int, gene: int) -> tuple[np.ndarray, str]:
    """Positions of one gene's tokens and their decoded text."""
    L = int(batch.lengths[row])
    positions = np.flatnonzero(batch.gene_index[row, :L].numpy() == gene)
    return positions, tokenizer.decode(batch.input_ids[row, positions].tolist())


def test_gene_tokens_decode_to_the_gene(pythia_tokenizer):
    batch = tokenize_prompts(pythia_tokenizer, [GENES], PromptSettings())
    for g, gene in enumerate(GENES):
        positions, text = _gene_tokens(pythia_tokenizer, batch, 0, g)
        assert text.removeprefix(" ") == gene
        assert (np.diff(positions) == 1).all(), f"tokens of {gene} are not contiguous"
    assert len(GENES[0]) > 1
    assert len(_gene_tokens(pythia_tokenizer, batch, 0, 0)[0]) > 1


def test_real_cell_sentences_map_every_gene(pythia_tokenizer, pbmc):
    gene_lists = rank_genes(pbmc.raw.X[:8], pbmc.raw.var_names.str.upper(), n_genes=200)
    batch = tokenize_prompts(pythia_tokenizer, gene_lists, PromptSettings())
    for row, genes in enumerate(gene_lists):
        decoded = [_gene_tokens(pythia_tokenizer, batch, row, g)[1] for g in range(len(genes))]
        assert [d.removeprefix(" ") for d in decoded] == genes


def test_prompt_text_around_the_sentence(pythia_tokenizer):
    settings = PromptSettings()
    batch = tokenize_prompts(pythia_tokenizer, [GENES], settings)
    ids, gidx = batch.input_ids[0].tolist(), batch.gene_index[0].numpy()
    gene_positions = np.flatnonzero(gidx >= 0)
    first, last = gene_positions[0], gene_positions[-1]

    # the first gene right after "Cell sentence:" is gene 0; everything before is prompt text
    assert gidx[first] == 0
    assert pythia_tokenizer.decode(ids[:first]).endswith("\nCell sentence:")
    assert (gidx[:first] == PROMPT_TEXT).all()
    # after the last gene: ".\nThe cell type ... is:", all prompt text
    assert gidx[last] == len(GENES) - 1
    after = settings.template.split("{genes}", 1)[1]
    assert pythia_tokenizer.decode(ids[last + 1 :]) == after
    assert (gidx[last + 1 :] == PROMPT_TEXT).all()
    # prompt text and genes together are the whole prompt
    assert pythia_tokenizer.decode(ids) == format_prompt(GENES, settings)


def test_gene_index_is_monotone_and_covers_every_gene(pythia_tokenizer):
    batch = tokenize_prompts(pythia_tokenizer, [GENES], PromptSettings())
    gidx = batch.gene_index[0].numpy()
    genes = gidx[gidx >= 0]
    assert (np.diff(genes) >= 0).all()
    np.testing.assert_array_equal(np.unique(genes), np.arange(len(GENES)))


def test_padding_in_a_batch_of_different_lengths(pythia_tokenizer):
    settings = PromptSettings()
    gene_lists = [GENES, GENES[:2], GENES[3:7]]
    batch = tokenize_prompts(pythia_tokenizer, gene_lists, settings)

    n_tokens = [len(pythia_tokenizer(format_prompt(g, settings))["input_ids"]) for g in gene_lists]
    assert batch.lengths.tolist() == n_tokens
    assert batch.input_ids.shape == (3, max(n_tokens))
    assert ((batch.gene_index == PADDING) == (batch.attention_mask == 0)).all()
    assert (batch.attention_mask.sum(1) == batch.lengths).all()
    # a prompt's gene index does not depend on the batch it is padded in
    for row, genes in enumerate(gene_lists):
        alone = tokenize_prompts(pythia_tokenizer, [genes], settings)
        L = n_tokens[row]
        assert torch.equal(batch.gene_index[row, :L], alone.gene_index[0])
        assert torch.equal(batch.input_ids[row, :L], alone.input_ids[0])


def test_too_long_prompts_are_refused(pythia_tokenizer):
    with pytest.raises(ValueError, match="n_genes"):
        tokenize_prompts(pythia_tokenizer, [GENES], PromptSettings(), max_length=10)


def test_token_gene_index_from_offsets():
    # "AB CDE." : genes AB = [0, 2) and CDE = [3, 6)
    spans = [(0, 2), (3, 6)]
    offsets = [
        (0, 0),  # zero width (a special token): prompt text
        (0, 1),  # "A"
        (1, 2),  # "B"
        (2, 4),  # " C", offsets not trimmed of the leading space
        (4, 6),  # "DE"
        (6, 7),  # "."
        (5, 5),  # zero width inside a gene: still prompt text
    ]
    np.testing.assert_array_equal(
        token_gene_index(offsets, spans), [PROMPT_TEXT, 0, 0, 1, 1, PROMPT_TEXT, PROMPT_TEXT]
    )
    np.testing.assert_array_equal(token_gene_index([(0, 1), (1, 2)], []), [PROMPT_TEXT] * 2)


# -- SentencePiece-style tokenizers (Gemma, Llama): a leading "▁" instead of a space ------------


def _gemma_style_tokenizer(genes):
    """Like Gemma's tokenizer.json: spaces replaced by "▁" in a normalizer and BPE pieces that
    start at a "▁" (as SentencePiece trains them), trained here on gene symbols.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " ")])
    corpus = [format_prompt(genes[i : i + 15], PromptSettings()) for i in range(0, len(genes), 5)]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=500, special_tokens=["<eos>", "<pad>", "<unk>"]),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module", params=["metaspace_unigram", "gemma_style_bpe"])
def sentencepiece_tokenizer(request):
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    from _models import gene_sentencepiece_tokenizer

    genes = list(pbmc.raw.var_names.str.upper()) + GENES + ["CD3", "CD3D", "CD3E", "CD3EAP"]
    if request.param == "metaspace_unigram":
        return gene_sentencepiece_tokenizer(genes)
    return _gemma_style_tokenizer(genes)


def _pieces(tokenizer, ids) -> str:
    return "".join(tokenizer.convert_ids_to_tokens(ids)).replace("▁", " ")


@pytest.mark.parametrize(
    "genes",
    [GENES, ["CD3", "CD3D", "CD3E", "CD3EAP", "CD3"], ["CD3D"]],
    ids=["subwords", "shared_prefixes", "one_gene"],
)
def test_sentencepiece_tokens_map_to_their_genes(sentencepiece_tokenizer, genes):
    tok = sentencepiece_tokenizer
    batch = tokenize_prompts(tok, [genes], PromptSettings())
    L = int(batch.lengths[0])
    ids, gidx = batch.input_ids[0, :L].tolist(), batch.gene_index[0, :L].numpy()
    pieces = tok.convert_ids_to_tokens(ids)
    assert any(p.startswith("▁") for p in pieces)  # really a SentencePiece-style vocabulary
    for g, gene in enumerate(genes):
        positions = np.flatnonzero(gidx == g)
        assert positions.size, f"{gene} has no token"
        assert (np.diff(positions) == 1).all(), f"tokens of {gene} are not contiguous"
        text = _pieces(tok, [ids[p] for p in positions]).strip()
        # a piece may carry the sentence's final "." with the last gene, never another gene
        assert text == gene or (g == len(genes) - 1 and text == gene + "."), (gene, text)
    # the first gene starts right after "Cell sentence:", whose tokens are prompt text
    first = int(np.flatnonzero(gidx == 0)[0])
    assert _pieces(tok, ids[:first]).endswith("Cell sentence:") or _pieces(
        tok, ids[:first]
    ).endswith("Cell sentence: ")
    assert (gidx[:first] == PROMPT_TEXT).all()
