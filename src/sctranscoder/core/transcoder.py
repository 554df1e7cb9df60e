"""Transcoders: wide, sparse replacements for an MLP layer, mapping its input to its output.

``f = act(W_enc x + b_enc)``, ``y = W_dec^T f + b_dec (+ W_skip x)``, with ``act`` either TopK
(keep the ``k`` largest ReLU pre-activations) or ReLU (sparsity from an L1 penalty in training).
Training keeps ReLU transcoders' decoder rows at unit norm (their L1 penalty is on activation
times decoder norm). TopK transcoders start from a zero decoder and leave its rows free, as
sparsify does: a feature's contribution to the output is its activation times its row's norm.
Torch only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("topk", "relu")
#: Weight names of a transcoder, in storage order.
WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")


class _TopKEncode(torch.autograd.Function):
    """TopK of ``relu(x W_enc^T + b_enc)`` whose backward touches only the selected features.

    Forward is one dense matmul and a ``topk``; only ``x``, the indices and the values are kept
    (not the ``(batch, n_features)`` pre-activations). Backward, with ``g`` the gradient of the
    values times the ReLU mask: ``grad_x = sum_j g_j W_enc[i_j]`` (``embedding_bag``),
    ``grad_W_enc[i_j] += g_j x`` (a sparse ``(n_features, batch)`` matrix with ``batch k``
    entries times ``x``: the index-add of the selected outer products without forming them) and
    ``grad_b_enc[i_j] += g_j`` (``index_add``), so its cost is ``O(batch k d_in)`` instead of
    ``O(batch n_features d_in)``.

    Optionally (``dead`` given) it also returns the AuxK candidates from the same matmul: the
    ``k_aux`` largest ReLU pre-activations among the ``dead`` features (0 where fewer are
    positive), with the same sparse backward. On the CPU only the dead features' columns are
    searched, so fewer than ``k_aux`` candidates come back when fewer features are dead (the
    others would be non-dead features with value 0, which add nothing to the loss or gradients).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dead, k_aux, compute_dtype):
        dt = compute_dtype or x.dtype  # .to() is a no-op in x's own dtype
        pre = F.relu(F.linear(x.to(dt), W_enc.to(dt), b_enc.to(dt)))
        values, indices = pre.topk(k, dim=-1, sorted=False)
        if dead is not None and x.device.type == "cpu":
            # only the dead features' columns (where reading the mask costs no device sync):
            # usually a handful, so no second TopK over all features
            cols = dead.nonzero().squeeze(1)
            aux_values, pos = pre.index_select(1, cols).topk(
                min(k_aux, cols.numel()), dim=-1, sorted=False
            )
            aux_indices = cols[pos]
        elif dead is not None:
            aux_values, aux_indices = pre.masked_fill_(~dead, 0.0).topk(k_aux, dim=-1, sorted=False)
        else:
            aux_values = pre.new_zeros(x.shape[0], 0)
            aux_indices = indices.new_zeros(x.shape[0], 0)
        values, aux_values = values.to(x.dtype), aux_values.to(x.dtype)
        ctx.save_for_backward(x, W_enc, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux_values, _grad_aux_indices):
        x, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        g = grad_values * (values > 0)  # ReLU
        if aux_indices.shape[-1]:
            g = torch.cat([g, grad_aux_values * (aux_values > 0)], dim=-1)
            indices = torch.cat([indices, aux_indices], dim=-1)
        g = g.to(x.dtype)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = encoder_weight_grad(indices, g, x, W_enc.shape[0]).to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[0], dtype=g.dtype, device=g.device)
            grad_b.index_add_(0, indices.reshape(-1), g.reshape(-1))
        return grad_x, grad_W, grad_b, None, None, None, None


#: How :func:`encoder_weight_grad` computes by default, per device type (others: ``"sparse_mm"``).
#: Chosen by measurement (``benchmarks/training_step.py``; see ``benchmarks/README.md``).
WEIGHT_GRAD_METHODS = {"cpu": "sparse_mm", "cuda": "embedding_bag"}


