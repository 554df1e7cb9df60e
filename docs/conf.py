"""Sphinx configuration of the sctranscoder documentation (``make docs``).

The scverse cookiecutter template's set-up: MyST Markdown pages and the tutorials rendered by
myst-nb (never executed here: they are committed with their outputs), the API reference
generated from the numpy docstrings by autosummary, the sphinx-book-theme. Nothing is fetched
from the network at build time (no intersphinx inventories).

The Markdown pages in ``docs/`` also read well on GitHub, where they link to files outside
``docs/`` (``../tutorials/01_quickstart.ipynb``, ``../src/sctranscoder/tl/_probe.py``,
``../CHANGELOG.md``). :func:`rewrite_links` points those links at their pages in the site.
"""

from __future__ import annotations

import json
import re
from datetime import date
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# -- Project ----------------------------------------------------------------------------------

project = "sctranscoder"
author = "sctranscoder developers"
copyright = f"{date.today():%Y}, {author}"
try:
    release = _version("sctranscoder")
except PackageNotFoundError:  # a source tree that was never installed
    release = "0+unknown"
version = release

# -- The tutorials --------------------------------------------------------------------------

#: The notebooks are committed once, in tutorials/; the build reads a copy in docs/tutorials/
#: (git-ignored), refreshed by setup() when a notebook changed, with its progress bars at their
#: last state. A symlink would not do: MyST resolves the links between notebooks through it,
#: outside the source directory.
TUTORIALS = HERE / "tutorials"


def _collapse_progress(text: str) -> str:
    """What a terminal (and Jupyter) shows of ``text``: each line from its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def _for_the_site(notebook: dict) -> dict:
    """The notebook with each run of stream outputs merged, progress bars at their last state.

    tqdm writes every update of a bar as its own output that starts with a carriage return; Jupyter
    overwrites them in place, but myst-nb would print each on a line of its own.
    """
    for cell in notebook.get("cells", []):
        merged: list[dict] = []
        for out in cell.get("outputs", []):
            last = merged[-1] if merged else None
            if (
                out.get("output_type") == "stream"
                and last is not None
                and last.get("output_type") == "stream"
                and last.get("name") == out.get("name")
            ):
                last["text"] = "".join(last["text"]) + "".join(out["text"])
            else:
                merged.append(dict(out))
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = _collapse_progress("".join(out["text"]))
        if "outputs" in cell:
            cell["outputs"] = merged
    return notebook


def copy_tutorials() -> None:
    """Copy every ``tutorials/*.ipynb`` that changed into ``docs/tutorials`` (and drop stale ones)."""
    TUTORIALS.mkdir(exist_ok=True)
    wanted = {p.name: p for p in sorted((ROOT / "tutorials").glob("*.ipynb"))}
    for stale in TUTORIALS.glob("*.ipynb"):
        if stale.name not in wanted:
            stale.unlink()
    for name, src in wanted.items():
        text = json.dumps(_for_the_site(json.loads(src.read_text(encoding="utf-8"))), indent=1)
        dst = TUTORIALS / name
        if not dst.exists() or dst.read_text(encoding="utf-8") != text:
            dst.write_text(text, encoding="utf-8")


# -- General ----------------------------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
# .rst first: autosummary writes its stubs with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
default_role = "literal"
pygments_style = "default"

# -- MyST and notebooks -----------------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # GitHub-style anchors, as the pages link them (storage.md#...)
# "src:" links are written by rewrite_links: a source file of the package, shown by viewcode.
myst_url_schemes = {
    "http": None,
    "https": None,
    "mailto": None,
    "src": "_modules/sctranscoder/{{path}}.html",
}
nb_execution_mode = "off"  # the tutorials are committed executed; CI runs them in the tests
nb_merge_streams = True

# -- API reference ----------------------------------------------------------------------------

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True

# -- HTML -------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "sctranscoder"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_js_files = ["custom.js"]
html_show_sphinx = False
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "use_download_button": True,
}

# -- Links written for GitHub, pointed at the site ------------------------------------------

#: Files outside docs/ that a page links to, and the page of the site that shows them.
PAGES = {
    "../CHANGELOG.md": "changelog.md",
    "../benchmarks/README.md": "benchmarks.md",
}
_LINK = re.compile(r"\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")


def _target(path: str) -> str | None:
    if path in PAGES:
        return PAGES[path]
    if path.startswith("../tutorials/") and path.endswith(".ipynb"):
        return path[len("../") :]
    if path.startswith("../src/sctranscoder/") and path.endswith(".py"):
        module = path[len("../src/sctranscoder/") : -len(".py")]
        return None if module.endswith("__init__") else f"src:{module}"
    return None


def rewrite_links(app, docname: str, source: list[str]) -> None:
    """Point links to files outside ``docs/`` at the pages that show them in the site.

    Tutorials (``../tutorials/X.ipynb``) are rendered from their copies in ``docs/tutorials``;
    source files of the package go to viewcode's pages; the changelog and the
    benchmarks' README to the pages that include them. Any other link outside ``docs/`` is left
    as it is, and the build then fails on it (``-W``).
    """
    if "/" in docname:  # only the hand-written pages at the top of docs/
        return

    def repl(match: re.Match) -> str:
        target = _target(match.group(1))
        if target is None:
            return match.group(0)
        return f"]({target}{match.group(2) or ''})"

    source[0] = _LINK.sub(repl, source[0])


_BOLD_LITERAL = re.compile(r"\*\*(``[^*]*?``)\*\*")


def literal_field_names(app, what, name, obj, options, lines: list[str]) -> None:
    """Show the fields a docstring's Returns lists (````params`` : dict``) as code, not bold.

    napoleon writes a field's name in bold, ``**``params``**``, which reStructuredText cannot
    nest: the backticks would show. Runs after napoleon (priority 600).
    """
    lines[:] = [_BOLD_LITERAL.sub(r"\1", line) for line in lines]


def setup(app):
    """Sphinx's hook for conf.py: copy the tutorials, rewrite the GitHub links of the pages."""
    copy_tutorials()
    app.connect("source-read", rewrite_links)
    app.connect("autodoc-process-docstring", literal_field_names, priority=600)
