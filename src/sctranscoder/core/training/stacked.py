"""All layers' TopK transcoders as stacked weights, trained by one batched step.

The trainer (:mod:`.trainer`) holds either one :class:`~sctranscoder.core.transcoder.Transcoder`
per layer (each layer's loss computed in turn, :mod:`.losses`) or, for TopK transcoders, one
:class:`StackedTranscoders`: every weight with a leading layer dimension (``W_enc``
``(L, n_features, d_in)``, ...), so that a step is one selection over all layers' rows, one sort
of all layers' selected features, one decode, one loss and one fused Adam update over five
tensors, whatever the number of layers (:func:`~sctranscoder.core.topk.stacked_topk`; the
per-layer matmuls are one batched matmul on CUDA, a loop on the CPU where that was measured
faster). The numbers are those of the per-layer path up to float rounding (tested against it in
float32 on the CPU). Opt-in (``TrainingConfig(stack_layers=True)``): see :data:`STACKED_DEVICES`
for what was measured. Torch only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..topk import stacked_pre_activations, stacked_topk
from ..transcoder import WEIGHTS, Transcoder, TranscoderConfig

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .config import TrainingConfig

#: Devices where ``TrainingConfig(stack_layers=None)`` trains stacked: none yet. On this
#: project's 2-core CPU a stacked step of 4 layers (d = 128, 1,024 features, 2,048 tokens) took
#: 66-70 ms against 53-55 ms per layer (``benchmarks/train_throughput.py --stack-layers``): one
#: call over all layers' ``(L, batch, n_features)`` pre-activations runs slower per element than
#: the same work a layer at a time, whose tensors stay in cache, and the calls it saves (600
#: instead of 1,850 a step) cost less than that. On CUDA the per-layer path is the measured one
#: (2.0x sparsify on an H100); the stacked step, one kernel launch per operation instead of one
#: per layer, is there to be measured with ``--stack-layers`` when a GPU is lent.
STACKED_DEVICES: tuple[str, ...] = ()


def use_stacked(config: TrainingConfig, device: torch.device) -> bool:
    """Whether a run with ``config`` on ``device`` trains stacked (``config.stack_layers``,
    ``None``: TopK, not compiled, on :data:`STACKED_DEVICES`).
    """
    if config.stack_layers is not None:
        return config.stack_layers
    return (
        config.activation == "topk"
        and not config.compile
        and torch.device(device).type in STACKED_DEVICES
    )


class StackedTranscoders(nn.Module):
    """The TopK transcoders of ``len(layers)`` layers, their weights stacked along a first
    dimension (a copy of ``transcoders``' weights, in the order of ``layers``).
    """

    def __init__(self, transcoders: dict[int, Transcoder], layers: Sequence[int]):
        super().__init__()
        self.layers = [int(layer) for layer in layers]
        first = transcoders[self.layers[0]]
        self.config: TranscoderConfig = first.config
        if self.config.activation != "topk":
            raise ValueError("Stacked training is for TopK transcoders (activation='topk').")
        for name in WEIGHTS:
            if getattr(first, name) is None:
                setattr(self, name, None)
                continue
            stacked = torch.stack([getattr(transcoders[la], name).detach() for la in self.layers])
            setattr(self, name, nn.Parameter(stacked.clone()))

    def layer_weights(self, i: int) -> dict[str, torch.Tensor]:
        """The weights of the ``i``-th layer (views)."""
        return {n: getattr(self, n)[i] for n in WEIGHTS if getattr(self, n) is not None}

    @torch.no_grad()
    def load_layer(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Set the ``i``-th layer's weights from a transcoder's ``state_dict``."""
        for name, value in self.layer_weights(i).items():
            value.copy_(state[name])

    def transcoders(self) -> dict[int, Transcoder]:
        """One frozen :class:`Transcoder` per layer (copies, on the stack's device)."""
        return {
            layer: Transcoder.from_tensors(self.config, self.layer_weights(i))
            for i, layer in enumerate(self.layers)
        }

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        dead: torch.Tensor | None,
        k_aux: int,
        auxk_alpha: float,
        *,
        dense: bool,
        compute_dtype: torch.dtype | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(losses, fvu, fired)`` of every layer on ``x``, ``y`` ``(L, batch, d)``.

        ``losses`` ``(L,)``: each layer's FVU plus ``auxk_alpha`` times its AuxK loss (what the
        per-layer path minimises; their sum is back-propagated); ``fvu`` ``(L,)`` (detached); ``fired`` ``(L, n_features)``: tokens that fired each feature. ``dead``
        ``(L, n_features)`` or None (no AuxK). ``dense``: the dense kernels (codes scattered into
        ``(L, batch, n_features)``, batched matmuls, plain autograd).
        """
        c = self.config
        if dense:
            y_dec, values, indices, e_hat = self._dense(x, dead, k_aux, compute_dtype)
        else:
            y_dec, values, indices, e_hat, _, _ = stacked_topk(
                x, self.W_enc, self.b_enc, self.W_dec, c.k, dead=dead, k_aux=k_aux,
                compute_dtype=compute_dtype,
            )  # fmt: skip
        y_hat = y_dec + self.b_dec.unsqueeze(1)
        if self.W_skip is not None:
            y_hat = y_hat + torch.bmm(x, self.W_skip.transpose(1, 2))
        var = (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
        fvu = (y_hat - y).pow(2).sum((1, 2)) / var
        losses = fvu
        if dead is not None and e_hat is not None:
            scale = (dead.sum(1).to(y.dtype) / k_aux).clamp(max=1.0)
            aux = scale * (e_hat - (y - y_hat).detach()).pow(2).sum((1, 2)) / var
            losses = losses + auxk_alpha * aux
        L, n_features = self.W_enc.shape[:2]
        offsets = (torch.arange(L, device=x.device) * n_features).view(L, 1, 1)
        fired = torch.zeros(L * n_features, dtype=y.dtype, device=y.device)
        fired.index_add_(0, (indices + offsets).reshape(-1), (values > 0).reshape(-1).to(y.dtype))
        return losses, fvu.detach(), fired.view(L, n_features)

    def _dense(self, x, dead, k_aux, compute_dtype):
        """Dense kernels: batched matmuls and plain autograd (the per-layer ``dense`` path's
        numbers); returns the decoded output without ``b_dec``, the TopK and AuxK's output.
        """
        c = self.config
        dt = compute_dtype or x.dtype
        with torch.autocast(x.device.type, dtype=dt, enabled=compute_dtype is not None):
            pre = F.relu(stacked_pre_activations(x, self.W_enc, self.b_enc, dt))
        values, indices = pre.topk(c.k, dim=-1, sorted=False)
        W = self.W_dec.to(pre.dtype)
        codes = torch.zeros_like(pre).scatter(-1, indices, values)
        y_dec = torch.bmm(codes, W).to(x.dtype)
        e_hat = None
        if dead is not None:
            masked = pre.masked_fill(~dead.unsqueeze(1), 0.0)
            aux_values, aux_indices = masked.topk(k_aux, dim=-1, sorted=False)
            aux_codes = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values)
            e_hat = torch.bmm(aux_codes, W).to(x.dtype)
        return y_dec, values.to(x.dtype), indices, e_hat
