"""Training throughput of transcoders on every MLP layer: sctranscoder vs EleutherAI sparsify.

Both sides train one TopK transcoder per MLP layer in the same process, on the same frozen model,
from the same stream of prompt batches (the same cells in the same seeded order), with the same
expansion factor, k, batch size in tokens, number of steps, Adam learning-rate rule
(``2e-4 / sqrt(n_features / 2**14)``), AuxK weight and dead-feature window. Both timings INCLUDE
the model forward pass that produces the MLP inputs/outputs (each library's own way of reading
them: sctranscoder stops the forward after the highest hooked layer, sparsify runs the whole model
as its ``Trainer`` does); the phase breakdown separates it out.

* ours: :func:`sctranscoder.core.training.train_transcoders`, called as the package calls it.
* sparsify (PyPI ``eai-sparsify``, ``pip install -e ".[benchmark]"``): ``SparseCoder`` modules
  built from ``TranscoderConfig`` (``SparseCoderConfig(transcode=True)``), trained by a loop that
  replicates one ``sparsify.Trainer`` step with ``optimizer="adam"``, ``loss_fn="fvu"``: its
  forward hooks on each MLP module collect inputs/outputs at the real tokens; on the first step the
  encoder bias is set to ``-mean(x) @ W_enc.T`` and ``b_dec`` to ``mean(y)``; each layer's
  ``fvu + auxk_alpha * auxk_loss`` is back-propagated locally; then ``Adam.step``, ``zero_grad``,
  LR scheduler step and the ``num_tokens_since_fired`` bookkeeping. As in sparsify's Trainer for
  transcoders, the decoder starts at zero and is not renormalised (``normalize_decoder`` only
  applies when autoencoding). The only departure: harvested tokens go through the same shuffle
  buffer as ours (same capacity, same shuffling), so that both sides train on equally shuffled
  2048-token batches; sparsify's Trainer would train on unshuffled per-sequence batches. The
  learning rate is constant by default (our rule); ``--sparsify-schedule sparsify`` uses its
  default linear warm-up (1000 steps) and linear decay instead.

Validation FVU (pooled squared error over total variance of the MLP output), L0 and the fraction
of features that never fire are computed by one function for both, on the held-out cells' tokens.

A separate, shorter profiled run of each side records where the time goes (model forward,
encoder, decoder (incl. loss and AuxK), backward, optimizer, other); the throughput runs are not
profiled. FLOPs per token are counted (see ``flops_per_token``) and the achieved time is compared
with the FLOP floor at the machine's peak (CPU: measured with a large float32 matmul; GPU: the
stated dense bf16 peak, e.g. H100 989 TFLOP/s, or ``--peak-tflops``).

    python benchmarks/train_throughput.py                           # CPU, embedded model, 4 layers
    python benchmarks/train_throughput.py --device cuda --model 410m
    python benchmarks/train_throughput.py --device cuda --model 410m --n-tokens 20000000

``--model 410m``: a GPT-NeoX with the C2S-Pythia-410m architecture (24 layers, d=1024, 16 heads,
d_ff=4096, parallel residual, rotary_pct 0.25, vocab 50304) and random weights, reading
pbmc68k_reduced cell sentences (200 genes) tokenised with the real Pythia tokenizer from
``../shared/assets/pythia_20B_tokenizer.json``; without that file, random token ids over the
vocabulary (``--seq-len`` tokens a prompt). On CUDA the frozen model runs in bfloat16 on both sides
(``--model-dtype``); sparsify's ``SparseCoder.forward`` additionally autocasts to bfloat16 on
CUDA by itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

PHASES = ("model_forward", "encoder", "decoder", "backward", "optimizer", "communication", "other")

# --------------------------------------------------------------------------------------------
# data and model


def build(args):
    """The model (a C2SModel), the training/validation prompt-batch factories and a description."""
    import numpy as np
    import torch

    import sctranscoder as sct
    from sctranscoder._records import sentences as cell_sentences
    from sctranscoder.core.model import C2SModel
    from sctranscoder.core.prompts import prompt_batches
    from sctranscoder.core.sentences import PromptSettings

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.model_dtype]
    if args.model == "tiny":
        cm = sct.datasets.tiny_c2s()
        cm.model.to(device=device, dtype=dtype)
        desc = {"name": "sct.datasets.tiny_c2s() (embedded, trained)"}
    else:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

        config = GPTNeoXConfig(
            vocab_size=50304,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            hidden_act="gelu",
            rotary_pct=0.25,
            max_position_embeddings=2048,
            layer_norm_eps=1e-5,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        torch.manual_seed(args.seed)
        with torch.device(device):
            hf = GPTNeoXForCausalLM(config)
        hf = hf.to(dtype).eval().requires_grad_(False)
        tok = None
        if _common.TOKENIZER.exists():
            tok = PreTrainedTokenizerFast(
                tokenizer_file=str(_common.TOKENIZER), eos_token="<|endoftext|>"
            )
        cm = C2SModel(
            model=hf,
            tokenizer=tok,
            settings=PromptSettings(n_genes=args.n_genes or 200),
            name="C2S-Pythia-410m architecture, random weights",
        )
        desc = {
            "name": "GPT-NeoX, C2S-Pythia-410m architecture (24 layers, d=1024, 16 heads, "
            "d_ff=4096, parallel residual, rotary_pct 0.25, vocab 50304), random weights",
            "tokenizer": str(_common.TOKENIZER) if tok is not None else None,
        }
    desc.update(
        n_layers=cm.n_layers,
        d_model=cm.d_model,
        dtype=args.model_dtype,
        n_params=sum(p.numel() for p in cm.model.parameters()),
    )

    rng = np.random.default_rng(args.seed)
    if cm.tokenizer is None:  # random tokens (410m without the tokenizer file)
        n_cells = 700
        val = np.zeros(n_cells, dtype=bool)
        val[rng.choice(n_cells, size=70, replace=False)] = True
        vocab = cm.model.config.vocab_size

        def stream(cells, *, seed, repeat):
            g = torch.Generator().manual_seed(0 if seed is None else seed)
            while True:
                for start in range(0, len(cells), args.prompt_batch_size):
                    n = len(cells[start : start + args.prompt_batch_size])
                    ids = torch.randint(vocab, (n, args.seq_len), generator=g)
                    yield ids, torch.ones_like(ids)
                if not repeat:
                    return

        desc["prompts"] = f"random token ids, {args.seq_len} tokens each"
        mean_len = float(args.seq_len)
    else:
        adata = _common.pbmc()
        n_genes = args.n_genes or cm.settings.n_genes
        cm.settings = dataclasses.replace(cm.settings, n_genes=n_genes)
        sct.pp.cell_sentences(adata, model=cm, n_genes=n_genes)
        sentences = cell_sentences(adata, "cell_sentence", n_genes=n_genes)
        n_cells = adata.n_obs
        val = np.zeros(n_cells, dtype=bool)
        val[rng.choice(n_cells, size=max(1, round(0.1 * n_cells)), replace=False)] = True

        def stream(cells, *, seed, repeat):
            return prompt_batches(
                cm,
                sentences,
                cells,
                batch_size=args.prompt_batch_size,
                seed=seed,
                repeat=repeat,
            )

        lens = [int(cm.tokenize(sentences[i : i + 64]).lengths.sum()) for i in range(0, 256, 64)]
        mean_len = sum(lens) / 256
        desc["prompts"] = (
            f"pbmc68k_reduced cell sentences, {n_genes} genes, C2S prompt template, "
            f"mean {mean_len:.0f} tokens"
        )
    train_cells, val_cells = np.flatnonzero(~val), np.flatnonzero(val)
    desc.update(
        n_train_cells=len(train_cells),
        n_val_cells=len(val_cells),
        mean_prompt_tokens=mean_len,
        prompt_batch_size=args.prompt_batch_size,
    )

    def train_stream():
        return stream(train_cells, seed=args.seed, repeat=True)

    def val_stream():
        it = stream(val_cells, seed=None, repeat=False)
        if args.val_batches:
            return (b for i, b in zip(range(args.val_batches), it, strict=False))
        return it

    return cm, train_stream, val_stream, desc


# --------------------------------------------------------------------------------------------
# timing helpers


class Timer:
    """Accumulate seconds per phase; synchronises CUDA at each boundary (profiled runs only)."""

    def __init__(self, device, enabled: bool):
        import torch

        self.enabled = enabled
        self.sync = torch.cuda.synchronize if (enabled and device.type == "cuda") else None
        self.t = dict.fromkeys(PHASES, 0.0)
        self.last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.t[phase] += now - self.last
        self.last = now


# --------------------------------------------------------------------------------------------
# ours


def run_ours(cm, train_stream, layers, args, *, n_tokens: int, profile: bool) -> dict:
    import torch

    from sctranscoder.core.training import TrainingConfig, train_transcoders

    kwargs = {}
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    note = None
    if profile and "profile" in names:
        kwargs["profile"] = True
    elif profile:
        note = "this sctranscoder version has no TrainingConfig(profile=True)"
    cfg = TrainingConfig(
        expansion_factor=args.expansion,
        k=args.k,
        batch_size=args.batch_size,
        n_tokens=n_tokens,
        seed=args.seed,
        autocast=args.autocast,
        prompt_batch_size=args.prompt_batch_size,
        **kwargs,
    )
    if args.stack_layers:
        cfg = cfg.replace(stack_layers=True)
    device = torch.device(args.device)
    _sync(device)
    t0 = time.perf_counter()
    tcs, log = train_transcoders(
        cm.model,
        train_stream(),
        layers=layers,
        config=cfg,
        d_in=cm.d_model,
        d_out=cm.d_model,
        device=device,
        progress=False,
    )
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {
        "tcs": tcs,
        "seconds": seconds,
        "tokens": int(log.tokens),
        "steps": int(log.steps),
        "train_dead_fraction": {int(k): float(v) for k, v in log.dead_fraction.items()},
        "lr": cfg.learning_rate(args.expansion * cm.d_model),
        "config": dataclasses.asdict(cfg),  # every field, None included
    }
    timings = getattr(log, "timings", None)
    if profile:
        out["timings"] = dict(timings) if timings else None
        out["profiled_seconds"] = float(getattr(log, "seconds", seconds) or seconds)
        if note:
            out["note"] = note
    return out


# --------------------------------------------------------------------------------------------
# sparsify


def run_sparsify(cm, train_stream, layers, args, *, n_tokens: int, profile: bool) -> dict:
    import torch
    from sparsify import SparseCoder, TranscoderConfig
    from transformers import get_linear_schedule_with_warmup

    from sctranscoder.core.model import mlp_modules
    from sctranscoder.core.training import TrainingConfig

    device = torch.device(args.device)
    model = cm.model
    d = cm.d_model
    ours_cfg = TrainingConfig(
        expansion_factor=args.expansion, k=args.k, batch_size=args.batch_size, n_tokens=n_tokens
    )
    auxk_alpha = ours_cfg.auxk_alpha
    dead_threshold = n_tokens // 10  # our default dead_tokens; sparsify's default is 10M tokens
    sae_cfg = TranscoderConfig(expansion_factor=args.expansion, k=args.k)
    saes = {}
    for layer in layers:
        torch.manual_seed(args.seed)  # as sparsify's Trainer: seed before each coder
        saes[layer] = SparseCoder(d, sae_cfg, device, dtype=torch.float32)
    bs = args.batch_size
    n_steps = n_tokens // bs
    pgs = [
        {"params": sae.parameters(), "lr": 2e-4 / (sae.num_latents / 2**14) ** 0.5}
        for sae in saes.values()
    ]
    opt = torch.optim.Adam(pgs)
    if args.sparsify_schedule == "sparsify":
        sched = get_linear_schedule_with_warmup(opt, 1000, n_steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)
    since_fired = {
        layer: torch.zeros(sae.num_latents, device=device, dtype=torch.long)
        for layer, sae in saes.items()
    }
    did_fire = {
        layer: torch.zeros(sae.num_latents, device=device, dtype=torch.bool)
        for layer, sae in saes.items()
    }

    timer = Timer(device, profile)
    if profile:  # split SparseCoder.forward into encoder and the rest (decoder, loss, AuxK)
        for sae in saes.values():
            enc = sae.encode

            def timed_encode(x, enc=enc):
                timer("other")
                out = enc(x)
                timer("encoder")
                return out

            sae.encode = timed_encode

    # the harvest, as sparsify's Trainer hooks do it: inputs[0] and output of each MLP module,
    # flattened, real tokens only, in the model's dtype; the model runs to the end.
    mlps = mlp_modules(model)
    store: dict[int, tuple] = {}
    mask_ref = {}

    def make_hook(layer):
        def hook(_module, inputs, output):
            m = mask_ref["mask"]
            store[layer] = (inputs[0].flatten(0, 1)[m], output.flatten(0, 1)[m])

        return hook

    handles = [mlps[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    cap = _buffer_cap(args, len(layers), d)
    shuffle_gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    buf_x = {layer: [] for layer in layers}
    buf_y = {layer: [] for layer in layers}
    n_buf = 0
    step = 0
    tokens = 0
    fvu_log = {layer: [] for layer in layers}
    source = train_stream()
    _sync(device)
    t0 = time.perf_counter()
    timer.last = t0
    try:
        while tokens < n_tokens:
            while n_buf < cap:
                ids, mask = next(source)
                ids, mask = ids.to(device), mask.to(device)
                mask_ref["mask"] = mask.flatten().bool()
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                for layer in layers:
                    buf_x[layer].append(store[layer][0])
                    buf_y[layer].append(store[layer][1])
                n_buf += store[layers[0]][0].shape[0]
                store.clear()
                timer("model_forward")
            X = {layer: torch.cat(buf_x[layer]) for layer in layers}
            Y = {layer: torch.cat(buf_y[layer]) for layer in layers}
            perm = torch.randperm(n_buf, generator=shuffle_gen).to(device)
            n_full = n_buf // bs
            timer("other")
            for b in range(n_full):
                if tokens >= n_tokens:
                    break
                idx = perm[b * bs : (b + 1) * bs]
                for layer, sae in saes.items():
                    inputs, outputs = X[layer][idx], Y[layer][idx]
                    if step == 0:  # sparsify Trainer's first-step initialisation
                        mean = inputs.mean(0).to(sae.dtype)
                        sae.encoder.bias.data = -mean @ sae.encoder.weight.data.T
                        sae.b_dec.data = outputs.mean(0).to(sae.dtype)
                    dead_mask = since_fired[layer] > dead_threshold if auxk_alpha > 0 else None
                    total_variance = (outputs - outputs.mean(0)).pow(2).sum()
                    timer("other")
                    out = sae(
                        x=inputs, y=outputs, dead_mask=dead_mask, total_variance=total_variance
                    )
                    timer("decoder")
                    did_fire[layer][out.latent_indices.flatten()] = True
                    fvu_log[layer].append(float(out.fvu.detach()))
                    loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
                    timer("other")
                    loss.backward()
                    timer("backward")
                opt.step()
                opt.zero_grad()
                sched.step()
                timer("optimizer")
                with torch.no_grad():
                    for layer, counts in since_fired.items():
                        counts += bs
                        counts[did_fire[layer]] = 0
                        did_fire[layer].zero_()
                step += 1
                tokens += bs
                timer("other")
            rest = perm[n_full * bs :]
            for layer in layers:
                buf_x[layer] = [X[layer][rest]] if rest.numel() else []
                buf_y[layer] = [Y[layer][rest]] if rest.numel() else []
            n_buf = int(rest.numel())
            timer("other")
    finally:
        for h in handles:
            h.remove()
    _sync(device)
    seconds = time.perf_counter() - t0
    for sae in saes.values():
        sae.__dict__.pop("encode", None)
        sae.eval().requires_grad_(False)
    out = {
        "saes": saes,
        "seconds": seconds,
        "tokens": tokens,
        "steps": step,
        "train_dead_fraction": {
            layer: float((since_fired[layer] > dead_threshold).float().mean()) for layer in layers
        },
        "lr": pgs[0]["lr"],
        "config": {
            "sparse_coder": dataclasses.asdict(sae_cfg),
            "optimizer": "torch.optim.Adam",
            "lr_schedule": args.sparsify_schedule,
            "auxk_alpha": auxk_alpha,
            "dead_feature_threshold": dead_threshold,
            "batch_size_tokens": bs,
        },
    }
    if profile:
        out["timings"] = dict(timer.t)
        out["profiled_seconds"] = seconds
    return out


def _buffer_cap(args, n_layers: int, d: int) -> int:
    """Our shuffle-buffer capacity: 32 batches, capped at 1 GiB of float32 activations."""
    return max(args.batch_size, min(32 * args.batch_size, (1 << 30) // (n_layers * 2 * d * 4)))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# validation (one function for both sides)


def validate(cm, val_stream, layers, coders: dict, device) -> dict:
    """Per side and layer: pooled FVU, mean L0, fraction of features never firing."""
    import torch

    from sctranscoder.core.training import harvest

    acc = {
        side: {
            layer: {"err": 0.0, "sum": None, "sumsq": 0.0, "n": 0, "l0": 0.0, "fired": None}
            for layer in layers
        }
        for side in coders
    }
    with torch.no_grad():
        for xs, ys in harvest(cm.model, val_stream(), layers, device=device):
            for side, fns in coders.items():
                for layer in layers:
                    x, y = xs[layer].float(), ys[layer].float()
                    values, indices, y_hat = fns[layer](x)
                    a = acc[side][layer]
                    a["err"] += float((y_hat.float() - y).double().pow(2).sum())
                    s = y.double().sum(0)
                    a["sum"] = s if a["sum"] is None else a["sum"] + s
                    a["sumsq"] += float(y.double().pow(2).sum())
                    a["n"] += y.shape[0]
                    on = values > 0
                    a["l0"] += float(on.sum())
                    f = torch.zeros(fns[layer].n_features, dtype=torch.bool, device=x.device)
                    f[indices[on]] = True
                    a["fired"] = f if a["fired"] is None else a["fired"] | f
    out = {}
    for side in coders:
        out[side] = {}
        for layer in layers:
            a = acc[side][layer]
            n = max(a["n"], 1)
            var = a["sumsq"] - float(a["sum"].pow(2).sum()) / n
            out[side][layer] = {
                "fvu": a["err"] / max(var, 1e-12),
                "l0": a["l0"] / n,
                "dead_fraction": float((~a["fired"]).float().mean()),
                "n_tokens": a["n"],
            }
    return out


class _Fn:
    def __init__(self, fn, n_features):
        self.fn, self.n_features = fn, n_features

    def __call__(self, x):
        return self.fn(x)


def ours_fns(tcs):
    def make(tc):
        def fn(x):
            v, i = tc.encode_sparse(x)
            return v, i, tc.decode_sparse(v, i, x)

        return _Fn(fn, tc.config.n_features)

    return {layer: make(tc) for layer, tc in tcs.items()}


def sparsify_fns(saes):
    def make(sae):
        def fn(x):
            enc = sae.encode(x.to(sae.dtype))
            return enc.top_acts, enc.top_indices, sae.decode(enc.top_acts, enc.top_indices)

        return _Fn(fn, sae.num_latents)

    return {layer: make(sae) for layer, sae in saes.items()}


# --------------------------------------------------------------------------------------------
# FLOPs


def flops_per_token(d: int, n_features: int, k: int) -> dict:
    """FLOPs of one training step per token and layer (multiply-add = 2 FLOPs).

    forward: encoder matmul ``2 d F``, TopK selection (comparisons, not counted), sparse decode
    (gather of k rows) ``2 k d``; backward: decoder weight and activation gradients ``2 k d``
    each; encoder weight gradient ``2 k d`` when only the k active pre-activations carry a
    gradient (sparse-aware, sparsify's fused encoder) or ``2 d F`` when autograd forms the dense
    gradient through TopK (the input needs no gradient: the model is frozen). The floor is the
    sparse-aware count, ``2 d F + 8 k d``. AuxK (only with dead features) and Adam (``~10``
    FLOPs per parameter per step, ``/ batch`` per token) are small and not counted.
    """
    enc, dec = 2 * d * n_features, 2 * k * d
    return {
        "encoder_forward": enc,
        "decoder_forward": dec,
        "decoder_backward": 2 * dec,
        "encoder_backward_sparse": dec,
        "encoder_backward_dense": enc,
        "floor": enc + 4 * dec,
        "dense_backward_total": 2 * enc + 3 * dec,
    }


def model_flops_per_token(cm, mean_len: float, layers) -> float:
    """Forward FLOPs per token of the frozen model up to the highest trained layer.

    ``2 x`` the non-embedding parameters of the blocks that run, plus causal attention scores and
    mixing, ``2 x 2 d x ctx`` per layer with ``ctx`` the mean context (half the prompt length).
    """
    from sctranscoder.core.model import mlp_modules

    n_run = max(layers) + 1
    blocks = [m for m in cm.model.modules() if hasattr(m, "mlp") and hasattr(m, "attention")]
    if not blocks:
        blocks = [type("B", (), {"parameters": m.parameters}) for m in mlp_modules(cm.model)]
    per_block = sum(p.numel() for p in blocks[0].parameters())
    d = cm.d_model
    return n_run * (2 * per_block + 4 * d * mean_len / 2)


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=["tiny", "410m"], default=None)
    ap.add_argument("--layers", type=int, default=None, help="train the first N layers (all)")
    ap.add_argument("--n-tokens", type=int, default=None, help="training tokens per layer")
    ap.add_argument("--profile-tokens", type=int, default=None, help="tokens of profiled runs")
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=2048, help="tokens per step")
    ap.add_argument("--prompt-batch-size", type=int, default=16, help="cells per forward pass")
    ap.add_argument("--n-genes", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=600, help="random-token prompts only")
    ap.add_argument("--val-batches", type=int, default=0, help="0: all validation cells")
    ap.add_argument("--model-dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument(
        "--autocast",
        choices=["bf16", "none"],
        default=None,
        help="ours: TrainingConfig.autocast (the encoder's matmul and TopK in bf16, as "
        "sparsify's encoder under its CUDA autocast); default bf16 on CUDA, none on CPU",
    )
    ap.add_argument("--sparsify-schedule", choices=["constant", "sparsify"], default="constant")
    ap.add_argument(
        "--stack-layers",
        action="store_true",
        help="ours: TrainingConfig(stack_layers=True), all layers in one batched step",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for the floor")
    ap.add_argument("--sides", nargs="+", default=["ours", "sparsify"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per side (fastest kept)")
    ap.add_argument(
        "--profile",
        choices=["inline", "separate", "off"],
        default=None,
        help="inline: time phases in the timed run (default on CPU, where it needs no "
        "synchronisation); separate: an extra, synchronised run of --profile-tokens (default "
        "on CUDA)",
    )
    ap.add_argument(
        "--op-profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="profile a --profile-tokens run of each side op by op (torch.profiler)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    _common.snapshot_code()

    import torch

    cuda = args.device.startswith("cuda")
    args.model = args.model or ("410m" if cuda else "tiny")
    args.model_dtype = args.model_dtype or ("bfloat16" if cuda else "float32")
    args.autocast = args.autocast or ("bf16" if cuda else "none")
    args.autocast = None if args.autocast == "none" else args.autocast
    if args.n_tokens is None:
        args.n_tokens = 5_000_000 if cuda else 204_800
    if args.profile_tokens is None:
        args.profile_tokens = max(args.batch_size, args.n_tokens // 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    kind = "cuda" if cuda else "cpu"
    out_path = args.out or _common.RESULTS / f"train_throughput_{kind}.json"
    device = torch.device(args.device)

    cm, train_stream, val_stream, desc = build(args)
    layers = list(range(args.layers or cm.n_layers))
    d, F = cm.d_model, args.expansion * cm.d_model
    print(f"model: {desc['name']}; layers {layers}; d={d}, F={F}, k={args.k}", flush=True)

    profile_mode = args.profile or ("separate" if cuda else "inline")
    results, fns, coders = {}, {}, {}
    for rep in range(args.repeats):
        for side in args.sides:  # interleaved, so that load changes hit both sides alike
            run = run_ours if side == "ours" else run_sparsify
            if cuda and rep == 0:  # warm-up (CUDA context, kernels, Triton compilation)
                run(cm, train_stream, layers, args, n_tokens=4 * args.batch_size, profile=False)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            load = list(os.getloadavg())
            r = run(
                cm,
                train_stream,
                layers,
                args,
                n_tokens=args.n_tokens,
                profile=profile_mode == "inline",
            )
            coders[side] = r.pop("tcs", None) or r.pop("saes", None)
            r["tokens_per_second"] = r["tokens"] / r["seconds"]
            r["load_average_before"] = load
            if cuda:
                r["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(
                f"{side} (run {rep + 1}/{args.repeats}): {r['tokens']} tokens x {len(layers)} "
                f"layers in {r['seconds']:.1f}s = {r['tokens_per_second']:.0f} tok/s "
                f"(load {load[0]:.1f})",
                flush=True,
            )
            if side in results:  # keep the fastest run; record all
                runs = results[side]["runs"]
                runs.append(_run_summary(r))
                if r["seconds"] < results[side]["seconds"]:
                    r["runs"] = runs
                    results[side] = r
            else:
                r["runs"] = [_run_summary(r)]
                results[side] = r
    for side, r in results.items():
        if profile_mode == "separate":
            run = run_ours if side == "ours" else run_sparsify
            p = run(cm, train_stream, layers, args, n_tokens=args.profile_tokens, profile=True)
            p.pop("tcs", None)
            p.pop("saes", None)
        elif profile_mode == "inline":
            p = r
        else:
            p = {"note": "profiling off"}
        r["profile"] = {
            "mode": profile_mode,
            "tokens": p.get("tokens"),
            "seconds": p.get("profiled_seconds"),
            "timings": p.get("timings"),
            **({"note": p["note"]} if "note" in p else {}),
        }
        r.pop("timings", None)
        r.pop("profiled_seconds", None)
        if args.op_profile:  # op by op, a separate run (the profiler slows small ops down)
            from _op_profile import op_profile

            run = run_ours if side == "ours" else run_sparsify
            r["op_profile"] = op_profile(
                lambda run=run: run(
                    cm, train_stream, layers, args, n_tokens=args.profile_tokens, profile=False
                ),
                device,
            )
            r["op_profile"]["tokens"] = args.profile_tokens
    fns = {side: ours_fns(c) if side == "ours" else sparsify_fns(c) for side, c in coders.items()}

    metrics = validate(cm, val_stream, layers, fns, device)
    for side, r in results.items():
        m = metrics[side]
        r["validation"] = {str(layer): v for layer, v in m.items()}
        r["fvu_mean"] = sum(v["fvu"] for v in m.values()) / len(m)
        r["l0_mean"] = sum(v["l0"] for v in m.values()) / len(m)
        r["dead_fraction_mean"] = sum(v["dead_fraction"] for v in m.values()) / len(m)

    # FLOPs and the floor
    fl = flops_per_token(d, F, args.k)
    model_fl = model_flops_per_token(cm, desc["mean_prompt_tokens"], layers)
    if cuda:
        name = torch.cuda.get_device_properties(0).name
        peak = args.peak_tflops or (989.0 if ("H100" in name or "H200" in name) else None)
        peak_note = "stated dense bf16 peak (H100/H200 SXM 989 TFLOP/s)"
        if peak is None:
            a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()
            peak = 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12
            peak_note = "measured bf16 8192^3 matmul"
        peak_flops = peak * 1e12
    else:
        peak_flops = _common.measure_cpu_peak_gflops(threads) * 1e9
        peak_note = f"measured float32 2048^3 matmul, {threads} threads"
    n_layers = len(layers)
    floor_per_token = n_layers * fl["floor"] + model_fl
    for r in results.values():
        floor_s = r["tokens"] * floor_per_token / peak_flops
        r["flop_floor_seconds"] = floor_s
        r["time_over_floor"] = r["seconds"] / floor_s
        r["projected_seconds_60M_tokens"] = r["seconds"] * 60e6 / r["tokens"]
    ratio = None
    if {"ours", "sparsify"} <= results.keys():
        o, s = results["ours"], results["sparsify"]
        ratio = {
            "tokens_per_second": o["tokens_per_second"] / s["tokens_per_second"],
            "fvu_mean": o["fvu_mean"] / s["fvu_mean"],
        }
        if o["profile"]["timings"] and s["profile"]["timings"]:

            def excl(p):
                return (
                    p["tokens"]
                    / (sum(p["timings"].values()) - p["timings"].get("model_forward", 0.0))
                    if p["timings"]
                    else None
                )

            ratio["tokens_per_second_excluding_model_forward_profiled"] = excl(o["profile"]) / excl(
                s["profile"]
            )

    doc = _common.document(
        "train_throughput",
        kind,
        threads,
        model=desc,
        settings={
            "layers": layers,
            "expansion_factor": args.expansion,
            "n_features": F,
            "k": args.k,
            "batch_size_tokens": args.batch_size,
            "n_tokens_per_layer": args.n_tokens,
            "profile_tokens": args.profile_tokens,
            "repeats": args.repeats,
            "sparsify_schedule": args.sparsify_schedule,
            "ours_autocast": args.autocast,
            "ours_stack_layers": args.stack_layers,
            "model_forward": "included on both sides (each library's own harvest)",
            "seed": args.seed,
        },
        flops={
            "per_token_per_layer": fl,
            "model_forward_per_token": model_fl,
            "floor_per_token_all_layers": floor_per_token,
            "peak_flops": peak_flops,
            "peak_note": peak_note,
        },
        results=results,
        ratio_ours_over_sparsify=ratio,
        peak_rss_mib=_common.peak_rss_mib(),
    )
    _common.write(doc, out_path)

    print(
        f"\n{'side':<10}{'tok/s':>10}{'steps':>7}{'FVU':>8}{'L0':>7}{'dead':>7}"
        f"{'x floor':>9}{'60M tok':>10}"
    )
    for side, r in results.items():
        print(
            f"{side:<10}{r['tokens_per_second']:>10.0f}{r['steps']:>7}{r['fvu_mean']:>8.3f}"
            f"{r['l0_mean']:>7.1f}{r['dead_fraction_mean']:>7.3f}{r['time_over_floor']:>9.1f}"
            f"{_hms(r['projected_seconds_60M_tokens']):>10}"
        )
    print(
        "\nper layer validation FVU: "
        + "; ".join(
            f"{side} " + " ".join(f"{v['fvu']:.3f}" for v in r["validation"].values())
            for side, r in results.items()
        )
    )
    print(f"\n{'profile (s)':<16}" + "".join(f"{p[:9]:>10}" for p in PHASES))
    for side, r in results.items():
        t = r["profile"]["timings"]
        if t:
            print(f"{side:<16}" + "".join(f"{t.get(p, 0.0):>10.2f}" for p in PHASES))
        else:
            print(f"{side:<16}(not available: {r['profile'].get('note', '')})")
    cats = ("matmul", "topk_sort", "attention", "sparse", "embedding_bag", "gather_scatter")
    cats += ("copy_cat", "elementwise", "optimizer", "other")
    if any("op_profile" in r for r in results.values()):
        print(f"\n{'op profile (%)':<16}{'gaps':>7}" + "".join(f"{c[:9]:>10}" for c in cats))
    for side, r in results.items():
        op = r.get("op_profile")
        if op:
            by = op["aten_self_by_category"]
            print(
                f"{side:<16}{100 * op['host_gaps_fraction']:>7.1f}"
                + "".join(f"{100 * by.get(c, 0.0) / op['wall_seconds']:>10.1f}" for c in cats)
            )
            if "device" in op:
                dv = op["device"]
                print(
                    f"{'':<16}device idle {100 * dv['device_idle_fraction']:.1f}%, "
                    f"{dv['launches']['calls']} launches, "
                    f"sync {dv['synchronisations']['host_seconds']:.3f}s, "
                    f"allocator {dv['allocator']['host_seconds']:.3f}s"
                )
    if ratio:
        print(
            f"\nours / sparsify: {ratio['tokens_per_second']:.2f}x tokens/s, "
            f"FVU ratio {ratio['fvu_mean']:.3f}"
        )


def _run_summary(r: dict) -> dict:
    return {
        "seconds": r["seconds"],
        "tokens_per_second": r["tokens_per_second"],
        "load_average_before": r["load_average_before"],
    }


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    h, rem = divmod(int(s), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


if __name__ == "__main__":
    main()
