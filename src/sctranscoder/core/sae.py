"""Sparse autoencoders on cell embeddings (Claye et al. 2025): concepts of any embedding.

A TopK SAE is a transcoder whose input and output are the same vector: here a cell's embedding
(C2S's own, scVI's, scGPT's, PCA's...), one cell being one "token". It is trained by the
transcoders' :class:`~sctranscoder.core.training.Trainer` on a single pseudo-layer with
``X = Y`` = the embeddings, so the loss (FVU, plus AuxK for dead concepts), the sparse TopK
kernels, the initialisation and the optimiser are the transcoders' own.

The embedding is multiplied by one scalar (:func:`embedding_scale`) so that its mean squared
distance to the mean is its width (per dimension, variance 1 on average): the default learning
rate and the initialisation then suit embeddings of any units. One scalar keeps the geometry
and the FVU unchanged; concept activations are in these scaled units. Torch, numpy and scipy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import sparse
from tqdm.auto import tqdm

from .training import Trainer, TrainingConfig, TrainingLog

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .transcoder import Transcoder

#: The pseudo-layer an SAE is trained as (the trainer's layer key).
SAE_LAYER = 0
#: Attribution below this fraction of a concept's activation in the cell counts as no drop
#: (two passes of the same cell can differ by float rounding).
RELATIVE_TOLERANCE = 1e-4


def embedding_scale(X: np.ndarray) -> float:
    """The scalar that gives ``X`` (cells x d) a mean squared distance to its mean of ``d``."""
    X = np.asarray(X, dtype=np.float64)
    var = float(((X - X.mean(0)) ** 2).sum(1).mean()) / X.shape[1]
    if not np.isfinite(var) or var <= 0:
        raise ValueError("The embedding is constant over the training cells: nothing to learn.")
    return float(1.0 / np.sqrt(var))


@dataclass
class SAEFit:
    """A trained SAE: the module (a :class:`~sctranscoder.core.transcoder.Transcoder` with
    ``d_in = d_out``), the ``scale`` applied to embeddings, the trainer's log and the metrics of
    :func:`evaluate` on the training and validation cells (prefixed ``train_``/``validation_``).
    """

    sae: Transcoder
    scale: float
    log: TrainingLog
    metrics: dict[str, float]


def _row_stream(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of ``batch`` row indices: epoch after epoch of seeded permutations."""
    pending = torch.zeros(0, dtype=torch.long)
    while True:
        while pending.numel() < batch:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        rows, pending = pending[:batch], pending[batch:]
        yield rows


