"""The local replacement model of one prompt: a causal LM made linear in its sources.

For the traced prompt, every MLP is replaced by its transcoder plus a constant error term (what
the MLP adds to the residual stream minus what the transcoder writes), and attention patterns and
norm scales are frozen at their values on this prompt. What remains is linear in the *sources*:
token embeddings, feature activations and error terms. So a target (a logit, or a feature's
pre-activation) is exactly the sum of each source's direct effect plus a constant bias, and direct
effects are gradients times source values.

Every family of :mod:`.architectures` is traced by the same code: GPT-NeoX (parallel and
sequential residual), Llama/Mistral/Qwen2, Gemma-2 and GPT-2. Gemma-2's norms after attention and
after the MLP are frozen like the others (its transcoders write after the post-feedforward norm,
so that norm is inside the replacement of the MLP). Logit targets are the logits *before* a final
soft-cap (Gemma-2's ``30 tanh(logit / 30)``): the soft-cap is monotone but not linear, so it is
left outside the attribution; :meth:`ReplacementModel.check` applies it before comparing with
the Hugging Face logits.

Everything here is computed by our own forward pass from the module's weights; it is checked
against the Hugging Face forward (:meth:`ReplacementModel.check`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import architecture

if TYPE_CHECKING:
    from .transcoder import Transcoder


@dataclass
class Frozen:
    """What the real forward pass fixes for the replacement model (one prompt, batch 1)."""

    attn_scale: list[torch.Tensor]  # (T, 1) scale of the norm before attention, per layer
    mlp_scale: list[torch.Tensor]  # (T, 1) scale of the norm before the MLP, per layer
    attn_out_scale: list[torch.Tensor | None]  # (T, 1) scale of a norm after attention (Gemma-2)
    patterns: list[torch.Tensor]  # (H, T, T) attention patterns per layer
    final_scale: torch.Tensor  # (T, 1)
    embeddings: torch.Tensor  # (T, d)
    values: dict[int, torch.Tensor]  # (T, k) active feature values per layer
    indices: dict[int, torch.Tensor]  # (T, k) feature ids
    errors: dict[int, torch.Tensor]  # (T, d) MLP write minus transcoder output
    logits: torch.Tensor  # (T, vocab) before any final soft-cap


@dataclass
class LinearOutputs:
    """What :meth:`ReplacementModel.linear_forward` returns."""

    mlp_inputs: list[torch.Tensor]  # per layer (B, T, d): what the transcoders read
    logits: torch.Tensor  # (B, T, vocab) before any final soft-cap


@dataclass
class Contributions:
    """What :meth:`ReplacementModel.contributions` returns: value x gradient per source."""

    embeddings: torch.Tensor  # (B, T)
    errors: dict[int, torch.Tensor]  # per layer (B, T)
    values: dict[int, torch.Tensor]  # per layer (B, T, k)
    attention_grads: dict[int, torch.Tensor] = field(default_factory=dict)  # per layer (B, T, d)


class ReplacementModel:
    """The replacement model of one prompt (see the module docstring).

    Parameters
    ----------
    model
        A causal LM (Hugging Face) of a family in :mod:`.architectures`.
    transcoders
        A transcoder for every layer of the model.
    input_ids
        ``(T,)`` token ids of the prompt (no padding).
    """

    def __init__(
        self, model: nn.Module, transcoders: dict[int, Transcoder], input_ids: torch.Tensor
    ):
        self.model = model
        self.arch = architecture(model)
        self.layers = self.arch.blocks
        missing = [i for i in range(len(self.layers)) if i not in transcoders]
        if missing:
            raise KeyError(
                f"Circuits need a transcoder for every layer; missing layer(s) {missing}. Train them "
                "with `sct.tl.train_transcoders(adata, model)` (default: all layers)."
            )
        self.transcoders = transcoders
        self.input_ids = input_ids.reshape(-1)
        self.device = next(model.parameters()).device
        self._mean_unembedding: torch.Tensor | None = None
        self.frozen = self._record()

    def logit_direction(self, token: int, *, subtract_mean: bool) -> torch.Tensor:
        """What a logit target reads from the final norm's output: the token's unembedding row,
        minus the mean row when the target is the logit minus the mean logit.
        """
        u = self.arch.W_U[token]
        if not subtract_mean:
            return u
        if self._mean_unembedding is None:  # one pass over the vocabulary, once
            self._mean_unembedding = self.arch.W_U.mean(0)
        return u - self._mean_unembedding

    @property
    def n_heads(self) -> list[int]:
        """Query heads per layer."""
        return [blk.attention.n_heads for blk in self.layers]

    # -- the real forward pass, recording what gets frozen ------------------------------------
    @torch.no_grad()
    def _record(self) -> Frozen:
        ids = self.input_ids.to(self.device)
        h = self.arch.embed(ids)
        emb = h.clone()
        s_attn, s_mlp, s_out, pats, vals, idxs, errs = [], [], [], [], {}, {}, {}
        for i, blk in enumerate(self.layers):
            s1 = blk.attn_norm.scale(h)
            x1 = blk.attn_norm.frozen(h, s1)
            pattern = blk.attention.pattern(x1)
            a = blk.attention.output(blk.attention.head_outputs(x1[None], pattern))[0]
            so = None
            if blk.attn_out_norm is not None:
                so = blk.attn_out_norm.scale(a)
                a = blk.attn_out_norm.frozen(a, so)
            mid = h if blk.parallel else h + a
            s2 = blk.mlp_norm.scale(mid)
            x2 = blk.mlp_norm.frozen(mid, s2)
            write = blk.mlp(x2.to(next(blk.mlp.parameters()).dtype)).float()
            if blk.mlp_out_norm is not None:
                write = blk.mlp_out_norm(write)
            tc = self.transcoders[i]
            values, indices = tc.encode_sparse(x2)
            errs[i] = write - tc.decode_sparse(values, indices, x2)
            vals[i], idxs[i] = values, indices
            h = h + a + write if blk.parallel else mid + write
            s_attn.append(s1)
            s_mlp.append(s2)
            s_out.append(so)
            pats.append(pattern)
        sf = self.arch.final_norm.scale(h)
        logits = self.arch.logits(self.arch.final_norm.frozen(h, sf))
        return Frozen(s_attn, s_mlp, s_out, pats, sf, emb, vals, idxs, errs, logits)

    @torch.no_grad()
    def check(self, atol: float = 1e-4) -> float:
        """Largest difference between our logits (after any final soft-cap) and the Hugging
        Face forward (should be ~0).
        """
        hf = self.model(input_ids=self.input_ids[None].to(self.device)).logits[0].float()
        diff = float((hf - self.arch.softcap(self.frozen.logits)).abs().max())
        if diff > atol:
            raise RuntimeError(f"Replacement forward differs from the model by {diff:.2e}.")
        return diff

    # -- the linear forward and its transpose --------------------------------------------------
    def linear_forward(
        self,
        embeddings: torch.Tensor,
        values: dict[int, torch.Tensor],
        errors: dict[int, torch.Tensor],
        *,
        with_bias: bool = True,
    ) -> LinearOutputs:
        """Forward of the frozen model from sources with a batch dimension ``B``.

        Parameters
        ----------
        embeddings
            ``(B, T, d)`` token embeddings.
        values, errors
            Per layer, ``(B, T, k)`` active feature values (at the recorded feature ids) and
            ``(B, T, d)`` error terms.
        with_bias
            ``False`` drops every constant term (biases, norm shifts, decoder biases), so the
            outputs are exactly the sources' linear effects.
        """
        f = self.frozen
        h = embeddings
        mlp_inputs = []
        for i, blk in enumerate(self.layers):
            x1 = blk.attn_norm.frozen(h, f.attn_scale[i], with_bias=with_bias)
            z = blk.attention.head_outputs(x1, f.patterns[i], with_bias=with_bias)
            a = blk.attention.output(z, with_bias=with_bias)
            if blk.attn_out_norm is not None:
                a = blk.attn_out_norm.frozen(a, f.attn_out_scale[i], with_bias=with_bias)
            mid = h if blk.parallel else h + a
            x2 = blk.mlp_norm.frozen(mid, f.mlp_scale[i], with_bias=with_bias)
            mlp_inputs.append(x2)
            tc = self.transcoders[i]
            B, T, _ = x2.shape
            idx = f.indices[i][None].expand(B, -1, -1)
            mlp = F.embedding_bag(
                idx.reshape(B * T, -1),
                tc.W_dec,
                per_sample_weights=values[i].reshape(B * T, -1),
                mode="sum",
            ).view(B, T, -1)
            if with_bias:
                mlp = mlp + tc.b_dec
            if tc.W_skip is not None:
                mlp = mlp + F.linear(x2, tc.W_skip)
            mlp = mlp + errors[i]
            h = h + a + mlp if blk.parallel else mid + mlp
        xf = self.arch.final_norm.frozen(h, f.final_scale, with_bias=with_bias)
        return LinearOutputs(mlp_inputs, self.arch.logits(xf, with_bias=with_bias))

    @torch.no_grad()
    def contributions(
        self,
        *,
        final: torch.Tensor | None = None,
        mlp_inputs: dict[int, torch.Tensor] | None = None,
        head_readout: dict[int, torch.Tensor] | None = None,
        attention: bool = True,
        attention_grads: list[int] | None = None,
    ) -> Contributions:
        """Every source's direct effect on ``B`` linear readouts, by one explicit backward pass.

        The replacement model is linear, so its transpose is a fixed linear map: the gradient is
        carried from the top down through frozen norms, attention patterns (values and outputs)
        and transcoder decoders, keeping one ``(B, T, d)`` gradient at a time and no activations.
        Each batch element reads ``final`` ``(B, T, d)`` (weights on the final norm's output),
        ``mlp_inputs[l]`` ``(B, T, d)`` (weights on layer ``l``'s MLP input) and
        ``head_readout[l]`` ``(B, T, H, hd)`` (weights on the heads' mixed values ``z``).

        Parameters
        ----------
        attention
            ``False`` cuts every path through attention.
        attention_grads
            Layers at whose attention write the gradient is returned (``attention_grads`` of the
            result, ``(B, T, d)`` each).

        Returns
        -------
        Per source, value x gradient: ``embeddings`` ``(B, T)``, ``errors[l]`` ``(B, T)`` and
        ``values[l]`` ``(B, T, k)``.
        """
        f = self.frozen
        mlp_inputs = mlp_inputs or {}
        head_readout = head_readout or {}
        reads = [*mlp_inputs, *head_readout]
        top = len(self.layers) - 1 if final is not None else max(reads)
        some = final if final is not None else next(iter({**mlp_inputs, **head_readout}.values()))
        B, T = some.shape[:2]
        g = torch.zeros(B, T, self.arch.W_U.shape[1], device=self.device)
        if final is not None:
            g = self.arch.final_norm.backward(final, f.final_scale)
        out = Contributions(torch.zeros(B, T, device=self.device), {}, {}, {})
        for i in range(top, -1, -1):
            blk, tc = self.layers[i], self.transcoders[i]
            # g: gradient on what block i adds to (the residual after it)
            dec = tc.W_dec[f.indices[i]]  # (T, k, d) rows of the active features
            out.values[i] = torch.einsum("btd,tkd->btk", g, dec) * f.values[i]
            out.errors[i] = (g * f.errors[i]).sum(-1)
            g_x2 = mlp_inputs.get(i)
            if tc.W_skip is not None:
                skip = g @ tc.W_skip
                g_x2 = skip if g_x2 is None else g_x2 + skip
            g_mid = g if g_x2 is None else g + blk.mlp_norm.backward(g_x2, f.mlp_scale[i])
            # parallel: attention writes next to the MLP; sequential: before it
            g_write = g if blk.parallel else g_mid
            if attention_grads is not None and i in attention_grads:
                out.attention_grads[i] = g_write
            g = g_mid
            if attention:
                g = g + self._attention_backward(i, g_write, head_readout.get(i))
            elif i in head_readout:
                raise ValueError("head_readout needs attention.")
        out.embeddings = (g * f.embeddings).sum(-1)
        return out

    def _attention_backward(
        self, layer: int, grad: torch.Tensor, readout: torch.Tensor | None
    ) -> torch.Tensor:
        """Gradient on the block's input through its attention, from ``grad`` on what attention
        writes (and ``readout`` on the heads' mixed values).
        """
        blk, f = self.layers[layer], self.frozen
        att = blk.attention
        if blk.attn_out_norm is not None:
            grad = blk.attn_out_norm.backward(grad, f.attn_out_scale[layer])
        B, T, _ = grad.shape
        g_z = (grad @ att.W_o).view(B, T, att.n_heads, att.head_dim)
        if readout is not None:
            g_z = g_z + readout
        g_v = torch.einsum("hqk,bqhs->bkhs", f.patterns[layer], g_z)
        g_v = g_v.view(B, T, att.n_kv_heads, att.groups, att.head_dim).sum(3)
        g_x1 = g_v.reshape(B, T, -1) @ att.W_v
        return blk.attn_norm.backward(g_x1, f.attn_scale[layer])

    def head_readout(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        """``U`` ``(T, H, hd)`` such that ``sum(U * z)`` is ``grad`` dotted with what each head
        of ``layer`` writes, for ``grad`` ``(T, d)`` at the point where attention writes (after
        a post-attention norm, frozen).
        """
        blk = self.layers[layer]
        g = grad
        if blk.attn_out_norm is not None:
            g = blk.attn_out_norm.backward(g, self.frozen.attn_out_scale[layer])
        att = blk.attention
        W = att.W_o.view(att.W_o.shape[0], att.n_heads, att.head_dim)
        return torch.einsum("td,dhs->ths", g, W)
