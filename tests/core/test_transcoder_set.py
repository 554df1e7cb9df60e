"""TranscoderSet: one object per base model's transcoders, its directory format and manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sctranscoder.core.training import TrainingConfig
from sctranscoder.core.transcoder import Transcoder, TranscoderConfig
from sctranscoder.core.transcoder_set import TranscoderDirectoryError, TranscoderSet

MODEL = {"name": "tiny", "fingerprint": "abc", "architecture": "gpt_neox", "n_layers": 4}
CONFIG = TrainingConfig(expansion_factor=4, k=8, batch_size=256, n_tokens=4096, lr=1e-3, seed=3)
RUN = {"layers": [0, 3], "tokens_seen": 4096, "steps": 16, "device": "cpu", "world_size": 1}


def _transcoder(activation="topk", *, skip=False, seed=0, d_in=16, d_out=12, n_features=64):
    gen = torch.Generator().manual_seed(seed)
    cfg = TranscoderConfig(d_in, d_out, n_features, activation=activation, k=8, skip=skip)
    tc = Transcoder(cfg, generator=gen)
    with torch.no_grad():
        tc.b_enc.normal_(generator=gen)
        tc.b_dec.normal_(generator=gen)
        if skip:
            tc.W_skip.normal_(generator=gen)
    return tc.eval().requires_grad_(False)


def _set() -> TranscoderSet:
    """Layers 0 (TopK) and 3 (ReLU with a skip connection), with every record filled."""
    metrics = {
        "layers": {"layer": [0, 3], "fvu": [np.float32(0.25), 0.5], "l0": [8.0, 11.5]},
        "model": {"ce_recovered": np.float64(0.9)},
    }
    transcoders = {3: _transcoder("relu", skip=True, seed=1), 0: _transcoder(seed=0)}
    return TranscoderSet(transcoders, dict(MODEL), CONFIG, dict(RUN), metrics)


@pytest.fixture
def saved(tmp_path):
    """A set saved to ``tmp_path / "tc"``: ``(set, path)``."""
    tset = _set()
    return tset, tset.save(tmp_path / "tc")


def _assert_same_weights(a: TranscoderSet, b: TranscoderSet) -> None:
    assert a.layers == b.layers
    for layer in a.layers:
        assert a[layer].config == b[layer].config
        wa, wb = a[layer].state_arrays(), b[layer].state_arrays()
        assert sorted(wa) == sorted(wb)
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (layer, name)


# -- the object -----------------------------------------------------------------------------------


def test_a_mapping_of_layers_in_order():
    tset = _set()
    assert tset.layers == [0, 3]
    assert list(tset) == [0, 3]
    assert len(tset) == 2
    assert 3 in tset
    assert 1 not in tset
    with pytest.raises(KeyError, match=r"layers \[0, 3\]"):
        tset[1]
    with pytest.raises(ValueError, match="at least one layer"):
        TranscoderSet({})
    with pytest.raises(ValueError, match="non-negative integers"):
        TranscoderSet({-1: _transcoder()})


def test_subset_shares_the_modules_and_refuses_missing_layers():
    tset = _set()
    sub = tset.subset([3])
    assert sub.layers == [3]
    assert sub[3] is tset[3]
    assert sub.model == tset.model
    assert sub.config == tset.config
    with pytest.raises(KeyError, match=r"layer\(s\) \[1\]"):
        tset.subset([0, 1])


def test_to_the_same_device_is_self_and_elsewhere_a_copy():
    tset = _set()
    assert tset.to("cpu") is tset
    assert tset.to(torch.device("cpu")) is tset
    moved = tset.to("meta")  # a device every torch build has: the move path without a GPU
    assert moved is not tset
    assert moved.device.type == "meta"
    assert tset.device.type == "cpu"
    assert tset[0].W_enc.device.type == "cpu"
    assert moved.layers == tset.layers
    assert moved.model == tset.model
    assert moved[3].config == tset[3].config


def test_check_model_refuses_another_fingerprint():
    tset = _set()
    tset.check_model("abc", "tiny")  # the recorded fingerprint passes
    with pytest.raises(ValueError, match=r"fingerprint abc.*'other'.*fingerprint xyz"):
        tset.check_model("xyz", "other")


def test_from_tensors_without_copy_shares_float32_memory():
    tc = _transcoder(skip=True)
    arrays = tc.to_numpy()
    shared = Transcoder.from_tensors(tc.config, arrays, copy=False)
    copied = Transcoder.from_tensors(tc.config, arrays, copy=True)
    for name, arr in arrays.items():
        assert getattr(shared, name).data_ptr() == arr.__array_interface__["data"][0], name
        assert getattr(copied, name).data_ptr() != arr.__array_interface__["data"][0], name
    arrays["W_enc"][0, 0] = 42.0
    assert float(shared.W_enc[0, 0]) == 42.0
    assert float(copied.W_enc[0, 0]) != 42.0
    assert not shared.W_enc.requires_grad
    # any other dtype is converted (a copy), with the same values
    as64 = {k: v.astype(np.float64) for k, v in arrays.items()}
    converted = Transcoder.from_tensors(tc.config, as64, copy=False)
    assert converted.W_enc.dtype == torch.float32
    assert torch.equal(converted.W_enc, torch.from_numpy(arrays["W_enc"]))


# -- save and load ----------------------------------------------------------------------------------


def test_save_and_load_directory(saved):
    tset, path = saved
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "layer_0.safetensors",
        "layer_3.safetensors",
        "manifest.json",
    ]
    # nothing left beside it (the temporary directory was renamed into place)
    assert [p.name for p in path.parent.iterdir()] == ["tc"]
    back = TranscoderSet.load(path)
    _assert_same_weights(back, tset)
    assert back.model == MODEL
    assert back.config == CONFIG
    assert back.run == RUN
    # numpy scalars are written as plain numbers
    assert back.metrics == {
        "layers": {"layer": [0, 3], "fvu": [0.25, 0.5], "l0": [8.0, 11.5]},
        "model": {"ce_recovered": 0.9},
    }
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    for layer in tset.layers:
        assert torch.equal(back[layer](x), tset[layer](x))


def test_a_set_without_training_config_round_trips(tmp_path):
    tset = TranscoderSet({2: _transcoder()}, {"name": "elsewhere"})
    back = TranscoderSet.load(tset.save(tmp_path / "tc"))
    assert back.config is None
    assert back.run == {}
    assert back.metrics == {}
    _assert_same_weights(back, tset)


def test_load_without_config_raises(tmp_path):
    with pytest.raises(TranscoderDirectoryError, match=r"config\.json"):
        TranscoderSet.load(tmp_path)
    with pytest.raises(TranscoderDirectoryError, match="not a directory"):
        TranscoderSet.load(tmp_path / "no-such-dir")


def test_save_refuses_an_existing_directory_unless_overwrite(saved):
    tset, path = saved
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tset.subset([3]).save(path)
    assert TranscoderSet.load(path).layers == [0, 3]  # untouched
    tset.subset([3]).save(path, overwrite=True)
    # the old layer 0 is gone, not left beside the new set
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "layer_3.safetensors",
        "manifest.json",
    ]
    assert [p.name for p in path.parent.iterdir()] == ["tc"]
    back = TranscoderSet.load(path)
    assert back.layers == [3]
    _assert_same_weights(back, tset.subset([3]))


# -- the manifest --------------------------------------------------------------------------------


def test_a_changed_byte_is_found_by_its_checksum(saved):
    tset, path = saved
    f = path / "layer_3.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: same size, different weights
    f.write_bytes(bytes(data))
    with pytest.raises(TranscoderDirectoryError, match=r"layer_3\.safetensors.*sha256"):
        TranscoderSet.load(path)
    # verify=False checks names and sizes only (and so reads the changed weights)
    unchecked = TranscoderSet.load(path, verify=False)
    assert any(
        not torch.equal(t, tset[3].state_arrays()[name])
        for name, t in unchecked[3].state_arrays().items()
    )


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("extra", r"unknown \['notes\.txt'\]"),
        ("missing", r"missing \['layer_0\.safetensors'\]"),
        ("truncated_layer", r"layer_0\.safetensors has \d+ bytes, the manifest says \d+"),
        ("truncated_config", r"config\.json has \d+ bytes"),
        ("no_manifest", r"manifest\.json is missing"),
    ],
)
def test_a_damaged_directory_is_refused(saved, damage, match):
    _, path = saved
    if damage == "extra":
        (path / "notes.txt").write_text("hello")
    elif damage == "missing":
        (path / "layer_0.safetensors").unlink()
    elif damage == "truncated_layer":
        f = path / "layer_0.safetensors"
        f.write_bytes(f.read_bytes()[:-10])
    elif damage == "truncated_config":
        f = path / "config.json"
        f.write_text(f.read_text()[:40])
    else:
        (path / "manifest.json").unlink()
    with pytest.raises(TranscoderDirectoryError, match=match):
        TranscoderSet.load(path)


def test_truncated_json_names_its_file(saved):
    _, path = saved
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text()[:30])
    with pytest.raises(TranscoderDirectoryError, match=r"manifest\.json is not valid JSON") as err:
        TranscoderSet.load(path)
    assert str(manifest) in str(err.value)
    assert not isinstance(err.value, json.JSONDecodeError)


def test_the_manifest_cannot_name_files_outside_the_pattern(saved):
    _, path = saved
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["files"]["../elsewhere.safetensors"] = {"bytes": 1, "sha256": "0" * 64}
    manifest.write_text(json.dumps(doc))
    with pytest.raises(TranscoderDirectoryError, match="unexpected file name"):
        TranscoderSet.load(path)


# -- directories written by sctranscoder 0.1 -----------------------------------------------------


def _legacy_directory(path, tset: TranscoderSet, *, params: dict, metrics: dict) -> None:
    """A directory as 0.1's ``save_transcoders`` wrote it: safetensors and config.json only."""
    from safetensors.torch import save_file

    path.mkdir()
    for layer, tc in tset.items():
        tensors = {k: torch.as_tensor(v) for k, v in tc.to_numpy().items()}
        save_file(tensors, str(path / f"layer_{layer}.safetensors"))
    doc = {
        "format": "sctranscoder.transcoders/1",
        "layers": {str(la): tc.config.to_dict() for la, tc in tset.items()},
        "metadata": {"model": dict(MODEL), "params": params, "metrics": metrics},
    }
    (path / "config.json").write_text(json.dumps(doc, indent=2) + "\n")


