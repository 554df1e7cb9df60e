"""Cell sentences: genes ranked by descending expression, wrapped in the C2S prompt.

Pure numpy/scipy; no AnnData. The AnnData layer (:func:`sctranscoder.pp.cell_sentences`) decides
which matrix to read and validates it, then calls :func:`rank_genes` and :func:`format_prompt`.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

if TYPE_CHECKING:
    from collections.abc import Sequence

#: The Cell2Sentence cell-type prediction prompt (C2S-Pythia-410m-cell-type-prediction).
C2S_CELL_TYPE_TEMPLATE = (
    "The following is a list of {n_genes} gene names ordered by descending expression level "
    "in a {organism} cell. Your task is to give the cell type which this cell belongs to based "
    "on its gene expression.\nCell sentence: {genes}.\nThe cell type corresponding to these "
    "genes is:"
)


@dataclass(frozen=True)
class PromptSettings:
    """How a model expects its prompts: genes per sentence, template and organism.

    A model records the settings it was trained with; every tool uses them unless told otherwise.
    """

    n_genes: int = 200
    template: str = C2S_CELL_TYPE_TEMPLATE
    organism: str = "Homo sapiens"
    #: Text placed between the prompt and the answer (C2S answers after a single space).
    answer_prefix: str = " "
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_genes < 1:
            raise ValueError(f"n_genes must be a positive integer, got {self.n_genes}.")
        for placeholder in ("{genes}",):
            if placeholder not in self.template:
                raise ValueError(
                    f"The prompt template must contain {placeholder}; got {self.template!r}."
                )

    def to_dict(self) -> dict:
        """The settings as a plain dict (as stored with a model)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PromptSettings:
        """Settings from :meth:`to_dict` (unknown keys are ignored; ``extra`` is kept)."""
        known = {k: d[k] for k in ("n_genes", "template", "organism", "answer_prefix") if k in d}
        return cls(**known, extra=dict(d.get("extra", {})))


def rank_genes(
    X: np.ndarray | sparse.spmatrix | sparse.sparray,
    gene_names: Sequence[str],
    *,
    n_genes: int | None,
    seed: int = 0,
    row_ids: np.ndarray | None = None,
) -> list[list[str]]:
    """Rank the expressed genes of each row by descending expression.

    Ties are broken by a shuffle seeded per row (``seed`` and the row's id), so a cell's sentence
    does not depend on which batch it was computed in. Genes with zero expression are left out.

    Parameters
    ----------
    X
        Non-negative expression, cells x genes (dense or sparse; any real or boolean dtype).
    gene_names
        Symbols for the columns of ``X``.
    n_genes
        Keep at most this many top genes (``None``: all expressed genes).
    seed
        Seed of the tie-breaking shuffle.
    row_ids
        A stable integer id per row (default: ``0..n-1``), mixed into the per-row seed.

    Returns
    -------
    One list of gene symbols per row, most expressed first.
    """
    names = np.asarray(gene_names, dtype=object)
    n_rows = X.shape[0]
    if row_ids is None:
        row_ids = np.arange(n_rows)
    if not sparse.issparse(X) and np.asarray(X).dtype == np.float16:
        X = np.asarray(X, dtype=np.float32)  # scipy.sparse has no float16; exact in float32
    csr = sparse.csr_matrix(X) if not sparse.issparse(X) else X.tocsr()
    if not csr.has_canonical_format:
        # The tie-break permutes stored entries: sort them by column (and merge duplicates) so
        # the same matrix gives the same sentences however its entries happen to be stored.
        csr = csr.copy()
        csr.sum_duplicates()
    out: list[list[str]] = []
    for i in range(n_rows):
        start, stop = csr.indptr[i], csr.indptr[i + 1]
        values = np.asarray(csr.data[start:stop])
        cols = np.asarray(csr.indices[start:stop])
        keep = values > 0
        # as float64: `-` is not defined for booleans (and wraps around for unsigned integers)
        values, cols = values[keep].astype(np.float64), cols[keep]
        rng = np.random.default_rng([seed, int(row_ids[i])])
        tiebreak = rng.permutation(values.size)
        # lexsort sorts by the last key first: descending value, then the random tie-break.
        order = np.lexsort((tiebreak, -values))
        if n_genes is not None:
            order = order[:n_genes]
        out.append(names[cols[order]].tolist())
    return out


def cell_ids(obs_names: Sequence[str]) -> np.ndarray:
    """A stable integer per cell name (CRC32): the ``row_ids`` that make tie-breaks per cell."""
    return np.fromiter((zlib.crc32(str(n).encode()) for n in obs_names), dtype=np.int64)


def format_prompt(genes: Sequence[str], settings: PromptSettings) -> str:
    """Wrap a ranked gene list in the prompt template."""
    return settings.template.format(
        n_genes=len(genes), organism=settings.organism, genes=" ".join(genes)
    )


def gene_spans(genes: Sequence[str], settings: PromptSettings) -> list[tuple[int, int]]:
    """Character span of each gene of the sentence inside ``format_prompt(genes, settings)``.

    Computed from the template's text before ``{genes}``, so a gene symbol that also occurs in the
    prompt text (or inside another symbol) is never confused with it.
    """
    prefix = settings.template.split("{genes}", 1)[0].format(
        n_genes=len(genes), organism=settings.organism
    )
    spans: list[tuple[int, int]] = []
    pos = len(prefix)
    for g in genes:
        spans.append((pos, pos + len(g)))
        pos += len(g) + 1
    return spans
