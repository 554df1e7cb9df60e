"""Checkpoints of transcoder training and resuming: a run stopped at a step limit and resumed
from its last checkpoint ends bit for bit where an uninterrupted run does (CPU, same seed); a
checkpoint of another run, or none, is refused before anything is written; a failed write
leaves the previous checkpoint whole. The 2-rank ``torchrun`` case is in ``test_distributed.py``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scanpy as sc
import torch
import torch.distributed as dist
from _models import random_prompts, tiny_neox

import sctranscoder as sct
from sctranscoder.core.prompts import prompt_batches
from sctranscoder.core.training import TIMING_KEYS, TrainingConfig, train_transcoders
from sctranscoder.core.training import checkpoint as ckpt

D = 64
LAYERS = [0, 1]
#: 20 steps; rounds of ~4 steps (1024-token buffer, ~290 tokens a prompt batch); AuxK from the
#: start (features dead after 512 tokens), so its state is part of what must be restored.
CONFIG = TrainingConfig(n_tokens=5000, batch_size=256, buffer_tokens=1024, dead_tokens=512)
EVERY = 1000  # tokens between checkpoints: about every round
STOP = 11  # the step at which the interrupted run stops


@pytest.fixture(scope="module")
def neox():
    return tiny_neox(n_layers=2, d=D)


def _train(model, config=CONFIG, batches=None, **kwargs):
    return train_transcoders(
        model,
        random_prompts(0) if batches is None else batches,
        layers=kwargs.pop("layers", LAYERS),
        config=config,
        d_in=D,
        d_out=D,
        progress=False,
        **kwargs,
    )


def _stop_at(step: int):
    """A callback that interrupts training after ``step`` steps, as Ctrl-C would."""

    def callback(log):
        if log.steps == step:
            raise KeyboardInterrupt

    return callback


@pytest.fixture(scope="module")
def uninterrupted(neox):
    return _train(neox)


@pytest.fixture(scope="module")
def interrupted_dir(neox, tmp_path_factory):
    """The checkpoint directory of a run stopped at step :data:`STOP` (read-only)."""
    directory = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(KeyboardInterrupt):
        _train(neox, checkpoint_dir=directory, checkpoint_every=EVERY, callback=_stop_at(STOP))
    return directory


@pytest.fixture
def interrupted(interrupted_dir, tmp_path):
    """A copy of :func:`interrupted_dir` in ``tmp_path``; its checkpoint as read."""
    shutil.copytree(interrupted_dir, tmp_path, dirs_exist_ok=True)
    return ckpt.read(ckpt.checkpoint_file(tmp_path))


def _assert_same_run(a, b):
    (tc_a, log_a), (tc_b, log_b) = a, b
    assert sorted(tc_a) == sorted(tc_b) == LAYERS
    for layer in LAYERS:
        sa, sb = tc_a[layer].state_dict(), tc_b[layer].state_dict()
        assert list(sa) == list(sb)
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (layer, name)
    assert (log_a.steps, log_a.tokens) == (log_b.steps, log_b.tokens)
    assert log_a.loss == log_b.loss
    assert log_a.fvu == log_b.fvu
    assert log_a.dead_fraction == log_b.dead_fraction


def _random_prompts_from(start: int):
    return itertools.islice(random_prompts(0), start, None)


@pytest.mark.parametrize("stream", ["iterator", "function"])
def test_stopped_and_resumed_run_equals_uninterrupted(
    neox, uninterrupted, interrupted, tmp_path, stream
):
    saved = interrupted
    # the last checkpoint is from before the stop: the steps after it are done again
    assert 0 < saved["trainer"]["log"]["steps"] < STOP
    assert len(saved["ranks"]) == 1
    leftover = saved["ranks"][0]["x"][0]
    assert sum(t.shape[0] for t in leftover) < CONFIG.batch_size  # never the whole buffer
    batches = _random_prompts_from if stream == "function" else random_prompts(0)
    resumed = _train(
        neox, batches=batches, checkpoint_dir=tmp_path, checkpoint_every=EVERY, resume=True
    )
    _assert_same_run(resumed, uninterrupted)
    # the run's end was checkpointed too: resuming it trains nothing more
    assert ckpt.read(ckpt.checkpoint_file(tmp_path))["trainer"]["log"]["steps"] == 20
    again = _train(neox, batches=batches, checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(again, uninterrupted)


def test_profile_may_change_on_resume(neox, uninterrupted, interrupted, tmp_path):
    resumed = _train(
        neox, config=CONFIG.replace(profile=True), checkpoint_dir=tmp_path, resume=True
    )
    _assert_same_run(resumed, uninterrupted)
    assert set(resumed[1].timings) == set(TIMING_KEYS)


def _snapshot(directory):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": CONFIG.replace(k=16)}, "config.k was 32, is 16"),
        ({"config": CONFIG.replace(n_tokens=6000)}, "config.n_tokens was 5000, is 6000"),
        ({"layers": [0]}, r"layers was \[0, 1\], is \[0\]"),
        ({"identity": {"model_fingerprint": "other"}}, "model_fingerprint was None"),
    ],
)
def test_resume_of_another_run_is_refused_and_writes_nothing(
    neox, interrupted, tmp_path, change, message
):
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"written by a different run: {message}"):
        _train(neox, checkpoint_dir=tmp_path, resume=True, **change)
    assert _snapshot(tmp_path) == before


def test_a_checkpoint_from_before_stacking_reads_as_per_layer(tmp_path):
    # checkpoints written before TrainingConfig(stack_layers=...) have no "stacked" entry
    old = ckpt.run_header(CONFIG, LAYERS, d_in=D, d_out=D)
    del old["stacked"]
    ckpt.check_header(dict(old), ckpt.run_header(CONFIG, LAYERS, d_in=D, d_out=D), tmp_path)
    stacked = ckpt.run_header(CONFIG, LAYERS, d_in=D, d_out=D, stacked=True)
    with pytest.raises(ValueError, match="stacked was False, is True"):
        ckpt.check_header(old, stacked, tmp_path)


def test_resume_with_another_number_of_ranks_is_refused(neox, interrupted, tmp_path):
    doc = interrupted
    doc["world_size"] = 2
    doc["ranks"] = doc["ranks"] * 2
    torch.save(doc, ckpt.checkpoint_file(tmp_path))
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\) and this run has 1"):
        _train(neox, checkpoint_dir=tmp_path, resume=True)


def test_missing_or_conflicting_checkpoint_is_refused(neox, interrupted_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        _train(neox, checkpoint_dir=tmp_path / "none", resume=True)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="pass its directory as checkpoint_dir"):
        _train(neox, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every needs a directory"):
        _train(neox, checkpoint_every=EVERY)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        _train(neox, checkpoint_dir=tmp_path, checkpoint_every=0)
    shutil.copytree(interrupted_dir, tmp_path, dirs_exist_ok=True)
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="pass resume=True to continue"):
        _train(neox, checkpoint_dir=tmp_path)  # a new run never overwrites a checkpoint
    assert _snapshot(tmp_path) == before


_executed = []


def _mark():
    _executed.append(True)


class _Payload:
    def __reduce__(self):
        return _mark, ()


def test_a_file_that_is_not_a_checkpoint_is_refused_without_running_code(neox, tmp_path):
    torch.save({"format": ckpt.FORMAT, "payload": _Payload()}, ckpt.checkpoint_file(tmp_path))
    with pytest.raises(ValueError, match="cannot be read as a training checkpoint"):
        _train(neox, checkpoint_dir=tmp_path, resume=True)
    assert not _executed  # weights_only: the pickled call was never made
    torch.save({"weights": torch.zeros(2)}, ckpt.checkpoint_file(tmp_path))
    with pytest.raises(ValueError, match="is not a training checkpoint"):
        _train(neox, checkpoint_dir=tmp_path, resume=True)


def test_a_failed_write_leaves_the_previous_checkpoint(neox, tmp_path, monkeypatch):
    save, calls, previous = torch.save, [], {}

    def failing_save(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            previous.update(_snapshot(tmp_path))
            path.write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError("No space left on device")
        save(obj, path)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        _train(neox, checkpoint_dir=tmp_path, checkpoint_every=EVERY)
    assert calls[0].name != ckpt.FILENAME  # written to a temporary sibling
    assert _snapshot(tmp_path) == previous  # the first checkpoint, nothing else
    assert ckpt.read(ckpt.checkpoint_file(tmp_path))["trainer"]["log"]["steps"] > 0


def test_prompt_batches_start_continues_the_stream(model):
    genes = ["CD3D", "MS4A1", "LYZ", "NKG7", "GNLY", "CD14", "FCGR3A", "PPBP"]
    sentences = [genes[i:] + genes[:i] for i in range(len(genes))]
    cells = np.arange(7)  # 3 batches an epoch (3 + 3 + 1)
    stream = functools.partial(prompt_batches, model, sentences, cells, batch_size=3, seed=5)
    whole = list(itertools.islice(stream(repeat=True), 10))
    for start in (0, 1, 3, 4, 8):
        tail = list(itertools.islice(stream(repeat=True, start=start), 10 - start))
        assert len(tail) == 10 - start
        for (ids, mask), (ids_ref, mask_ref) in zip(tail, whole[start:], strict=True):
            assert torch.equal(ids, ids_ref)
            assert torch.equal(mask, mask_ref)
    assert len(list(stream(repeat=False, start=2))) == 1
    assert list(stream(repeat=False, start=3)) == []


# -- sct.tl.train_transcoders ------------------------------------------------------------------

#: 24 cells, one layer, 8 steps of 128 tokens; rounds of ~3 steps (one ~400-token prompt each).
TL_SETTINGS = {
    "layers": [1],
    "n_tokens": 1024,
    "batch_size": 128,
    "buffer_tokens": 384,
    "prompt_batch_size": 1,
    "progress": False,
}
TL_STOP = 6


@pytest.fixture(scope="module")
def cells24(model):
    adata = sc.datasets.pbmc68k_reduced()[:24].copy()
    sct.pp.cell_sentences(adata, model=model)
    return adata


def test_tl_resume_gives_the_uninterrupted_record(cells24, model, tmp_path, monkeypatch):
    whole = cells24.copy()
    sct.tl.train_transcoders(whole, model, **TL_SETTINGS)

    stopped = cells24.copy()
    from sctranscoder.tl import _train_transcoders as tl_module

    fit = tl_module.fit_transcoders
    monkeypatch.setattr(
        tl_module, "fit_transcoders", functools.partial(fit, callback=_stop_at(TL_STOP))
    )
    with pytest.raises(KeyboardInterrupt):
        sct.tl.train_transcoders(
            stopped, model, checkpoint_dir=tmp_path, checkpoint_every=256, **TL_SETTINGS
        )
    monkeypatch.undo()
    assert "sct" not in stopped.uns
    assert 0 < ckpt.read(ckpt.checkpoint_file(tmp_path))["trainer"]["log"]["steps"] < TL_STOP

    other = cells24.copy()
    with pytest.raises(ValueError, match=r"config\.seed was 0, is 1"):
        sct.tl.train_transcoders(
            other, model, checkpoint_dir=tmp_path, resume=True, **TL_SETTINGS, seed=1
        )
    assert "sct" not in other.uns
    with pytest.raises(ValueError, match="cell_sentences was"):
        sct.tl.train_transcoders(
            cells24[::-1].copy(), model, checkpoint_dir=tmp_path, resume=True, **TL_SETTINGS
        )

    sct.tl.train_transcoders(stopped, model, checkpoint_dir=tmp_path, resume=True, **TL_SETTINGS)
    got, want = stopped.uns["sct"], whole.uns["sct"]
    assert sorted(got["transcoders"]) == sorted(want["transcoders"]) == ["layer_1"]
    for name, value in want["transcoders"]["layer_1"].items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got["transcoders"]["layer_1"][name], value, name)
    for key in ("tokens_seen", "steps", "lr"):
        assert got["params"][key] == want["params"][key], key
    assert got["metrics"]["model"] == want["metrics"]["model"]


# -- torchrun: 2 gloo processes ----------------------------------------------------------------

HELPER = Path(__file__).parents[1] / "_distributed_train.py"
#: 60 cells (27 training cells a rank), 8 steps of 256 tokens (128 a rank); rounds of ~3 steps.
DDP_ARGS = ["60", "2048", "256", "--buffer-tokens", "384", "--prompt-batch-size", "1"]


def _torchrun(out: Path, *args: str) -> None:
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(HELPER),
        str(out),
        *DDP_ARGS,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)
def test_torchrun_stopped_and_resumed_equals_uninterrupted(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    _torchrun(tmp_path / "whole")
    stop = ["--checkpoint-dir", str(checkpoints), "--checkpoint-every", "512"]
    _torchrun(tmp_path / "stopped", *stop, "--stop-at-step", "6")
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == [
        "rank0.stopped",
        "rank1.stopped",
    ]
    saved = ckpt.read(ckpt.checkpoint_file(checkpoints))
    assert saved["world_size"] == 2
    assert 0 < saved["trainer"]["log"]["steps"] < 6
    # each rank's own stream position and buffer, gathered by rank 0
    assert len(saved["ranks"]) == 2
    assert not torch.equal(saved["ranks"][0]["generator"], saved["ranks"][1]["generator"])
    _torchrun(tmp_path / "resumed", "--checkpoint-dir", str(checkpoints), "--resume")

    def load(run: str, r: int):
        record = json.loads((tmp_path / run / f"rank{r}.json").read_text())
        return record, np.load(tmp_path / run / f"rank{r}.npz")

    want, w_want = load("whole", 0)
    for r in (0, 1):
        got, w_got = load("resumed", r)
        assert sorted(w_got.files) == sorted(w_want.files)
        assert w_want.files
        for name in w_want.files:
            np.testing.assert_array_equal(w_got[name], w_want[name], err_msg=f"rank {r} {name}")
        assert got["params"] == want["params"]  # steps, tokens, world_size, config (...)
        assert got["layers"] == want["layers"]  # validation metrics
        assert got["model"] == want["model"]