#: The ``params`` of a 0.1 record (from ``tests/data/legacy_0.1.0.dev0.h5ad``): the training
#: config's fields mixed with the run's facts, ``lr`` the rate used.
LEGACY_PARAMS = {
    "activation": "topk",
    "auxk_alpha": 0.03125,
    "batch_size": 512,
    "compile": False,
    "device": "cpu",
    "expansion_factor": 4,
    "k": 8,
    "kernels": "auto",
    "l1_coefficient": 0.00014,
    "layers": [0, 3],
    "lr": 0.002262741699796952,
    "n_tokens": 4096,
    "profile": False,
    "prompt_batch_size": 16,
    "seed": 0,
    "sentence_key": "cell_sentence",
    "skip": False,
    "steps": 8,
    "tokens_seen": 4096,
    "train_seconds": 1.19,
    "validation_fraction": 0.1,
    "world_size": 1,
}


def test_a_legacy_directory_still_loads(tmp_path):
    tset = _set()
    metrics = {
        "layers": {"name": ["layer_0", "layer_3"], "layer": [0, 3], "fvu": [0.25, 0.5]},
        "model": {"ce_recovered": 0.9},
    }
    path = tmp_path / "legacy"
    _legacy_directory(path, tset, params=LEGACY_PARAMS, metrics=metrics)
    back = TranscoderSet.load(path)
    _assert_same_weights(back, tset)
    assert back.model == MODEL
    assert back.metrics == metrics
    assert back.run["tokens_seen"] == 4096
    assert back.run["world_size"] == 1
    # trained before answer tokens existed: read as trained on prompts only
    assert back.config == TrainingConfig(
        expansion_factor=4,
        k=8,
        batch_size=512,
        n_tokens=4096,
        lr=0.002262741699796952,
        answer_tokens=False,
        answer_weight=1,
    )
    # a legacy directory saved again gets the current format, with a manifest
    again = TranscoderSet.load(back.save(tmp_path / "current"))
    assert json.loads((tmp_path / "current" / "config.json").read_text())["format"] == (
        "sctranscoder.transcoders/2"
    )
    assert (tmp_path / "current" / "manifest.json").exists()
    _assert_same_weights(again, tset)
    assert again.config == back.config


