"""The MLP's own neurons, read like a transcoder's features: the baseline of interpretability.

A transcoder is judged against the units it replaces (Claye et al. ask whether sparse concepts
are more interpretable than the model's neurons). A :class:`NeuronBasis` computes the hidden
units of one MLP after its activation function from the MLP's input, with the model's own
weights, and offers them through the two things that :func:`~.activations.batch_activations`
and :func:`~.activations.collect_activations` ask of a transcoder: ``config.n_features`` (the
hidden width) and ``encode_sparse(x) -> (values, indices)``, here every unit at every token.

The hidden units per family (:data:`MLP_PARTS`):

- ``gpt_neox`` (Pythia, C2S-Pythia): ``act(dense_h_to_4h(x))``, written by ``dense_4h_to_h``;
- ``gpt2``: ``act(c_fc(x))``, written by ``c_proj``;
- ``llama``, ``gemma2`` (gated MLPs): ``act(gate_proj(x)) * up_proj(x)``, written by
  ``down_proj`` (and, in Gemma-2, the norm after it: :func:`~.architectures.mlp_write_modules`).

A neuron *fires* where its value is positive. GELU and gated units are also negative (slightly,
or in both directions for gated ones); :meth:`NeuronBasis.encode_sparse` keeps the positive part
only, as the activation tables keep a transcoder feature's positive activations, while
:meth:`NeuronBasis.hidden` gives the signed values that :meth:`NeuronBasis.decode` turns back
into the MLP's output. Torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .architectures import family, mlp_write_modules
from .model import mlp_modules

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass(frozen=True)
class MLPParts:
    """Attribute names of an MLP's modules: ``up`` (``gate`` for gated MLPs, with ``up`` as
    the multiplied branch), the activation ``act`` and the projection back, ``down``.
    """

    up: str
    act: str
    down: str
    gate: str | None = None


#: How each family's MLP computes its neurons (see the module docstring).
MLP_PARTS = {
    "gpt_neox": MLPParts(up="dense_h_to_4h", act="act", down="dense_4h_to_h"),
    "gpt2": MLPParts(up="c_fc", act="act", down="c_proj"),
    "llama": MLPParts(up="up_proj", act="act_fn", down="down_proj", gate="gate_proj"),
    "gemma2": MLPParts(up="up_proj", act="act_fn", down="down_proj", gate="gate_proj"),
}


@dataclass(frozen=True)
class NeuronConfig:
    """What collectors read of a basis: the number of units (``n_features``) and the layer."""

    n_features: int
    layer: int


class NeuronBasis(nn.Module):
    """The post-activation hidden units of one MLP, computed from the MLP's input.

    Holds the MLP's own modules (no copy of the weights). Values are computed in the weights'
    dtype, as the model computes them, and returned in float32.

    Parameters
    ----------
    mlp
        The MLP module of a block.
    parts
        Its layout (:data:`MLP_PARTS`).
    layer
        The block's index.
    write
        The module whose output the MLP adds to the residual stream, when it is not the MLP
        itself (Gemma-2's post-feedforward norm): :meth:`decode` applies it.
    """

    def __init__(self, mlp: nn.Module, parts: MLPParts, layer: int, write: nn.Module | None = None):
        super().__init__()
        self.up = getattr(mlp, parts.up)
        self.gate = getattr(mlp, parts.gate) if parts.gate else None
        self.act = getattr(mlp, parts.act)
        self.down = getattr(mlp, parts.down)
        self.write = write
        weight = self.up.weight
        # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out) and names out ``nf``
        width = getattr(self.up, "out_features", None) or getattr(self.up, "nf", None)
        self.config = NeuronConfig(int(width if width is not None else weight.shape[0]), layer)
        self._dtype = weight.dtype

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Signed post-activation values ``(..., n_features)`` of the MLP input ``x``, float32."""
        x = x.to(self._dtype)
        h = self.act(self.up(x) if self.gate is None else self.gate(x))
        if self.gate is not None:
            h = h * self.up(x)
        return h.float()

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` of every unit at every position: ``values`` the positive part of
        :meth:`hidden`, ``indices`` ``0 .. n_features - 1`` (an expanded view, no copy).
        """
        values = self.hidden(x).clamp_min(0.0)
        indices = torch.arange(values.shape[-1], device=values.device).expand(values.shape)
        return values, indices

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream from its signed hidden units, float32."""
        out = self.down(hidden.to(self._dtype))
        if self.write is not None:
            out = self.write(out)
        return out.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output (with Gemma-2's norm after it) recomputed through the neurons."""
        return self.decode(self.hidden(x))


def mlp_parts(model: nn.Module) -> MLPParts:
    """The MLP layout of a Hugging Face causal LM of a supported family; a TypeError otherwise."""
    fam = family(model)
    if fam not in MLP_PARTS:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise TypeError(
            f"Neurons are read from the MLPs of the families {', '.join(MLP_PARTS)}; got "
            f"{model_type!r}."
        )
    return MLP_PARTS[fam]


def neuron_bases(model: nn.Module, layers: Sequence[int]) -> dict[int, NeuronBasis]:
    """A :class:`NeuronBasis` per layer of ``model`` (a Hugging Face causal LM)."""
    parts = mlp_parts(model)
    mlps = mlp_modules(model)
    writes = mlp_write_modules(model, mlps)
    bad = [la for la in layers if not 0 <= int(la) < len(mlps)]
    if bad:
        raise ValueError(f"Layers {bad} do not exist: the model has MLP layers 0..{len(mlps) - 1}.")
    out = {}
    for la in sorted({int(x) for x in layers}):
        write = writes[la] if writes[la] is not mlps[la] else None
        out[la] = NeuronBasis(mlps[la], parts, la, write)
    return out
