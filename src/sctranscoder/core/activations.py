"""Feature activations of cells, aggregated per cell and per gene, from one pass of the model.

For every token the transcoder of a layer gives its active features; a cell's activation of a
feature is then the maximum (or mean) over the tokens of its genes, or the value at the final
prompt token (where the model makes its prediction). A gene's activation in a cell is the maximum
over the gene's subword tokens. :func:`collect_activations` runs every cell once and gathers,
per layer, the cells x features matrix, each feature's firing rate and the genes x features
tables (in how many cells a feature fires on a gene, and the sum of those activations). Torch,
numpy and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from scipy import sparse
from tqdm.auto import tqdm

from . import distributed
from .hooks import capture_mlp_io, causal_mask, run_to_layers

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from .model import C2SModel
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
    transcoders: Mapping[int, Transcoder],
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
    model_mask = causal_mask(batch.attention_mask)
    gidx = batch.gene_index.to(device)
    layers = sorted(transcoders)
    with capture_mlp_io(model, layers) as store:
        run_to_layers(model, ids, None if model_mask is None else mask)
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


@dataclass
class ActivationTables:
    """What :func:`collect_activations` gathers, per layer.

    Attributes
    ----------
    cells
        ``(n_cells, n_features)`` CSR float32: each cell's aggregated activation.
    firing_rate
        ``(n_features,)``: fraction of prompt tokens on which each feature fires.
    n_tokens
        Prompt tokens seen (padding excluded).
    genes
        Every gene of the sentences, in first-seen order (the rows of the gene tables); empty
        without gene tables.
    gene_cells
        Cells whose sentence contains each gene.
    gene_counts, gene_sums
        ``(n_genes, n_features)`` CSR: in how many cells the feature fires on the gene (int32),
        and the sum of those activations (float32); divide by ``gene_cells`` for the mean over
        the cells that contain the gene.
    """

    cells: dict[int, sparse.csr_matrix]
    firing_rate: dict[int, np.ndarray]
    n_tokens: int
    genes: list[str] = field(default_factory=list)
    gene_cells: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    gene_counts: dict[int, sparse.csr_matrix] = field(default_factory=dict)
    gene_sums: dict[int, sparse.csr_matrix] = field(default_factory=dict)


class _SparseSum:
    """A running sum of sparse matrices, merged in groups (linear in their total size)."""

    def __init__(self, shape: tuple[int, int], dtype):
        self.shape, self.dtype = shape, dtype
        self.parts: list[sparse.csr_matrix] = []

    def add(self, m: sparse.csr_matrix) -> None:
        self.parts.append(m)
        if len(self.parts) >= 32:
            self.parts = [self.total()]

    def total(self) -> sparse.csr_matrix:
        out = sparse.csr_matrix(self.shape, dtype=self.dtype)
        for part in self.parts:
            out = out + part
        out = sparse.csr_matrix(out, dtype=self.dtype)
        out.eliminate_zeros()
        return out


@torch.no_grad()
def collect_activations(
    model: C2SModel,
    transcoders: Mapping[int, Transcoder],
    sentences: Sequence[Sequence[str]],
    *,
    batch_size: int = 32,
    aggregate: Aggregate = "max",
    genes: bool = True,
    cells: bool = True,
    progress: bool = True,
    gene_names: Sequence[str] | None = None,
) -> ActivationTables:
    """Run every sentence through ``model`` once and gather every transcoder's activations.

    Parameters
    ----------
    model
        The base model (with its tokenizer and prompt settings).
    transcoders
        Transcoders by layer, on the model's device.
    sentences
        One ranked gene list per cell.
    batch_size
        Cells per forward pass.
    aggregate
        ``"max"`` or ``"mean"`` over the tokens of a cell's genes, or ``"last"``: the final
        prompt token.
    genes
        Also gather the genes x features tables.
    cells
        Keep the cells x features matrices (else ``cells`` is empty: for dense bases such as
        :class:`~.neurons.NeuronBasis`, whose matrices are large, when only the rest is needed).
    progress
        Show a progress bar.
    gene_names
        The rows of the gene tables (default: the genes of ``sentences``, in first-seen order);
        must hold every gene of ``sentences``. Ranks that each run a share of the cells pass the
        genes of all cells, so that their tables add up (:func:`gather_tables`).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be positive.")
    layers = sorted(transcoders)
    if not genes:
        names = []
    elif gene_names is None:
        names = list(dict.fromkeys(g for s in sentences for g in s))
    else:
        names = list(gene_names)
    index = {g: i for i, g in enumerate(names)}
    n_features = {la: transcoders[la].config.n_features for la in layers}
    rows = {la: [] for la in layers}
    fired = {la: np.zeros(n_features[la]) for la in layers}
    counts = {la: _SparseSum((len(names), n_features[la]), np.float32) for la in layers}
    sums = {la: _SparseSum((len(names), n_features[la]), np.float32) for la in layers}
    gene_cells = np.zeros(len(names), dtype=np.int64)
    n_tokens = 0
    bar = tqdm(total=len(sentences), desc="activations", disable=not progress, unit="cell")
    try:
        for b0 in range(0, len(sentences), batch_size):
            gl = sentences[b0 : b0 + batch_size]
            batch = model.tokenize(gl)
            acts = batch_activations(
                model.model, transcoders, batch, aggregate=aggregate, genes=genes
            )
            n_tokens += int(batch.attention_mask.sum())
            onto = None
            for la in layers:
                a = acts[la]
                if cells:
                    rows[la].append(sparse.csr_matrix(a.cells.cpu().numpy().astype(np.float32)))
                fired[la] += a.fired.cpu().numpy()
                if not genes or not a.gene_values.shape[0]:
                    continue
                if onto is None:  # gene x (cell, gene) pair: sums a gene's pairs in the batch
                    pairs = zip(a.gene_cell.tolist(), a.gene_pos.tolist(), strict=True)
                    gene_rows = np.fromiter((index[gl[c][p]] for c, p in pairs), dtype=np.int64)
                    np.add.at(gene_cells, gene_rows, 1)
                    onto = sparse.csr_matrix(
                        (
                            np.ones(len(gene_rows), np.float32),
                            (gene_rows, np.arange(len(gene_rows))),
                        ),
                        shape=(len(names), len(gene_rows)),
                    )
                vals = sparse.csr_matrix(
                    a.gene_values.clamp_min(0).cpu().numpy().astype(np.float32)
                )
                hit = vals.copy()
                hit.data = (hit.data > 0).astype(np.float32)
                counts[la].add((onto @ hit).tocsr())
                sums[la].add((onto @ vals).tocsr())
            bar.update(len(gl))
    finally:
        bar.close()
    out = ActivationTables(
        cells={la: _stack(rows[la], n_features[la]) for la in layers} if cells else {},
        firing_rate={la: fired[la] / max(n_tokens, 1) for la in layers},
        n_tokens=n_tokens,
    )
    if genes:
        out.genes, out.gene_cells = names, gene_cells
        for la in layers:
            c = counts[la].total()
            c.data = np.rint(c.data)
            out.gene_counts[la] = c.astype(np.int32)
            out.gene_sums[la] = sums[la].total()
    return out


