"""Check the built documentation site in a real browser (headless Chromium).

Run ``make docs`` first, then ``python scripts/check_site.py --screenshots DIR``. It opens the
site's ``index.html`` and one tutorial page from disk (``file://``, as a reader who opens the
built site would) with playwright driving the system Chromium (Debian's ``chromium``; never a
browser downloaded by playwright), and checks

- the title of each page names the project, and the index's navigation lists the tutorials, the
  topic pages and the API reference;
- the tutorial page shows an output image of the notebook (loaded, not broken);
- every local ``href``/``src`` of both pages (links, images, style sheets, scripts) exists on
  disk, and a link to an anchor (``storage.html#overview``) finds that anchor in its page;

and saves a screenshot of each page into DIR. It exits 0 when all holds, 1 listing every
failure, and 2 when Chromium or the built site is missing (saying how to get them).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HTML = ROOT / "docs" / "_build" / "html"
DEFAULT_TUTORIAL = "tutorials/01_quickstart.html"
TITLE = "sctranscoder"
#: Link texts the index's navigation must hold (the sidebar's table of contents).
NAVIGATION = (
    "Quickstart",
    "Tracing circuits",
    "Feature interpretation",
    "Biology you can trust",
    "Workflow",
    "Interpretation",
    "Circuits",
    "Explorer",
    "Storage",
    "Scaling",
    "Model families",
    "Command line",
    "API overview",
    "API reference",
    "Changelog",
)
#: Schemes that are not files of the site.
EXTERNAL = ("http", "https", "mailto", "data", "javascript", "tel")
VIEWPORT = {"width": 1400, "height": 1000}


def chromium_path() -> str:
    """The system Chromium's executable, or exit 2 saying how to install it."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    print(
        "check_site: Chromium is not installed (no `chromium` on PATH). Install Debian's package "
        "(`sudo apt-get install chromium`; `.ci/run` does this when it can), then run again.",
        file=sys.stderr,
    )
    sys.exit(2)


def local_targets(page) -> list[tuple[str, str]]:
    """``(attribute value, kind)`` of every local href/src of the page."""
    values = page.eval_on_selector_all(
        "a[href], link[href], img[src], script[src], source[src], iframe[src]",
        """els => els.map(e => [e.getAttribute(e.hasAttribute('href') ? 'href' : 'src'),
                               e.tagName.toLowerCase()])""",
    )
    out = []
    for value, tag in values:
        scheme = urlsplit(value).scheme
        if value.startswith("//") or scheme in EXTERNAL:
            continue
        out.append((value, tag))
    return out


def check_links(page, page_file: Path, html_root: Path) -> list[str]:
    """Every local link and resource of ``page`` (opened from ``page_file``) that is missing."""
    problems = []
    anchors_cache: dict[Path, set[str]] = {}
    for value, tag in local_targets(page):
        parts = urlsplit(value)
        if parts.scheme == "file":
            target = Path(unquote(parts.path))
        elif parts.path:
            target = (page_file.parent / unquote(parts.path)).resolve()
        else:
            target = page_file
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"{page_file.name}: <{tag}> {value!r}: {target} does not exist")
            continue
        if html_root.resolve() not in target.resolve().parents:
            problems.append(f"{page_file.name}: <{tag}> {value!r} points outside the site")
            continue
        if parts.fragment and target.suffix == ".html":
            if target not in anchors_cache:
                text = target.read_text(encoding="utf-8", errors="replace")
                anchors_cache[target] = set(re.findall(r'\b(?:id|name)="([^"]+)"', text))
            if unquote(parts.fragment) not in anchors_cache[target]:
                problems.append(
                    f"{page_file.name}: <{tag}> {value!r}: no anchor #{parts.fragment} in "
                    f"{target.relative_to(html_root)}"
                )
    return problems


def check_index(page, index: Path) -> list[str]:
    problems = []
    title = page.title()
    if TITLE not in title:
        problems.append(f"index.html: title {title!r} does not name {TITLE!r}")
    nav = page.locator("nav.bd-docs-nav, #bd-docs-nav, .bd-sidebar-primary nav").first
    if nav.count() == 0:
        return [*problems, "index.html: no navigation (sidebar) found"]
    texts = [t.strip() for t in nav.locator("a:visible").all_inner_texts() if t.strip()]
    for wanted in NAVIGATION:
        if not any(t.startswith(wanted) for t in texts):
            problems.append(f"index.html: the navigation has no link {wanted!r} (it has {texts})")
    return problems


def check_tutorial(page, tutorial: Path) -> list[str]:
    problems = []
    title = page.title()
    if TITLE not in title:
        problems.append(f"{tutorial.name}: title {title!r} does not name {TITLE!r}")
    images = page.locator(".cell_output img")
    if images.count() == 0:
        return [*problems, f"{tutorial.name}: no output image (.cell_output img) on the page"]
    loaded = page.eval_on_selector_all(
        ".cell_output img", "els => els.map(e => e.complete && e.naturalWidth > 0)"
    )
    if not any(loaded):
        problems.append(f"{tutorial.name}: none of its {len(loaded)} output images loaded")
    elif not all(loaded):
        problems.append(f"{tutorial.name}: {loaded.count(False)} output images did not load")
    images.first.scroll_into_view_if_needed()
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, default=DEFAULT_HTML, help="the built site")
    parser.add_argument(
        "--tutorial", default=DEFAULT_TUTORIAL, help="the tutorial page, relative to --html"
    )
    parser.add_argument(
        "--screenshots", type=Path, required=True, help="folder for the screenshots"
    )
    args = parser.parse_args(argv)

    html = args.html.resolve()
    index = html / "index.html"
    tutorial = html / args.tutorial
    for path in (index, tutorial):
        if not path.is_file():
            print(f"check_site: {path} does not exist; build the site with `make docs`.")
            return 2
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("check_site: playwright is not installed: pip install -e '.[test]'")
        return 2

    args.screenshots.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        page.goto(index.as_uri(), wait_until="load")
        problems += check_index(page, index)
        problems += check_links(page, index, html)
        n_links = len(local_targets(page))
        page.screenshot(path=str(args.screenshots / "docs_index.png"))

        page.goto(tutorial.as_uri(), wait_until="load")
        problems += check_tutorial(page, tutorial)
        problems += check_links(page, tutorial, html)
        n_links += len(local_targets(page))
        n_images = page.locator(".cell_output img").count()
        page.screenshot(path=str(args.screenshots / "docs_tutorial.png"))
        problems += [f"JavaScript error: {e}" for e in errors]
        browser.close()

    shots = ", ".join(str(args.screenshots / n) for n in ("docs_index.png", "docs_tutorial.png"))
    if problems:
        print(f"check_site: {len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        print(f"screenshots: {shots}")
        return 1
    print(
        f"check_site: index and {args.tutorial} OK ({n_links} local links and resources, "
        f"{n_images} output images); screenshots: {shots}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
