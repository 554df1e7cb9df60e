"""Architecture adapters: what each model family computes, declared once.

Hooking (:mod:`.hooks`), training, activations and the local replacement model of circuits
(:mod:`.replacement`) read a model through :func:`architecture`, never through its attribute
names. An :class:`Architecture` holds, for one Hugging Face causal LM, views of its weights as
plain tensors in one vocabulary:

- the token embedding (with Gemma's ``sqrt(d_model)`` scale and GPT-2's learned positions),
- per block: the norm before attention, the attention weights per head (queries, keys, values,
  output; grouped-query layouts, biases, rotary embedding, logit soft-cap, sliding window), the
  norm after attention (Gemma-2), the norm before the MLP, the MLP module and the module whose
  output is what the MLP adds to the residual stream (Gemma-2: the post-feedforward norm), and
  whether attention and MLP read the same residual (parallel, GPT-NeoX/Pythia) or one after the
  other,
- the final norm, the unembedding and the final logit soft-cap (Gemma-2).

Families: ``gpt_neox`` (Pythia, C2S-Pythia; parallel or sequential), ``llama`` (also
``mistral`` and ``qwen2``, with Qwen2's QKV biases), ``gemma2`` (C2S-Scale) and ``gpt2``.

Norms are written ``y = (x - mean(x)) * s * w + b`` for LayerNorm and ``y = x * s * w`` for
RMSNorm, with ``s = 1 / sqrt(var(x) + eps)`` (resp. ``mean(x^2)``) the input-dependent scale and
``w`` the effective weight (Gemma stores ``w - 1``; its ``1 + w`` is applied here). Freezing ``s``
at its value on a prompt makes a norm linear, which is how the replacement model treats it.
Torch only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Callable

#: Families traced by circuits (all are also hooked by transcoders and activations).
FAMILIES = ("gpt_neox", "llama", "gemma2", "gpt2")
#: ``config.model_type`` of each supported model, and its family.
MODEL_TYPES = {
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma2": "gemma2",
    "gpt2": "gpt2",
}


@dataclass(frozen=True)
class Norm:
    """A LayerNorm (``centred``) or RMSNorm, with its effective weight and bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    centred: bool

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The input-dependent scale ``s`` ``(..., 1)``, in float32."""
        c = self._centre(x.float())
        return torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.eps)

    def frozen(self, x: torch.Tensor, scale: torch.Tensor, *, with_bias: bool = True):
        """The norm of ``x`` with its scale fixed at ``scale``: linear in ``x`` (plus the bias)."""
        y = self._centre(x) * scale * self.weight
        return y + self.bias if with_bias and self.bias is not None else y

    def backward(self, grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Gradient with respect to the input of :meth:`frozen` (scale fixed) given ``grad``
        with respect to its output: ``C (scale * weight * grad)``, ``C`` removing the mean for
        LayerNorm (it is symmetric).
        """
        g = grad * scale * self.weight
        return g - g.mean(-1, keepdim=True) if self.centred else g

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of ``x`` (float32)."""
        return self.frozen(x.float(), self.scale(x))


@dataclass(frozen=True)
class Attention:
    """One attention layer as per-head weights: ``W_q`` ``(H*hd, d)``, ``W_k``/``W_v``
    ``(KV*hd, d)``, ``W_o`` ``(d, H*hd)``; query head ``h`` reads key/value head
    ``h // (H // KV)``.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    W_q: torch.Tensor
    W_k: torch.Tensor
    W_v: torch.Tensor
    W_o: torch.Tensor
    b_q: torch.Tensor | None
    b_k: torch.Tensor | None
    b_v: torch.Tensor | None
    b_o: torch.Tensor | None
    scaling: float
    softcap: float | None
    sliding_window: int | None
    rotary: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Attention pattern ``(H, T, T)`` of one prompt's normalised input ``x`` ``(T, d)``."""
        T = x.shape[0]
        q = F.linear(x, self.W_q, self.b_q).view(T, self.n_heads, self.head_dim).transpose(0, 1)
        k = F.linear(x, self.W_k, self.b_k).view(T, self.n_kv_heads, self.head_dim).transpose(0, 1)
        if self.rotary is not None:
            q, k = self.rotary(q, k, T)
        k = k.repeat_interleave(self.groups, dim=0)
        scores = (q @ k.transpose(-1, -2)) * self.scaling
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        pos = torch.arange(T, device=x.device)
        allowed = pos[None, :] <= pos[:, None]
        if self.sliding_window is not None:
            allowed &= pos[:, None] - pos[None, :] < self.sliding_window
        return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)

    def head_outputs(
        self, x: torch.Tensor, pattern: torch.Tensor, *, with_bias: bool = True
    ) -> torch.Tensor:
        """Per-head mixed values ``z`` ``(B, T, H, hd)`` for inputs ``x`` ``(B, T, d)``."""
        B, T, _ = x.shape
        v = F.linear(x, self.W_v, self.b_v if with_bias else None)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).repeat_interleave(self.groups, dim=2)
        return torch.einsum("hqk,bkhs->bqhs", pattern, v)

    def output(self, z: torch.Tensor, *, with_bias: bool = True) -> torch.Tensor:
        """``W_o z (+ b_o)`` ``(B, T, d)`` from per-head values ``(B, T, H, hd)``."""
        return F.linear(z.flatten(-2), self.W_o, self.b_o if with_bias else None)

    def head_writes(self, z: torch.Tensor) -> torch.Tensor:
        """What each head writes (before any post-attention norm), ``(B, T, H, d)``."""
        W = self.W_o.view(self.W_o.shape[0], self.n_heads, self.head_dim)
        return torch.einsum("bths,dhs->bthd", z, W)