def shard_cells(n_cells: int) -> np.ndarray:
    """The cells (positions) this rank computes under ``torch.distributed``: every
    ``world_size``-th cell from position ``rank`` (all cells without a process group).
    """
    return np.asarray(distributed.shard(np.arange(n_cells, dtype=np.int64)))


def gather_tables(
    tables: ActivationTables, cells: np.ndarray, n_cells: int, device=None
) -> ActivationTables | None:
    """Put together on rank 0 the tables each rank computed for its ``cells`` (positions in
    the original order, as from :func:`shard_cells`): the cells x features rows in the original
    cell order, firing rates weighted by each rank's tokens, gene tables summed. Returns the
    whole on rank 0 and ``None`` on the other ranks; ``tables`` itself without a process group.

    Each rank's share travels pickled (``torch.distributed.gather_object``), so rank 0 holds
    every rank's cells x features rows at once: the result's size, not the model's, bounds its
    memory.
    """
    if not distributed.is_distributed():
        return tables
    fired = {la: r * tables.n_tokens for la, r in tables.firing_rate.items()}
    share = (np.asarray(cells, dtype=np.int64), tables, fired)
    parts = distributed.gather_object(share, device)
    if parts is None:
        return None
    order = np.concatenate([p[0] for p in parts])
    if len(order) != n_cells or not np.array_equal(np.sort(order), np.arange(n_cells)):
        raise RuntimeError(
            f"The ranks computed {len(order)} cells, not each of the {n_cells} once: every rank "
            "must pass the same cells in the same order."
        )
    inverse = np.empty(n_cells, dtype=np.int64)
    inverse[order] = np.arange(n_cells)
    layers = sorted(tables.firing_rate)
    n_tokens = sum(p[1].n_tokens for p in parts)
    out = ActivationTables(
        cells={
            la: sparse.vstack([p[1].cells[la] for p in parts], format="csr")[inverse]
            for la in layers
        }
        if tables.cells
        else {},
        firing_rate={la: sum(p[2][la] for p in parts) / max(n_tokens, 1) for la in layers},
        n_tokens=n_tokens,
    )
    if tables.genes:
        out.genes = list(tables.genes)
        out.gene_cells = sum(p[1].gene_cells for p in parts)
        for la in layers:
            out.gene_counts[la] = sparse.csr_matrix(
                sum(p[1].gene_counts[la] for p in parts), dtype=np.int32
            )
            out.gene_sums[la] = sparse.csr_matrix(
                sum(p[1].gene_sums[la] for p in parts), dtype=np.float32
            )
    return out


def _stack(blocks: list[sparse.csr_matrix], n_features: int) -> sparse.csr_matrix:
    if not blocks:
        return sparse.csr_matrix((0, n_features), dtype=np.float32)
    X = sparse.vstack(blocks, format="csr").astype(np.float32)
    X.eliminate_zeros()
    return X
