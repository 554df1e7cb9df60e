"""Tokenise prompts and map every token to the gene it belongs to.

Tokenizers split gene symbols into subwords (the Pythia tokenizer reads ``HLA-DRB1`` as
``HLA - DR B 1``). Each token is assigned to the gene whose characters it overlaps, using the
tokenizer's character offsets; tokens of the prompt text get gene index ``-1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .sentences import PromptSettings, format_prompt, gene_spans

if TYPE_CHECKING:
    from collections.abc import Sequence

#: Gene index given to tokens of the prompt text (not part of any gene).
PROMPT_TEXT = -1


@dataclass
class TokenizedPrompts:
    """A right-padded batch of prompts with a gene index for every token.

    Attributes
    ----------
    input_ids, attention_mask
        ``(batch, seq)`` long tensors, right-padded.
    gene_index
        ``(batch, seq)`` long tensor: position of the token's gene in that prompt's gene list,
        ``-1`` for prompt text, ``-2`` for padding; None when tokenised without it
        (``tokenize_prompts(gene_index=False)``, as training's prompt streams are).
    lengths
        Number of real tokens per prompt.
    prompts
        The prompt strings.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    gene_index: torch.Tensor | None
    lengths: torch.Tensor
    prompts: list[str]


PADDING = -2


def token_gene_index(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> np.ndarray:
    """Gene index of each token given token character offsets and gene character spans.

    A token belongs to a gene when their character ranges overlap. Offsets of zero width (special
    tokens) belong to the prompt text.
    """
    starts = np.fromiter((s for s, _ in spans), dtype=np.int64, count=len(spans))
    ends = np.fromiter((e for _, e in spans), dtype=np.int64, count=len(spans))
    out = np.full(len(offsets), PROMPT_TEXT, dtype=np.int64)
    if len(spans) == 0:
        return out
    for t, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        # the last gene starting before the token's end; spans are sorted and disjoint
        g = int(np.searchsorted(starts, e, side="left")) - 1
        if g >= 0 and ends[g] > s:
            out[t] = g
    return out


def tokenize_prompts(
    tokenizer,
    gene_lists: Sequence[Sequence[str]],
    settings: PromptSettings,
    *,
    max_length: int | None = None,
    gene_index: bool = True,
) -> TokenizedPrompts:
    """Build, tokenise and right-pad the prompts of ``gene_lists``.

    Parameters
    ----------
    tokenizer
        A fast Hugging Face tokenizer (it must return character offsets).
    gene_lists
        Ranked gene symbols per cell.
    settings
        Prompt template and organism.
    max_length
        Refuse prompts longer than this many tokens (the model's context).
    gene_index
        Find each token's gene (``False``: ``gene_index`` is None; 2.8 ms instead of 12.8 ms
        for 16 prompts of 100 genes with the embedded default's tokenizer, which is what
        training's prompt streams need).
    """
    prompts = [format_prompt(g, settings) for g in gene_lists]
    enc = tokenizer(prompts, return_offsets_mapping=gene_index, add_special_tokens=False)
    ids_list, gidx_list = list(enc["input_ids"]), []
    if gene_index:
        for genes, offs in zip(gene_lists, enc["offset_mapping"], strict=True):
            gidx_list.append(token_gene_index(offs, gene_spans(genes, settings)))
    lengths = [len(i) for i in ids_list]
    longest = max(lengths) if lengths else 0
    if max_length is not None and longest > max_length:
        raise ValueError(
            f"A prompt has {longest} tokens but the model reads at most {max_length}; "
            "use fewer genes per sentence (n_genes=...)."
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(ids_list)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, ids in enumerate(ids_list):
        input_ids[i, : len(ids)] = torch.as_tensor(ids)
        mask[i, : len(ids)] = 1
    index = None
    if gene_index:
        index = torch.full((n, longest), PADDING, dtype=torch.long)
        for i, gi in enumerate(gidx_list):
            index[i, : len(gi)] = torch.as_tensor(gi)
    return TokenizedPrompts(input_ids, mask, index, torch.as_tensor(lengths), prompts)
