"""Where the wall time of a run goes, op by op (``torch.profiler``): not a benchmark by itself.

:func:`op_profile` runs a function under the profiler and splits its wall time into

* time inside top-level operators (the union of their intervals on the host) and the **gaps**
  between them: Python, hooks, the autograd engine's bookkeeping, and on a GPU the host waiting;
* host self time by **category** of operator (matmul, TopK/sort, attention, sparse, gather/scatter,
  copy/cat, elementwise/reduction, optimizer, other) and the heaviest operators;
* on CUDA also: kernel time on the device and its idle time (wall minus the union of kernel
  intervals), the number and host time of kernel launches, of synchronisations
  (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``) and of the
  allocator (``cudaMalloc``/``cudaFree``, when the caching allocator has to ask the driver).

The profiler itself slows many small operators down, so the fractions, not the seconds, are what
to compare between runs; the timed throughput runs are never profiled.
"""

from __future__ import annotations

import time

#: Operator categories, by substrings of ``aten::`` names (first match wins).
CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax")),
    ("topk_sort", ("topk", "sort", "kthvalue", "argsort")),
    ("sparse", ("sparse", "_to_sparse", "coalesce", "_sparse_", "csr")),
    ("embedding_bag", ("embedding_bag", "embedding_dense_backward")),
    ("matmul", ("addmm", "::mm", "bmm", "matmul", "linear", "baddbmm", "::dot")),
    ("optimizer", ("_foreach_", "_fused_adam", "adam", "lerp")),
    ("gather_scatter", ("index", "gather", "scatter", "masked", "nonzero", "take", "bincount")),
    ("copy_cat", ("copy_", "::cat", "::to", "_to_copy", "clone", "contiguous", "stack", "repeat")),
    (
        "elementwise",
        (
            "add",
            "sub",
            "mul",
            "div",
            "relu",
            "gelu",
            "pow",
            "sum",
            "mean",
            "where",
            "clamp",
            "maximum",
            "neg",
            "fill",
            "zero",
            "layer_norm",
            "threshold",
            "gt",
            "lt",
            "ge",
            "eq",
            "cumsum",
            "norm",
            "sqrt",
            "exp",
            "cos",
            "sin",
            "rsqrt",
        ),
    ),
)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
ALLOC_CALLS = ("cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaFreeHost")
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def category(name: str) -> str:
    """The category of an operator name (``"other"`` when none matches)."""
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(key in low for key in keys):
            return cat
    return "other"


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def op_profile(fn, device, *, top: int = 15) -> dict:
    """Run ``fn()`` under ``torch.profiler`` and split its wall time (see the module docstring)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = list(prof.events())
    host = [e for e in events if e.device_type == DeviceType.CPU]
    top_level = [e for e in host if e.cpu_parent is None]
    busy = _union([(e.time_range.start, e.time_range.end) for e in top_level]) / 1e6
    ops = [e for e in host if e.name.startswith("aten::")]
    self_by_cat: dict[str, float] = {}
    self_by_op: dict[str, list[float]] = {}
    for e in ops:
        s = e.self_cpu_time_total / 1e6
        cat = category(e.name)
        self_by_cat[cat] = self_by_cat.get(cat, 0.0) + s
        acc = self_by_op.setdefault(e.name, [0.0, 0])
        acc[0] += s
        acc[1] += 1
    op_self = sum(self_by_cat.values())
    heaviest = sorted(self_by_op.items(), key=lambda kv: -kv[1][0])[:top]
    out = {
        "wall_seconds": wall,
        "host_busy_seconds": busy,
        "host_gaps_seconds": max(wall - busy, 0.0),
        "host_gaps_fraction": max(wall - busy, 0.0) / wall if wall else None,
        "aten_self_seconds": op_self,
        "aten_calls": len(ops),
        "aten_self_by_category": dict(sorted(self_by_cat.items(), key=lambda kv: -kv[1])),
        "heaviest_ops": [
            {"name": name, "self_seconds": s, "calls": n, "ms_per_call": 1e3 * s / n}
            for name, (s, n) in heaviest
        ],
    }
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        k_busy = _union([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6

        def runtime(names):
            hits = [e for e in host if e.name in names]
            return {"calls": len(hits), "host_seconds": sum(e.cpu_time_total for e in hits) / 1e6}

        out["device"] = {
            "kernels": len(kernels),
            "kernel_seconds": sum(e.time_range.elapsed_us() for e in kernels) / 1e6,
            "kernel_busy_seconds": k_busy,
            "device_idle_seconds": max(wall - k_busy, 0.0),
            "device_idle_fraction": max(wall - k_busy, 0.0) / wall if wall else None,
            "launches": runtime(LAUNCH_CALLS),
            "synchronisations": runtime(SYNC_CALLS),
            "allocator": runtime(ALLOC_CALLS),
        }
    return out