@dataclass(frozen=True)
class Block:
    """One transformer block (see the module docstring)."""

    attn_norm: Norm
    attention: Attention
    attn_out_norm: Norm | None
    mlp_norm: Norm
    mlp: nn.Module
    mlp_write: nn.Module
    mlp_out_norm: Norm | None
    parallel: bool


@dataclass(frozen=True)
class Architecture:
    """A causal LM seen through one vocabulary (see the module docstring)."""

    family: str
    blocks: list[Block]
    final_norm: Norm
    W_U: torch.Tensor
    b_U: torch.Tensor | None
    final_softcap: float | None
    _embed: Callable[[torch.Tensor], torch.Tensor]

    @property
    def n_layers(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """What the residual stream starts from, ``(T, d)`` float32 for token ids ``(T,)``."""
        return self._embed(ids).float()

    def logits(self, x: torch.Tensor, *, with_bias: bool = True) -> torch.Tensor:
        """Logits before the final soft-cap from the normalised final residual."""
        return F.linear(x, self.W_U, self.b_U if with_bias else None)

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The final logit soft-cap ``c * tanh(logits / c)`` (identity when the model has none)."""
        if self.final_softcap is None:
            return logits
        return torch.tanh(logits / self.final_softcap) * self.final_softcap


# -- per family -------------------------------------------------------------------------------


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float()


def _layer_norm(ln: nn.Module) -> Norm:
    return Norm(_f32(ln.weight), _f32(ln.bias), float(ln.eps), centred=True)


def _rms_norm(norm: nn.Module, *, plus_one: bool = False) -> Norm:
    w = _f32(norm.weight)
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = norm.variance_epsilon
    return Norm(1.0 + w if plus_one else w, None, float(eps), centred=False)


def _rotary(model_module: nn.Module, attn: nn.Module):
    """Rotary embedding with the family's own ``rotary_emb`` and ``apply_rotary_pos_emb``."""
    apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def rotate(q: torch.Tensor, k: torch.Tensor, T: int):
        pos = torch.arange(T, device=q.device)[None]
        cos, sin = model_module.rotary_emb(q.transpose(0, 1)[None], position_ids=pos)
        q2, k2 = apply(q[None], k[None], cos.float(), sin.float())
        return q2[0], k2[0]

    return rotate


def _bias(linear: nn.Module) -> torch.Tensor | None:
    return _f32(getattr(linear, "bias", None))


def _gpt_neox(model: nn.Module) -> Architecture:
    base = model.gpt_neox
    cfg = model.config
    H = cfg.num_attention_heads
    blocks = []
    for layer in base.layers:
        attn = layer.attention
        d = cfg.hidden_size
        hs = d // H
        W = _f32(attn.query_key_value.weight).view(H, 3, hs, d)
        b = _bias(attn.query_key_value)
        b = None if b is None else b.view(H, 3, hs)
        qkv = [W[:, i].reshape(H * hs, d) for i in range(3)]
        qkv_b = [None if b is None else b[:, i].reshape(H * hs) for i in range(3)]
        blocks.append(
            Block(
                attn_norm=_layer_norm(layer.input_layernorm),
                attention=Attention(
                    n_heads=H,
                    n_kv_heads=H,
                    head_dim=hs,
                    W_q=qkv[0],
                    W_k=qkv[1],
                    W_v=qkv[2],
                    W_o=_f32(attn.dense.weight),
                    b_q=qkv_b[0],
                    b_k=qkv_b[1],
                    b_v=qkv_b[2],
                    b_o=_bias(attn.dense),
                    scaling=float(attn.scaling),
                    softcap=None,
                    sliding_window=None,
                    rotary=_rotary(base, attn),
                ),
                attn_out_norm=None,
                mlp_norm=_layer_norm(layer.post_attention_layernorm),
                mlp=layer.mlp,
                mlp_write=layer.mlp,
                mlp_out_norm=None,
                parallel=bool(cfg.use_parallel_residual),
            )
        )
    unembed = model.get_output_embeddings()
    return Architecture(
        "gpt_neox",
        blocks,
        _layer_norm(base.final_layer_norm),
        _f32(unembed.weight),
        _bias(unembed),
        None,
        base.embed_in,
    )


def _llama_like(model: nn.Module, family: str) -> Architecture:
    base = model.model
    cfg = model.config
    gemma = family == "gemma2"
    blocks = []
    for layer in base.layers:
        attn = layer.self_attn
        H = cfg.num_attention_heads
        KV = getattr(cfg, "num_key_value_heads", None) or H
        hd = getattr(attn, "head_dim", None) or cfg.hidden_size // H
        blocks.append(
            Block(
                attn_norm=_rms_norm(layer.input_layernorm, plus_one=gemma),
                attention=Attention(
                    n_heads=H,
                    n_kv_heads=KV,
                    head_dim=int(hd),
                    W_q=_f32(attn.q_proj.weight),
                    W_k=_f32(attn.k_proj.weight),
                    W_v=_f32(attn.v_proj.weight),
                    W_o=_f32(attn.o_proj.weight),
                    b_q=_bias(attn.q_proj),
                    b_k=_bias(attn.k_proj),
                    b_v=_bias(attn.v_proj),
                    b_o=_bias(attn.o_proj),
                    scaling=float(attn.scaling),
                    softcap=getattr(attn, "attn_logit_softcapping", None),
                    sliding_window=(
                        getattr(cfg, "sliding_window", None)  # Mistral: every layer
                        if cfg.model_type == "mistral"
                        else getattr(attn, "sliding_window", None)
                    ),
                    rotary=_rotary(base, attn),
                ),
                attn_out_norm=(
                    _rms_norm(layer.post_attention_layernorm, plus_one=True) if gemma else None
                ),
                mlp_norm=_rms_norm(
                    layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm,
                    plus_one=gemma,
                ),
                mlp=layer.mlp,
                mlp_write=layer.post_feedforward_layernorm if gemma else layer.mlp,
                mlp_out_norm=(
                    _rms_norm(layer.post_feedforward_layernorm, plus_one=True) if gemma else None
                ),
                parallel=False,
            )
        )
    unembed = model.get_output_embeddings()
    return Architecture(
        family,
        blocks,
        _rms_norm(base.norm, plus_one=gemma),
        _f32(unembed.weight),
        _bias(unembed),
        getattr(cfg, "final_logit_softcapping", None) if gemma else None,
        base.embed_tokens,  # Gemma's scaled embedding module applies sqrt(d_model) itself
    )


def _gpt2(model: nn.Module) -> Architecture:
    base = model.transformer
    cfg = model.config
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(
        cfg, "reorder_and_upcast_attn", False
    ):
        raise TypeError(
            "GPT-2 models with `scale_attn_by_inverse_layer_idx` or `reorder_and_upcast_attn` "
            "are not supported by circuits."
        )
    H, d = cfg.n_head, cfg.n_embd
    hd = d // H
    blocks = []
    for layer in base.h:
        attn = layer.attn
        W = _f32(attn.c_attn.weight).T  # Conv1D stores (in, out)
        b = _f32(attn.c_attn.bias)
        scaling = hd**-0.5 if getattr(attn, "scale_attn_weights", True) else 1.0
        blocks.append(
            Block(
                attn_norm=_layer_norm(layer.ln_1),
                attention=Attention(
                    n_heads=H,
                    n_kv_heads=H,
                    head_dim=hd,
                    W_q=W[:d],
                    W_k=W[d : 2 * d],
                    W_v=W[2 * d :],
                    W_o=_f32(attn.c_proj.weight).T,
                    b_q=b[:d],
                    b_k=b[d : 2 * d],
                    b_v=b[2 * d :],
                    b_o=_f32(attn.c_proj.bias),
                    scaling=scaling,
                    softcap=None,
                    sliding_window=None,
                    rotary=None,
                ),
                attn_out_norm=None,
                mlp_norm=_layer_norm(layer.ln_2),
                mlp=layer.mlp,
                mlp_write=layer.mlp,
                mlp_out_norm=None,
                parallel=False,
            )
        )

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return base.wte(ids) + base.wpe(torch.arange(ids.shape[-1], device=ids.device))

    unembed = model.get_output_embeddings()
    return Architecture(
        "gpt2", blocks, _layer_norm(base.ln_f), _f32(unembed.weight), _bias(unembed), None, embed
    )


def family(model: nn.Module) -> str | None:
    """The family of a Hugging Face causal LM (see :data:`MODEL_TYPES`), or None."""
    return MODEL_TYPES.get(getattr(getattr(model, "config", None), "model_type", None))


def architecture(model: nn.Module) -> Architecture:
    """The :class:`Architecture` of a Hugging Face causal LM of a supported family.

    Weights are float32 views (copies for other dtypes and for GPT-NeoX's fused QKV).
    """
    fam = family(model)
    if fam is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise TypeError(
            f"Circuits are traced on the families {', '.join(FAMILIES)} "
            f"(model types {', '.join(sorted(MODEL_TYPES))}); got {model_type!r}."
        )
    if fam == "gpt_neox":
        return _gpt_neox(model)
    if fam == "gpt2":
        return _gpt2(model)
    return _llama_like(model, fam)


def mlp_write_modules(model: nn.Module, mlps: list[nn.Module]) -> list[nn.Module]:
    """Per block, the module whose output is what the MLP adds to the residual stream.

    The MLP itself, except in Gemma-2, where a norm follows it (``post_feedforward_layernorm``):
    a transcoder there replaces MLP and norm together, so that transcoder plus error term give
    the forward pass exactly.
    """
    if family(model) != "gemma2":
        return list(mlps)
    return [layer.post_feedforward_layernorm for layer in model.model.layers]