def test_a_truncated_legacy_config_names_its_file(tmp_path):
    path = tmp_path / "legacy"
    _legacy_directory(path, _set(), params=LEGACY_PARAMS, metrics={})
    config = path / "config.json"
    config.write_text(config.read_text()[:50])  # no manifest: the JSON parser finds it
    with pytest.raises(TranscoderDirectoryError, match=r"config\.json is not valid JSON") as err:
        TranscoderSet.load(path)
    assert str(config) in str(err.value)


def test_overwrite_never_replaces_a_directory_that_is_not_a_transcoder_set(tmp_path):
    path = tmp_path / "results"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a transcoder directory"):
        _set().save(path, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine"
    assert [p.name for p in path.iterdir()] == ["notes.txt"]


def test_load_reads_and_checks_only_the_layers_asked_for(saved, monkeypatch):
    tset, path = saved
    import safetensors.torch

    read = []
    real = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda f: read.append(f) or real(f))
    back = TranscoderSet.load(path, layers=[3])
    assert back.layers == [3]
    assert [p.rsplit("/", 1)[-1] for p in read] == ["layer_3.safetensors"]
    _assert_same_weights(back, tset.subset([3]))
    with pytest.raises(KeyError, match=r"layer\(s\) \[5\]"):
        TranscoderSet.load(path, layers=[5])


