"""The local replacement model of one prompt: a GPT-NeoX made linear in its sources.

For the traced prompt, every MLP is replaced by its transcoder plus a constant error term (the
MLP's output minus the transcoder's), and attention patterns and LayerNorm scales are frozen at
their values on this prompt. What remains is linear in the *sources*: token embeddings, feature
activations and error terms. So a target (a logit, or a feature's pre-activation) is exactly the
sum of each source's direct effect plus a constant bias, and direct effects are gradients times
source values. Works for parallel-residual (Pythia, C2S) and sequential GPT-NeoX layouts.

Everything here is computed by our own forward pass from the Hugging Face module's weights; it is
checked against the Hugging Face forward (:meth:`ReplacementModel.check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .transcoder import Transcoder


def _gpt_neox_parts(model: nn.Module):
    base = getattr(model, "gpt_neox", None)
    if base is None or getattr(model.config, "model_type", None) != "gpt_neox":
        raise TypeError(
            "Circuits are traced on GPT-NeoX (Pythia) models, the architecture of C2S; got "
            f"{type(model).__name__}."
        )
    return base, model.get_output_embeddings()


def _ln_parts(ln: nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred input and the (to be frozen) scale ``1/sqrt(var + eps)`` of a LayerNorm."""
    centred = x - x.mean(-1, keepdim=True)
    scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps)
    return centred, scale