def encoder_weight_grad(
    indices: torch.Tensor,
    g: torch.Tensor,
    x: torch.Tensor,
    n_features: int,
    method: str | None = None,
) -> torch.Tensor:
    """``grad_W[i] = sum over (token t, slot j) with indices[t, j] == i of g[t, j] x[t]``.

    The gradient of a TopK encoder's weight from the gradient ``g`` of its ``(batch, k)`` values,
    without forming the ``(batch, n_features)`` gradient of the pre-activations. ``method``:

    * ``"sparse_mm"``: a sparse ``(n_features, batch)`` COO matrix with ``batch k`` entries times
      ``x``;
    * ``"embedding_bag"``: the weight gradient of ``embedding_bag(indices, W, g)`` with ``x`` as
      its output gradient (the same sum; a sorted segment reduction on CUDA);
    * ``"dense"``: scatter ``g`` into ``(batch, n_features)`` and one matmul (in ``x``'s dtype);
    * ``None``: :data:`WEIGHT_GRAD_METHODS` for ``x``'s device.
    """
    if method is None:
        method = WEIGHT_GRAD_METHODS.get(x.device.type, "sparse_mm")
    n, kk = indices.shape
    if method == "sparse_mm":
        rows = torch.arange(n, device=x.device).repeat_interleave(kk)
        G = torch.sparse_coo_tensor(
            torch.stack([indices.reshape(-1), rows]),
            g.reshape(-1).to(x.dtype),
            (n_features, n),
            check_invariants=False,
        )
        return torch.sparse.mm(G, x)
    if method == "embedding_bag":
        with torch.enable_grad():
            w = torch.zeros(n_features, x.shape[1], dtype=x.dtype, device=x.device)
            w.requires_grad_(True)
            out = F.embedding_bag(indices, w, per_sample_weights=g.to(x.dtype), mode="sum")
            (grad,) = torch.autograd.grad(out, w, grad_outputs=x)
        return grad
    if method == "dense":
        G = torch.zeros(n, n_features, dtype=x.dtype, device=x.device)
        G.scatter_add_(1, indices, g.to(x.dtype))
        return G.T @ x
    raise ValueError(f"method must be 'sparse_mm', 'embedding_bag' or 'dense', got {method!r}.")


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    dead: torch.Tensor | None = None,
    k_aux: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """``(values, indices)`` of the ``k`` largest ``relu(x W_enc^T + b_enc)`` per row of ``x``.

    The same numbers as ``F.relu(F.linear(x, W_enc, b_enc)).topk(k, sorted=False)`` but its
    backward is sparse (see :class:`_TopKEncode`): no ``(batch, n_features)`` gradient is ever
    formed. With a boolean ``dead`` mask over features, also returns ``(aux_values,
    aux_indices)``: the ``k_aux`` largest ReLU pre-activations among dead features (AuxK).
    ``x`` may have leading dimensions; outputs are ``(..., k)``.

    ``compute_dtype`` (e.g. ``torch.bfloat16``): the matmul and the TopK selection run in that
    precision (as sparsify's encoder does under autocast on CUDA); the values come back in ``x``'s
    dtype and the backward stays in ``x``'s dtype.
    """
    shape = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    values, indices, aux_values, aux_indices = _TopKEncode.apply(
        flat, W_enc, b_enc, k, dead, k_aux, compute_dtype
    )
    out = (values.reshape(*shape, -1), indices.reshape(*shape, -1))
    if dead is None:
        return out
    return *out, aux_values.reshape(*shape, -1), aux_indices.reshape(*shape, -1)


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_j values_j W_dec[indices_j] (+ b_dec)``: a gather of ``k`` decoder rows per row.

    ``embedding_bag`` forward and backward: the gradient of ``W_dec`` is accumulated row by row
    and that of ``values`` is a ``(batch, k)`` gather, never a ``(batch, n_features)`` tensor.
    """
    shape = values.shape
    flat_v = values.reshape(-1, shape[-1])
    flat_i = indices.reshape(-1, shape[-1])
    y = F.embedding_bag(flat_i, W_dec, per_sample_weights=flat_v, mode="sum")
    y = y.reshape(*shape[:-1], -1)
    return y if b_dec is None else y + b_dec


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` are one device (``"cuda"`` matches any ``"cuda:<i>"``)."""
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


@dataclass(frozen=True)
class TranscoderConfig:
    """Shape and activation of one transcoder.

    Attributes
    ----------
    d_in, d_out
        Width of the MLP's input and output (``d_model`` for all supported models).
    n_features
        Number of features (``expansion_factor * d_in``).
    activation
        ``"topk"`` or ``"relu"``.
    k
        Features kept per token by TopK.
    skip
        Whether a linear skip connection ``W_skip x`` is added to the output.
    """

    d_in: int
    d_out: int
    n_features: int
    activation: str = "topk"
    k: int = 32
    skip: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        if self.activation == "topk" and not 0 < self.k <= self.n_features:
            raise ValueError(f"k must be in 1..n_features ({self.n_features}), got {self.k}.")
        if min(self.d_in, self.d_out, self.n_features) < 1:
            raise ValueError("d_in, d_out and n_features must be positive.")

    def to_dict(self) -> dict:
        """The fields, as stored in ``adata.uns`` and ``config.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TranscoderConfig:
        """The config of :meth:`to_dict`; unknown or missing fields are refused by name."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"Unknown transcoder setting(s) {unknown}; expected {names}.")
        types = {"d_in": int, "d_out": int, "n_features": int, "activation": str, "k": int}
        out = {}
        for name, value in values.items():
            value = value.item() if hasattr(value, "item") else value
            if name == "skip":
                out[name] = bool(value)
            elif isinstance(value, bool) or not isinstance(value, types[name]):
                raise ValueError(
                    f"Transcoder setting {name}={value!r} is not a {types[name].__name__}."
                )
            else:
                out[name] = value
        try:
            return cls(**out)
        except TypeError as err:  # a required field is missing
            raise ValueError(f"Incomplete transcoder settings {sorted(values)}: {err}.") from err


