"""Helper of ``test_distributed.py``: train transcoders on a fixed subset of pbmc68k_reduced.

Run plainly (one process) or under ``torchrun`` (gloo, CPU); every rank writes its transcoder
weights to ``<out>/rank<r>.npz`` (``"layer_<i>/W_enc"``, ...) and its record's metrics and
parameters (``params``, with the ``TrainingConfig`` as ``params["config"]``) to
``<out>/rank<r>.json``.

    python tests/_distributed_train.py OUT N_CELLS N_TOKENS BATCH_SIZE

Optional arguments (``test_checkpoint``'s torchrun case): ``--buffer-tokens`` and
``--prompt-batch-size`` (training settings), ``--checkpoint-dir``, ``--checkpoint-every`` and
``--resume`` (passed on), and ``--stop-at-step S``, which interrupts training after step ``S``
(a ``KeyboardInterrupt``, as Ctrl-C would) and writes ``<out>/rank<r>.stopped`` instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def main(
    out: Path,
    n_cells: int,
    n_tokens: int,
    batch_size: int,
    *,
    stop_at_step: int | None = None,
    **options,
) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    import scanpy as sc

    import sctranscoder as sct
    from sctranscoder.core.distributed import rank

    adata = sc.datasets.pbmc68k_reduced()[:n_cells].copy()
    model = sct.datasets.tiny_c2s()
    sct.pp.cell_sentences(adata, model=model)
    if stop_at_step is not None:
        from sctranscoder.tl import _train_transcoders as tl

        tl.fit_transcoders = functools.partial(tl.fit_transcoders, callback=_stop_at(stop_at_step))
    options = {k: v for k, v in options.items() if v is not None}
    r = rank()
    try:
        sct.tl.train_transcoders(
            adata,
            model,
            n_tokens=n_tokens,
            batch_size=batch_size,
            device="cpu",
            progress=False,
            **options,
        )
    except KeyboardInterrupt:
        if stop_at_step is None:
            raise
        (out / f"rank{r}.stopped").write_text("")
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    rec = adata.uns["sct"]  # the transcoder record (default key_added)
    np.savez(
        out / f"rank{r}.npz",
        **{
            f"{layer}/{k}": v  # layer: "layer_<i>"; its "config" dict is left out
            for layer, d in rec["transcoders"].items()
            for k, v in d.items()
            if isinstance(v, np.ndarray)
        },
    )
    params = {k: _plain(v) for k, v in rec["params"].items() if k != "train_seconds"}
    (out / f"rank{r}.json").write_text(
        json.dumps(
            {
                "layers": _plain(rec["metrics"]["layers"].to_dict(orient="list")),
                "model": _plain(rec["metrics"]["model"]),
                "params": params,
                "train_seconds": rec["params"]["train_seconds"],
                "split": adata.obs["sct_split"].astype(str).tolist(),
            }
        )
    )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _stop_at(step: int):
    def callback(log):
        if log.steps == step:
            raise KeyboardInterrupt

    return callback


def _plain(value):
    """Values of a record as JSON-ready Python (numpy arrays and scalars converted)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray | list | tuple):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    for name in ("n_cells", "n_tokens", "batch_size"):
        parser.add_argument(name, type=int)
    for name in ("buffer_tokens", "prompt_batch_size", "checkpoint_every", "stop_at_step"):
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume", action="store_true", default=None)
    main(**vars(parser.parse_args()))
