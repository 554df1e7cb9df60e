"""The parts of one transcoder training step on a device: checked against float64, then timed.

Checks (every run, fresh random inputs): the device's TopK encoder (:func:`topk_encode`) and
sparse decoder, forward and backward, in float32 and with the encoder in bfloat16
(``compute_dtype``, what ``TrainingConfig(autocast="bf16")`` uses), against dense autograd in
float64 on the CPU: relative Frobenius errors of the loss, the reconstruction and every gradient,
and the fraction of the reference's TopK indices the device selected. Each way of computing the
encoder's weight gradient (:func:`encoder_weight_grad`) is checked the same way.

Timings (median over ``--reps`` after warm-up; CUDA events on a GPU): the encoder forward in
float32 and bfloat16, each weight-gradient method, the AuxK selection, one layer's whole loss
forward and backward as training runs it (``kernels`` sparse or dense, float32 or bf16, without
and with AuxK), and
Adam over ``--layers`` transcoders (foreach against fused). They decide the defaults
(:data:`WEIGHT_GRAD_METHODS`, fused Adam on CUDA) and explain ``train_throughput``'s profile.

    python benchmarks/training_step.py                        # CPU, d=128 (the embedded model)
    python benchmarks/training_step.py --device cuda          # d=1024, 8192 features (410m)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _problem(n, d, n_features, seed, device, dtype):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    W_enc = torch.randn(n_features, d, generator=g, dtype=torch.float64) / d**0.5
    b_enc = 0.2 * torch.randn(n_features, generator=g, dtype=torch.float64)
    W_dec = torch.randn(n_features, d, generator=g, dtype=torch.float64) / d**0.5
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    dead = torch.rand(n_features, generator=g) < 0.05
    return [
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for t in (x, W_enc, b_enc, W_dec, y)
    ] + [dead.to(device)]


def _step(x, W_enc, b_enc, W_dec, y, dead, k, k_aux, *, kernels, compute_dtype=None):
    """Loss (FVU + AuxK), reconstruction, codes, indices and gradients of one layer's step, as
    training computes it with ``kernels`` ("sparse" or "dense").
    """
    import torch

    from sctranscoder.core.topk import sparse_decode
    from sctranscoder.core.training import losses

    encode, decode = {
        "sparse": (losses.sparse_encode, losses.sparse_decode_loss),
        "dense": (losses.dense_encode, losses.dense_decode_loss),
    }[kernels]
    leaves = [t.clone().requires_grad_() for t in (W_enc, b_enc, W_dec)]
    we, be, wd = leaves
    b_dec = torch.zeros(y.shape[1], dtype=y.dtype, device=y.device)
    enc = encode(x, we, be, k, dead, k_aux, compute_dtype)
    loss = decode(x, y, *enc, wd, b_dec, None, dead, k_aux, 1 / 32)[0]
    loss.backward()
    values, indices = enc[0].detach().to(y.dtype), enc[1]
    codes = torch.zeros(x.shape[0], W_enc.shape[0], dtype=y.dtype, device=x.device)
    codes.scatter_(1, indices, values)
    y_hat = sparse_decode(values, indices, W_dec)
    return loss.detach(), y_hat, codes, indices, [t.grad for t in leaves]


VARIANTS = {
    "sparse_float32": ("sparse", None),
    "sparse_bf16": ("sparse", "bfloat16"),
    "dense_float32": ("dense", None),
    "dense_bf16": ("dense", "bfloat16"),
}


def checks(args, device) -> dict:
    import torch

    from sctranscoder.core.topk import encoder_weight_grad

    n, d, nf, k, k_aux = args.batch, args.d, args.features, args.k, args.d // 2
    cpu64 = _problem(n, d, nf, args.seed, "cpu", torch.float64)
    dev32 = _problem(n, d, nf, args.seed, device, torch.float32)
    ref = _step(*cpu64, k, k_aux, kernels="dense")
    ref_mask = torch.zeros(n, nf, dtype=torch.bool).scatter_(1, ref[3], True)
    out = {}
    for name, (kernels, dtype) in VARIANTS.items():
        got = _step(
            *dev32, k, k_aux, kernels=kernels, compute_dtype=dtype and getattr(torch, dtype)
        )
        got_mask = torch.zeros(n, nf, dtype=torch.bool).scatter_(1, got[3].cpu(), True)
        grads = zip(("W_enc", "b_enc", "W_dec"), got[4], ref[4], strict=True)
        out[name] = {
            "loss": _rel(got[0], ref[0]),
            "reconstruction": _rel(got[1], ref[1]),
            "codes": _rel(got[2], ref[2]),
            "topk_indices_agree": float((ref_mask & got_mask).sum() / ref_mask.sum()),
            **{f"grad_{p}": _rel(g, r) for p, g, r in grads},
        }
        if not all(torch.isfinite(torch.tensor(v)) for v in out[name].values()):
            raise AssertionError(f"non-finite check result for {name}: {out[name]}")
    # the weight-gradient methods on the same (indices, g, x)
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randint(nf, (n, k), generator=g)
    gv = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    want = encoder_weight_grad(idx, gv, x, nf, method="dense")
    out["weight_grad"] = {
        m: _rel(
            encoder_weight_grad(
                idx.to(device),
                gv.to(device, torch.float32),
                x.to(device, torch.float32),
                nf,
                method=m,
            ),
            want,
        )
        for m in ("sparse_mm", "csr", "embedding_bag", "dense")
    }
    # the two-stage TopK selection returns the same values as torch.topk
    from sctranscoder.core.topk import topk_select

    pre = torch.randn(n, nf, generator=g).to(device)
    got = topk_select(pre, k)[0].sort(-1).values
    out["topk_select_equal_values"] = bool(
        torch.equal(got, pre.topk(k, dim=-1, sorted=False).values.sort(-1).values)
    )
    return out


def _timer(device, reps: int):
    import torch

    def run(fn) -> float:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    return run


def timings(args, device) -> dict:
    import torch
    import torch.nn.functional as F

    from sctranscoder.core.topk import encoder_weight_grad, topk_encode, topk_select

    n, d, nf, k, k_aux = args.batch, args.d, args.features, args.k, args.d // 2
    x, W_enc, b_enc, W_dec, y, dead = _problem(n, d, nf, args.seed + 2, device, torch.float32)
    run = _timer(device, args.reps)
    ms = {}
    with torch.no_grad():
        pre32 = F.linear(x, W_enc, b_enc)
        ms["topk_torch"] = run(lambda: pre32.topk(k, dim=-1, sorted=False))
        ms["topk_select"] = run(lambda: topk_select(pre32, k))
        ms["encoder_forward_float32"] = run(lambda: topk_encode(x, W_enc, b_enc, k))
        ms["encoder_forward_bf16"] = run(
            lambda: topk_encode(x, W_enc, b_enc, k, compute_dtype=torch.bfloat16)
        )
        pre = F.relu(F.linear(x.bfloat16(), W_enc.bfloat16(), b_enc.bfloat16()))
        ms["auxk_select_bf16"] = run(
            lambda: pre.masked_fill(~dead, 0.0).topk(k_aux, dim=-1, sorted=False)
        )
    values, indices = topk_encode(x, W_enc, b_enc, k)
    gv = torch.randn_like(values)
    for m in ("sparse_mm", "csr", "embedding_bag", "dense"):
        ms[f"weight_grad_{m}"] = run(lambda m=m: encoder_weight_grad(indices, gv, x, nf, method=m))
    xb = x.bfloat16()
    ms["weight_grad_dense_bf16"] = run(
        lambda: encoder_weight_grad(indices, gv, xb, nf, method="dense")
    )

    # one layer's whole step (loss forward and backward) as training computes it, by kernels
    # and precision, without and with AuxK (5% of features dead)
    from sctranscoder.core.training.losses import (
        dense_decode_loss,
        dense_encode,
        sparse_decode_loss,
        sparse_encode,
    )

    params = [t.clone().requires_grad_() for t in (W_enc, b_enc, W_dec)]
    b_dec = torch.zeros(d, device=device, requires_grad=True)
    kernels = {
        "sparse": (sparse_encode, sparse_decode_loss),
        "dense": (dense_encode, dense_decode_loss),
    }

    def step(kernel, compute_dtype, aux):
        encode, decode = kernels[kernel]
        mask = dead if aux else None

        def fn():
            enc = encode(x, params[0], params[1], k, mask, k_aux, compute_dtype)
            loss = decode(x, y, *enc, params[2], b_dec, None, mask, k_aux, 1 / 32)[0]
            loss.backward()

        return fn

    for kernel in kernels:
        for precision, dtype in (("float32", None), ("bf16", torch.bfloat16)):
            for aux in (False, True):
                for p in (*params, b_dec):
                    p.grad = None
                name = f"layer_step_{kernel}_{precision}{'_auxk' if aux else ''}"
                ms[name] = run(step(kernel, dtype, aux))

    # Adam over all layers' parameters
    n_params = 0
    tensors = []
    for _ in range(args.layers):
        for shape in ((nf, d), (nf,), (nf, d), (d,)):
            t = torch.randn(shape, device=device).requires_grad_()
            t.grad = torch.randn_like(t)
            tensors.append(t)
            n_params += t.numel()
    for fused in (False, True):
        opt = torch.optim.Adam(tensors, lr=1e-4, fused=fused)
        ms[f"adam_{'fused' if fused else 'foreach'}_{args.layers}_layers"] = run(opt.step)
    return ms, n_params


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d", type=int, default=None, help="d_model (CPU 128, CUDA 1024)")
    ap.add_argument("--features", type=int, default=None, help="default 8 d")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None, help="for Adam (CPU 4, CUDA 24)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    _common.snapshot_code()
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.d = args.d or (1024 if cuda else 128)
    args.features = args.features or 8 * args.d
    args.layers = args.layers or (24 if cuda else 4)
    check = checks(args, device)
    ms, n_params = timings(args, device)
    doc = _common.document(
        "training_step",
        device.type,
        torch.get_num_threads(),
        settings={
            "d": args.d,
            "n_features": args.features,
            "k": args.k,
            "k_aux": args.d // 2,
            "batch_tokens": args.batch,
            "adam_layers": args.layers,
            "adam_parameters": n_params,
            "reps": args.reps,
        },
        checks_relative_error_vs_float64_cpu=check,
        median_ms=ms,
    )
    _common.write(doc, args.out or _common.RESULTS / f"training_step_{device.type}.json")
    print(
        f"\n{'check (rel. error vs float64)':<32}"
        + "".join(f"{c:>14}" for c in check["sparse_float32"])
    )
    for name in VARIANTS:
        print(f"{name:<32}" + "".join(f"{v:>14.2e}" for v in check[name].values()))
    print("weight gradient: " + ", ".join(f"{m} {v:.1e}" for m, v in check["weight_grad"].items()))
    print(f"\n{'part':<40}{'ms':>10}")
    for name, v in ms.items():
        print(f"{name:<40}{v:>10.3f}")


if __name__ == "__main__":
    main()
