"""The explorer (sct.pl.explorer): one self-contained HTML file, its data, its checks, and the
page itself in a real browser (headless Chromium driven by playwright).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import EVERYTHING_LAYER

import sctranscoder as sct
from sctranscoder.pl import _explorer

EXTERNAL = re.compile(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


@pytest.fixture(scope="module")
def adata(everything, model):
    """Every record the explorer shows: activations, annotation, ranking (layer 2), a circuit
    with its enrichment and score, a gene attribution and feature connections.
    """
    adata, _ = everything
    adata = adata.copy()
    feature = str(adata.uns["ga"]["params"]["feature"])
    sct.tl.feature_connections(adata, [feature], model, n_top=5)
    return adata


@pytest.fixture(scope="module")
def written(adata, tmp_path_factory):
    path = tmp_path_factory.mktemp("explorer") / "pbmc_explorer.html"
    result = sct.pl.explorer(adata, path)
    return result, path


def _data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    match = re.search(
        r'<script type="application/json" id="sct-data">(.*?)</script>', text, re.DOTALL
    )
    assert match, "the data is embedded as JSON"
    return json.loads(match.group(1))


def _circuit_key(adata) -> str:
    return next(k for k in adata.uns if sct._records.record_kind(adata.uns[k]) == "circuit")


def _decoded(entry: dict, n_features: int) -> np.ndarray:
    """Cells x features activations of one layer, decoded as the page decodes them."""
    import base64

    n = entry["n_cells"]
    scale = np.array([np.nan if m is None else m for m in entry["max"]]) / 255
    out = np.zeros((n, n_features))
    data = np.frombuffer(base64.b64decode(entry["data"]), dtype=np.uint8)
    if entry["format"] == "dense":
        features = np.frombuffer(base64.b64decode(entry["features"]), dtype=np.uint32)
        q = data.reshape(len(features), n).T
        out[:, features] = q * scale[features]
    else:
        indptr = np.frombuffer(base64.b64decode(entry["indptr"]), dtype=np.uint32)
        cells = np.frombuffer(
            base64.b64decode(entry["cells"]), dtype=np.uint32 if entry["wide"] else np.uint16
        )
        for j in range(n_features):
            lo, hi = indptr[j], indptr[j + 1]
            out[cells[lo:hi], j] = data[lo:hi] * scale[j]
    return out


# -- the file -------------------------------------------------------------------------------------


def test_the_file_is_self_contained(written):
    result, path = written
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # the markup and the style load nothing (no src/href to a server, no <link>, no url(...));
    # plotly.js mentions web addresses in strings (map tiles, its logo's link) that only maps
    # and the mode bar's logo (turned off) would use: the browser test watches the requests
    markup = re.sub(r"<script\b[^>]*>.*?</script>", "", text, flags=re.DOTALL | re.IGNORECASE)
    assert not EXTERNAL.findall(markup), "nothing is loaded from the network"
    assert "<link" not in markup.lower()
    assert "url(" not in markup.lower()
    assert "@import" not in markup.lower()
    scripts = re.findall(r"<script\b([^>]*)>", text, flags=re.IGNORECASE)
    assert len(scripts) == 3  # the data, plotly.js, ours: all inline
    assert all("src" not in attributes.lower() for attributes in scripts)
    ours = Path(_explorer.__file__).parent / "_explorer_assets" / "explorer.js"
    assert "http" not in ours.read_text(encoding="utf-8")
    # plotly.js inline, with its licence notice
    assert "window.Plotly" in text
    assert "plotly.js v" in text
    assert "MIT License" in text
    assert "Permission is hereby granted" in text
    assert os.fspath(result) == str(path)
    assert result.n_bytes == path.stat().st_size


def test_the_data_round_trips(adata, written):
    _, path = written
    data = _data(path)
    layers = data["meta"]["layers"]
    assert layers == [0, 1, 2, 3]
    offset = 0
    for layer, n in zip(layers, data["meta"]["n_features"], strict=True):
        table = sct.get.feature_table(adata, layer, n_top=20)
        rates = np.array(data["features"]["rate"][offset : offset + n], dtype=float)
        np.testing.assert_allclose(rates, table["firing_rate"], rtol=1e-5)
        assert data["features"]["live"][offset : offset + n] == table["live"].astype(int).tolist()
        # top genes, in order, and the best term with its FDR
        j = int(np.argmax(table["n_genes"]))
        genes = [data["genes"][i] for i in data["features"]["top_genes"][offset + j]]
        assert genes == table["top_genes"].iloc[j].split(";")
        term = data["features"]["term"][offset + j]
        assert (data["terms"][term] if term >= 0 else "") == table["ora_term"].iloc[j]
        fdr = data["features"]["fdr"][offset + j]
        if np.isfinite(table["ora_fdr"].iloc[j]):
            assert fdr == pytest.approx(table["ora_fdr"].iloc[j], rel=1e-2)
        # per-cell activations: every non-zero kept, within half a quantisation step
        X = adata.obsm[f"X_sct_L{layer}"].toarray()
        got = _decoded(data["activations"][str(layer)], n)
        assert ((got > 0) == (X > 0)).all()
        step = X.max(0) / 255
        assert (np.abs(got - X) <= step / 2 + 1e-4 * X.max(0) + 1e-6).all()
        offset += n


def test_groups_come_from_the_ranking_else_from_obs(adata, written):
    _, path = written
    data = _data(path)
    assert data["meta"]["groupby"] == "bulk_labels"
    names = data["groups"]["names"]
    n = data["meta"]["n_features"][0]
    # layer 2: the ranking's top group ("/" written as the look-alike "∕" there)
    spec = adata.uns["rank_features_groups"]["specificity"]
    spec = spec[spec["layer"] == EVERYTHING_LAYER]
    start = EVERYTHING_LAYER * n
    for row in spec.head(50).itertuples():
        code = data["features"]["group"][start + int(row.feature)]
        assert (names[code] if code >= 0 else "").replace("/", "∕") == row.top_group
    # layer 0 (not ranked): the group with the highest mean activation, from obs
    X = adata.obsm["X_sct_L0"].toarray()
    groups = adata.obs["bulk_labels"].astype(str).to_numpy()
    by_group = pd.DataFrame(X).groupby(groups).mean().to_numpy()
    ordered = np.sort(by_group, axis=0)
    j = int(np.argmax(ordered[-1] - ordered[-2]))  # a feature without ties at the top
    means = pd.Series(X[:, j]).groupby(groups).mean()
    assert names[data["features"]["group"][j]] == means.idxmax()
    assert data["features"]["group_mean"][j] == pytest.approx(means.max(), rel=1e-3)


def test_circuits_attributions_and_connections_are_embedded(adata, written):
    _, path = written
    data = _data(path)
    key = _circuit_key(adata)
    (circuit,) = data["circuits"]
    record = adata.uns[key]
    assert circuit["key"] == key
    assert circuit["nodes"]["id"] == [str(n) for n in record["nodes"].index]
    assert len(circuit["edges"]["source"]) == len(record["edges"])
    np.testing.assert_allclose(
        circuit["nodes"]["influence"], record["nodes"]["influence"], rtol=1e-3, atol=1e-9
    )
    table = adata.uns[f"{key}_enrichment"]["table"]
    assert circuit["enrichment"]["rows"][0][0] == table["term"].iloc[0]
    columns = {s["column"] for s in circuit["scores_per_cell"]}
    assert columns == {f"{key}_score", f"{key}_score_genes"}
    score = next(s for s in circuit["scores_per_cell"] if s["column"] == f"{key}_score")
    np.testing.assert_allclose(score["values"], adata.obs[f"{key}_score"], rtol=1e-3)
    feature = str(adata.uns["ga"]["params"]["feature"])
    attribution = data["attribution"][feature]
    assert attribution["genes"] == adata.uns["ga"]["genes"]["gene"].head(20).tolist()
    partners = {row[0] for row in data["connections"][feature]}
    expected = adata.uns["feature_connections"]["connections"]
    assert partners == set(expected.loc[expected["feature"] == feature, "partner"])


def test_the_log_says_what_was_written(adata, tmp_path, sct_logs):
    path = tmp_path / "x.html"
    sct.pl.explorer(adata, path)
    message = " ".join(r.getMessage() for r in sct_logs.records)
    assert str(path) in message
    assert re.search(r"\d+\.\d MiB", message)


def test_jupyter_shows_the_file_in_an_iframe(written):
    result, path = written
    shown = result._repr_html_()
    assert shown.startswith("<iframe srcdoc=")
    srcdoc = re.match(r'<iframe srcdoc="([^"]*)"', shown).group(1)
    assert html.unescape(srcdoc) == path.read_text(encoding="utf-8")


def test_max_cells_keeps_the_circuit_cell(adata, tmp_path):
    path = tmp_path / "few.html"
    sct.pl.explorer(adata, path, max_cells=20, layers=[2])
    data = _data(path)
    cell = adata.uns[_circuit_key(adata)]["params"]["cell"]
    assert len(data["cells"]["names"]) == 20
    assert cell in data["cells"]["names"]
    assert data["meta"]["layers"] == [2]
    assert data["meta"]["n_cells"] == adata.n_obs
    positions = [adata.obs_names.get_loc(n) for n in data["cells"]["names"]]
    assert positions == sorted(positions)
    x = np.asarray(adata.obsm["X_umap"])[positions, 0]
    np.testing.assert_allclose(data["cells"]["x"], x, atol=1e-3)


def test_activations_alone_are_enough(trained_base, tmp_path):
    path = tmp_path / "plain.html"
    sct.pl.explorer(trained_base, path, basis=None)
    data = _data(path)
    assert data["circuits"] == []
    assert data["meta"]["annotation"] is None
    assert data["meta"]["groupby"] is None
    assert data["cells"]["x"] is None
    assert set(data["features"]["term"]) == {-1}


def test_an_sae_s_concepts_are_explored_per_cell(pbmc, tmp_path):
    """Concepts of a TopK SAE on any embedding (here PCA) get the same explorer."""
    sct.tl.train_sae(pbmc, use_rep="X_pca", n_steps=50, progress=False)
    path = tmp_path / "sae.html"
    sct.pl.explorer(pbmc, path, activations_key="sae_activations", groupby="bulk_labels")
    data = _data(path)
    assert data["meta"]["activations_key"] == "sae_activations"
    assert data["meta"]["unit"] == "cell"  # firing rates per cell, not per token
    assert data["meta"]["n_features"] == [pbmc.obsm["X_sae"].shape[1]]
    assert data["meta"]["n_cells"] == pbmc.n_obs


# -- bad input: refused before anything is written ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [
        ("x.png", {}, ValueError, r"must end in \.html"),
        ("x", {}, ValueError, r"must end in \.html"),
        ("missing/x.html", {}, FileNotFoundError, "does not exist: create it"),
        ("x.html", {"groupby": "nope"}, KeyError, "not a column of adata.obs"),
        ("x.html", {"basis": "tsne"}, KeyError, "sc.tl.umap"),
        ("x.html", {"activations_key": "nope"}, KeyError, "sct.tl.feature_activations"),
        ("x.html", {"annotation_key": "nope"}, KeyError, "annotate_features"),
        ("x.html", {"rank_key": "nope"}, KeyError, "rank_features_groups"),
        ("x.html", {"circuits": ["nope"]}, KeyError, "trace_circuit"),
        ("x.html", {"layers": [9]}, KeyError, "layer"),
        ("x.html", {"max_cells": 0}, ValueError, "max_cells"),
        ("x.html", {"overwrite": "yes"}, TypeError, "overwrite"),
    ],
)
def test_bad_input_is_refused(adata, tmp_path, name, kwargs, error, match):
    with pytest.raises(error, match=match):
        sct.pl.explorer(adata, tmp_path / name, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_missing_activations_name_the_tool_to_run(pbmc, tmp_path):
    with pytest.raises(KeyError, match=r"sct\.tl\.feature_activations"):
        sct.pl.explorer(pbmc, tmp_path / "x.html")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_only_with_overwrite(adata, tmp_path):
    path = tmp_path / "x.html"
    path.write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sct.pl.explorer(adata, path, layers=[0])
    assert path.read_text() == "mine"
    with pytest.raises(IsADirectoryError):
        sct.pl.explorer(adata, tmp_path, layers=[0])
    (tmp_path / "dir.html").mkdir()
    with pytest.raises(IsADirectoryError):
        sct.pl.explorer(adata, tmp_path / "dir.html", layers=[0])
    sct.pl.explorer(adata, path, layers=[0], overwrite=True)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.html", "x.html"]


# -- in a browser ---------------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip(
        "no system Chromium (`chromium` on PATH): install Debian's package `chromium` "
        "(.ci/run does) to run the explorer's browser tests"
    )


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'"
    )
    executable = _chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


class _Watched:
    """A page whose console errors, uncaught exceptions and network requests are recorded."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", self._request)

    def _request(self, request):
        if not request.url.startswith(("file:", "data:", "blob:", "about:")):
            self.requests.append(request.url)


