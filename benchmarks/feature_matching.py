"""Cost of matching two dictionaries one to one (``core.stability.match_dictionaries``: cosine
similarities, then scipy's Hungarian ``linear_sum_assignment``), by number of features.

Random unit vectors (the worst case for the assignment: no clear matches). Each size runs in a
fresh subprocess, so that its peak resident memory is its own.

Run: ``python benchmarks/feature_matching.py [--sizes 1024 2048 4096 8192]``
Writes ``benchmarks/results/feature_matching_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import _common


def one(n: int, d: int) -> dict:
    import time

    import numpy as np

    from sctranscoder.core.stability import match_dictionaries

    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    t0 = time.perf_counter()
    m = match_dictionaries(A, B, max_features=n)
    seconds = time.perf_counter() - t0
    return {
        "n_features": n,
        "d": d,
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(_common.peak_rss_mib(), 1),
        "median_cosine": float(np.median(m.cosine)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--d", type=int, default=1024, help="width of the rows (d_model)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(_common.RESULTS / "feature_matching_cpu.json"))
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.d)))
        return
    _common.snapshot_code()
    rows = []
    for n in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--d", str(args.d)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    import scipy

    doc = _common.document("feature_matching", "cpu", None, scipy=scipy.__version__, results=rows)
    _common.write(doc, Path(args.out))


if __name__ == "__main__":
    main()
