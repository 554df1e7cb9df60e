"""The ``sctranscoder`` command line, end to end on the embedded model: from a raw ``.h5ad`` to
sentences, transcoders, activations, a circuit, annotations and exports; options and defaults
generated from the API; exit codes; atomic output; ``--resume``; ``torchrun`` with 2 processes.

Most commands run in-process through ``main(argv)``; a few through the console script and
``python -m sctranscoder``, as a user runs them.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch.distributed as dist

import sctranscoder as sct
from sctranscoder.cli import EXIT_CODES, commands, main
from sctranscoder.cli._options import Form, docstring_entries, function_params

N_CELLS, N_TOKENS, BATCH = 40, 1024, 512
TRAIN = ["--n-tokens", str(N_TOKENS), "--batch-size", str(BATCH), "--device", "cpu"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(capsys, *argv) -> tuple[int, dict | None, str]:
    """``main(argv)``: exit code, the JSON summary of stdout (None if empty) and stderr."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def _subprocess(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def _console_script() -> Path:
    script = Path(sys.executable).parent / "sctranscoder"
    if not script.exists():
        pytest.skip("the console script is not installed: `pip install -e . --no-deps`")
    return script


class _Capture:
    """capsys for a module fixture: ``main(argv)`` with stdout and stderr captured."""

    def run(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        return code, json.loads(out.getvalue()) if out.getvalue().strip() else None, err.getvalue()


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "raw.h5ad"
    sc.datasets.pbmc68k_reduced()[:N_CELLS].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def pipeline(raw):
    """Every command in order, from the raw file; their exit codes, summaries and files."""
    capsys = _Capture()
    root = raw.parent
    files = {name: root / f"{name}.h5ad" for name in ("s", "t", "a", "c", "n")}
    # a user's first command: the console script (the rest in-process, for speed)
    proc = _subprocess(
        _console_script(), "sentences", raw, "-o", files["s"], "--model", sct.datasets.TINY_C2S_NAME
    )
    runs = {"sentences": (proc.returncode, json.loads(proc.stdout or "null"), proc.stderr)}
    cell = sc.read_h5ad(raw).obs_names[0]
    runs["train"] = capsys.run("train", files["s"], "-o", files["t"], *TRAIN, "-q")
    # the same training through the API, now: later steps may change torch's thread count (the
    # marker gene sets of `annotate` raise it), which changes float rounding
    api = sc.read_h5ad(files["s"])
    sct.tl.train_transcoders(api, n_tokens=N_TOKENS, batch_size=BATCH, device="cpu", progress=False)
    runs["api train"] = api.uns["sct"]
    runs["activations"] = capsys.run("activations", files["t"], "-o", files["a"], "-q")
    runs["trace"] = capsys.run(
        "trace", files["a"], "-o", files["c"], "--cell", cell, "--max-feature-nodes", 8,
        "--head-nodes", "", "-q",
    )  # fmt: skip
    runs["annotate"] = capsys.run(
        "annotate", files["c"], "-o", files["n"], "--gene-sets", "markers:bulk_labels",
        "--n-top", 20, "--baseline", "none", "-q",
    )  # fmt: skip
    runs["export transcoders"] = capsys.run("export", "transcoders", files["n"], root / "tc", "-q")
    runs["export circuit-tracer-graph"] = capsys.run(
        "export", "circuit-tracer-graph", files["n"], root / "graphs", "--circuit", cell,
        "--annotation-key", "sct_annotation", "-q",
    )  # fmt: skip
    runs["export circuit-tracer-transcoders"] = capsys.run(
        "export", "circuit-tracer-transcoders", files["n"], root / "ct", "--model-name",
        "sctranscoder/tiny_c2s", "--allow-topk", "-q",
    )  # fmt: skip
    return runs, files, root, cell


def test_pipeline_from_a_raw_file(pipeline):
    runs, files, root, cell = pipeline
    for name, (code, _, err) in ((k, v) for k, v in runs.items() if k != "api train"):
        assert code == 0, f"{name}: {err[-2000:]}"
    assert runs["sentences"][1]["written"]["obs"] == ["cell_sentence", "cell_sentence_n_genes"]
    assert runs["train"][1]["written"] == {"uns": ["sct"], "obs": ["sct_split"], "obsm": []}
    # the circuit, and its enrichment against the shipped GO sets (gene_sets="auto")
    assert runs["trace"][1]["written"]["uns"] == [f"circuit_{cell}", f"circuit_{cell}_enrichment"]
    assert runs["annotate"][1]["written"]["uns"] == ["sct_annotation"]
    adata = sc.read_h5ad(files["n"])
    params = adata.uns["sct"]["params"]
    assert params["config"]["n_tokens"] == N_TOKENS
    assert params["config"]["k"] == sct.TrainingConfig().k  # not given: the API's default
    assert params["world_size"] == 1
    assert adata.obsm["X_sct_L0"].shape[0] == N_CELLS
    assert len(adata.uns[f"circuit_{cell}"]["nodes"]) > 0
    assert "features" in adata.uns["sct_annotation"]
    # the exports
    tset = sct.TranscoderSet.load(root / "tc")
    assert sorted(tset.layers) == list(range(sct.datasets.tiny_c2s().n_layers))
    graph = json.loads(Path(runs["export circuit-tracer-graph"][1]["path"]).read_text())
    assert graph["nodes"]
    assert graph["links"]
    assert (root / "ct" / "config.yaml").exists()
    # -q: logs of info level are not shown; without it (the console script's run) they are
    assert "training transcoders" not in runs["train"][2]
    assert "computing cell sentences" in runs["sentences"][2]


def test_train_matches_the_python_api(pipeline):
    """The command passes exactly what it was given: the same transcoders as the API call."""
    runs, files, _, _ = pipeline
    cli, api = sc.read_h5ad(files["t"]).uns["sct"], runs["api train"]
    assert cli["params"]["config"] == api["params"]["config"]
    for layer, weights in api["transcoders"].items():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            np.testing.assert_array_equal(cli["transcoders"][layer][name], weights[name])


def test_python_m_and_in_place(pipeline, tmp_path):
    """``python -m sctranscoder``; ``--in-place`` replaces the input; --link needs an output."""
    _, files, _, _ = pipeline
    path = tmp_path / "linked.h5ad"
    shutil.copy(files["t"], path)
    proc = _subprocess(
        sys.executable, "-m", "sctranscoder", "export", "transcoders", path,
        tmp_path / "weights", "--link", "--in-place",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["output"] == str(path)
    assert summary["written"]["uns"] == ["sct"]
    rec = sc.read_h5ad(path).uns["sct"]
    assert "weights" in rec
    assert "transcoders" not in rec  # only the link is kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.fixture
def help_text(capsys):
    def get(*argv) -> str:
        capsys.readouterr()
        assert main([*argv, "--help"]) == 0
        return capsys.readouterr().out

    return get


def _option_help(text: str, flag: str) -> str:
    """The help entry of ``flag`` in ``--help`` output, as one line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"  {flag}([ ,]|$)", line):
            entry = [line]
            for nxt in lines[i + 1 :]:
                if not nxt.startswith("   "):  # the next option, group or the epilog
                    break
                entry.append(nxt)
            return " ".join(" ".join(entry).split())
    raise AssertionError(f"{flag} is not in the help")


def _default_after(text: str, flag: str) -> str | None:
    """The ``(default: ...)`` that the help of ``flag`` ends with."""
    entry = _option_help(text, flag)
    if not entry.endswith(")") or "(default: " not in entry:
        return None
    return entry.rsplit("(default: ", 1)[1][:-1]


@pytest.mark.parametrize("name", list(commands()))
def test_help_lists_every_option_with_the_api_default(help_text, name):
    command = commands()[name]
    text = help_text(*name.split())
    for p in command.params():
        assert _option_help(text, p.flag)
        assert p.help, f"{p.name} has no docstring entry"
    # defaults read from the signature, never re-typed
    sig = inspect.signature(command.function).parameters
    for p in command.params():
        if p.name in sig and type(sig[p.name].default) in (int, float, str):
            assert _default_after(text, p.flag) == str(sig[p.name].default), p.flag


def test_help_of_train_has_every_training_setting(help_text):
    text = help_text("train")
    defaults = sct.TrainingConfig()
    assert _default_after(text, "--n-tokens") == str(defaults.n_tokens)
    assert _default_after(text, "--batch-size") == str(defaults.batch_size)
    assert _default_after(text, "--skip") == "--no-skip"
    sig = inspect.signature(sct.tl.trace_circuit).parameters
    trace = help_text("trace")
    assert _default_after(trace, "--node-threshold") == str(sig["node_threshold"].default)
    assert _default_after(trace, "--edge-threshold") == str(sig["edge_threshold"].default)
    assert _default_after(trace, "--head-nodes") == ",".join(sig["head_nodes"].default)
    for code in EXIT_CODES:
        assert re.search(rf"^ +{code}  ", text, re.MULTILINE), code


@pytest.mark.slow  # three trainings
def test_resume_after_an_interruption(pipeline, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first checkpoint: exit 130, no output; ``--resume`` ends where an
    uninterrupted run does.
    """
    from sctranscoder.core.training import checkpoint as ckpt

    _, files, _, _ = pipeline
    settings = ["--n-tokens", 1024, "--batch-size", 256, "--buffer-tokens", 512, "--device", "cpu"]
    code, _, err = _run(capsys, "train", files["s"], "-o", tmp_path / "full.h5ad", *settings, "-q")
    assert code == 0, err

    save = ckpt.Checkpoints.save

    def save_then_stop(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt

    out = tmp_path / "resumed.h5ad"
    run = ["train", files["s"], "-o", out, *settings, "--checkpoint-dir", tmp_path / "ck"]
    run += ["--checkpoint-every", 512, "-q"]
    with monkeypatch.context() as m:
        m.setattr(ckpt.Checkpoints, "save", save_then_stop)
        code, summary, err = _run(capsys, *run)
    assert code == 130
    assert summary is None
    assert "interrupted" in err
    assert not out.exists()
    assert (tmp_path / "ck" / ckpt.FILENAME).exists()

    code, _, err = _run(capsys, *run, "--resume")
    assert code == 0, err
    full, resumed = (sc.read_h5ad(tmp_path / n).uns["sct"] for n in ("full.h5ad", "resumed.h5ad"))
    for layer, weights in full["transcoders"].items():
        for name in ("W_enc", "W_dec"):
            np.testing.assert_array_equal(resumed["transcoders"][layer][name], weights[name])


# -- exit codes and atomic output -----------------------------------------------------------------


def test_missing_input_file(capsys, tmp_path):
    code, summary, err = _run(capsys, "train", tmp_path / "nope.h5ad", "-o", tmp_path / "o.h5ad")
    assert code == 3
    assert summary is None
    assert err.strip().splitlines() == [
        f"sctranscoder train: error: input {tmp_path / 'nope.h5ad'} does not exist."
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--n-tokens", "many"],  # not an int
        ["--aggregate-typo", "1"],  # unknown option
        ["--layers", "0,x"],  # not a list of ints
    ],
)
def test_bad_option_value_is_usage(pipeline, capsys, tmp_path, argv):
    _, files, _, _ = pipeline
    code, _, err = _run(capsys, "train", files["s"], "-o", tmp_path / "o.h5ad", *argv)
    assert code == 2
    assert "error:" in err
    assert not (tmp_path / "o.h5ad").exists()


def test_usage_errors(pipeline, capsys, tmp_path, monkeypatch):
    _, files, _, _ = pipeline
    assert _run(capsys, "train", files["s"])[0] == 2  # neither -o nor --in-place
    assert _run(capsys, "train", files["s"], "-o", tmp_path, *TRAIN)[0] == 2  # a directory
    assert _run(capsys, "train", files["s"], "-o", tmp_path / "o.zarr", *TRAIN)[0] == 2
    code, _, err = _run(capsys, "export", "transcoders", files["t"], tmp_path / "w", "--link")
    assert code == 2
    assert "--in-place" in err
    assert not (tmp_path / "w").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    code, _, err = _run(capsys, "activations", files["t"], "-o", tmp_path / "a.h5ad")
    assert code == 2
    assert "only `train` runs data-parallel" in err


@pytest.mark.parametrize(
    ("command", "argv", "message"),
    [
        ("train", ["--k", 0], "k must be"),
        ("train", ["--n-tokens", 100, "--batch-size", 512], "must be at least one batch"),
        ("trace", ["--cell", "no-such-cell"], "is not in adata.obs_names"),
    ],
)
def test_validation_errors(pipeline, capsys, tmp_path, command, argv, message):
    _, files, _, _ = pipeline
    out = tmp_path / "o.h5ad"
    code, summary, err = _run(capsys, command, files["a"], "-o", out, *argv)
    assert code == 4
    assert summary is None
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"sctranscoder {command}: error: ")
    assert message in lines[-1]
    assert "Traceback" not in err
    assert not out.exists()


def test_api_argument_names_get_their_options(pipeline, capsys, tmp_path):
    _, files, _, _ = pipeline
    code, _, err = _run(
        capsys, "export", "circuit-tracer-transcoders", files["t"], tmp_path / "ct",
        "--model-name", "m",
    )  # fmt: skip
    assert code == 4
    assert "allow_topk=True" in err
    assert err.rstrip().endswith("[options: --allow-topk]")


def test_debug_prints_the_traceback(pipeline, capsys, tmp_path):
    _, files, _, _ = pipeline
    code, _, err = _run(
        capsys, "train", files["s"], "-o", tmp_path / "o.h5ad", "--k", "0", "--debug"
    )
    assert code == 4
    assert "Traceback" in err


@pytest.mark.parametrize(
    ("raised", "code"),
    [(OSError("disk full"), 5), (KeyboardInterrupt(), 130), ("SIGTERM", 143)],
)
def test_failed_write_leaves_the_old_output(pipeline, capsys, monkeypatch, raised, code):
    """A write that fails half-way (or is interrupted) keeps the previous output, byte for byte,
    and leaves no temporary file.
    """
    _, files, root, _ = pipeline
    folder = root / f"atomic_{code}"
    folder.mkdir()
    out = folder / "out.h5ad"
    shutil.copy(files["s"], out)
    before = out.read_bytes()
    write = ad.AnnData.write_h5ad

    def half_written(self, filename, **kwargs):
        write(self, filename, **kwargs)
        with open(filename, "r+b") as fh:
            fh.truncate(1000)  # a half-written file
        if raised == "SIGTERM":  # as a scheduler's time limit: the handler raises here
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise raised

    monkeypatch.setattr(ad.AnnData, "write_h5ad", half_written)
    result, summary, err = _run(
        capsys, "sentences", files["s"], "-o", out, "--key-added", "again", "-q"
    )
    assert result == code, err
    assert summary is None
    assert out.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["out.h5ad"]


# -- the option generator -------------------------------------------------------------------------


def test_forms_of_annotations():
    form = Form.of(list[int] | None)
    assert (form.kind, form.item, form.optional) == ("list", int, True)
    assert form.parse("0, 2") == [0, 2]
    assert form.parse("none") is None
    assert form.parse("") == []
    assert Form.of(int).parse("2e6") == 2_000_000
    with pytest.raises(ValueError, match=r"2\.5"):
        Form.of(int).parse("2.5")
    from typing import Literal

    choice = Form.of(Literal["shuffled"] | None)
    assert choice.parse("shuffled") == "shuffled"
    assert choice.parse("None") is None
    with pytest.raises(ValueError, match="other"):
        choice.parse("other")
    assert Form.of(bool).kind == "bool"
    assert Form.of(str | os.PathLike | None).item is str
    assert Form.of(dict) is None


def test_a_parameter_without_a_form_is_refused():
    def tool(adata, *, callback: dict | None = None, n: int = 3):
        """A tool.

        Parameters
        ----------
        adata
            Data.
        callback
            Not for a shell.
        n
            A count.
        """

    with pytest.raises(TypeError, match=r"'callback'.*no command-line form"):
        function_params(tool, skip=["adata"])
    (param,) = function_params(tool, skip=["adata", "callback"])
    assert (param.name, param.default, param.help) == ("n", 3, "A count.")


def test_docstring_entries_share_a_text_and_drop_markup():
    docs = docstring_entries(sct.tl.trace_circuit)
    assert docs["node_threshold"] == docs["edge_threshold"]
    assert docs["key"] == "adata.uns key of the transcoders."
    assert "``" not in "".join(docs.values())
    assert ":func:" not in "".join(docs.values())


def test_docs_page_lists_every_command_and_exit_code():
    text = DOCS.read_text()
    for name in commands():
        assert f"sctranscoder {name}" in text, name
    for code in EXIT_CODES:
        assert f"| {code} |" in text, code


# -- torchrun ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)
def test_torchrun_two_processes(pipeline, tmp_path):
    _, files, _, _ = pipeline
    out = tmp_path / "ddp.h5ad"
    proc = _subprocess(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "sctranscoder", "train", files["s"], "-o", out, *TRAIN, "-q", timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 reports; rank 1 writes nothing
    assert json.loads(lines[0])["output"] == str(out)
    params = sc.read_h5ad(out).uns["sct"]["params"]
    assert params["world_size"] == 2
    assert params["tokens_seen"] == N_TOKENS
    assert [p.name for p in tmp_path.iterdir()] == ["ddp.h5ad"]