def fit_sae(
    X: np.ndarray,
    is_val: np.ndarray,
    config: TrainingConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> SAEFit:
    """Train a TopK SAE on the rows of ``X`` not in ``is_val`` with the transcoders' trainer.

    ``config.batch_size`` cells a step, ``config.n_tokens // config.batch_size`` steps (cells are
    drawn epoch by epoch in a seeded order); ``config.expansion_factor * d`` concepts, ``k``
    active per cell. The scale comes from the training cells only.
    """
    X = np.asarray(X, dtype=np.float32)
    is_val = np.asarray(is_val, dtype=bool)
    train = X[~is_val]
    if config.batch_size > train.shape[0]:
        raise ValueError(
            f"batch_size ({config.batch_size}) is more than the {train.shape[0]} training cells."
        )
    device = torch.device(device)
    scale = embedding_scale(train)
    Xt = torch.as_tensor(train * np.float32(scale), device=device)
    d = Xt.shape[1]
    trainer = Trainer(config, [SAE_LAYER], d_in=d, d_out=d, device=device)
    stream = _row_stream(
        Xt.shape[0], config.batch_size, torch.Generator().manual_seed(config.seed + 1)
    )
    data = {SAE_LAYER: Xt}
    n_steps = config.n_tokens // config.batch_size
    start = time.perf_counter()
    bar = tqdm(total=n_steps, desc="SAE", unit="step", disable=not progress)
    try:
        for step in range(n_steps):
            rows = next(stream).to(device)
            if not trainer.initialised:
                trainer.initialise({SAE_LAYER: Xt[rows]}, {SAE_LAYER: Xt[rows]})
            trainer.step(data, data, rows)
            bar.update(1)
            if (step + 1) % 64 == 0:
                trainer.flush()
                bar.set_postfix(fvu=f"{trainer.mean_fvu():.3f}")
    finally:
        bar.close()
    transcoders, log = trainer.finish(time.perf_counter() - start)
    sae = transcoders[SAE_LAYER]
    metrics = {}
    for name, rows in (("train", ~is_val), ("validation", is_val)):
        for metric, value in evaluate(sae, X[rows], scale).items():
            metrics[f"{name}_{metric}"] = value
    fired = np.zeros(sae.config.n_features, dtype=bool)
    for rows in (~is_val, is_val):
        fired |= np.asarray(encode(sae, X[rows], scale).sum(0)).ravel() > 0
    metrics["dead_fraction"] = float(1.0 - fired.mean())
    metrics["train_dead_fraction"] = float(log.dead_fraction[SAE_LAYER])
    return SAEFit(sae, scale, log, metrics)


@torch.no_grad()
def evaluate(sae: Transcoder, X: np.ndarray, scale: float, *, chunk: int = 4096) -> dict:
    """``fvu`` (squared error over the squared distance to these cells' mean), ``r2``
    (``1 - fvu``) and ``l0`` (mean active concepts per cell) of ``sae`` on the rows of ``X``.
    """
    X = np.asarray(X, dtype=np.float64) * scale
    if X.shape[0] == 0:
        return {"fvu": float("nan"), "r2": float("nan"), "l0": float("nan")}
    device = sae.W_enc.device
    sse, l0 = 0.0, 0.0
    for b0 in range(0, X.shape[0], chunk):
        x = torch.as_tensor(X[b0 : b0 + chunk], dtype=torch.float32, device=device)
        values, indices = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(values, indices, x)
        sse += float((x_hat.double() - x.double()).pow(2).sum())
        l0 += float((values > 0).sum())
    total = float(((X - X.mean(0)) ** 2).sum())
    fvu = sse / total if total > 0 else float("nan")
    return {"fvu": fvu, "r2": 1.0 - fvu, "l0": l0 / X.shape[0]}


@torch.no_grad()
def encode_dense(sae: Transcoder, X: np.ndarray, scale: float) -> np.ndarray:
    """``(n_cells, n_concepts)`` float32 concept activations of the embeddings ``X``."""
    x = torch.as_tensor(np.asarray(X, dtype=np.float32) * scale, device=sae.W_enc.device)
    return sae.encode(x).float().cpu().numpy()


def encode(sae: Transcoder, X: np.ndarray, scale: float, *, chunk: int = 4096) -> sparse.csr_matrix:
    """:func:`encode_dense` as CSR float32, ``chunk`` cells at a time."""
    blocks = [
        sparse.csr_matrix(encode_dense(sae, X[b0 : b0 + chunk], scale))
        for b0 in range(0, X.shape[0], chunk)
    ]
    if not blocks:
        return sparse.csr_matrix((0, sae.config.n_features), dtype=np.float32)
    out = sparse.vstack(blocks, format="csr").astype(np.float32)
    out.eliminate_zeros()
    return out


class AttributionTables:
    """Per (gene, concept), over the cells where the gene was removed: the number of cells in
    which removing it lowered the concept (``counts``), the summed drop there (``sums``), and the
    summed signed drop over all those cells (``signed``); per gene, in how many cells it was
    removed (``n_cells``). Genes are added as they come (first-seen order).
    """

    def __init__(self, n_concepts: int):
        self.n_concepts = n_concepts
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self._n_cells: list[int] = []
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []  # (gene rows, drops)

    def add(self, genes: list[str], drops: np.ndarray) -> None:
        """Add one batch: per row, the removed gene and the drop of every concept's activation
        when it is removed from the cell (``(n, n_concepts)``, :func:`concept_drops`).
        """
        rows = np.empty(len(genes), dtype=np.int64)
        for i, g in enumerate(genes):
            if g not in self.index:
                self.index[g] = len(self.names)
                self.names.append(g)
                self._n_cells.append(0)
            rows[i] = self.index[g]
            self._n_cells[rows[i]] += 1
        self._parts.append((rows, np.asarray(drops, dtype=np.float32)))

    def tables(self) -> tuple[np.ndarray, sparse.csr_matrix, sparse.csr_matrix, sparse.csr_matrix]:
        """``(n_cells, counts, sums, signed)``: int64 per gene; genes x concepts CSR int32,
        float32, float32.
        """
        shape = (len(self.names), self.n_concepts)
        counts = np.zeros(shape, dtype=np.int64)
        sums = np.zeros(shape, dtype=np.float64)
        signed = np.zeros(shape, dtype=np.float64)
        for rows, drops in self._parts:
            np.add.at(signed, rows, drops)
            positive = np.where(drops > 0, drops, 0.0)
            np.add.at(sums, rows, positive)
            np.add.at(counts, rows, (positive > 0).astype(np.int64))
        return (
            np.asarray(self._n_cells, dtype=np.int64),
            _csr(counts, np.int32),
            _csr(sums, np.float32),
            _csr(signed, np.float32),
        )


def concept_drops(original: np.ndarray, perturbed: np.ndarray) -> np.ndarray:
    """``original - perturbed`` concept activations, with drops within
    :data:`RELATIVE_TOLERANCE` of the original activation (float rounding) set to 0.
    """
    drops = np.asarray(original, dtype=np.float32) - np.asarray(perturbed, dtype=np.float32)
    noise = np.abs(drops) <= RELATIVE_TOLERANCE * np.maximum(np.abs(original), 1e-12)
    drops[noise] = 0.0
    return drops


def _csr(a: np.ndarray, dtype) -> sparse.csr_matrix:
    m = sparse.csr_matrix(a.astype(dtype))
    m.eliminate_zeros()
    return m