def test_moved_transcoder_is_a_copy_and_leaves_the_original_where_it_was():
    tc = _transcoder()
    assert tc.moved("cpu") is tc
    meta = tc.moved("meta")
    assert meta is not tc
    assert meta.W_enc.device.type == "meta"
    assert tc.W_enc.device.type == "cpu"


_KILLED_SAVE = """
import sys, time
from pathlib import Path
import safetensors.torch
import torch
from sctranscoder.core.transcoder import Transcoder, TranscoderConfig
from sctranscoder.core.transcoder_set import TranscoderSet

path, marker = Path(sys.argv[1]), Path(sys.argv[2])
real_save = safetensors.torch.save_file
def slow_save(tensors, filename, *args, **kwargs):
    real_save(tensors, filename, *args, **kwargs)
    marker.write_text(filename)  # one layer file is written: the parent kills us now
    time.sleep(60)
safetensors.torch.save_file = slow_save
cfg = TranscoderConfig(16, 12, 64, activation="topk", k=8)
gen = torch.Generator().manual_seed(7)
TranscoderSet({la: Transcoder(cfg, generator=gen) for la in range(4)}).save(path, overwrite=True)
"""


def test_a_save_killed_midway_leaves_the_previous_directory_intact(saved, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    tset, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    marker = tmp_path / "one-layer-written"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the saving process ended before it was killed"
            assert time.monotonic() < deadline, "the saving process never wrote a layer"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    # the half-written set went to a temporary sibling, never into the directory
    assert marker.read_text().startswith(str(path.parent / f".{path.name}.tmp-"))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    _assert_same_weights(TranscoderSet.load(path), tset)
    # the next save still works, and replaces the set whole
    other = TranscoderSet({5: _transcoder(seed=9)}, dict(MODEL))
    other.save(path, overwrite=True)
    _assert_same_weights(TranscoderSet.load(path), other)
