"""Stability of learned dictionaries: match the features of two runs by their decoder directions.

Claye et al. (2025, Figure 4) ask whether sparse concepts learned on two datasets (or on two
disjoint halves of one) are the same concepts. Each run is a dictionary: an ``(n_features, d)``
decoder matrix whose rows are the directions the features write (a transcoder's ``W_dec``, a
sparse autoencoder's decoder). The features of run A are matched one to one to those of run B by
the Hungarian algorithm (:func:`scipy.optimize.linear_sum_assignment`), maximising the summed
cosine similarity of matched decoder rows; the distribution of matched cosines says how many
features recur. Nothing here knows about transcoders, SAEs or AnnData: any two decoder matrices
with the same ``d`` will do.

Chance is not zero: among ``n`` random directions in ``d`` dimensions the best one-to-one
matching finds cosines well above 0 when ``n`` is large against ``d`` (median 0.27 for 1024
random unit vectors in 128 dimensions, 0.15 for 4096 in 512). :func:`init_baseline` measures it
with independently initialised, untrained dictionaries of the same shapes, drawn as this package
initialises a decoder (:func:`random_dictionary`).

Cost. The similarity matrix is ``n_a x n_b`` (float64 inside scipy) and the assignment is
roughly cubic in the worst case. Measured on this project's 2-core CPU with scipy 1.17 on random
unit vectors of width 1024 (``benchmarks/feature_matching.py``,
``benchmarks/results/feature_matching_cpu.json``): 0.05 s at 1,024 x 1,024 features, 0.33 s at
2,048, 1.5 s at 4,096 and 6.5 s at 8,192 (peak resident memory of the process 2.0 GB, of which
about 0.5 GB is the imported libraries). From 4,096 to 8,192 the time grew 4.2-fold, so 32,768
features (a C2S-Pythia-410m layer at expansion 8) would take minutes and over 12 GB (the float32
similarities plus scipy's float64 copy) per matching, and a baseline repeats it.
:data:`MAX_FEATURES` refuses more than 8,192 rows per side by default; the
way down is to match only the live features (dead ones match at chance anyway), or to raise the
limit knowingly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

#: Default largest dictionary (rows per side) that :func:`match_dictionaries` accepts; see the
#: module docstring for what larger sizes cost.
MAX_FEATURES = 8192
#: Rows shorter than this have no direction (e.g. a TopK decoder row that never moved from its
#: zero initialisation) and are refused by :func:`match_dictionaries`.
MIN_NORM = 1e-8


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of the rows of two dictionaries.

    Attributes
    ----------
    index_a, index_b
        Matched rows: row ``index_a[i]`` of A is matched to row ``index_b[i]`` of B
        (``min(n_a, n_b)`` pairs, ``index_a`` increasing).
    cosine
        The cosine similarity of each matched pair.
    """

    index_a: np.ndarray
    index_b: np.ndarray
    cosine: np.ndarray


def unit_rows(W: np.ndarray | torch.Tensor, what: str = "W") -> np.ndarray:
    """The rows of ``W`` scaled to unit norm, as float32; rows without a direction are refused."""
    W = W.detach().to("cpu", torch.float32).numpy() if isinstance(W, torch.Tensor) else W
    W = np.asarray(W, dtype=np.float32)
    if W.ndim != 2 or min(W.shape) < 1:
        raise ValueError(f"{what} must be a non-empty 2-d (n_features, d) array, got {W.shape}.")
    if not np.isfinite(W).all():
        raise ValueError(f"{what} holds non-finite values.")
    norms = np.linalg.norm(W, axis=1)
    short = np.flatnonzero(norms < MIN_NORM)
    if short.size:
        raise ValueError(
            f"{short.size} row(s) of {what} have (near) zero norm, e.g. {short[:5].tolist()}: "
            "they have no direction to match. Leave them out (e.g. dead features)."
        )
    return W / norms[:, None]


def match_dictionaries(
    A: np.ndarray | torch.Tensor,
    B: np.ndarray | torch.Tensor,
    *,
    max_features: int = MAX_FEATURES,
) -> Matching:
    """Match the rows of ``A`` (``n_a x d``) to those of ``B`` (``n_b x d``) one to one.

    The Hungarian algorithm on the cosine similarity of the rows, maximising the sum of matched
    cosines (signed: a feature writing the opposite direction is not the same feature). With
    ``n_a != n_b``, every row of the smaller dictionary is matched. Dictionaries with more than
    ``max_features`` rows are refused (see the module docstring for the cost).
    """
    Ua, Ub = unit_rows(A, "A"), unit_rows(B, "B")
    if Ua.shape[1] != Ub.shape[1]:
        raise ValueError(
            f"A and B have rows of different widths ({Ua.shape[1]} and {Ub.shape[1]}): decoder "
            "directions can only be compared in one space (the same model and layer)."
        )
    largest = max(len(Ua), len(Ub))
    if largest > max_features:
        raise ValueError(
            f"Matching {len(Ua)} x {len(Ub)} features exceeds max_features={max_features}: the "
            "Hungarian algorithm is roughly cubic (measured 6.5 s and 2 GB at 8,192; minutes "
            "and over 12 GB at 32,768). Match only the live features, or raise max_features "
            "knowing the cost."
        )
    similarity = Ua @ Ub.T
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    return Matching(
        index_a=rows.astype(np.int64),
        index_b=cols.astype(np.int64),
        cosine=similarity[rows, cols].astype(np.float32),
    )