def _search_text(data: dict, g: int) -> str:
    f = data["features"]
    layer = f["layer"][g]
    j = g - sum(
        n
        for l_, n in zip(data["meta"]["layers"], data["meta"]["n_features"], strict=True)
        if l_ < layer
    )
    term = data["terms"][f["term"][g]] if f["term"][g] >= 0 else ""
    group = data["groups"]["names"][f["group"][g]] if f["group"][g] >= 0 else ""
    genes = " ".join(data["genes"][i] for i in f["top_genes"][g])
    return f"L{layer}F{j} {genes} {term} {group}".lower()


def _drawn_edges(page) -> int:
    """Edges in the plotted traces (each edge is one curve ended by a gap)."""
    return page.evaluate(
        """() => document.getElementById("circuit-graph").data
            .filter((t) => t.meta === "edges")
            .reduce((n, t) => n + t.x.filter((v) => v === null).length, 0)"""
    )


def test_in_a_browser(browser, adata, written, tmp_path):
    _, path = written
    data = _data(path)
    watched = _Watched(browser)
    page = watched.page
    page.goto(path.as_uri())
    page.wait_for_selector("html[data-sct-ready='1']")
    n_features = sum(data["meta"]["n_features"])
    assert page.inner_text("#feature-count") == f"{n_features:,} of {n_features:,} features"
    page.screenshot(path=tmp_path / "table.png")

    # search: every word must match a feature's name, genes, gene set or group
    gene = data["genes"][data["features"]["top_genes"][2 * 1024][0]]
    expected = sum(gene.lower() in _search_text(data, g) for g in range(n_features))
    page.fill("#feature-search", gene)
    page.wait_for_function(
        f"document.getElementById('feature-count').textContent.startsWith('{expected:,} of')"
    )
    assert 0 < expected < n_features
    rows = page.locator("#feature-table tbody tr")
    assert rows.count() == min(expected, 50)

    # sort by firing rate, ascending then descending
    page.click("#feature-table th[data-key='rate']")
    rates = [
        float(r) for r in page.locator("#feature-table tbody td:nth-child(3)").all_inner_texts()
    ]
    assert rates == sorted(rates)
    page.click("#feature-table th[data-key='rate']")
    rates = [
        float(r) for r in page.locator("#feature-table tbody td:nth-child(3)").all_inner_texts()
    ]
    assert rates == sorted(rates, reverse=True)

    # click a row: the feature's page, with its top genes and the cells plotted
    feature = str(adata.uns["ga"]["params"]["feature"])
    page.fill("#feature-search", feature)
    page.wait_for_selector(f"#feature-table tbody tr[data-feature='{feature}']")
    page.click(f"#feature-table tbody tr[data-feature='{feature}'] td:nth-child(3)")
    page.wait_for_selector("#feature-umap .main-svg")
    assert page.inner_text("#feature-name") == feature
    table = sct.get.feature_table(adata, EVERYTHING_LAYER, n_top=20)
    ticks = page.locator("#feature-genes .ytick text").all_text_contents()
    assert set(ticks) == set(table.loc[feature, "top_genes"].split(";"))
    points = page.locator("#feature-umap .scatterlayer .point").count()
    assert points == adata.n_obs
    attributed = page.locator("#feature-attribution .ytick text").all_text_contents()
    assert set(attributed) == set(adata.uns["ga"]["genes"]["gene"].head(20))
    assert page.locator("#feature-connections a").count() > 0
    page.screenshot(path=tmp_path / "feature.png", full_page=True)

    # the circuit: a real click on its most influential feature opens that feature
    page.click("nav.tabs a[data-tab='circuits']")
    page.click("#circuit-table tbody tr:first-child td:nth-child(2)")
    page.wait_for_selector("#circuit-graph .main-svg")
    key = _circuit_key(adata)
    nodes = adata.uns[key]["nodes"]
    edges = adata.uns[key]["edges"]
    count = page.locator("#circuit-edge-count")
    assert len(nodes) > 81
    assert count.get_attribute("data-nodes") == "81"  # the 80 most influential and the target
    page.locator("#circuit-node-threshold").fill(str(len(nodes) - 1))
    assert count.get_attribute("data-nodes") == str(len(nodes))
    assert _drawn_edges(page) == len(edges)
    page.screenshot(path=tmp_path / "circuit.png", full_page=True)
    feats = nodes[nodes["type"] == "feature"]
    top = feats["influence"].abs().idxmax()
    name = f"L{int(feats.at[top, 'layer'])}F{int(feats.at[top, 'feature'])}"
    where = page.evaluate(f"sctExplorer.nodePosition({top!r})")
    page.mouse.move(where["x"], where["y"])
    page.wait_for_selector(".hoverlayer .hovertext")
    assert name in page.locator(".hoverlayer .hovertext").text_content()
    page.mouse.click(where["x"], where["y"])
    page.wait_for_function(f"document.getElementById('feature-name')?.textContent === '{name}'")
    assert page.evaluate("sctExplorer.route()") == f"/feature/{name}"

    # back to the circuit; the edge threshold prunes edges (keyboard on the slider)
    page.go_back()
    page.wait_for_selector("#circuit-graph .main-svg")
    slider = page.locator("#circuit-edge-threshold")
    slider.focus()
    for _ in range(30):
        page.keyboard.press("ArrowRight")
    assert slider.input_value() == "30"
    # what the page holds (weights rounded to 4 digits)
    w = np.abs(np.array(data["circuits"][0]["edges"]["weight"], dtype=float))
    kept = int(((w >= 0.30 * w.max()) & (w > 0)).sum())
    page.wait_for_function(f"sctExplorer.drawnEdges() === {kept}")
    assert 0 < kept < len(edges)
    assert _drawn_edges(page) == kept
    assert count.get_attribute("data-edges") == str(kept)
    # fewer nodes: the 20 most influential and the target, and the edges among them
    page.locator("#circuit-node-threshold").fill("20")
    assert count.get_attribute("data-nodes") == "21"
    embedded = data["circuits"][0]
    influence = np.abs(np.array(embedded["nodes"]["influence"], dtype=float))
    is_target = np.array(embedded["nodes"]["type"]) == "target"
    order = np.lexsort((np.arange(len(influence)), -influence, ~is_target))
    on = np.zeros(len(influence), dtype=bool)
    on[order[:21]] = True
    src, dst = (np.array(embedded["edges"][k]) for k in ("source", "target"))
    among = int((on[src] & on[dst] & (w >= 0.30 * w.max()) & (w > 0)).sum())
    assert _drawn_edges(page) == among < kept

    # the circuit's cell: its sentence, each gene with its influence
    page.click("#circuit-name a")
    page.wait_for_selector("#cell-sentence .chip")
    cell = adata.uns[key]["params"]["cell"]
    assert page.inner_text("#cell-name") == cell
    sentence = adata.obs.loc[cell, "cell_sentence"].split()
    chips = page.locator("#cell-sentence .chip")
    assert chips.count() == len(sentence)
    genes = adata.uns[key]["genes"]
    first = genes.index[0]
    chip = page.locator(f"#cell-sentence .chip[data-gene='{first}'] small")
    assert chip.inner_text() == _fmt2(genes.at[first, "influence"])
    page.screenshot(path=tmp_path / "cell.png", full_page=True)

    assert watched.errors == []
    assert watched.requests == []
    assert all((tmp_path / f"{p}.png").stat().st_size > 10_000 for p in ("table", "circuit"))
    page.close()


