"""Feature activations of a batch of prompts, aggregated per cell and per gene. Torch only.

For every token the transcoder of a layer gives its active features; a cell's activation of a
feature is then the maximum (or mean) over the tokens of its genes, or the value at the final
prompt token (where the model makes its prediction). A gene's activation in a cell is the maximum
over the gene's subword tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .hooks import capture_mlp_io, run_to_layers
from .tokens import TokenizedPrompts
from .transcoder import Transcoder

Aggregate = Literal["max", "mean", "last"]
AGGREGATES = ("max", "mean", "last")


@dataclass
class BatchActivations:
    """One layer's activations for one batch of prompts.

    Attributes
    ----------
    cells
        ``(batch, n_features)`` aggregated activation per cell.
    gene_cell, gene_pos, gene_values
        Per (cell, gene) pair present in the batch: the cell's row in the batch, the gene's
        position in that cell's sentence, and its ``(n_pairs, n_features)`` maximum activation
        over the gene's tokens.
    fired
        ``(n_features,)`` number of real tokens on which each feature fired.
    n_tokens
        Number of real tokens.
    """

    cells: torch.Tensor
    gene_cell: torch.Tensor
    gene_pos: torch.Tensor
    gene_values: torch.Tensor
    fired: torch.Tensor
    n_tokens: int


@torch.no_grad()
def batch_activations(
    model: torch.nn.Module,
    transcoders: dict[int, Transcoder],
    batch: TokenizedPrompts,
    *,
    aggregate: Aggregate = "max",
    genes: bool = True,
) -> dict[int, BatchActivations]:
    """Run the model once on ``batch`` and aggregate every transcoder's features."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}.")
    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    gidx = batch.gene_index.to(device)
    layers = sorted(transcoders)
    with capture_mlp_io(model, layers) as store:
        run_to_layers(model, ids, mask)
        inputs = {layer: store[layer][0] for layer in layers}
    B, T = ids.shape
    is_gene = gidx >= 0
    last = batch.lengths.to(device) - 1
    n_real = int(mask.sum())
    # (cell, gene) pairs present: compact ids per token, for per-gene maxima
    G = int(gidx.max().item()) + 1 if genes and bool(is_gene.any()) else 0
    if G:
        pair_of_token = torch.where(is_gene, torch.arange(B, device=device)[:, None] * G + gidx, -1)
        present, pair_compact = torch.unique(pair_of_token[is_gene], return_inverse=True)
        gene_cell, gene_pos = present // G, present % G
    out = {}
    for layer in layers:
        tc = transcoders[layer]
        F_ = tc.config.n_features
        x = inputs[layer].float()
        values, indices = tc.encode_sparse(x)  # (B, T, k)
        k = values.shape[-1]
        real = mask.bool()
        fired = torch.zeros(F_, device=device)
        fired.scatter_add_(0, indices[real].reshape(-1), (values[real] > 0).float().reshape(-1))
        if aggregate == "last":
            rows = torch.arange(B, device=device)
            cells = torch.zeros(B, F_, device=device)
            cells.scatter_(1, indices[rows, last], values[rows, last])
        else:
            v = values.masked_fill(~is_gene[..., None], 0.0).reshape(B, T * k)
            i = indices.reshape(B, T * k)
            cells = torch.zeros(B, F_, device=device)
            if aggregate == "max":
                cells.scatter_reduce_(1, i, v, reduce="amax", include_self=True)
            else:
                cells.scatter_add_(1, i, v)
                cells /= is_gene.sum(1, keepdim=True).clamp_min(1)
        if G:
            gv = torch.zeros(present.numel(), F_, device=device)
            tok_v = values[is_gene]  # (n_gene_tokens, k)
            tok_i = indices[is_gene]
            flat = pair_compact[:, None] * F_ + tok_i
            gv.view(-1).scatter_reduce_(0, flat.reshape(-1), tok_v.reshape(-1), reduce="amax")
            out[layer] = BatchActivations(cells, gene_cell, gene_pos, gv, fired, n_real)
        else:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            out[layer] = BatchActivations(
                cells, empty, empty, torch.zeros(0, F_, device=device), fired, n_real
            )
    return out
