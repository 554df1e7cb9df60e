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

from .topk import sparse_decode, topk_select

ACTIVATIONS = ("topk", "relu")
#: Weight names of a transcoder, in storage order.
WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")


def _select(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.topk.topk_select` over the last dimension of ``pre`` (any leading dimensions)."""
    values, indices = topk_select(pre.reshape(-1, pre.shape[-1]), k)
    return values.reshape(*pre.shape[:-1], k), indices.reshape(*pre.shape[:-1], k)


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
            return _select(pre, self.config.k)
        idx = torch.arange(pre.shape[-1], device=pre.device).expand_as(pre)
        return pre, idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations ``(..., n_features)``."""
        pre = F.relu(self.pre_activations(x))
        if self.config.activation == "topk":
            values, indices = _select(pre, self.config.k)
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
