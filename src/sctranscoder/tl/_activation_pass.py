"""One pass of the model over a dataset's cells, yielding every transcoder's activations per batch.

Shared by the tools that aggregate activations (:func:`feature_activations`,
:func:`feature_genes`): they differ only in what they accumulate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from .._constants import Key
from .._store import gene_lists, resolve_model, sct_uns, stored_transcoders
from ..core.activations import Aggregate, BatchActivations, batch_activations

if TYPE_CHECKING:
    from anndata import AnnData

    from ..core.model import C2SModel
    from ..core.transcoder import Transcoder


@dataclass
class ActivationPass:
    """The model (fingerprint checked), its stored transcoders and the cells' sentences."""

    model: C2SModel
    transcoders: dict[int, Transcoder]
    sentences: list[list[str]]
    sentence_key: str

    @property
    def layers(self) -> list[int]:
        return sorted(self.transcoders)

    def batches(
        self,
        *,
        batch_size: int,
        aggregate: Aggregate = "max",
        genes: bool = True,
        progress: bool = True,
        desc: str = "activations",
    ) -> Iterator[tuple[list[list[str]], dict[int, BatchActivations], int]]:
        """``(sentences, activations by layer, real tokens)`` for each batch of cells, in order."""
        if batch_size < 1:
            raise ValueError("batch_size must be positive.")
        n = len(self.sentences)
        bar = tqdm(total=n, desc=desc, disable=not progress, unit="cell")
        try:
            for b0 in range(0, n, batch_size):
                gl = self.sentences[b0 : b0 + batch_size]
                batch = self.model.tokenize(gl)
                acts = batch_activations(
                    self.model.model, self.transcoders, batch, aggregate=aggregate, genes=genes
                )
                bar.update(len(gl))
                yield gl, acts, int(batch.attention_mask.sum())
        finally:
            bar.close()


def activation_pass(
    adata: AnnData,
    model: C2SModel | str | None,
    *,
    key: str,
    layers: Sequence[int] | None,
    sentence_key: str | None,
) -> ActivationPass:
    """Resolve everything a pass needs, with the checks (transcoders, fingerprint, sentences)."""
    record = sct_uns(adata, key)
    if sentence_key is None:
        sentence_key = str(record.get("params", {}).get("sentence_key", Key.sentence))
    transcoders = stored_transcoders(
        adata, key, None if layers is None else [int(x) for x in layers]
    )
    model = resolve_model(adata, key, model)
    # stored transcoders load on the CPU: run them where the model is (e.g. a GPU)
    transcoders = {layer: tc.to(model.device) for layer, tc in transcoders.items()}
    sentences = gene_lists(adata, sentence_key, n_genes=model.settings.n_genes)
    return ActivationPass(model, transcoders, sentences, sentence_key)
