"""Preranked GSEA statistics of many rankings at once: the torch kernel behind
:func:`sctranscoder._gsea.prerank_many` (which documents the statistics: gseapy's ES, gene-set
permutation null, NES, nominal p-value and FDR q-value). Torch and numpy only.

The ES of a set depends on its genes only through their positions in a ranking, so every set of
one size shares one null, and the same random positions serve every ranking of a chunk.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


class PrerankKernel:
    """Statistics of every gene set in every ranking of a dense chunk (see the module docstring).

    Parameters
    ----------
    members
        Per set, the column indices of its genes among the ``n_genes`` ranked genes.
    n_genes
        Genes per ranking.
    permutations
        Random gene-set permutations of the null.
    seed
        Seed of the permutations.
    weight
        Exponent of the scores in the running sum (0: classic Kolmogorov-Smirnov steps).
    """

    def __init__(
        self,
        members: Sequence[np.ndarray],
        n_genes: int,
        *,
        permutations: int,
        seed: int,
        weight: float,
    ):
        size = np.array([len(m) for m in members], dtype=np.int64)
        self.sizes = np.unique(size)
        self.groups = [np.flatnonzero(size == k) for k in self.sizes]  # set indices per size
        self.members_by_size = [
            torch.from_numpy(np.stack([np.asarray(members[t]) for t in g])) for g in self.groups
        ]
        self.multiplicity = torch.tensor([len(g) for g in self.groups], dtype=torch.float64)
        self.null_positions = _null_positions(n_genes, self.sizes, permutations, seed)
        self.n_genes, self.n_sets = n_genes, len(members)
        self.permutations, self.weight = permutations, float(weight)

    def bytes_per_ranking(self) -> int:
        """Working memory one ranking of a chunk takes (the null walks dominate)."""
        k_max, P = int(self.sizes.max()), self.permutations
        return 8 * 8 * P * k_max + 8 * 8 * (self.n_genes + len(self.sizes) * P)

    def __call__(self, dense: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(es, nes, pvalue, fdr)``, each (rankings x sets), of a (rankings x genes) chunk."""
        return _statistics(
            torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float64)),
            self.members_by_size,
            self.groups,
            self.n_sets,
            self.null_positions,
            self.multiplicity,
            self.weight,
        )

    @staticmethod
    @contextmanager
    def threads(n: int | None) -> Iterator[None]:
        """Run with ``n`` torch CPU threads (None: unchanged), restored afterwards."""
        previous = torch.get_num_threads()
        if n is not None:
            torch.set_num_threads(int(n))
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def _null_positions(N: int, sizes: np.ndarray, permutations: int, seed: int) -> list:
    """For each size ``k``: (permutations x k) random positions in ``0..N-1``, sorted per row.

    Row ``i`` holds the first ``k`` entries of the ``i``-th seeded random order of the
    positions, so the draws are nested across sizes and do not depend on the queries.
    """
    rng = np.random.default_rng(seed)
    k_max = int(sizes.max())
    prefix = np.empty((permutations, k_max), dtype=np.int64)
    step = max(1, 2**22 // N)
    for lo in range(0, permutations, step):
        keys = rng.random((min(step, permutations - lo), N))
        if k_max < N:
            part = np.argpartition(keys, k_max - 1, axis=1)[:, :k_max]
            order = np.argsort(np.take_along_axis(keys, part, axis=1), axis=1)
            prefix[lo : lo + len(keys)] = np.take_along_axis(part, order, axis=1)
        else:
            prefix[lo : lo + len(keys)] = np.argsort(keys, axis=1)
    return [torch.from_numpy(np.sort(prefix[:, :k], axis=1)) for k in sizes]


def _statistics(X, members_by_size, groups, n_sets, null_positions, multiplicity, weight):
    """ES, NES, nominal p and FDR q (each queries x sets, numpy) of one chunk of rankings."""
    B, N = X.shape
    order = torch.argsort(-X, dim=1, stable=True)
    v = torch.gather(X, 1, order)  # sorted scores, decreasing
    w = v.abs() ** weight
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N).expand(B, N).contiguous())
    # tie blocks in the sorted order: first and last position of each position's block
    idx = torch.arange(N).expand(B, N)
    new = torch.ones(B, N, dtype=torch.bool)
    new[:, 1:] = v[:, 1:] != v[:, :-1]
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=1).values
    last = torch.ones(B, N, dtype=torch.bool)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, idx, torch.full_like(idx, N)).flip(1).cummin(dim=1).values.flip(1)
    # Rankings without ties among non-zero scores take the fast walk (zero-weight hits cannot
    # change the ES there); the others, and every ranking when weight == 0, the block walk.
    tied = ((~new[:, 1:]) & (v[:, 1:] != 0)).any(dim=1)
    if weight == 0:
        tied[:] = True
    fast = torch.nonzero(~tied).flatten()
    slow = torch.nonzero(tied).flatten()
    zero_start = (v > 0).sum(1)  # the block of zeros, if any: [zero_start, zero_end]
    zero_end = (v >= 0).sum(1) - 1
    cut = torch.where(v[:, -1] == 0, zero_start, N)  # trailing zeros start here (else N)
    walk_fast = (w[fast], cut[fast], zero_start[fast], zero_end[fast])
    walk_slow = (w[slow], start[slow], end[slow])

    def enrichment(pos):  # (B, R, k) per ranking, or (R, k) shared by all
        out = torch.empty((B, pos.shape[-2]), dtype=torch.float64)
        if fast.numel():
            p = pos if pos.dim() == 2 else pos[fast]
            out[fast] = _walk_fast(*walk_fast, p, N)
        if slow.numel():
            p = pos.expand(len(slow), *pos.shape) if pos.dim() == 2 else pos[slow]
            out[slow] = _walk(*walk_slow, p, N)
        return out

    es = torch.empty(B, n_sets, dtype=torch.float64)
    nes = torch.empty_like(es)
    pvalue = torch.empty_like(es)
    pooled, pooled_weight = [], []
    for g, (members, nulls) in enumerate(zip(members_by_size, null_positions, strict=True)):
        T_g, k = members.shape
        pos = rank[:, members.reshape(-1)].reshape(B, T_g, k).sort(dim=-1).values
        es_obs = enrichment(pos)  # (B, T_g)
        null = enrichment(nulls)  # (B, P)
        P = null.shape[1]
        nonneg = null >= 0
        n_pos = nonneg.sum(1, keepdim=True).to(torch.float64)
        n_neg = P - n_pos
        pos_mean = torch.where(nonneg, null, 0).sum(1, keepdim=True) / n_pos.clamp(min=1)
        neg_mean = -torch.where(nonneg, 0, null).sum(1, keepdim=True) / n_neg.clamp(min=1)
        # NES: ES over the same-sign null mean; sign(ES) without a usable mean (gseapy)
        pos_ok, neg_ok = (n_pos > 0) & (pos_mean > 0), (n_neg > 0) & (neg_mean > 0)
        nes_g = torch.where(
            es_obs >= 0,
            torch.where(pos_ok, es_obs / pos_mean.clamp(min=1e-300), torch.sign(es_obs)),
            torch.where(neg_ok, es_obs / neg_mean.clamp(min=1e-300), torch.sign(es_obs)),
        )
        # nominal p from the same-sign null
        if T_g <= 32:
            below = (null.unsqueeze(1) < es_obs.unsqueeze(2)).sum(-1).to(torch.float64)
            at_most = (null.unsqueeze(1) <= es_obs.unsqueeze(2)).sum(-1).to(torch.float64)
        else:
            sorted_null = null.sort(dim=1).values
            below = torch.searchsorted(sorted_null, es_obs, right=False).to(torch.float64)
            at_most = torch.searchsorted(sorted_null, es_obs, right=True).to(torch.float64)
        p_pos = torch.where(n_pos > 0, (P - below) / n_pos.clamp(min=1), 1.0)
        p_neg = torch.where(n_neg > 0, at_most / n_neg.clamp(min=1), 1.0)
        p_g = torch.where(es_obs >= 0, p_pos, p_neg)
        cols = torch.from_numpy(groups[g])
        es[:, cols], nes[:, cols], pvalue[:, cols] = es_obs, nes_g, p_g.clamp(max=1.0)
        # the null normalised by its own same-sign means, for the FDR
        pooled.append(
            torch.where(
                nonneg,
                null / torch.where(pos_ok, pos_mean, 1.0),
                null / torch.where(neg_ok, neg_mean, 1.0),
            )
        )
        pooled_weight.append(multiplicity[g].expand(P))
    fdr = _fdr_q(nes, torch.cat(pooled, dim=1), torch.cat(pooled_weight))
    return es.numpy(), nes.numpy(), pvalue.numpy(), fdr.numpy()


