"""Training settings: one serialisable dataclass, the single source of every training parameter."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

#: ``TrainingConfig.autocast`` values.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: ``TrainingConfig.kernels``: how a TopK step is computed.
Kernels = Literal["auto", "sparse", "dense"]
KERNELS = get_args(Kernels)
#: ``TrainingConfig.activation``: the transcoders' activation function.
Activation = Literal["topk", "relu"]
ACTIVATIONS = get_args(Activation)


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of transcoder training.

    Pass one whole to :func:`sctranscoder.tl.train_transcoders` (``config=``), or any field as a
    keyword there; it is stored with the transcoders (``to_dict``) and read back
    (``from_dict``), for example by :func:`sctranscoder.tl.random_model_baseline`.

    Attributes
    ----------
    activation
        ``"topk"`` (default) or ``"relu"``.
    expansion_factor
        Features per model dimension.
    k
        Active features per token for TopK.
    skip
        Add a linear skip connection.
    l1_coefficient
        ReLU only: weight of the L1 penalty on activations (times decoder norms). The ReLU loss is
        the mean squared error in the model's units plus this penalty, as in Hosokawa et al. 2025
        (expansion 8, lr 1e-4, L1 1.4e-4, 2048 tokens a batch). TopK minimises the fraction of
        variance unexplained (scale-free across layers).
    lr
        Adam learning rate; ``None``: ``2e-4 / sqrt(n_features / 2**14)`` for TopK (Gao et al.
        2024), ``1e-4`` for ReLU.
    batch_size
        Tokens per optimiser step, over all ranks under ``torch.distributed`` (each of the
        ``world_size`` ranks takes ``batch_size // world_size``; it must divide).
    n_tokens
        Training tokens per layer (every layer sees the same tokens).
    dead_tokens
        A feature that has not fired for this many tokens is dead; ``None``: ``n_tokens // 10``.
    auxk_alpha
        Weight of the auxiliary loss that trains dead features to explain the residual error (AuxK).
    buffer_tokens
        Tokens held in the shuffle buffer; ``None``: 32 batches, capped at 1 GiB of activations.
    seed
        Seed of the train/validation split, initialisation and shuffling.
    autocast
        Run the frozen model's forward under :func:`torch.autocast` in ``"bf16"`` or ``"fp16"``,
        and the TopK encoder's matmul and selection in that precision (as sparsify's encoder runs
        under autocast on CUDA). Activations are cast back to float32; TopK values, the decoder,
        the loss, gradients, weights and the optimiser stay in float32. ``None`` (default):
        float32 throughout. On the tiny C2S model, bf16 MLP inputs/outputs differ from float32 by
        at most 0.4% (relative Frobenius error) and bf16 training ends within 0.02 validation FVU
        of float32 (``tests/core/test_training.py``).
    compile
        :func:`torch.compile` the per-layer loss (encoder and decoder-plus-loss); if compiling
        fails, a warning is logged and training runs eagerly.
    profile
        Record seconds per phase in ``TrainingLog.timings``, synchronising the device around every
        phase (which slows a GPU down a little).
    kernels
        How a TopK step is computed; the same numbers up to float rounding.
        ``"sparse"``: the encoder's backward touches only the ``k`` selected features per token
        (:func:`~sctranscoder.core.topk.topk_encode`) and decoding gathers ``k`` decoder
        rows per token (``embedding_bag``); the weights' gradients come from the selected
        features only (no ``(batch, n_features)`` gradient of a weight; on the CPU the decoded
        values' gradient is one ``(batch, n_features)`` product, measured faster there).
        ``"dense"``: the codes are scattered into ``(batch, n_features)`` and decoded by a matmul,
        with plain autograd (the reference; on a GPU, in bf16 under ``autocast``, matmuls over
        all features beat gathers and scatters). ``"auto"`` (default): dense on CUDA, sparse
        elsewhere, as measured by ``benchmarks/training_step.py``.
    stack_layers
        Train all layers' TopK transcoders as one stack (:mod:`~sctranscoder.core.training.stacked`):
        every weight with a leading layer dimension, one batched step for all layers (one
        selection, one sort, one decode, one loss, one fused Adam update) instead of one
        computation per layer; the same numbers up to float rounding. ``None`` (default): per
        layer, the faster on the CPU as measured (:data:`~.stacked.STACKED_DEVICES`) and the one
        measured on a GPU so far; ``True`` for the stacked step (made for GPUs with many
        layers, where it saves one kernel launch per layer and operation). ReLU transcoders and
        ``compile`` always train per layer.
    prompt_batch_size
        Cells per forward pass of the frozen model.
    validation_fraction
        Fraction of cells held out (seeded by ``seed``) for the quality metrics.
    answer_tokens
        Also train on the positions where the model reads its own answer: each training cell's
        greedy answer (the cell type, computed once before training) is fed after its prompt,
        teacher-forced, so the transcoders see the MLP inputs of the model answering, not only
        of the model reading genes. ``False``: prompts only (what transcoders recorded before
        this field existed were trained on). Measured on the embedded default: see the
        changelog and ``answer_*`` in the metrics of :func:`sctranscoder.tl.train_transcoders`.
    answer_weight
        With ``answer_tokens``: each position that predicts a token of the answer (the last
        prompt token and the answer tokens fed) is taken this many times in the training
        stream (answer positions are few: about 3% of the tokens on the embedded default).
        Measured on the embedded default at 10**6 tokens per layer
        (``benchmarks/answer_faithfulness.py``): validation cells whose answer the replacement
        keeps, 0.79 prompts only, 0.96 at weight 1, 0.97 at weight 4 (of 70 cells: 55, 67
        and 68), with the FVU of every layer within 0.001.
    """

    activation: Activation = "topk"
    expansion_factor: int = 8
    k: int = 32
    skip: bool = False
    l1_coefficient: float = 1.4e-4
    lr: float | None = None
    batch_size: int = 2048
    n_tokens: int = 1_000_000
    dead_tokens: int | None = None
    auxk_alpha: float = 1 / 32
    buffer_tokens: int | None = None
    seed: int = 0
    autocast: Literal["bf16", "fp16"] | None = None
    compile: bool = False
    profile: bool = False
    kernels: Kernels = "auto"
    stack_layers: bool | None = None
    prompt_batch_size: int = 16
    validation_fraction: float = 0.1
    answer_tokens: bool = True
    answer_weight: int = 4

    def __post_init__(self) -> None:
        for name in (
            "expansion_factor",
            "k",
            "batch_size",
            "n_tokens",
            "prompt_batch_size",
            "answer_weight",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("dead_tokens", "buffer_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        if self.n_tokens < self.batch_size:
            raise ValueError(
                f"n_tokens ({self.n_tokens}) must be at least one batch ({self.batch_size} tokens)."
            )
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}.")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(
                f"autocast must be None or one of {sorted(AUTOCAST_DTYPES)}, got {self.autocast!r}."
            )
        if not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}."
            )
        for name in ("l1_coefficient", "auxk_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}.")
        if self.stack_layers and (self.activation != "topk" or self.compile):
            raise ValueError(
                "stack_layers=True trains TopK transcoders without torch.compile; use "
                "activation='topk' and compile=False, or stack_layers=None."
            )
        if self.stack_layers is not None and not isinstance(self.stack_layers, bool):
            raise ValueError(
                f"stack_layers must be True, False or None, got {self.stack_layers!r}."
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive (or None for the default), got {self.lr}.")

    def resolved_kernels(self, device: torch.device | str) -> str:
        """``kernels`` with ``"auto"`` resolved for ``device``: dense on CUDA, else sparse."""
        if self.kernels != "auto":
            return self.kernels
        return "dense" if torch.device(device).type == "cuda" else "sparse"

    def learning_rate(self, n_features: int) -> float:
        """``lr``, or its default for ``n_features`` features."""
        if self.lr is not None:
            return self.lr
        if self.activation == "topk":
            return 2e-4 / math.sqrt(n_features / 2**14)
        return 1e-4

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with ``changes`` (unknown names are refused, as in :meth:`from_dict`)."""
        _check_fields(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field with a value; ``None`` (a default chosen at training time) is left out.

        What ``adata.uns`` and JSON can store: :meth:`from_dict` gives back an equal config.
        """
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, values: dict[str, Any]) -> TrainingConfig:
        """The config of a stored record: :meth:`from_dict`, where a field added after the
        record was written takes the value the record was trained with (:data:`ADDED_FIELDS`),
        not today's default.
        """
        return cls.from_dict({**ADDED_FIELDS, **dict(values)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """The config of :meth:`to_dict` (numpy scalars as read from an ``.h5ad`` are accepted)."""
        values = dict(values)
        _check_fields(values)
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        out = {}
        for name, value in values.items():
            if hasattr(value, "item"):  # numpy scalars from h5ad
                value = value.item()
            if "bool" in types[name]:
                value = bool(value)
            elif types[name].startswith("int") and isinstance(value, float) and value.is_integer():
                value = int(value)
            out[name] = value
        return cls(**out)


#: Fields added to :class:`TrainingConfig` after records were first written, with the value that
#: describes how records written without them were trained.
ADDED_FIELDS: dict[str, Any] = {"answer_tokens": False, "answer_weight": 1}


def _check_fields(values: dict) -> None:
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(
            f"Unknown training setting(s) {unknown}; TrainingConfig has {sorted(known)}."
        )


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