def random_dictionary(
    n_features: int, d: int, generator: torch.Generator | int = 0
) -> torch.Tensor:
    """An untrained decoder: ``n_features`` Gaussian rows of unit norm in ``d`` dimensions.

    The same draw as :class:`~sctranscoder.core.transcoder.Transcoder` makes for ``W_dec`` when
    constructed with ``generator`` (isotropic directions; ReLU transcoders train from it, TopK
    ones start from a zero decoder, which has no direction, so the isotropic draw stands for
    their initial state too).
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    w = torch.randn(int(n_features), int(d), generator=generator)
    return w / w.norm(dim=1, keepdim=True)


def init_baseline(
    n_a: int,
    n_b: int,
    d: int,
    *,
    n_repeats: int = 3,
    seed: int = 0,
    max_features: int = MAX_FEATURES,
) -> np.ndarray:
    """Matched cosines of ``n_repeats`` pairs of independent untrained dictionaries.

    Each pair is an ``n_a x d`` and an ``n_b x d`` :func:`random_dictionary` with its own seed
    (``seed``, ``seed + 1``, ...); returns ``(n_repeats, min(n_a, n_b))`` cosines, each row one
    pair's matching: the chance level of :func:`match_dictionaries` at these shapes.
    """
    gen = torch.Generator().manual_seed(int(seed))
    out = [
        match_dictionaries(
            random_dictionary(n_a, d, gen),
            random_dictionary(n_b, d, gen),
            max_features=max_features,
        ).cosine
        for _ in range(int(n_repeats))
    ]
    return np.stack(out) if out else np.zeros((0, min(n_a, n_b)), dtype=np.float32)


def trained_vs_init(
    W: np.ndarray | torch.Tensor,
    n_other: int,
    *,
    n_repeats: int = 1,
    seed: int = 0,
    max_features: int = MAX_FEATURES,
) -> np.ndarray:
    """Matched cosines of a trained dictionary ``W`` against ``n_repeats`` untrained ones of
    ``n_other`` rows: how close a trained set comes to directions that learned nothing (the
    other run before training). Returns ``(n_repeats, min(len(W), n_other))`` cosines.
    """
    W = unit_rows(W)
    gen = torch.Generator().manual_seed(int(seed))
    out = [
        match_dictionaries(
            W, random_dictionary(n_other, W.shape[1], gen), max_features=max_features
        ).cosine
        for _ in range(int(n_repeats))
    ]
    return np.stack(out) if out else np.zeros((0, min(len(W), n_other)), dtype=np.float32)


def covariance_baseline(
    A: np.ndarray | torch.Tensor,
    B: np.ndarray | torch.Tensor,
    *,
    n_repeats: int = 3,
    seed: int = 0,
    max_features: int = MAX_FEATURES,
) -> np.ndarray:
    """Matched cosines of random directions that share each trained set's subspace, not its
    features: ``len(A)`` Gaussian rows with the covariance of A's unit rows, matched to
    ``len(B)`` with that of B's, ``n_repeats`` times. Trained decoders span few dimensions (an
    effective dimension of 29 to 41 of 128 on the embedded model), which alone lifts matched
    cosines well above the isotropic :func:`init_baseline`; this is the chance level of "the
    same features" rather than "the same subspace". Returns ``(n_repeats, min(n_a, n_b))``.
    """
    Ua, Ub = unit_rows(A, "A").astype(np.float64), unit_rows(B, "B").astype(np.float64)
    rng = np.random.default_rng(int(seed))

    def draw(U):
        w, V = np.linalg.eigh(U.T @ U / len(U))
        return (rng.standard_normal(U.shape) * np.sqrt(np.clip(w, 0, None))) @ V.T

    out = [
        match_dictionaries(draw(Ua), draw(Ub), max_features=max_features).cosine
        for _ in range(int(n_repeats))
    ]
    return np.stack(out) if out else np.zeros((0, min(len(Ua), len(Ub))), dtype=np.float32)


def summarise(cosine: np.ndarray, thresholds: tuple[float, ...] = (0.5, 0.7)) -> dict[str, float]:
    """``median``, ``mean`` and the fraction of cosines above each threshold."""
    cosine = np.asarray(cosine, dtype=np.float64).ravel()
    if cosine.size == 0:
        return {"median": np.nan, "mean": np.nan} | {
            f"fraction_above_{t:g}": np.nan for t in thresholds
        }
    out = {"median": float(np.median(cosine)), "mean": float(cosine.mean())}
    for t in thresholds:
        out[f"fraction_above_{t:g}"] = float((cosine > t).mean())
    return out