def _walk_fast(w, cut, zero_start, zero_end, pos, N: int):
    """:func:`_walk` for rankings whose only tied scores are zeros, and ``weight > 0``.

    Then the order inside the block of zeros cannot change the ES: its genes add nothing to the
    running sum, which only falls through it towards 0, so its hits are neither the highest
    point nor below the lowest one, and gseapy's walk over the hits in sorted order gives the
    block-read ES. Hits from ``cut`` on (the trailing zeros) can therefore be left out: the hit
    dimension is cut to the most hits any ranking has before its ``cut``. ``pos`` is (B, R, k),
    or (R, k) shared by all rankings. When no hit has weight (all among the zeros), they get
    equal weights and the ES is read at the ends of the zero block.
    """
    k = pos.shape[-1]
    miss = 1.0 / (N - k)
    if pos.dim() == 2:  # shared: the count before the largest cut bounds every ranking's
        kept = int(torch.searchsorted(pos, cut.max().expand(len(pos), 1).contiguous()).max())
    else:
        bound = cut.view(-1, 1, 1).expand(*pos.shape[:2], 1).contiguous()
        kept = int(torch.searchsorted(pos, bound).max())
    if kept:
        p = pos[..., :kept]
        flat = p.reshape(1, -1).expand(len(w), -1) if p.dim() == 2 else p.reshape(len(w), -1)
        wh = torch.gather(w, 1, flat).view(len(w), *p.shape[-2:])
        cw = wh.cumsum(-1)
        total = cw[..., -1:]
        norm = torch.where(total > 0, total, 1.0)
        drop = (p - torch.arange(kept)) * miss  # misses before each hit
        hi = (cw / norm - drop).amax(-1)
        lo = ((cw - wh) / norm - drop).amin(-1)
        es = torch.where(hi >= -lo, hi, lo)
        total = total[..., 0]
    else:
        shape = (len(w), pos.shape[-2])
        es, total = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    # all hits among the zeros (no weight): equal weights, read at the zero block's ends
    hi0 = (1.0 - (zero_end + 1 - k) * miss).to(torch.float64).unsqueeze(1)
    lo0 = (-zero_start * miss).to(torch.float64).unsqueeze(1)
    es0 = torch.where(hi0 >= -lo0, hi0, lo0)
    return torch.where(total > 0, es, es0)


