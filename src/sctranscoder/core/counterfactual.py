"""Counterfactual sentences and one feature's activation on them (Claye et al. 2025). Torch only.

Correlation says which genes' tokens a feature is active on; a counterfactual says which genes
make it fire: remove a gene from the cell sentence (or move it to the end), rerun the model up to
the feature's layer, and measure how much the feature's activation drops.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .hooks import capture_mlp_io, run_to_layers
from .tokens import tokenize_prompts

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .model import C2SModel
    from .transcoder import Transcoder

Mode = Literal["remove", "move_to_end"]
MODES = ("remove", "move_to_end")


def counterfactual(genes: Sequence[str], position: int, mode: Mode) -> list[str]:
    """The sentence ``genes`` with the gene at ``position`` removed or moved to the end."""
    rest = [*genes[:position], *genes[position + 1 :]]
    return rest if mode == "remove" else [*rest, genes[position]]


@torch.no_grad()
def feature_values(
    model: C2SModel,
    transcoder: Transcoder,
    layer: int,
    feature: int,
    sentences: Sequence[Sequence[str]],
    *,
    aggregate: Literal["max", "last"] = "max",
    batch_size: int = 64,
    stated_n_genes: int | None = None,
) -> np.ndarray:
    """One feature's activation per sentence: max over gene tokens, or at the last token.

    The model runs only up to ``layer``; the transcoder encodes that layer's MLP input. With
    ``stated_n_genes``, every prompt states that many genes (the template's ``{n_genes}``)
    whatever the sentence's length.
    """
    device = next(model.model.parameters()).device
    settings = model.settings
    if stated_n_genes is not None:
        template = settings.template.replace("{n_genes}", str(int(stated_n_genes)))
        settings = dataclasses.replace(settings, template=template)
    transcoder = transcoder.moved(device)
    out = []
    for b0 in range(0, len(sentences), batch_size):
        batch = tokenize_prompts(
            model.tokenizer,
            sentences[b0 : b0 + batch_size],
            settings,
            max_length=model.max_length,
        )
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        with capture_mlp_io(model.model, [layer]) as store:
            run_to_layers(model.model, ids, mask)
            x = store[layer][0].float()
        values, indices = transcoder.encode_sparse(x)
        f = (values * (indices == feature)).sum(-1)  # (B, T): the feature at every token
        if aggregate == "last":
            rows = torch.arange(f.shape[0], device=device)
            out.append(f[rows, batch.lengths.to(device) - 1])
        else:
            is_gene = batch.gene_index.to(device) >= 0
            out.append(f.masked_fill(~is_gene, 0.0).amax(1))
    return torch.cat(out).float().cpu().numpy() if out else np.zeros(0, dtype=np.float32)


def gene_effects(
    model: C2SModel,
    transcoder: Transcoder,
    layer: int,
    feature: int,
    sentence: Sequence[str],
    *,
    mode: Mode = "remove",
    aggregate: Literal["max", "last"] = "max",
    batch_size: int = 64,
    keep_n_genes: bool = True,
) -> np.ndarray:
    """The feature's activation on every counterfactual of ``sentence`` (one per gene position).

    With ``keep_n_genes`` and ``mode="remove"``, every prompt states the original number of genes,
    so that the only change is the missing gene.
    """
    cfs = [counterfactual(sentence, p, mode) for p in range(len(sentence))]
    return feature_values(
        model,
        transcoder,
        layer,
        feature,
        cfs,
        aggregate=aggregate,
        batch_size=batch_size,
        stated_n_genes=len(sentence) if keep_n_genes else None,
    )


def counterfactual_effects(
    model: C2SModel,
    transcoder: Transcoder,
    layer: int,
    feature: int,
    sentences: Sequence[Sequence[str]],
    *,
    mode: Mode = "remove",
    aggregate: Literal["max", "last"] = "max",
    batch_size: int = 64,
    keep_n_genes: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The feature's activation on each sentence, and on every counterfactual of each sentence
    on which it fires: ``(original, {sentence index: activation per gene position})``.
    """
    original = feature_values(
        model, transcoder, layer, feature, sentences, aggregate=aggregate, batch_size=batch_size
    )
    used = np.flatnonzero(original > 0)
    effects = {}
    for i in tqdm(used, desc="gene attribution", disable=not progress, unit="cell"):
        effects[int(i)] = gene_effects(
            model,
            transcoder,
            layer,
            feature,
            sentences[i],
            mode=mode,
            aggregate=aggregate,
            batch_size=batch_size,
            keep_n_genes=keep_n_genes,
        )
    return original, effects
