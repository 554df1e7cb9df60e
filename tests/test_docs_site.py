"""The documentation site's own code: the links conf.py rewrites, the checks of check_site.py.

Building the site (``make docs``) and opening it in Chromium (``scripts/check_site.py``) are
CI steps, not tests; these check the parts that decide what those steps report, without either.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conf = _load(ROOT / "docs" / "conf.py", "sct_docs_conf")
check_site = _load(ROOT / "scripts" / "check_site.py", "sct_check_site")


def test_github_links_of_the_pages_point_at_pages_of_the_site():
    text = (
        "[Q](../tutorials/01_quickstart.ipynb), [S](../src/sctranscoder/tl/_probe.py), "
        "[C](../CHANGELOG.md), [B](../benchmarks/README.md), [T](storage.md#overview), "
        "[R](../README.md), [U](https://example.org/x.md)"
    )
    source = [text]
    conf.rewrite_links(None, "api", source)
    assert source[0] == (
        "[Q](tutorials/01_quickstart.ipynb), [S](src:tl/_probe), "
        "[C](changelog.md), [B](benchmarks.md), [T](storage.md#overview), "
        # a file the site does not show stays as it is, and the build (-W) fails on it
        "[R](../README.md), [U](https://example.org/x.md)"
    )
    # the notebooks' own pages are not rewritten
    source = [text]
    conf.rewrite_links(None, "tutorials/02_circuits", source)
    assert source[0] == text


def test_every_link_out_of_docs_is_one_the_site_shows():
    pages = sorted((ROOT / "docs").glob("*.md"))
    links = {
        path for page in pages for path, _ in conf._LINK.findall(page.read_text(encoding="utf-8"))
    }
    assert links, "the pages link to the tutorials, the source and the changelog"
    assert {link for link in links if conf._target(link) is None} == set()
    for link in links:  # and each target exists: a tutorial, a source file, an included file
        assert (ROOT / "docs" / link).resolve().is_file(), link


def test_tutorial_pages_show_progress_bars_at_their_last_state():
    def stream(name, text):
        return {"output_type": "stream", "name": name, "text": text}

    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "outputs": [
                    stream("stdout", "computing\n"),
                    stream("stderr", "\rbar:   0%| | 0/2"),
                    stream("stderr", ["\rbar:  50%|5| 1/2", "\rbar: 100%|#| 2/2"]),
                    stream("stderr", "\n"),
                    stream("stdout", "    finished\n"),
                    {"output_type": "execute_result", "data": {"text/plain": "1"}},
                ],
            },
            {"cell_type": "markdown", "source": "text"},
        ]
    }
    cells = conf._for_the_site(notebook)["cells"]
    assert [o.get("text") for o in cells[0]["outputs"]] == [
        "computing\n",
        "bar: 100%|#| 2/2\n",
        "    finished\n",
        None,
    ]
    assert cells[1] == {"cell_type": "markdown", "source": "text"}


class _Page:
    """What check_links reads of a playwright page: its elements' href/src and tag."""

    def __init__(self, targets):
        self.targets = targets

    def eval_on_selector_all(self, selector, script):
        return self.targets


def test_check_links_reports_missing_files_and_anchors(tmp_path):
    site = tmp_path / "html"
    (site / "_static").mkdir(parents=True)
    (site / "_static" / "theme.css").write_text("")
    (site / "storage.html").write_text('<h2 id="overview">Overview</h2>')
    index = site / "index.html"
    index.write_text('<p id="top"></p>')
    page = _Page(
        [
            ["_static/theme.css", "link"],
            ["storage.html#overview", "a"],
            ["#top", "a"],
            ["https://example.org/", "a"],
            ["mailto:someone@example.org", "a"],
            ["data:image/png;base64,AAAA", "img"],
            ["_images/missing.png", "img"],
            ["storage.html#no-such-anchor", "a"],
            ["../outside.html", "a"],
        ]
    )
    (tmp_path / "outside.html").write_text("")
    problems = check_site.check_links(page, index, site)
    assert len(problems) == 3, problems
    assert "_images/missing.png" in problems[0]
    assert "does not exist" in problems[0]
    assert "no anchor #no-such-anchor" in problems[1]
    assert "outside the site" in problems[2]
