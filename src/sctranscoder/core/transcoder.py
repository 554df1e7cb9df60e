"""Transcoders: wide, sparse replacements for an MLP layer, mapping its input to its output.

``f = act(W_enc x + b_enc)``, ``y = W_dec^T f + b_dec (+ W_skip x)``, with ``act`` either TopK
(keep the ``k`` largest ReLU pre-activations) or ReLU (sparsity from an L1 penalty in training).
Decoder rows are kept at unit norm, so a feature's activation is its contribution's size.
Torch only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("topk", "relu")
_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")


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
        return asdict(self)


class Transcoder(nn.Module):
    """A sparse replacement for one MLP layer (see the module docstring)."""

    def __init__(self, config: TranscoderConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        c = config
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
        shape = values.shape
        flat_v = values.reshape(-1, shape[-1])
        flat_i = indices.reshape(-1, shape[-1])
        y = F.embedding_bag(flat_i, self.W_dec, per_sample_weights=flat_v, mode="sum")
        y = y.reshape(*shape[:-1], -1) + self.b_dec
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
    def to_numpy(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays (for ``adata.uns``)."""
        return {
            name: getattr(self, name).detach().to("cpu", torch.float32).numpy().copy()
            for name in _WEIGHTS
            if getattr(self, name) is not None
        }

    @classmethod
    def from_numpy(cls, config: TranscoderConfig, weights: dict) -> Transcoder:
        """Rebuild from :meth:`to_numpy` output, checking every shape."""
        tc = cls(config)
        missing = [n for n in _WEIGHTS if getattr(tc, n) is not None and n not in weights]
        if missing:
            raise ValueError(f"Transcoder weights are missing {missing}.")
        with torch.no_grad():
            for name in _WEIGHTS:
                p = getattr(tc, name)
                if p is None:
                    continue
                arr = torch.as_tensor(np.asarray(weights[name]), dtype=torch.float32)
                if tuple(arr.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{name} has shape {tuple(arr.shape)}, expected {tuple(p.shape)} for {config}."
                    )
                p.copy_(arr)
        return tc


def save_transcoders(
    transcoders: dict[int, Transcoder], path: str | Path, *, metadata: dict | None = None
) -> Path:
    """Write transcoders to a directory: ``layer_<i>.safetensors`` and ``config.json``.

    ``metadata`` (the base model's name and fingerprint, training parameters, metrics) is stored in
    ``config.json`` so that loading can check the model they belong to.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not transcoders:
        raise ValueError("No transcoders to save.")
    path.mkdir(parents=True, exist_ok=True)
    configs = {}
    for layer, tc in sorted(transcoders.items()):
        tensors = {k: torch.as_tensor(v) for k, v in tc.to_numpy().items()}
        save_file(tensors, str(path / f"layer_{layer}.safetensors"))
        configs[str(layer)] = tc.config.to_dict()
    doc = {"format": "sctranscoder.transcoders/1", "layers": configs, "metadata": metadata or {}}
    (path / "config.json").write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    return path


def load_transcoders(path: str | Path) -> tuple[dict[int, Transcoder], dict]:
    """Read a directory written by :func:`save_transcoders`; returns ``(transcoders, metadata)``."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(
            f"{cfg_file} not found: is {path} a directory of saved transcoders?"
        )
    doc = json.loads(cfg_file.read_text())
    if doc.get("format") != "sctranscoder.transcoders/1":
        raise ValueError(f"{cfg_file} is not an sctranscoder transcoder config.")
    out = {}
    for layer, cfg in doc["layers"].items():
        weights = {
            k: v.numpy() for k, v in load_file(str(path / f"layer_{layer}.safetensors")).items()
        }
        out[int(layer)] = Transcoder.from_numpy(TranscoderConfig(**cfg), weights)
    return out, doc.get("metadata", {})


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"Cannot serialise {type(o).__name__} to JSON.")
