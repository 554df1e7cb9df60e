"""Train transcoders on every chosen MLP layer from one forward pass of the model.

The model reads a stream of prompt batches; forward hooks collect each layer's MLP input and
output for the real (non-padding) tokens into a bounded buffer; the buffer is shuffled and cut into
token batches on which all layers' transcoders take one optimiser step together. Nothing is cached
to disk and memory is bounded by the buffer, whatever the number of cells. Torch only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .hooks import capture_mlp_io, run_to_layers
from .transcoder import Transcoder, TranscoderConfig

logger = logging.getLogger(__name__)

TokenBatch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask)


@dataclass
class TrainingConfig:
    """Hyper-parameters of transcoder training.

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
        Tokens per optimiser step.
    n_tokens
        Training tokens per layer.
    dead_tokens
        A feature that has not fired for this many tokens is dead; ``None``: ``n_tokens // 10``.
    auxk_alpha
        Weight of the auxiliary loss that trains dead features to explain the residual error (AuxK).
    buffer_tokens
        Tokens held in the shuffle buffer; ``None``: 32 batches, capped at 1 GiB of activations.
    seed
        Seed of initialisation and shuffling.
    """

    activation: str = "topk"
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

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.n_tokens < self.batch_size:
            raise ValueError(
                f"n_tokens ({self.n_tokens}) must be at least one batch ({self.batch_size} tokens)."
            )
        if self.expansion_factor < 1:
            raise ValueError("expansion_factor must be >= 1.")

    def learning_rate(self, n_features: int) -> float:
        if self.lr is not None:
            return self.lr
        if self.activation == "topk":
            return 2e-4 / math.sqrt(n_features / 2**14)
        return 1e-4

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingLog:
    """What happened in training, per layer: loss curve (per step), dead fraction at the end."""

    steps: int = 0
    tokens: int = 0
    loss: dict[int, list[float]] = field(default_factory=dict)
    fvu: dict[int, list[float]] = field(default_factory=dict)
    dead_fraction: dict[int, float] = field(default_factory=dict)


def _buffer_tokens(cfg: TrainingConfig, n_layers: int, d_in: int, d_out: int) -> int:
    if cfg.buffer_tokens is not None:
        return max(cfg.buffer_tokens, cfg.batch_size)
    per_token = n_layers * (d_in + d_out) * 4
    return max(cfg.batch_size, min(32 * cfg.batch_size, (1 << 30) // per_token))


def harvest(
    model: nn.Module,
    batches: Iterable[TokenBatch],
    layers: Sequence[int],
    *,
    device: torch.device,
) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """For each prompt batch, the MLP inputs and outputs of ``layers`` at real tokens, ``(n, d)``."""
    with capture_mlp_io(model, layers) as store:
        for ids, mask in batches:
            ids, mask = ids.to(device), mask.to(device)
            run_to_layers(model, ids, mask)
            keep = mask.bool()
            xs = {layer: store[layer][0][keep].float() for layer in layers}
            ys = {layer: store[layer][1][keep].float() for layer in layers}
            store.clear()
            yield xs, ys


def _aux_loss(
    tc: Transcoder, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor
) -> torch.Tensor:
    """AuxK: the top dead features (by ReLU pre-activation) should explain what the others missed."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return residual.new_zeros(())
    k_aux = min(residual.shape[-1] // 2, n_dead)
    vals, idx = pre.masked_fill(~dead, 0.0).topk(k_aux, dim=-1, sorted=False)
    e_hat = F.embedding_bag(idx, tc.W_dec, per_sample_weights=vals, mode="sum")
    denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    scale = min(n_dead / k_aux, 1.0)
    return scale * (e_hat - residual.detach()).pow(2).sum() / denom


def train_transcoders(
    model: nn.Module,
    batches: Iterable[TokenBatch],
    *,
    layers: Sequence[int],
    config: TrainingConfig,
    d_in: int,
    d_out: int,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[dict[int, Transcoder], TrainingLog]:
    """Train one transcoder per layer in ``layers`` on the prompts in ``batches``.

    Parameters
    ----------
    model
        A frozen causal LM (see :func:`sctranscoder.core.model.mlp_modules` for layouts).
    batches
        ``(input_ids, attention_mask)`` prompt batches; iterated until ``config.n_tokens`` tokens
        have been used, so pass an endless (e.g. epoch-cycling, shuffled) iterator.
    layers
        MLP layers to train transcoders for.
    config
        Hyper-parameters.
    d_in, d_out
        Width of the MLP input and output.
    device
        Device of the model and transcoders (default: the model's).
    progress
        Show a tqdm progress bar.

    Returns
    -------
    The transcoders by layer, and a :class:`TrainingLog`.
    """
    layers = [int(layer) for layer in layers]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator().manual_seed(config.seed)
    tc_cfg = TranscoderConfig(
        d_in=d_in,
        d_out=d_out,
        n_features=config.expansion_factor * d_in,
        activation=config.activation,
        k=config.k,
        skip=config.skip,
    )
    transcoders = {layer: Transcoder(tc_cfg, generator=gen).to(device) for layer in layers}
    params = [p for tc in transcoders.values() for p in tc.parameters()]
    lr = config.learning_rate(tc_cfg.n_features)
    opt = torch.optim.Adam(params, lr=lr)
    dead_tokens = config.dead_tokens if config.dead_tokens is not None else config.n_tokens // 10
    since_fired = {
        layer: torch.zeros(tc_cfg.n_features, dtype=torch.long, device=device) for layer in layers
    }
    log = TrainingLog(loss={layer: [] for layer in layers}, fvu={layer: [] for layer in layers})
    cap = _buffer_tokens(config, len(layers), d_in, d_out)
    bs = config.batch_size
    shuffle_gen = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    logger.info(
        "training %d transcoders (%s, %d features, lr %.2e) on %d tokens each",
        len(layers),
        config.activation,
        tc_cfg.n_features,
        lr,
        config.n_tokens,
    )

    bar = tqdm(total=config.n_tokens, unit="tok", desc="transcoders", disable=not progress)
    buf_x: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    buf_y: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    n_buf = 0
    initialised = False
    source = harvest(model, batches, layers, device=device)
    try:
        while log.tokens < config.n_tokens:
            # fill the buffer
            while n_buf < cap:
                try:
                    xs, ys = next(source)
                except StopIteration:
                    break
                for layer in layers:
                    buf_x[layer].append(xs[layer])
                    buf_y[layer].append(ys[layer])
                n_buf += next(iter(xs.values())).shape[0]
            if n_buf < bs:
                raise ValueError(
                    f"The prompts gave only {n_buf} tokens, fewer than one batch ({bs}); "
                    "use more cells or a smaller batch_size."
                )
            X = {layer: torch.cat(buf_x[layer]) for layer in layers}
            Y = {layer: torch.cat(buf_y[layer]) for layer in layers}
            if not initialised:
                for layer, tc in transcoders.items():
                    _initialise_from_data(tc, X[layer][:bs], Y[layer][:bs])
                initialised = True
            perm = torch.randperm(n_buf, generator=shuffle_gen).to(device)
            n_full = n_buf // bs
            for b in range(n_full):
                if log.tokens >= config.n_tokens:
                    break
                idx = perm[b * bs : (b + 1) * bs]
                total = torch.zeros((), device=device)
                for layer, tc in transcoders.items():
                    x, y = X[layer][idx], Y[layer][idx]
                    loss, fvu, fired = _layer_loss(
                        tc, x, y, config, since_fired[layer] > dead_tokens
                    )
                    total = total + loss
                    since_fired[layer] += bs
                    since_fired[layer][fired] = 0
                    log.loss[layer].append(float(loss.detach()))
                    log.fvu[layer].append(float(fvu))
                opt.zero_grad(set_to_none=True)
                total.backward()
                for tc in transcoders.values():
                    _remove_parallel_grad(tc)
                opt.step()
                for tc in transcoders.values():
                    tc.normalize_decoder()
                log.steps += 1
                log.tokens += bs
                bar.update(bs)
                if log.steps % 10 == 0:
                    bar.set_postfix(
                        fvu=f"{sum(log.fvu[la][-1] for la in layers) / len(layers):.3f}"
                    )
            # keep the unused tail of the buffer
            rest = perm[n_full * bs :]
            for layer in layers:
                buf_x[layer] = [X[layer][rest]] if rest.numel() else []
                buf_y[layer] = [Y[layer][rest]] if rest.numel() else []
            n_buf = int(rest.numel())
    finally:
        bar.close()
        source.close()
    for layer in layers:
        log.dead_fraction[layer] = float((since_fired[layer] > dead_tokens).float().mean())
        transcoders[layer].eval()
        transcoders[layer].requires_grad_(False)
    return transcoders, log


@torch.no_grad()
def _initialise_from_data(tc: Transcoder, x: torch.Tensor, y: torch.Tensor) -> None:
    """Start at the mean output, with outputs of the same typical size as the MLP's.

    Without this, unit-norm decoder rows times O(1) activations can be orders of magnitude larger
    than an MLP's output, and the first hundreds of steps only shrink the encoder.
    """
    tc.b_dec.copy_(y.mean(0))
    y_hat = tc(x) - tc.b_dec
    scale = (y - y.mean(0)).norm(dim=-1).median() / y_hat.norm(dim=-1).median().clamp_min(1e-12)
    tc.W_enc.mul_(scale)
    tc.b_enc.mul_(scale)


def _layer_loss(
    tc: Transcoder, x: torch.Tensor, y: torch.Tensor, cfg: TrainingConfig, dead: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of one layer on one batch; also its FVU and which features fired."""
    var = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
    pre = F.relu(tc.pre_activations(x))
    if tc.config.activation == "topk":
        values, indices = pre.topk(tc.config.k, dim=-1, sorted=False)
        y_hat = tc.decode_sparse(values, indices, x)
        fvu = (y_hat - y).pow(2).sum() / var
        loss = fvu
        fired = indices[values > 0].unique()
    else:
        y_hat = tc.decode(pre, x)
        err = (y_hat - y).pow(2).sum()
        fvu = err / var
        l1 = (pre * tc.W_dec.norm(dim=1)).sum(-1).mean()
        loss = err / x.shape[0] + cfg.l1_coefficient * l1
        fired = (pre > 0).any(0).nonzero().squeeze(-1)
    if cfg.auxk_alpha > 0:
        loss = loss + cfg.auxk_alpha * _aux_loss(tc, pre, y - y_hat, dead)
    return loss, fvu.detach(), fired


@torch.no_grad()
def _remove_parallel_grad(tc: Transcoder) -> None:
    """Drop the gradient component along each unit-norm decoder row (it only rescales the row)."""
    g = tc.W_dec.grad
    if g is None:
        return
    parallel = (g * tc.W_dec).sum(dim=1, keepdim=True)
    g.sub_(parallel * tc.W_dec)