def _ln_frozen(ln: nn.LayerNorm, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred * scale * ln.weight + ln.bias


@dataclass
class Frozen:
    """What the real forward pass fixes for the replacement model (one prompt, batch 1)."""

    ln1: list[torch.Tensor]  # (T, 1) scale of input_layernorm per layer
    ln2: list[torch.Tensor]  # (T, 1) scale of post_attention_layernorm per layer
    patterns: list[torch.Tensor]  # (H, T, T) attention patterns per layer
    ln_final: torch.Tensor  # (T, 1)
    embeddings: torch.Tensor  # (T, d)
    values: dict[int, torch.Tensor]  # (T, k) active feature values per layer
    indices: dict[int, torch.Tensor]  # (T, k) feature ids
    errors: dict[int, torch.Tensor]  # (T, d) MLP output minus transcoder output
    logits: torch.Tensor  # (T, vocab) of the real model


class ReplacementModel:
    """The replacement model of one prompt (see the module docstring).

    Parameters
    ----------
    model
        A GPT-NeoX causal LM (Hugging Face).
    transcoders
        A transcoder for every layer of the model.
    input_ids
        ``(T,)`` token ids of the prompt (no padding).
    """

    def __init__(
        self, model: nn.Module, transcoders: dict[int, Transcoder], input_ids: torch.Tensor
    ):
        self.model = model
        self.base, self.unembed = _gpt_neox_parts(model)
        self.layers = list(self.base.layers)
        missing = [i for i in range(len(self.layers)) if i not in transcoders]
        if missing:
            raise KeyError(
                f"Circuits need a transcoder for every layer; missing layer(s) {missing}. Train them "
                "with `sct.tl.train_transcoders(adata, model)` (default: all layers)."
            )
        self.transcoders = transcoders
        self.parallel = bool(model.config.use_parallel_residual)
        self.n_heads = model.config.num_attention_heads
        self.input_ids = input_ids.reshape(-1)
        self.device = next(model.parameters()).device
        self.frozen = self._record()

    # -- the real forward pass, recording what gets frozen ------------------------------------
    def _attention_parts(self, layer: nn.Module, x: torch.Tensor, position_embeddings):
        """Queries, keys and values ``(H, T, hs)`` of one attention layer for input ``x`` (T, d)."""
        attn = layer.attention
        T = x.shape[0]
        qkv = attn.query_key_value(x).view(T, self.n_heads, -1).transpose(0, 1)
        q, k, v = qkv.chunk(3, dim=-1)
        cos, sin = position_embeddings
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        return q[0], k[0], v, attn

    @torch.no_grad()
    def _record(self) -> Frozen:
        ids = self.input_ids.to(self.device)
        T = ids.shape[0]
        h = self.base.embed_in(ids[None])[0].float()
        emb = h.clone()
        pos = torch.arange(T, device=self.device)[None]
        pe = self.base.rotary_emb(h[None], position_ids=pos)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        ln1s, ln2s, pats, vals, idxs, errs = [], [], [], {}, {}, {}
        for i, layer in enumerate(self.layers):
            _, s1 = _ln_parts(layer.input_layernorm, h)
            x1 = layer.input_layernorm(h)
            q, k, v, attn = self._attention_parts(layer, x1, pe)
            scores = (q @ k.transpose(-1, -2)) * attn.scaling
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            pattern = scores.softmax(-1)
            a = (pattern @ v).transpose(0, 1).reshape(T, -1)
            a = attn.dense(a)
            mid = h if self.parallel else h + a
            _, s2 = _ln_parts(layer.post_attention_layernorm, mid)
            x2 = layer.post_attention_layernorm(mid)
            mlp_out = layer.mlp(x2)
            tc = self.transcoders[i]
            values, indices = tc.encode_sparse(x2)
            errs[i] = mlp_out - tc.decode_sparse(values, indices, x2)
            vals[i], idxs[i] = values, indices
            h = h + a + mlp_out if self.parallel else mid + mlp_out
            ln1s.append(s1)
            ln2s.append(s2)
            pats.append(pattern)
        _, sf = _ln_parts(self.base.final_layer_norm, h)
        logits = self.unembed(self.base.final_layer_norm(h))
        return Frozen(ln1s, ln2s, pats, sf, emb, vals, idxs, errs, logits)

    @torch.no_grad()
    def check(self, atol: float = 1e-4) -> float:
        """Largest difference between our logits and the Hugging Face forward (should be ~0)."""
        hf = self.model(input_ids=self.input_ids[None].to(self.device)).logits[0].float()
        diff = float((hf - self.frozen.logits).abs().max())
        if diff > atol:
            raise RuntimeError(f"Replacement forward differs from the model by {diff:.2e}.")
        return diff

    # -- the linear forward ----------------------------------------------------------------------
    def linear_forward(
        self,
        embeddings: torch.Tensor,
        values: dict[int, torch.Tensor],
        errors: dict[int, torch.Tensor],
        *,
        with_bias: bool = True,
        upto: int | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Forward of the frozen model from sources with a batch dimension ``B``.

        Parameters
        ----------
        embeddings
            ``(B, T, d)`` token embeddings.
        values, errors
            Per layer, ``(B, T, k)`` active feature values (at the recorded feature ids) and
            ``(B, T, d)`` error terms.
        with_bias
            ``False`` drops every constant term (biases, LayerNorm shifts, decoder biases), so the
            outputs are exactly the sources' linear effects.
        upto
            Stop once layer ``upto``'s MLP input is known (no logits): enough for targets that
            are features of layers ``<= upto``.

        Returns
        -------
        Per layer the transcoder pre-activations' inputs ``LN2(h)`` ``(B, T, d)``, and the logits
        ``(B, T, vocab)``.
        """
        f = self.frozen
        h = embeddings
        ln2_inputs = []
        for i, layer in enumerate(self.layers):
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            attn = layer.attention
            x1 = (h - h.mean(-1, keepdim=True)) * f.ln1[i] * ln1.weight
            if with_bias:
                x1 = x1 + ln1.bias
            B, T, d = x1.shape
            hs = d // self.n_heads
            w_v = attn.query_key_value.weight.view(self.n_heads, 3, hs, d)[:, 2]  # (H, hs, d)
            v = torch.einsum("btd,hsd->bhts", x1, w_v)
            if with_bias and attn.query_key_value.bias is not None:
                b_v = attn.query_key_value.bias.view(self.n_heads, 3, hs)[:, 2]
                v = v + b_v[None, :, None, :]
            z = torch.einsum("hqk,bhks->bqhs", f.patterns[i], v).reshape(B, T, d)
            a = F.linear(z, attn.dense.weight, attn.dense.bias if with_bias else None)
            mid = h if self.parallel else h + a
            x2 = (mid - mid.mean(-1, keepdim=True)) * f.ln2[i] * ln2.weight
            if with_bias:
                x2 = x2 + ln2.bias
            ln2_inputs.append(x2)
            if upto is not None and i == upto:
                return ln2_inputs, None
            tc = self.transcoders[i]
            idx = f.indices[i][None].expand(B, -1, -1)
            mlp = F.embedding_bag(
                idx.reshape(B * T, -1),
                tc.W_dec,
                per_sample_weights=values[i].reshape(B * T, -1),
                mode="sum",
            ).view(B, T, d)
            if with_bias:
                mlp = mlp + tc.b_dec
            if tc.W_skip is not None:
                mlp = mlp + F.linear(x2, tc.W_skip)
            mlp = mlp + errors[i]
            h = h + a + mlp if self.parallel else mid + mlp
        lnf = self.base.final_layer_norm
        xf = (h - h.mean(-1, keepdim=True)) * f.ln_final * lnf.weight
        if with_bias:
            xf = xf + lnf.bias
        logits = F.linear(
            xf, self.unembed.weight, getattr(self.unembed, "bias", None) if with_bias else None
        )
        return ln2_inputs, logits