class Transcoder(nn.Module):
    """A sparse replacement for one MLP layer (see the module docstring)."""

    def __init__(
        self,
        config: TranscoderConfig,
        *,
        generator: torch.Generator | None = None,
        init: bool = True,
    ):
        super().__init__()
        self.config = config
        c = config
        if not init:  # weights set by the caller (from_tensors): shapes only, no memory
            meta = {"device": "meta"}
            self.W_dec = nn.Parameter(torch.empty(c.n_features, c.d_out, **meta))
            self.b_dec = nn.Parameter(torch.empty(c.d_out, **meta))
            self.W_enc = nn.Parameter(torch.empty(c.n_features, c.d_in, **meta))
            self.b_enc = nn.Parameter(torch.empty(c.n_features, **meta))
            self.W_skip = nn.Parameter(torch.empty(c.d_out, c.d_in, **meta)) if c.skip else None
            return
        w = torch.randn(c.n_features, c.d_out, generator=generator)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.b_dec = nn.Parameter(torch.zeros(c.d_out))
        self.W_enc = nn.Parameter(
            torch.randn(c.n_features, c.d_in, generator=generator) / c.d_in**0.5
        )
        self.b_enc = nn.Parameter(torch.zeros(c.n_features))
        self.W_skip = nn.Parameter(torch.zeros(c.d_out, c.d_in)) if c.skip else None

    # -- encoding ---------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``W_enc x + b_enc`` for inputs ``(..., d_in)``."""
        return F.linear(x, self.W_enc, self.b_enc)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Active features as ``(values, indices)``, each ``(..., k)``.

        For TopK these are the ``k`` largest ReLU pre-activations (values may be 0 when fewer than
        ``k`` are positive); for ReLU, all features are returned with ``k = n_features``.
        """
        pre = F.relu(self.pre_activations(x))
        if self.config.activation == "topk":
            values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
            return values, indices
        idx = torch.arange(pre.shape[-1], device=pre.device).expand_as(pre)
        return pre, idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations ``(..., n_features)``."""
        pre = F.relu(self.pre_activations(x))
        if self.config.activation == "topk":
            values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, indices, values)
        return pre

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Output from dense activations (and the input, for the skip connection)."""
        y = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("This transcoder has a skip connection: pass the input `x`.")
            y = y + F.linear(x, self.W_skip)
        return y

    def decode_sparse(
        self, values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Output from ``(values, indices)``: a gather of ``k`` decoder rows per token."""
        y = sparse_decode(values, indices, self.W_dec, self.b_dec)
        if self.W_skip is not None:
            if x is None:
                raise ValueError("This transcoder has a skip connection: pass the input `x`.")
            y = y + F.linear(x, self.W_skip)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The replacement MLP output for input ``x``."""
        if self.config.activation == "topk":
            values, indices = self.encode_sparse(x)
            return self.decode_sparse(values, indices, x)
        return self.decode(self.encode(x), x)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm and the encoder rows by the inverse (same output)."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[:, None])
        self.b_enc.mul_(norms)

    # -- (de)serialisation --------------------------------------------------------------------
    def state_arrays(self) -> dict[str, torch.Tensor]:
        """The weights by name (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and ``W_skip``)."""
        return {name: getattr(self, name) for name in WEIGHTS if getattr(self, name) is not None}

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays (for ``adata.uns``)."""
        return {
            name: t.detach().to("cpu", torch.float32).numpy().copy()
            for name, t in self.state_arrays().items()
        }

    @classmethod
    def from_tensors(
        cls, config: TranscoderConfig, weights: dict, *, copy: bool = True
    ) -> Transcoder:
        """A frozen transcoder from its weights (arrays or tensors), every shape checked.

        ``copy=False`` shares memory with float32 CPU arrays (no copy of large weights); any other
        dtype or device is converted. Unknown or missing weight names are refused.
        """
        tc = cls(config, init=False)
        expected = [n for n in WEIGHTS if getattr(tc, n) is not None]
        missing = [n for n in expected if n not in weights]
        unknown = sorted(set(weights) - set(expected))
        if missing or unknown:
            raise ValueError(
                f"Transcoder weights do not match {config}: missing {missing}, unexpected {unknown}."
            )
        for name in expected:
            arr = weights[name]
            t = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.asarray(arr))
            t = t.to(torch.float32)
            p = getattr(tc, name)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, expected {tuple(p.shape)} for {config}."
                )
            setattr(tc, name, nn.Parameter(t.clone() if copy else t, requires_grad=False))
        tc.eval()
        return tc

    def moved(self, device: torch.device | str) -> Transcoder:
        """The transcoder on ``device``: itself when already there, else a moved copy (unlike
        ``nn.Module.to``, which moves in place a module that others may share).
        """
        device = torch.device(device)
        if same_device(self.W_enc.device, device):
            return self
        weights = {k: t.to(device) for k, t in self.state_arrays().items()}
        return Transcoder.from_tensors(self.config, weights, copy=False)

    @classmethod
    def from_numpy(cls, config: TranscoderConfig, weights: dict) -> Transcoder:
        """Rebuild from :meth:`to_numpy` output (copies), checking every shape."""
        return cls.from_tensors(config, weights, copy=True)