def _fmt2(x: float) -> str:
    """The page's fmt(x, 2) for a value in [1e-3, 1e4)."""
    return f"{float(f'{x:.2g}'):g}" if abs(x) >= 1e-3 else f"{x:.1e}".replace("e-0", "e-")


def test_in_a_notebook_iframe(browser, written, tmp_path):
    """The object Jupyter shows: the file in an iframe's srcdoc, navigable inside it."""
    result, _ = written
    host = tmp_path / "notebook.html"
    host.write_text(f"<!DOCTYPE html><html><body>{result._repr_html_()}</body></html>")
    watched = _Watched(browser)
    page = watched.page
    page.goto(host.as_uri())
    frame = page.frame_locator("iframe")
    frame.locator("html[data-sct-ready='1']").wait_for(state="attached")
    row = frame.locator("#feature-table tbody tr").first
    name = row.get_attribute("data-feature")
    row.locator("td:nth-child(3)").click()
    frame.locator("#feature-umap .main-svg").first.wait_for()
    assert frame.locator("#feature-name").inner_text() == name
    assert watched.errors == []
    assert watched.requests == []
    page.close()


def test_sparse_activations_decode_in_the_page(browser, adata, tmp_path):
    """Sparse per-cell activations (each cell's 20 strongest features): stored sparsely, and
    decoded by the page into the same values (a feature over cells, a cell's top features).
    """
    from scipy import sparse

    thin = adata.copy()
    X = thin.obsm["X_sct_L2"].toarray()
    cutoff = -np.sort(-X, axis=1)[:, 19:20]
    thin.obsm["X_sct_L2"] = sparse.csr_matrix(np.where(X >= cutoff, X, 0), dtype=np.float32)
    path = tmp_path / "sparse.html"
    sct.pl.explorer(thin, path, layers=[2])
    data = _data(path)
    entry = data["activations"]["2"]
    assert entry["format"] == "sparse"
    decoded = _decoded(entry, data["meta"]["n_features"][0])
    assert ((decoded > 0) == (thin.obsm["X_sct_L2"].toarray() > 0)).all()
    watched = _Watched(browser)
    page = watched.page
    page.goto(path.as_uri())
    page.wait_for_selector("html[data-sct-ready='1']")
    for j in np.flatnonzero(decoded.any(0))[:5]:
        got = page.evaluate(f"sctExplorer.column('L2F{j}')")
        np.testing.assert_allclose(got, decoded[:, j], rtol=1e-6)
    cell = data["cells"]["names"][3]
    page.evaluate(f"sctExplorer.go('/cell/' + encodeURIComponent({cell!r}))")
    page.wait_for_selector("#cell-features a")
    shown = [int(t[len("L2F") :]) for t in page.locator("#cell-features a").all_inner_texts()]
    sixth = np.sort(decoded[3])[-6]
    assert len(shown) == 6
    assert all(decoded[3, j] >= sixth for j in shown)
    assert watched.errors == []
    page.close()
