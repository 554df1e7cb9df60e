"""What checkpoints cost transcoder training: tokens/s without checkpoints and with them.

The embedded model (``sct.datasets.tiny_c2s()``, 4 layers, d=128) trains transcoders on every
MLP layer from pbmc68k_reduced cell sentences with
:func:`sctranscoder.core.training.train_transcoders`, three ways, alternated in one process
(``--repeats`` rounds of all three, so that load changes hit them alike):

* ``none``: no checkpoints;
* ``every_10pct``: ``checkpoint_dir`` with the default ``checkpoint_every`` (a tenth of
  ``n_tokens``; each checkpoint at the first buffer-round boundary after a multiple), plus the
  one at the end of training: the realistic setting;
* ``every_round``: a checkpoint at every buffer-round boundary (``checkpoint_every=1``): the
  most a run can write.

Each run's seconds are wall time around the call, model forward included. Recorded per mode:
tokens/s, the overhead against ``none`` of the same round (``tps_none / tps - 1``), the number
of checkpoints, the seconds of each write (gathering the state, ``torch.save`` to a temporary
sibling, fsync, rename) and their share of the run's wall time (``write_share``: the overhead
measured directly, which the machine's load disturbs less than a difference of two runs), the
checkpoint's size on disk and the seconds to read it back (``weights_only``); and whether the
transcoders equal those of the ``none`` run bit for bit (checkpointing must change no number). The buffer is smaller than the default
(``--buffer-tokens``, 2 batches; rounds of ~3 steps with 4-cell prompt batches) so that a
short run has many round boundaries.

    python benchmarks/checkpoint_overhead.py                 # CPU, 65,536 tokens a run, 3 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

MODES = ("none", "every_10pct", "every_round")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-tokens", type=int, default=65_536, help="training tokens per layer")
    ap.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    ap.add_argument(
        "--buffer-tokens", type=int, default=2048, help="tokens gathered before each shuffle"
    )
    ap.add_argument("--prompt-batch-size", type=int, default=4, help="cells per forward pass")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of all modes")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--checkpoint-root", type=Path, default=None, help="default: system temp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    _common.snapshot_code()

    import numpy as np
    import torch

    import sctranscoder as sct
    from sctranscoder._records import sentences as cell_sentences
    from sctranscoder.core.prompts import prompt_batches, split_cells
    from sctranscoder.core.training import TrainingConfig, train_transcoders
    from sctranscoder.core.training import checkpoint as ckpt

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    out_path = args.out or _common.RESULTS / f"checkpoint_overhead_{kind}.json"

    cm = sct.datasets.tiny_c2s()
    cm.model.to(device)
    adata = _common.pbmc()
    sct.pp.cell_sentences(adata, model=cm)
    sentences = cell_sentences(adata, "cell_sentence", n_genes=cm.settings.n_genes)
    train_cells = np.flatnonzero(~split_cells(adata.n_obs, 0.1, args.seed))
    layers = list(range(cm.n_layers))
    config = TrainingConfig(
        n_tokens=args.n_tokens,
        batch_size=args.batch_size,
        buffer_tokens=args.buffer_tokens,
        prompt_batch_size=args.prompt_batch_size,
        seed=args.seed,
    )
    every = {"none": None, "every_10pct": ckpt.default_every(config), "every_round": 1}

    def stream(start: int):
        return prompt_batches(
            cm,
            sentences,
            train_cells,
            batch_size=args.prompt_batch_size,
            seed=args.seed,
            repeat=True,
            start=start,
        )

    writes: list[float] = []
    save = ckpt.Checkpoints.save

    def timed_save(self, *a, **k):
        t0 = time.perf_counter()
        save(self, *a, **k)
        writes.append(time.perf_counter() - t0)

    ckpt.Checkpoints.save = timed_save

    def run(mode: str, root: Path) -> dict:
        writes.clear()
        directory = root / f"{mode}-{time.monotonic_ns()}" if mode != "none" else None
        load = list(os.getloadavg())
        t0 = time.perf_counter()
        tcs, log = train_transcoders(
            cm.model,
            stream,
            layers=layers,
            config=config,
            d_in=cm.d_model,
            d_out=cm.d_model,
            device=device,
            progress=False,
            checkpoint_dir=directory,
            checkpoint_every=every[mode] if directory is not None else None,
        )
        seconds = time.perf_counter() - t0
        r = {
            "seconds": seconds,
            "tokens": log.tokens,
            "steps": log.steps,
            "tokens_per_second": log.tokens / seconds,
            "load_average_before": load,
            "checkpoints": len(writes),
            "write_seconds": list(writes),
            "write_share": sum(writes) / seconds,
        }
        if directory is not None:
            path = ckpt.checkpoint_file(directory)
            r["checkpoint_bytes"] = path.stat().st_size
            t1 = time.perf_counter()
            ckpt.read(path)
            r["read_seconds"] = time.perf_counter() - t1
        weights = {la: {k: v.clone() for k, v in tc.state_dict().items()} for la, tc in tcs.items()}
        return r, weights

    runs = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(dir=args.checkpoint_root) as tmp:
        root = Path(tmp)
        print(f"checkpoints written under {root}", flush=True)
        for rep in range(args.repeats):
            reference = None
            for mode in MODES:
                r, weights = run(mode, root)
                if mode == "none":
                    reference = weights
                else:
                    r["equal_to_none"] = all(
                        torch.equal(weights[la][k], reference[la][k])
                        for la in reference
                        for k in reference[la]
                    )
                runs[mode].append(r)
                print(
                    f"{mode:<12} (round {rep + 1}/{args.repeats}): {r['tokens']} tokens x "
                    f"{len(layers)} layers in {r['seconds']:.2f} s = "
                    f"{r['tokens_per_second']:.0f} tok/s, {r['checkpoints']} checkpoints "
                    f"(load {r['load_average_before'][0]:.1f})",
                    flush=True,
                )
    ckpt.Checkpoints.save = save

    summary = {}
    for mode in MODES:
        rs = runs[mode]
        s = {
            "tokens_per_second_median": statistics.median(r["tokens_per_second"] for r in rs),
            "checkpoints_per_run": rs[0]["checkpoints"],
        }
        if mode != "none":
            overhead = [
                none["tokens_per_second"] / r["tokens_per_second"] - 1
                for none, r in zip(runs["none"], rs, strict=True)
            ]
            all_writes = [w for r in rs for w in r["write_seconds"]]
            s.update(
                overhead_median=statistics.median(overhead),
                overhead_per_round=overhead,
                write_share_median=statistics.median(r["write_share"] for r in rs),
                write_seconds_median=statistics.median(all_writes),
                write_seconds_max=max(all_writes),
                checkpoint_mib=rs[0]["checkpoint_bytes"] / 2**20,
                read_seconds_median=statistics.median(r["read_seconds"] for r in rs),
                equal_to_none=all(r["equal_to_none"] for r in rs),
                checkpoint_every_tokens=every[mode],
            )
        summary[mode] = s

    doc = _common.document(
        "checkpoint_overhead",
        str(device),
        threads,
        model={
            "name": "sct.datasets.tiny_c2s() (embedded, trained)",
            "n_layers": cm.n_layers,
            "d_model": cm.d_model,
            "prompts": "pbmc68k_reduced cell sentences (630 training cells)",
        },
        settings={
            "layers": layers,
            "config": config.to_dict(),
            "rounds_per_run": "about n_tokens / buffer_tokens",
            "repeats": args.repeats,
            "checkpoint_root": str(args.checkpoint_root or tempfile.gettempdir()),
        },
        summary=summary,
        runs=runs,
        peak_rss_mib=_common.peak_rss_mib(),
    )
    _common.write(doc, out_path)

    print(
        f"\n{'mode':<12}{'tok/s':>10}{'overhead':>10}{'in writes':>10}{'ckpts':>7}{'s/write':>9}"
        f"{'MiB':>7}{'s/read':>8}{'equal':>7}"
    )
    for mode, s in summary.items():
        if mode == "none":
            print(f"{mode:<12}{s['tokens_per_second_median']:>10.0f}")
            continue
        print(
            f"{mode:<12}{s['tokens_per_second_median']:>10.0f}{s['overhead_median']:>10.1%}"
            f"{s['write_share_median']:>10.1%}{s['checkpoints_per_run']:>7}{s['write_seconds_median']:>9.3f}"
            f"{s['checkpoint_mib']:>7.1f}{s['read_seconds_median']:>8.3f}"
            f"{s['equal_to_none']!s:>7}"
        )


if __name__ == "__main__":
    main()
