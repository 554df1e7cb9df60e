"""``sctranscoder explore``: an .h5ad in, the explorer's .html out (sct.pl.explorer)."""

from __future__ import annotations

import json
import re

import pytest

from sctranscoder.cli import EXIT_CODES, main


@pytest.fixture(scope="module")
def h5ad(everything, tmp_path_factory):
    path = tmp_path_factory.mktemp("explore") / "pbmc.h5ad"
    adata, _ = everything
    adata.write_h5ad(path)
    return path


def _run(capsys, *argv) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def _data(path) -> dict:
    text = path.read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="sct-data">(.*?)</script>', text, re.S)
    return json.loads(match.group(1))


def test_explore_writes_the_html(h5ad, tmp_path, capsys):
    out = tmp_path / "pbmc_explorer.html"
    code, summary, err = _run(
        capsys, "explore", h5ad, out, "--layers", "1,2", "--max-cells", 40, "--title", "PBMC"
    )
    assert code == 0, err
    assert summary["command"] == "explore"
    assert summary["path"] == str(out)
    assert "output" not in summary  # the .h5ad is not written
    data = _data(out)
    assert data["meta"]["layers"] == [1, 2]
    assert data["meta"]["title"] == "PBMC"
    assert len(data["cells"]["names"]) == 40
    assert data["meta"]["groupby"] == "bulk_labels"  # the ranking's, by default
    assert re.search(r"writing the explorer .* to .*pbmc_explorer\.html", err)
    assert re.search(r"finished: \d+\.\d MiB", err)
    assert [p.name for p in tmp_path.iterdir()] == ["pbmc_explorer.html"]


def test_an_existing_output_needs_overwrite(h5ad, tmp_path, capsys):
    out = tmp_path / "x.html"
    out.write_text("mine")
    code, summary, err = _run(capsys, "explore", h5ad, out, "--layers", "0", "-q")
    assert code == 4, EXIT_CODES[4]
    assert summary is None
    assert "overwrite=True" in err
    assert "[options: --overwrite]" in err
    assert out.read_text() == "mine"
    code, _, err = _run(capsys, "explore", h5ad, out, "--layers", "0", "--overwrite", "-q")
    assert code == 0, err
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    ("output", "options", "code", "message"),
    [
        ("x.png", [], 4, "must end in .html"),
        ("missing/x.html", [], 3, "does not exist: create it"),
        ("x.html", ["--groupby", "nope"], 4, "not a column of adata.obs"),
        ("x.html", ["--basis", "tsne"], 4, "sc.tl.umap"),
        ("x.html", ["--max-cells", "zero"], 2, "invalid int value"),
    ],
)
def test_errors(h5ad, tmp_path, capsys, output, options, code, message):
    got, summary, err = _run(capsys, "explore", h5ad, tmp_path / output, *options)
    assert got == code, err
    assert summary is None
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_missing_input(tmp_path, capsys):
    code, _, err = _run(capsys, "explore", tmp_path / "nope.h5ad", tmp_path / "x.html")
    assert code == 3
    assert "does not exist" in err


def test_help_names_the_output_and_the_options(capsys):
    capsys.readouterr()
    assert main(["explore", "--help"]) == 0
    text = capsys.readouterr().out
    assert "OUTPUT.html" in text
    assert "Runs sctranscoder.pl.explorer" in text
    for flag in ("--groupby", "--basis", "--max-cells", "--circuits", "--overwrite"):
        assert flag in text
