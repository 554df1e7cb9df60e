"""C2S's own cell embedding: a layer's residual stream pooled over a cell's prompt. Torch only.

The *residual stream after block* ``layer`` is what the block passes on to the next one (the
hidden state after its attention and MLP were added, before any final norm). A cell's embedding
pools it over the tokens of the cell's genes (``"mean"``) or reads it at the last prompt token
(``"last"``, where the model starts its answer). The forward pass stops after ``layer``.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .model import mlp_modules
from .tokens import tokenize_prompts

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from .model import C2SModel

Pool = Literal["mean", "last"]
POOLS = ("mean", "last")


class _Stop(Exception):
    """Raised by the hook on the chosen block: the layers above it are not needed."""


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, bottom to top: the modules whose ``mlp`` is
    :func:`~sctranscoder.core.model.mlp_modules`' list (so both always agree).
    """
    mlps = mlp_modules(model)
    for mod in model.modules():
        if (
            isinstance(mod, nn.ModuleList)
            and len(mod) == len(mlps)
            and all(getattr(b, "mlp", None) is m for b, m in zip(mod, mlps, strict=True))
        ):
            return list(mod)
    raise ValueError(f"Could not find the transformer blocks of {type(model).__name__}.")


@contextmanager
def _residual_after(model: nn.Module, layer: int) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of block ``layer`` (``store["h"]``) and stop the forward pass there."""
    blocks = block_modules(model)
    if not 0 <= int(layer) < len(blocks):
        raise ValueError(
            f"layer {layer} does not exist: the model has layers 0..{len(blocks) - 1}."
        )
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        # blocks return the hidden state, or a tuple starting with it (older transformers)
        store["h"] = (output[0] if isinstance(output, tuple) else output).detach()
        raise _Stop

    handle = blocks[int(layer)].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@torch.no_grad()
def embed_sentences(
    model: C2SModel,
    sentences: Sequence[Sequence[str]],
    *,
    layer: int,
    pool: Pool = "mean",
    batch_size: int = 32,
    stated_n_genes: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "cell embeddings",
) -> np.ndarray:
    """``(n_cells, d_model)`` float32: each sentence's residual stream after block ``layer``,
    averaged over its genes' tokens (``pool="mean"``) or at its last prompt token (``"last"``).

    With ``stated_n_genes`` (one number per sentence), each prompt states that many genes (the
    template's ``{n_genes}``) whatever its length: a counterfactual sentence with one gene
    removed then differs from the original by that gene only.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}.")
    if batch_size < 1:
        raise ValueError("batch_size must be positive.")
    device = model.device
    out = np.zeros((len(sentences), model.d_model), dtype=np.float32)
    # sentences that state the same gene count share a template; group them into batches
    if stated_n_genes is None:
        groups = {None: np.arange(len(sentences))}
    else:
        stated = np.asarray(stated_n_genes, dtype=np.int64)
        groups = {int(n): np.flatnonzero(stated == n) for n in np.unique(stated)}
    bar = tqdm(total=len(sentences), desc=desc, disable=not progress, unit="cell")
    try:
        with _residual_after(model.model, layer) as store:
            for n, rows in groups.items():
                settings = model.settings
                if n is not None:
                    template = settings.template.replace("{n_genes}", str(n))
                    settings = dataclasses.replace(settings, template=template)
                for b0 in range(0, len(rows), batch_size):
                    idx = rows[b0 : b0 + batch_size]
                    batch = tokenize_prompts(
                        model.tokenizer,
                        [sentences[i] for i in idx],
                        settings,
                        max_length=model.max_length,
                    )
                    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
                    try:
                        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
                    except _Stop:
                        pass
                    out[idx] = pool_hidden(store.pop("h"), batch, pool).cpu().numpy()
                    bar.update(len(idx))
    finally:
        bar.close()
    return out


def pool_hidden(h: torch.Tensor, batch, pool: Pool) -> torch.Tensor:
    """``(batch, d)``: ``h`` ``(batch, seq, d)`` averaged over each prompt's gene tokens, or at
    its last real token.
    """
    h = h.float()
    if pool == "last":
        rows = torch.arange(h.shape[0], device=h.device)
        return h[rows, batch.lengths.to(h.device) - 1]
    is_gene = (batch.gene_index.to(h.device) >= 0).to(h.dtype)
    n = is_gene.sum(1, keepdim=True).clamp_min(1.0)
    return (h * is_gene[..., None]).sum(1) / n