def _walk(w, start, end, pos, N: int):
    """Enrichment score of hit positions ``pos`` (..., k; sorted) in each ranking of a chunk.

    ``w`` (B x N) are the weights in sorted order, ``start``/``end`` the first/last position
    of each position's tie block; ``pos`` has the chunk's B rankings as its first dimension.
    The running sum is read at the end of each block holding a hit (the maxima) and just
    before each such block (the minima).
    """
    B = w.shape[0]
    shape = pos.shape
    k = shape[-1]
    flat = pos.reshape(B, -1)
    wh = torch.gather(w, 1, flat).reshape(shape)
    s = torch.gather(start, 1, flat).reshape(shape)
    e = torch.gather(end, 1, flat).reshape(shape)
    total = wh.sum(-1, keepdim=True)
    wh = torch.where(total > 0, wh, 1.0)  # all weights zero: equal weights
    cw = torch.nn.functional.pad(wh.cumsum(-1), (1, 0))
    cw = cw / cw[..., -1:]
    i = torch.arange(k).expand(shape)
    first = torch.ones(shape, dtype=torch.bool)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    lastb = torch.ones(shape, dtype=torch.bool)
    lastb[..., :-1] = first[..., 1:]
    before = torch.where(first, i, torch.zeros_like(i)).cummax(dim=-1).values  # hits before block
    upto = torch.where(lastb, i + 1, torch.full_like(i, k)).flip(-1).cummin(dim=-1).values.flip(-1)
    miss = 1.0 / (N - k)
    top = torch.gather(cw, -1, upto) - (e + 1 - upto) * miss
    bottom = torch.gather(cw, -1, before) - (s - before) * miss
    hi = top.max(dim=-1).values
    lo = bottom.min(dim=-1).values
    return torch.where(hi >= -lo, hi, lo)


def _fdr_q(nes, pooled, pooled_weight):
    """Gseapy's FDR q-value of every set of each ranking (rows), from the pooled normalised null."""
    B, T = nes.shape
    null, idx = pooled.sort(dim=1)
    cw = torch.nn.functional.pad(pooled_weight[idx].cumsum(1), (1, 0))  # weight of the first i
    total = cw[:, -1:]

    def weight_below(x, right):  # weighted count of null < x (or <= x with right)
        return torch.gather(cw, 1, torch.searchsorted(null, x, right=right))

    zero = torch.zeros(B, 1, dtype=nes.dtype)
    null_neg = weight_below(zero, False)  # null < 0
    null_pos = total - null_neg
    obs = nes.sort(dim=1).values
    obs_neg = torch.searchsorted(obs, zero, right=False).to(nes.dtype)
    obs_pos = T - obs_neg
    obs_below = torch.searchsorted(obs, nes, right=False).to(nes.dtype)
    obs_at_most = torch.searchsorted(obs, nes, right=True).to(nes.dtype)
    up = nes >= 0
    phi_null = torch.where(
        up,
        (total - weight_below(nes, False)) / null_pos.clamp(min=1e-300),
        weight_below(nes, True) / null_neg.clamp(min=1e-300),
    )
    phi_null = torch.where(torch.where(up, null_pos, null_neg) > 0, phi_null, 0.0)
    phi_obs = torch.where(
        up,
        (T - obs_below) / obs_pos.clamp(min=1),
        obs_at_most / obs_neg.clamp(min=1),
    )
    return (phi_null / phi_obs).clamp(max=1.0)
