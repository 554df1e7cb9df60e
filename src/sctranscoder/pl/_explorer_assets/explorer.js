/* sctranscoder explorer: navigation, the tables and the pages. The data is the JSON in
   #sct-data, written by sctranscoder.pl.explorer; plots are plotly.js (embedded above). */
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("sct-data").textContent);
  const M = D.meta;
  const F = D.features;
  const NF = F.layer.length;
  const CELLS = D.cells;
  const NC = CELLS.names.length;
  const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };

  // -- helpers ------------------------------------------------------------------------------------

  const $ = (sel, el) => (el || document).querySelector(sel);
  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function isNum(x) { return typeof x === "number" && isFinite(x); }
  function fmt(x, digits) {
    if (!isNum(x)) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (Number.isInteger(x) && a < 1e15) return x.toLocaleString("en-US");
    if (a >= 1e4 || a < 1e-3) return x.toExponential(Math.max((digits || 3) - 1, 0));
    return Number(x.toPrecision(digits || 3)).toString();
  }
  function decode(b64, Type) {
    const bin = atob(b64);
    const u8 = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
    return Type === Uint8Array ? u8 : new Type(u8.buffer);
  }
  function el(html) {
    const t = document.createElement("template");
    t.innerHTML = html.trim();
    return t.content.firstElementChild;
  }
  function purge(section) {
    section.querySelectorAll(".js-plotly-plot").forEach((div) => Plotly.purge(div));
  }
  function plot(div, traces, layout) {
    const base = { margin: { l: 60, r: 20, t: 10, b: 40 }, font: { size: 12 }, hoverlabel: { align: "left" }, paper_bgcolor: "#fff", plot_bgcolor: "#fff" };
    return Plotly.newPlot(div, traces, Object.assign(base, layout || {}), PLOT_CONFIG);
  }
  function groupName(code) { return code === null || code === undefined || code < 0 ? "" : D.groups.names[code]; }

  // -- features -----------------------------------------------------------------------------------

  const offsets = {};
  (function () {
    let o = 0;
    M.layers.forEach((l, i) => { offsets[l] = o; o += M.n_features[i]; });
  })();
  function fname(g) { const l = F.layer[g]; return "L" + l + "F" + (g - offsets[l]); }
  function findex(name) {
    const m = /^L(\d+)F(\d+)$/.exec(name || "");
    if (!m) return -1;
    const l = +m[1], j = +m[2], k = M.layers.indexOf(l);
    if (k < 0 || j >= M.n_features[k]) return -1;
    return offsets[l] + j;
  }
  function topGenes(g, n) { return F.top_genes[g].slice(0, n).map((i) => D.genes[i]); }
  function term(g) { return F.term[g] >= 0 ? D.terms[F.term[g]] : ""; }
  /** Whether feature g's best gene set passes the annotation's FDR threshold. */
  function significant(g) {
    const a = M.annotation;
    return !!(a && term(g) && isNum(F.fdr[g]) && isNum(a.fdr) && F.fdr[g] < a.fdr);
  }
  function featureLink(name) {
    return findex(name) >= 0 ? '<a href="#/feature/' + esc(name) + '">' + esc(name) + "</a>" : esc(name);
  }

  // -- per-cell activations (decoded per layer on first use) ----------------------------------------

  const layerCache = {};
  function layerActs(l) {
    if (layerCache[l]) return layerCache[l];
    const a = D.activations[String(l)];
    const r = { n: a.n_cells, max: a.max, format: a.format };
    if (a.format === "dense") {
      r.features = decode(a.features, Uint32Array);
      r.data = decode(a.data, Uint8Array);
      r.row = new Int32Array(a.max.length).fill(-1);
      r.features.forEach((f, i) => { r.row[f] = i; });
    } else {
      r.indptr = decode(a.indptr, Uint32Array);
      r.cells = decode(a.cells, a.wide ? Uint32Array : Uint16Array);
      r.data = decode(a.data, Uint8Array);
    }
    layerCache[l] = r;
    return r;
  }
  /** A feature's activation in every embedded cell (quantised: q / levels of its max). */
  function column(g) {
    const l = F.layer[g], j = g - offsets[l], a = layerActs(l);
    const out = new Float32Array(a.n);
    const s = (a.max[j] || 0) / M.levels;
    if (!s) return out;
    if (a.format === "dense") {
      const r = a.row[j];
      if (r < 0) return out;
      const base = r * a.n;
      for (let i = 0; i < a.n; i++) out[i] = a.data[base + i] * s;
    } else {
      for (let k = a.indptr[j]; k < a.indptr[j + 1]; k++) out[a.cells[k]] = a.data[k] * s;
    }
    return out;
  }
  /** The n most active features of cell c in layer l: [[global index, activation], ...]. */
  function cellTop(c, l, n) {
    const a = layerActs(l), out = [];
    if (a.format === "dense") {
      for (let r = 0; r < a.features.length; r++) {
        const q = a.data[r * a.n + c];
        if (q) { const j = a.features[r]; out.push([offsets[l] + j, (q * a.max[j]) / M.levels]); }
      }
    } else {
      for (let j = 0; j + 1 < a.indptr.length; j++) {
        let lo = a.indptr[j], hi = a.indptr[j + 1] - 1;
        while (lo <= hi) {
          const mid = (lo + hi) >> 1, v = a.cells[mid];
          if (v === c) { out.push([offsets[l] + j, (a.data[mid] * a.max[j]) / M.levels]); break; }
          if (v < c) lo = mid + 1; else hi = mid - 1;
        }
      }
    }
    out.sort((x, y) => y[1] - x[1]);
    return out.slice(0, n);
  }

  // -- the feature table --------------------------------------------------------------------------

  const method = M.annotation && M.annotation.method ? M.annotation.method.toUpperCase() : "";
  const FCOLS = [
    { key: "name", label: "Feature", value: (g) => g },
    { key: "layer", label: "Layer", value: (g) => F.layer[g], num: true },
    { key: "rate", label: "Firing rate", value: (g) => F.rate[g], num: true, title: "fraction of prompt " + M.unit + "s on which it fires" },
    { key: "live", label: "Live", value: (g) => F.live[g] },
    { key: "n_genes", label: "Genes", value: (g) => F.n_genes[g], num: true, title: "genes it fires on" },
    { key: "top", label: "Top genes", sortable: false },
    { key: "term", label: "Best gene set" + (method ? " (" + method + ")" : ""), value: (g) => term(g).toLowerCase() || null },
    { key: "fdr", label: "FDR", value: (g) => F.fdr[g], num: true },
    { key: "group", label: "Most active in", value: (g) => groupName(F.group[g]).toLowerCase() || null, title: "group with the highest mean activation" + (M.groupby ? " (" + M.groupby + ")" : "") },
    { key: "group_mean", label: "Mean there", value: (g) => F.group_mean[g], num: true },
  ];
  const FT = { sort: "rate", dir: -1, page: 0, per: 50, query: "", layer: "all", live: false, rows: [] };
  let searchText = null;
  function featureSearchText() {
    if (searchText) return searchText;
    searchText = new Array(NF);
    for (let g = 0; g < NF; g++) {
      searchText[g] = (fname(g) + " " + topGenes(g, 1000).join(" ") + " " + term(g) + " " + groupName(F.group[g])).toLowerCase();
    }
    return searchText;
  }
  function sortRows(rows, cols, state) {
    const col = cols.find((c) => c.key === state.sort);
    if (!col || !col.value) return rows;
    const vals = new Map(rows.map((g) => [g, col.value(g)]));
    rows.sort((a, b) => {
      const x = vals.get(a), y = vals.get(b);
      const nx = x === null || x === undefined || (typeof x === "number" && !isFinite(x));
      const ny = y === null || y === undefined || (typeof y === "number" && !isFinite(y));
      if (nx || ny) return nx === ny ? a - b : nx ? 1 : -1; // missing values last
      if (x < y) return -state.dir;
      if (x > y) return state.dir;
      return a - b;
    });
    return rows;
  }
  function filterFeatures() {
    const words = FT.query.toLowerCase().split(/\s+/).filter(Boolean);
    const text = words.length ? featureSearchText() : null;
    const rows = [];
    for (let g = 0; g < NF; g++) {
      if (FT.layer !== "all" && F.layer[g] !== +FT.layer) continue;
      if (FT.live && !F.live[g]) continue;
      if (words.length && !words.every((w) => text[g].includes(w))) continue;
      rows.push(g);
    }
    FT.rows = sortRows(rows, FCOLS, FT);
  }
  function header(table, cols, state, onSort) {
    const tr = document.createElement("tr");
    cols.forEach((c) => {
      const th = document.createElement("th");
      th.textContent = c.label;
      th.dataset.key = c.key;
      if (c.title) th.title = c.title;
      if (c.sortable !== false) {
        th.className = "sortable" + (state.sort === c.key ? " sorted" + (state.dir > 0 ? " asc" : "") : "");
        th.addEventListener("click", () => onSort(c.key));
      }
      tr.appendChild(th);
    });
    const thead = table.querySelector("thead");
    thead.innerHTML = "";
    thead.appendChild(tr);
  }
  function pager(div, state, n, render) {
    const pages = Math.max(1, Math.ceil(n / state.per));
    state.page = Math.min(state.page, pages - 1);
    div.innerHTML = "";
    const prev = el("<button>&larr; previous</button>");
    const next = el("<button>next &rarr;</button>");
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
    prev.addEventListener("click", () => { state.page--; render(); });
    next.addEventListener("click", () => { state.page++; render(); });
    div.append(prev, el("<span>page " + (state.page + 1) + " of " + pages + "</span>"), next);
  }
  let firstTable = true;
  function renderFeatureTable() {
    const table = $("#feature-table");
    header(table, FCOLS, FT, (key) => {
      FT.dir = FT.sort === key ? -FT.dir : key === "name" || key === "term" || key === "group" || key === "layer" ? 1 : -1;
      FT.sort = key;
      filterFeatures();
      renderFeatureTable();
    });
    const start = FT.page * FT.per;
    const rows = FT.rows.slice(start, start + FT.per);
    const html = rows.map((g) => {
      const name = fname(g);
      const fdr = F.fdr[g];
      const sig = significant(g);
      return (
        '<tr data-feature="' + name + '"><td><a href="#/feature/' + name + '">' + name + "</a></td>" +
        '<td class="num">' + F.layer[g] + "</td>" +
        '<td class="num">' + fmt(F.rate[g], 3) + "</td>" +
        "<td>" + (F.live[g] ? '<span class="live">live</span>' : '<span class="dead">dead</span>') + "</td>" +
        '<td class="num">' + (F.n_genes[g] === null ? "–" : F.n_genes[g]) + "</td>" +
        '<td class="genes">' + esc(topGenes(g, 6).join(", ")) + "</td>" +
        '<td class="term' + (sig ? "" : " ns") + '">' + esc(term(g)) + "</td>" +
        '<td class="num">' + (sig ? "<b>" + fmt(fdr, 2) + "</b>" : fmt(fdr, 2)) + "</td>" +
        "<td>" + esc(groupName(F.group[g])) + "</td>" +
        '<td class="num">' + fmt(F.group_mean[g], 3) + "</td></tr>"
      );
    });
    table.querySelector("tbody").innerHTML = html.join("");
    $("#feature-count").textContent = FT.rows.length.toLocaleString() + " of " + NF.toLocaleString() + " features";
    pager($("#feature-pager"), FT, FT.rows.length, renderFeatureTable);
    if (firstTable) {
      firstTable = false;
      performance.mark("sct-table-rendered");
      document.documentElement.setAttribute("data-sct-ready", "1");
    }
  }
  function setupFeatureTable() {
    const sel = $("#feature-layer");
    sel.innerHTML = '<option value="all">all</option>' + M.layers.map((l) => '<option value="' + l + '">' + l + "</option>").join("");
    sel.addEventListener("change", () => { FT.layer = sel.value; FT.page = 0; filterFeatures(); renderFeatureTable(); });
    $("#feature-live").addEventListener("change", (e) => { FT.live = e.target.checked; FT.page = 0; filterFeatures(); renderFeatureTable(); });
    let timer = null;
    $("#feature-search").addEventListener("input", (e) => {
      clearTimeout(timer);
      timer = setTimeout(() => { FT.query = e.target.value; FT.page = 0; filterFeatures(); renderFeatureTable(); }, 120);
    });
    $("#feature-table tbody").addEventListener("click", (e) => {
      const tr = e.target.closest("tr[data-feature]");
      if (tr && !e.target.closest("a")) go("/feature/" + tr.dataset.feature);
    });
    filterFeatures();
    renderFeatureTable();
  }

  // -- plots shared by pages ------------------------------------------------------------------------

  function markerSize() { return Math.max(3, Math.min(8, 3000 / Math.max(NC, 1))); }
  function embeddingPlot(div, values, label, onClick) {
    if (!CELLS.x) { div.outerHTML = '<p class="note">No embedding was given (basis=None).</p>'; return; }
    const zero = [], on = [];
    for (let i = 0; i < NC; i++) (values[i] > 0 ? on : zero).push(i);
    on.sort((a, b) => values[a] - values[b]);
    const text = (idx) => idx.map((i) => esc(CELLS.names[i]) + (CELLS.group ? "<br>" + esc(groupName(CELLS.group[i])) : "") + "<br>" + label + " " + fmt(values[i], 3));
    const size = markerSize();
    const traces = [
      { type: "scatter", mode: "markers", x: zero.map((i) => CELLS.x[i]), y: zero.map((i) => CELLS.y[i]), customdata: zero, text: text(zero), hoverinfo: "text", marker: { size: size, color: "#d9d9d9" }, name: "0" },
      { type: "scatter", mode: "markers", x: on.map((i) => CELLS.x[i]), y: on.map((i) => CELLS.y[i]), customdata: on, text: text(on), hoverinfo: "text", marker: { size: size, color: on.map((i) => values[i]), colorscale: "Viridis", showscale: true, colorbar: { title: { text: label, side: "right" }, thickness: 12 } }, name: label },
    ];
    const axis = { showgrid: false, zeroline: false, showticklabels: false, title: { text: (M.basis || "").toUpperCase() } };
    plot(div, traces, { height: 380, showlegend: false, xaxis: Object.assign({}, axis, { title: { text: (M.basis || "").toUpperCase() + "1" } }), yaxis: Object.assign({}, axis, { title: { text: (M.basis || "").toUpperCase() + "2" } }), margin: { l: 30, r: 10, t: 10, b: 30 } });
    if (onClick) div.on("plotly_click", (ev) => { const p = ev.points[0]; if (p && p.customdata !== undefined) onClick(p.customdata); });
  }
  function groupPlot(div, values, label, active) {
    if (!CELLS.group) { div.outerHTML = '<p class="note">No cell groups: pass groupby= to sct.pl.explorer.</p>'; return; }
    const n = D.groups.names.length, sum = new Float64Array(n), count = new Float64Array(n), act = new Float64Array(n);
    for (let i = 0; i < NC; i++) {
      const c = CELLS.group[i];
      if (c < 0) continue;
      sum[c] += values[i]; count[c]++; if (values[i] > 0) act[c]++;
    }
    const idx = [...Array(n).keys()].filter((c) => count[c] > 0).sort((a, b) => sum[a] / count[a] - sum[b] / count[b]);
    plot(div, [{
      type: "bar", orientation: "h", y: idx.map((c) => D.groups.names[c]), x: idx.map((c) => sum[c] / count[c]),
      marker: { color: idx.map((c) => D.groups.colors[c]) },
      text: active === false ? undefined : idx.map((c) => Math.round((100 * act[c]) / count[c]) + "% active"), textposition: active === false ? "none" : "outside", cliponaxis: false,
      hovertext: idx.map((c) => esc(D.groups.names[c]) + "<br>mean " + label + " " + fmt(sum[c] / count[c], 3) + "<br>" + count[c] + " cells" + (active === false ? "" : ", " + Math.round((100 * act[c]) / count[c]) + "% active")),
      hoverinfo: "text",
    }], { height: Math.max(220, 26 * idx.length + 70), xaxis: { title: { text: "mean " + label + " per cell" }, rangemode: "tozero" }, margin: { l: 190, r: 70, t: 10, b: 45 }, yaxis: { automargin: true } });
  }
  function topCellsTable(values, n) {
    const idx = [...Array(NC).keys()].filter((i) => values[i] > 0).sort((a, b) => values[b] - values[a]).slice(0, n);
    if (!idx.length) return '<p class="note">Active in none of the embedded cells.</p>';
    return '<table class="small"><thead><tr><th>cell</th><th>group</th><th>value</th></tr></thead><tbody>' +
      idx.map((i) => '<tr><td><a href="#/cell/' + encodeURIComponent(CELLS.names[i]) + '">' + esc(CELLS.names[i]) + "</a></td><td>" + esc(CELLS.group ? groupName(CELLS.group[i]) : "") + '</td><td class="num">' + fmt(values[i], 3) + "</td></tr>").join("") +
      "</tbody></table>";
  }

  // -- a feature's page -----------------------------------------------------------------------------

  function circuitEdgesOf(g) {
    const l = F.layer[g], j = g - offsets[l], out = [];
    D.circuits.forEach((c, ci) => {
      const N = c.nodes, mine = new Set();
      N.id.forEach((id, k) => { if (N.type[k] === "feature" && N.layer[k] === l && N.feature[k] === j) mine.add(k); });
      if (!mine.size) return;
      const agg = new Map();
      c.edges.source.forEach((s, e) => {
        const t = c.edges.target[e];
        let partner = -1, dir = "";
        if (mine.has(t) && !mine.has(s)) { partner = s; dir = "input"; } else if (mine.has(s) && !mine.has(t)) { partner = t; dir = "output"; } else return;
        const key = dir + ":" + nodeLabel(c, partner);
        const cur = agg.get(key) || { circuit: ci, dir: dir, partner: partner, weight: 0 };
        cur.weight += c.edges.weight[e] || 0;
        agg.set(key, cur);
      });
      agg.forEach((v) => out.push(v));
    });
    out.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    return out;
  }
  function nodeLabel(c, k) {
    const N = c.nodes, type = N.type[k];
    if (type === "feature") return "L" + N.layer[k] + "F" + N.feature[k];
    if (type === "embedding") return "embedding of " + (N.gene[k] || JSON.stringify(N.token[k]));
    if (type === "error") return "error L" + N.layer[k] + " at " + (N.gene[k] || JSON.stringify(N.token[k]));
    return "target (" + c.target + ")";
  }
  function renderFeature(name) {
    const page = $("#page-feature");
    purge(page);
    const g = findex(name);
    if (g < 0) { page.innerHTML = '<div class="card"><h2>No feature ' + esc(name) + '</h2><p><a href="#/features">Back to the table</a></p></div>'; return; }
    const l = F.layer[g];
    const values = column(g);
    const unit = M.unit;
    const rate = F.rate[g];
    const ann = M.annotation;
    const groupLine = F.group[g] >= 0 ? "<span>most active in <b>" + esc(groupName(F.group[g])) + "</b> (mean " + fmt(F.group_mean[g], 3) + ")</span>" : "";
    const termLine = !ann ? "" : significant(g)
      ? "<span>enriched in <b>" + esc(term(g)) + "</b> (" + esc(method) + ", FDR " + fmt(F.fdr[g], 2) + ")</span>"
      : "<span>no gene set at FDR &lt; " + fmt(ann.fdr, 2) + (term(g) ? " (best: " + esc(term(g)) + ", FDR " + fmt(F.fdr[g], 2) + ")" : "") + "</span>";
    const prev = g > 0 && F.layer[g - 1] === l ? '<a href="#/feature/' + fname(g - 1) + '">&larr; ' + fname(g - 1) + "</a>" : "";
    const next = g + 1 < NF && F.layer[g + 1] === l ? '<a href="#/feature/' + fname(g + 1) + '">' + fname(g + 1) + " &rarr;</a>" : "";
    const attr = D.attribution[name];
    page.innerHTML =
      '<div class="navline"><a href="#/features">&larr; all features</a><span>·</span>' + prev + next + "</div>" +
      '<div class="card" id="feature-header"><h2 id="feature-name">' + esc(name) + '</h2><div class="facts">' +
      "<span>layer <b>" + l + "</b></span>" +
      "<span>firing rate <b>" + fmt(rate, 3) + "</b> per " + unit + " (log10 " + (rate > 0 ? fmt(Math.log10(rate), 3) : "−∞") + ")</span>" +
      "<span><b class=\"" + (F.live[g] ? "live" : "dead") + '">' + (F.live[g] ? "live" : "dead") + "</b></span>" +
      "<span>fires on <b>" + (F.n_genes[g] === null ? "–" : F.n_genes[g]) + "</b> genes</span>" + termLine + groupLine +
      "</div></div>" +
      '<div class="grid">' +
      '<div class="card"><h3>Top genes</h3><div class="plot" id="feature-genes"></div><p class="note">Cells in which it fires on the gene (genes ranked by that count, then by mean activation).</p></div>' +
      (attr ? '<div class="card"><h3>Counterfactual attribution</h3><div class="plot" id="feature-attribution"></div><p class="note">Mean drop of its activation when the gene is removed from the sentence (' + esc(attr.mode) + "), over " + Math.max(...attr.n_cells) + " cell(s); adata.uns[" + esc(JSON.stringify(attr.key)) + "].</p></div>" : "") +
      '<div class="card"><h3>Cells coloured by its activation</h3><div class="plot" id="feature-umap"></div><p class="note">Click a cell to open it. Activations quantised to ' + M.levels + " levels of the feature's largest.</p></div>" +
      '<div class="card"><h3>Activation by ' + esc(M.groupby || "group") + '</h3><div class="plot" id="feature-groups"></div></div>' +
      '<div class="card"><h3>Enriched gene sets</h3><div id="feature-terms"></div></div>' +
      '<div class="card"><h3>Strongest connections</h3><div id="feature-connections"></div></div>' +
      '<div class="card"><h3>Top cells</h3><div id="feature-cells"></div></div>' +
      "</div>";
    // top genes
    const genes = topGenes(g, 1000), counts = F.top_counts[g];
    if (genes.length) {
      const n = genes.length;
      plot($("#feature-genes"), [{ type: "bar", orientation: "h", y: genes.slice().reverse(), x: counts.slice().reverse(), marker: { color: "#4c78a8" }, hovertemplate: "%{y}: %{x} cells<extra></extra>" }],
        { height: Math.max(240, 18 * n + 60), xaxis: { title: { text: "cells in which it fires on the gene" } }, yaxis: { automargin: true, tickfont: { size: 11 } }, margin: { l: 90, r: 20, t: 10, b: 45 } });
    } else {
      $("#feature-genes").outerHTML = M.unit === "cell"
        ? '<p class="note">No genes for these concepts yet: run sct.tl.concept_attribution (counterfactual gene attribution of an SAE\'s concepts).</p>'
        : '<p class="note">No genes x features table (rerun sct.tl.feature_activations with genes=True).</p>';
    }
    if (attr) {
      const n = attr.genes.length;
      plot($("#feature-attribution"), [{ type: "bar", orientation: "h", y: attr.genes.slice().reverse(), x: attr.effect.slice().reverse(),
        error_x: { type: "data", array: attr.sd.slice().reverse().map((s) => (isNum(s) ? s : 0)), visible: true, thickness: 1 },
        marker: { color: attr.effect.slice().reverse().map((v) => (v >= 0 ? "#f28e2b" : "#9c9c9c")) }, hovertemplate: "%{y}: %{x:.3g}<extra></extra>" }],
        { height: Math.max(240, 18 * n + 60), xaxis: { title: { text: "mean drop of the activation without the gene" } }, yaxis: { automargin: true, tickfont: { size: 11 } }, margin: { l: 90, r: 20, t: 10, b: 45 } });
    }
    embeddingPlot($("#feature-umap"), values, "activation", (i) => go("/cell/" + encodeURIComponent(CELLS.names[i])));
    groupPlot($("#feature-groups"), values, "activation");
    // enriched terms
    const en = D.enrichment[name];
    let termsHtml;
    if (en && en.length) {
      const score = method === "ORA" ? "overlap" : method === "GSEA" ? "NES" : "t";
      const none = !en.some((r) => isNum(r[1]) && ann && r[1] < ann.fdr);
      termsHtml = (none ? '<p class="note">None at FDR &lt; ' + fmt(ann ? ann.fdr : null, 2) + "; the best by p-value:</p>" : "") +
        '<table class="small"><thead><tr><th>gene set</th><th>FDR</th><th>p</th><th>' + score + "</th></tr></thead><tbody>" +
        en.map((r) => '<tr><td class="' + (ann && isNum(r[1]) && r[1] < ann.fdr ? "" : "ns") + '">' + esc(D.terms[r[0]]) + '</td><td class="num">' + fmt(r[1], 2) + '</td><td class="num">' + fmt(r[2], 2) + '</td><td class="num">' + fmt(r[3], 3) + "</td></tr>").join("") + "</tbody></table>" +
        '<p class="note">' + esc(ann ? ann.gene_sets : "") + " · " + esc(method) + " on its top genes; FDR below " + fmt(ann ? ann.fdr : null, 2) + " counts as enriched.</p>";
    } else if (ann && term(g)) {
      termsHtml = "<p>" + esc(term(g)) + " (FDR " + fmt(F.fdr[g], 2) + ')</p><p class="note">Only the best set is stored (annotate_features with tables=True keeps every set).</p>';
    } else if (ann) {
      termsHtml = '<p class="note">No gene set with p &lt; 0.05' + (F.live[g] ? "" : " (dead features are not tested)") + ".</p>";
    } else {
      termsHtml = '<p class="note">Not annotated: run sct.tl.annotate_features.</p>';
    }
    $("#feature-terms").innerHTML = termsHtml;
    // connections
    let conn = "";
    const fc = D.connections[name];
    if (fc && fc.length) {
      const rows = fc.slice().sort((a, b) => Math.abs(b[2]) - Math.abs(a[2])).slice(0, 12);
      conn += '<table class="small"><thead><tr><th>partner</th><th>direction</th><th>connection</th></tr></thead><tbody>' +
        rows.map((r) => "<tr><td>" + featureLink(r[0]) + "</td><td>" + esc(r[1]) + '</td><td class="num">' + fmt(r[2], 3) + "</td></tr>").join("") +
        '</tbody></table><p class="note">Input-independent connections (sct.tl.feature_connections): upstream partners write what it reads, downstream ones read what it writes.</p>';
    }
    const ce = circuitEdgesOf(g).slice(0, 12);
    if (ce.length) {
      conn += '<table class="small"><thead><tr><th>partner</th><th>edge</th><th>weight</th><th>circuit</th></tr></thead><tbody>' +
        ce.map((r) => {
          const c = D.circuits[r.circuit], lab = nodeLabel(c, r.partner);
          return "<tr><td>" + featureLink(lab) + "</td><td>" + (r.dir === "input" ? "into it" : "out of it") + '</td><td class="num">' + fmt(r.weight, 3) + '</td><td><a href="#/circuit/' + encodeURIComponent(c.key) + '">' + esc(c.cell) + "</a></td></tr>";
        }).join("") + '</tbody></table><p class="note">Edges of the traced circuits that touch it (direct effects in that cell).</p>';
    }
    $("#feature-connections").innerHTML = conn || '<p class="note">None: it is in no traced circuit, and sct.tl.feature_connections was not run for it.</p>';
    $("#feature-cells").innerHTML = topCellsTable(values, 10);
  }

  // -- circuits -------------------------------------------------------------------------------------

  const STYLE = {
    embedding: { symbol: "square", color: "#59a14f", label: "token embedding" },
    error: { symbol: "diamond", color: "#a0a0a0", label: "error (MLP − transcoder)" },
    feature: { symbol: "circle", color: "#f28e2b", label: "transcoder feature" },
    target: { symbol: "star", color: "#8e44ad", label: "target" },
  };
  const MARGIN = { l: 90, r: 24, t: 44, b: 116 };
  const ROW_NODES = 12; // nodes of one (layer, position) side by side before wrapping
  const SPACING = 30; // px between nodes of one (layer, position)
  const COLUMN = 16; // px of a position with one node per layer (room for its tick label)
  const ROW_HEIGHT = 104; // px per layer
  const SUBROW = 0.27; // layer heights between wrapped rows
  const CS = { index: -1, topNodes: 80, edgeFrac: 0, drawn: 0, drawnNodes: 0, labels: 12, layout: null, width: null };
  function renderCircuitList() {
    const page = $("#page-circuits");
    if (!D.circuits.length) {
      page.innerHTML = '<div class="card"><h3>No circuits</h3><p class="note">Trace one with sct.tl.trace_circuit(adata, cell=...) and write the explorer again.</p></div>';
      return;
    }
    page.innerHTML = '<div class="table-wrap"><table class="data" id="circuit-table"><thead><tr><th>circuit</th><th>cell</th><th>target</th><th>predicted</th><th>nodes</th><th>edges</th><th>replacement</th><th>completeness</th></tr></thead><tbody>' +
      D.circuits.map((c) => '<tr data-circuit="' + esc(c.key) + '"><td><a href="#/circuit/' + encodeURIComponent(c.key) + '">' + esc(c.key) + "</a></td><td>" + esc(c.cell) + "</td><td>" + esc(c.target) + "</td><td>" + esc(c.predicted) + '</td><td class="num">' + c.nodes.id.length + '</td><td class="num">' + c.edges.source.length + '</td><td class="num">' + fmt(c.scores.replacement_score, 3) + '</td><td class="num">' + fmt(c.scores.completeness_score, 3) + "</td></tr>").join("") +
      "</tbody></table></div>";
    page.querySelector("tbody").addEventListener("click", (e) => {
      const tr = e.target.closest("tr[data-circuit]");
      if (tr && !e.target.closest("a")) go("/circuit/" + encodeURIComponent(tr.dataset.circuit));
    });
  }
  function circuitByKey(key) { return D.circuits.findIndex((c) => c.key === key || c.cell === key); }
  function nodeHover(c, k) {
    const N = c.nodes, type = N.type[k];
    const where = N.gene[k] ? "gene <b>" + esc(N.gene[k]) + "</b>" : "prompt text " + esc(JSON.stringify(N.token[k]));
    const head = type === "feature" ? "<b>L" + N.layer[k] + "F" + N.feature[k] + "</b> (click to open)" : type === "target" ? "<b>target</b>: " + esc(c.target) : "<b>" + STYLE[type].label + "</b>" + (type === "error" ? " L" + N.layer[k] : "");
    return head + "<br>" + where + " · position " + N.position[k] + (type === "target" ? "" : "<br>layer " + (N.layer[k] < 0 ? "embedding" : N.layer[k])) +
      "<br>activation " + fmt(N.activation[k], 3) + "<br>influence " + fmt(N.influence[k], 3);
  }
  /** Nodes by decreasing |influence| (the target first): the order in which the slider adds them. */
  function byInfluence(c) {
    if (c._order) return c._order;
    const N = c.nodes;
    c._order = [...N.id.keys()].sort((a, b) => (N.type[b] === "target") - (N.type[a] === "target") || Math.abs(N.influence[b] || 0) - Math.abs(N.influence[a] || 0) || a - b);
    return c._order;
  }
  function nTarget(c) { return c.nodes.type.filter((t) => t === "target").length; }
  /** The nodes and edges drawn: the target and the CS.topNodes most influential other nodes,
      and the edges among them with |weight| at least CS.edgeFrac of the largest. */
  function visibleCircuit(c) {
    const N = c.nodes, n = N.id.length, order = byInfluence(c);
    const nodeOn = new Uint8Array(n);
    order.slice(0, nTarget(c) + CS.topNodes).forEach((k) => { nodeOn[k] = 1; });
    let maxInf = 0, maxW = 0;
    for (let k = 0; k < n; k++) if (nodeOn[k] && N.type[k] !== "target") maxInf = Math.max(maxInf, Math.abs(N.influence[k] || 0));
    c.edges.weight.forEach((w) => { maxW = Math.max(maxW, Math.abs(w || 0)); });
    const edges = [];
    c.edges.source.forEach((s, e) => {
      const t = c.edges.target[e], w = c.edges.weight[e] || 0;
      if (nodeOn[s] && nodeOn[t] && w !== 0 && Math.abs(w) >= CS.edgeFrac * maxW) edges.push(e);
    });
    return { nodeOn: nodeOn, edges: edges, maxInf: maxInf || 1, maxW: maxW || 1 };
  }
  /** Pixel layout of the drawn nodes: layers bottom to top, the positions that have nodes left
      to right in prompt order; nodes of one (layer, position) side by side, most influential in
      the middle row, wrapped into up to 4 rows. Recomputed when nodes are pruned, so the
      remaining ones get the room. */
  function layoutCircuit(c, vis, avail) {
    const N = c.nodes, n = N.id.length;
    let top = -1;
    for (let k = 0; k < n; k++) if (vis.nodeOn[k] && N.type[k] !== "target") top = Math.max(top, N.layer[k]);
    const row = new Float64Array(n);
    for (let k = 0; k < n; k++) row[k] = N.type[k] === "target" ? Math.max(N.layer[k], top + 1) : N.layer[k];
    const cells = new Map();
    byInfluence(c).forEach((k) => {
      if (!vis.nodeOn[k]) return;
      const key = row[k] + "|" + N.position[k];
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(k);
    });
    const perRow = (m) => (m <= ROW_NODES ? m : Math.ceil(m / Math.min(4, Math.ceil(m / ROW_NODES))));
    const wide = new Map();
    cells.forEach((ks, key) => {
      const p = +key.split("|")[1];
      wide.set(p, Math.max(wide.get(p) || 0, perRow(ks.length)));
    });
    const positions = [...wide.keys()].sort((a, b) => a - b);
    const widths = positions.map((p) => (wide.get(p) > 1 ? wide.get(p) * SPACING + 12 : COLUMN));
    const total = widths.reduce((a, b) => a + b, 0);
    const scale = Math.max(1, Math.min(2.5, (avail - MARGIN.l - MARGIN.r) / Math.max(total, 1)));
    const centre = new Map();
    let acc = 0;
    positions.forEach((p, i) => { centre.set(p, (acc + widths[i] / 2) * scale); acc += widths[i]; });
    const x = new Float64Array(n), y = new Float64Array(n);
    cells.forEach((ks, key) => {
      const [r, p] = key.split("|").map(Number), per = perRow(ks.length), nSub = Math.ceil(ks.length / per);
      ks.forEach((k, j) => {
        const sub = Math.floor(j / per), i = j % per, inRow = Math.min(per, ks.length - sub * per);
        x[k] = centre.get(p) + (i - (inRow - 1) / 2) * SPACING * Math.min(scale, 1.4);
        y[k] = r + ((nSub - 1) / 2 - sub) * SUBROW;
      });
    });
    const rows = [...new Set([-1, ...[...cells.keys()].map((key) => +key.split("|")[0])])].sort((a, b) => a - b);
    const ticks = positions.map((p) => [centre.get(p), c.labels[String(p)] || ["", false]]);
    return { x: x, y: y, rows: rows, ticks: ticks, xMax: total * scale, top: Math.max(...rows) };
  }
  function circuitGeometry(c, vis) {
    const wrap = $("#circuit-graph-wrap");
    const avail = wrap ? wrap.clientWidth - 2 : 1000;
    const L = layoutCircuit(c, vis, avail);
    const width = Math.max(avail, Math.round(L.xMax + MARGIN.l + MARGIN.r));
    const height = Math.round(MARGIN.t + MARGIN.b + ROW_HEIGHT * (L.rows.length + 0.2));
    return Object.assign(L, { width: width, height: height, ppx: (width - MARGIN.l - MARGIN.r) / L.xMax, ppy: (height - MARGIN.t - MARGIN.b) / (L.rows.length + 0.2) });
  }
  function circuitTraces(c, vis, geo) {
    const N = c.nodes, traces = [];
    // edges: gently curved (so that edges along one position pass beside the nodes between),
    // binned by sign and strength into a few traces
    const bins = {};
    vis.edges.forEach((e) => {
      const s = c.edges.source[e], t = c.edges.target[e], w = c.edges.weight[e];
      const rel = Math.abs(w) / vis.maxW, b = Math.min(3, Math.floor(rel * 4));
      const key = (w > 0 ? "p" : "n") + b;
      const bin = bins[key] || (bins[key] = { x: [], y: [], sign: w > 0, b: b });
      const x0 = geo.x[s], y0 = geo.y[s], x1 = geo.x[t], y1 = geo.y[t];
      const dx = (x1 - x0) * geo.ppx, dy = (y1 - y0) * geo.ppy, len = Math.max(Math.hypot(dx, dy), 1e-9);
      const bend = Math.min(0.12 * len, 18);
      const cx = (x0 + x1) / 2 + (-dy / len) * bend / geo.ppx, cy = (y0 + y1) / 2 + (dx / len) * bend / geo.ppy;
      for (let i = 0; i <= 10; i++) {
        const u = i / 10;
        bin.x.push((1 - u) * (1 - u) * x0 + 2 * (1 - u) * u * cx + u * u * x1);
        bin.y.push((1 - u) * (1 - u) * y0 + 2 * (1 - u) * u * cy + u * u * y1);
      }
      bin.x.push(null); bin.y.push(null);
    });
    Object.keys(bins).sort((a, b) => bins[a].b - bins[b].b).forEach((key) => {
      const bin = bins[key], alpha = [0.16, 0.35, 0.6, 0.85][bin.b], width = [0.6, 1.2, 2.1, 3.2][bin.b];
      const rgb = bin.sign ? "33,102,172" : "178,24,43";
      traces.push({ type: "scatter", mode: "lines", x: bin.x, y: bin.y, hoverinfo: "skip", showlegend: false, line: { color: "rgba(" + rgb + "," + alpha + ")", width: width }, meta: "edges" });
    });
    traces.push({ type: "scatter", mode: "lines", x: [null], y: [null], line: { color: "rgb(33,102,172)", width: 2 }, name: "positive edge", hoverinfo: "skip" });
    traces.push({ type: "scatter", mode: "lines", x: [null], y: [null], line: { color: "rgb(178,24,43)", width: 2 }, name: "negative edge", hoverinfo: "skip" });
    // nodes, one trace per type
    ["embedding", "error", "feature", "target"].forEach((type) => {
      const idx = [];
      for (let k = 0; k < N.id.length; k++) if (vis.nodeOn[k] && N.type[k] === type) idx.push(k);
      if (!idx.length) return;
      const st = STYLE[type];
      const size = idx.map((k) => (type === "target" ? 24 : 7 + 13 * Math.sqrt(Math.min(1, Math.abs(N.influence[k] || 0) / vis.maxInf))));
      traces.push({
        type: "scatter", mode: "markers", name: st.label, x: idx.map((k) => geo.x[k]), y: idx.map((k) => geo.y[k]), customdata: idx,
        text: idx.map((k) => nodeHover(c, k)), hoverinfo: "text",
        marker: { symbol: st.symbol, color: st.color, size: size, line: { color: "#3a3a3a", width: 0.7 } }, meta: "nodes-" + type,
      });
    });
    return traces;
  }
  /** Labels of the most influential features, each where it overlaps no other label and the
      fewest nodes (in pixels); a label with no free place is left out (hover still names it). */
  function placeLabels(c, vis, geo, feats) {
    const N = c.nodes, placed = [], out = [], pts = [];
    for (let k = 0; k < N.id.length; k++) if (vis.nodeOn[k]) pts.push([geo.x[k] * geo.ppx, geo.y[k] * geo.ppy]);
    const overlap = (a, b) => Math.max(0, Math.min(a[2], b[2]) - Math.max(a[0], b[0])) * Math.max(0, Math.min(a[3], b[3]) - Math.max(a[1], b[1]));
    feats.forEach((k) => {
      const text = "L" + N.layer[k] + "F" + N.feature[k];
      const w = 6.3 * text.length + 6, h = 14, cx = geo.x[k] * geo.ppx, cy = geo.y[k] * geo.ppy;
      const side = w / 2 + 10;
      const cands = [[0, 16], [0, -16], [side, 0], [-side, 0], [side, 14], [-side, 14], [side, -14], [-side, -14], [0, 31], [0, -31]];
      let best = null;
      cands.forEach(([dx, dy], ci) => {
        const box = [cx + dx - w / 2, cy + dy - h / 2, cx + dx + w / 2, cy + dy + h / 2];
        if (placed.some((b) => overlap(box, b) > 0)) return;
        const covered = pts.filter((p) => p[0] > box[0] - 4 && p[0] < box[2] + 4 && p[1] > box[1] - 4 && p[1] < box[3] + 4).length;
        const cost = 10 * covered + ci;
        if (!best || cost < best[0]) best = [cost, box, dx, dy];
      });
      if (!best || best[0] >= 20) return; // it would hide two nodes or more
      placed.push(best[1]);
      out.push({ x: geo.x[k], y: geo.y[k], text: text, showarrow: false, xshift: best[2], yshift: best[3], font: { size: 10, color: "#222" }, bgcolor: "rgba(255,255,255,0.85)", borderpad: 1 });
    });
    return out;
  }
  function circuitLayout(c, vis, geo) {
    const N = c.nodes;
    const names = (r) => (r === -1 ? "embeddings" : nTarget(c) && r === geo.top ? "target" : "layer " + r);
    const feats = [];
    for (let k = 0; k < N.id.length; k++) if (vis.nodeOn[k] && N.type[k] === "feature") feats.push(k);
    feats.sort((a, b) => Math.abs(N.influence[b]) - Math.abs(N.influence[a]));
    return {
      width: geo.width, height: geo.height, autosize: false, hovermode: "closest", hoverdistance: 12, dragmode: "pan",
      margin: MARGIN, paper_bgcolor: "#fff", plot_bgcolor: "#fff", hoverlabel: { align: "left" },
      legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom", font: { size: 11 } },
      xaxis: { range: [0, geo.xMax], tickvals: geo.ticks.map((t) => t[0]), ticktext: geo.ticks.map((t) => (t[1][1] ? esc(t[1][0]) : '<i><span style="color:#888">' + esc(t[1][0]) + "</span></i>")), tickangle: -90, tickfont: { size: 10 }, showgrid: false, zeroline: false, title: { text: "" } },
      yaxis: { range: [Math.min(...geo.rows) - 0.6, geo.top + 0.6], tickvals: geo.rows, ticktext: geo.rows.map(names), showgrid: true, gridcolor: "#eee", zeroline: false, fixedrange: true },
      annotations: placeLabels(c, vis, geo, feats.slice(0, CS.labels)),
    };
  }
  function drawCircuit() {
    const c = D.circuits[CS.index], div = $("#circuit-graph");
    const vis = visibleCircuit(c), geo = circuitGeometry(c, vis);
    CS.layout = geo;
    CS.drawn = vis.edges.length;
    CS.drawnNodes = vis.nodeOn.reduce((a, b) => a + b, 0);
    const count = $("#circuit-edge-count");
    count.textContent = CS.drawnNodes + " of " + c.nodes.id.length + " nodes, " + CS.drawn + " of " + c.edges.source.length + " edges drawn";
    count.dataset.edges = String(CS.drawn);
    count.dataset.nodes = String(CS.drawnNodes);
    const widthBefore = CS.width;
    CS.width = geo.width;
    return Plotly.react(div, circuitTraces(c, vis, geo), circuitLayout(c, vis, geo), PLOT_CONFIG).then((gd) => {
      const wrap = $("#circuit-graph-wrap");
      // a new width: keep the target (the answer, at the end of the prompt) in view
      if (wrap && geo.width !== widthBefore) wrap.scrollLeft = wrap.scrollWidth;
      return gd;
    });
  }
  function renderCircuit(key) {
    const page = $("#page-circuit");
    purge(page);
    const ci = circuitByKey(key);
    if (ci < 0) { page.innerHTML = '<div class="card"><h2>No circuit ' + esc(key) + '</h2><p><a href="#/circuits">All circuits</a></p></div>'; return; }
    const c = D.circuits[ci];
    if (CS.index !== ci) { CS.topNodes = Math.min(80, c.nodes.id.length - nTarget(c)); CS.edgeFrac = 0; }
    CS.index = ci;
    const nOthers = c.nodes.id.length - nTarget(c);
    const cellIdx = CELLS.names.indexOf(c.cell);
    const s = c.scores;
    page.innerHTML =
      '<div class="navline"><a href="#/circuits">&larr; all circuits</a></div>' +
      '<div class="card"><h2 id="circuit-name">Circuit of ' + (cellIdx >= 0 ? '<a href="#/cell/' + encodeURIComponent(c.cell) + '">' + esc(c.cell) + "</a>" : esc(c.cell)) + " → " + esc(c.target) + "</h2>" +
      '<div class="facts"><span>adata.uns[' + esc(JSON.stringify(c.key)) + "]</span>" + (c.predicted ? "<span>predicted <b>" + esc(c.predicted) + "</b></span>" : "") +
      "<span>replacement <b>" + fmt(s.replacement_score, 3) + "</b></span><span>completeness <b>" + fmt(s.completeness_score, 3) + "</b></span>" +
      "<span>features kept <b>" + fmt(s.n_kept_features, 4) + "</b> of " + fmt(s.n_active_features, 6) + " active</span></div></div>" +
      '<div class="card"><h3>Attribution graph</h3>' +
      '<div class="graph-controls">' +
      '<label>nodes <input type="range" id="circuit-node-threshold" min="1" max="' + nOthers + '" step="1" value="' + CS.topNodes + '"><span>the <span id="circuit-node-value"></span> most influential</span></label>' +
      '<label>edges <input type="range" id="circuit-edge-threshold" min="0" max="100" step="1" value="' + Math.round(CS.edgeFrac * 100) + '"><span>|weight| ≥ <span id="circuit-edge-value"></span></span></label>' +
      '<label>labels <input type="number" id="circuit-labels" min="0" max="200" value="' + CS.labels + '" style="width:56px"></label>' +
      '<span class="count" id="circuit-edge-count"></span></div>' +
      '<div class="graph-wrap" id="circuit-graph-wrap"><div id="circuit-graph"></div></div>' +
      '<p class="note">Layers bottom to top, the prompt\'s tokens with nodes left to right (genes; prompt text in grey). Node size grows with √|influence| on the target; edges are direct effects, blue positive, red negative, thicker when stronger. Hover a node for its gene, activation and influence; click a feature to open it; drag to pan; the box scrolls sideways when the prompt is long. The sliders keep the most influential nodes (and the target) and the edges among them with |weight| at least a fraction of the largest; the layout makes room for what is kept.</p></div>' +
      '<div class="grid">' +
      '<div class="card"><h3>Most influential genes</h3><div class="plot" id="circuit-genes"></div></div>' +
      '<div class="card"><h3>Enrichment of its genes</h3><div id="circuit-enrichment"></div></div>' +
      '<div class="card"><h3>Cells that carry it</h3><div id="circuit-score-select"></div><div class="plot" id="circuit-umap"></div></div>' +
      '<div class="card"><h3>By ' + esc(M.groupby || "group") + '</h3><div class="plot" id="circuit-groups"></div><div id="circuit-cells"></div></div>' +
      "</div>";
    const pct = (v) => v + "% of the largest";
    const nodeIn = $("#circuit-node-threshold"), edgeIn = $("#circuit-edge-threshold"), labIn = $("#circuit-labels");
    $("#circuit-node-value").textContent = nodeIn.value;
    $("#circuit-edge-value").textContent = pct(edgeIn.value);
    nodeIn.addEventListener("input", () => { CS.topNodes = +nodeIn.value; $("#circuit-node-value").textContent = nodeIn.value; drawCircuit(); });
    edgeIn.addEventListener("input", () => { CS.edgeFrac = edgeIn.value / 100; $("#circuit-edge-value").textContent = pct(edgeIn.value); drawCircuit(); });
    labIn.addEventListener("change", () => { CS.labels = Math.max(0, +labIn.value || 0); drawCircuit(); });
    CS.width = null;
    drawCircuit().then(() => {
      $("#circuit-graph").on("plotly_click", (ev) => {
        const p = ev.points && ev.points[0];
        if (!p || p.customdata === undefined || typeof p.customdata !== "number") return;
        const k = p.customdata;
        if (c.nodes.type[k] === "feature") go("/feature/L" + c.nodes.layer[k] + "F" + c.nodes.feature[k]);
      });
    });
    // genes
    const G = c.genes, n = Math.min(20, G.gene.length);
    if (n) {
      const ys = G.gene.slice(0, n).reverse();
      const traces = G.embedding && G.features ? [
        { type: "bar", orientation: "h", y: ys, x: G.embedding.slice(0, n).reverse(), name: "token embeddings", marker: { color: STYLE.embedding.color } },
        { type: "bar", orientation: "h", y: ys, x: G.features.slice(0, n).reverse(), name: "features", marker: { color: STYLE.feature.color } },
      ] : [{ type: "bar", orientation: "h", y: ys, x: G.influence.slice(0, n).reverse(), marker: { color: STYLE.feature.color } }];
      plot($("#circuit-genes"), traces, { barmode: "relative", height: Math.max(260, 19 * n + 80), xaxis: { title: { text: "influence on the target" } }, yaxis: { automargin: true, tickfont: { size: 11 } }, legend: { orientation: "h", y: 1.02, yanchor: "bottom" }, margin: { l: 90, r: 20, t: 30, b: 45 } });
    }
    // enrichment
    const en = c.enrichment;
    $("#circuit-enrichment").innerHTML = en ? '<table class="small"><thead><tr><th>gene set</th><th>overlap</th><th>FDR</th><th>genes</th></tr></thead><tbody>' +
      en.rows.map((r) => "<tr><td>" + esc(r[0]) + '</td><td class="num">' + r[2] + "/" + r[1] + '</td><td class="num">' + fmt(r[4], 2) + '</td><td class="genes">' + esc(String(r[5]).split(";").filter(Boolean).slice(0, 6).join(", ")) + (String(r[5]).split(";").filter(Boolean).length > 6 ? ", …" : "") + "</td></tr>").join("") +
      '</tbody></table><p class="note">' + esc(en.gene_sets) + " · adata.uns[" + esc(JSON.stringify(en.key)) + "]</p>" : '<p class="note">No enrichment: run sct.tl.circuit_enrichment (or trace_circuit with gene_sets=).</p>';
    // cells carrying it
    const scores = c.scores_per_cell;
    if (!scores.length) {
      $("#circuit-umap").outerHTML = '<p class="note">No per-cell score: run sct.tl.score_circuit(adata, circuit=...).</p>';
      $("#circuit-groups").outerHTML = "";
      return;
    }
    const sel = $("#circuit-score-select");
    if (scores.length > 1) {
      sel.innerHTML = '<label>score <select id="circuit-score">' + scores.map((s, i) => '<option value="' + i + '">' + esc(s.label) + " (" + esc(s.column) + ")</option>").join("") + "</select></label>";
    } else {
      sel.innerHTML = '<p class="note">' + esc(scores[0].label) + ": adata.obs[" + esc(JSON.stringify(scores[0].column)) + "]</p>";
    }
    const drawScores = (i) => {
      const v = Float32Array.from(scores[i].values.map((x) => (isNum(x) ? x : 0)));
      purge($("#circuit-umap").parentElement);
      embeddingPlot($("#circuit-umap"), v, "score", (k) => go("/cell/" + encodeURIComponent(CELLS.names[k])));
      groupPlot($("#circuit-groups"), v, "score", false);
      $("#circuit-cells").innerHTML = "<h3>Top cells</h3>" + topCellsTable(v, 8);
    };
    drawScores(0);
    if (scores.length > 1) $("#circuit-score").addEventListener("change", (e) => drawScores(+e.target.value));
  }

  // -- cells ----------------------------------------------------------------------------------------

  const CT = { sort: "name", dir: 1, page: 0, per: 50, query: "", rows: [] };
  const circuitsOfCell = {};
  D.circuits.forEach((c, i) => { (circuitsOfCell[c.cell] = circuitsOfCell[c.cell] || []).push(i); });
  const CCOLS = [
    { key: "name", label: "Cell", value: (i) => i },
    { key: "group", label: M.groupby || "group", value: (i) => (CELLS.group ? groupName(CELLS.group[i]).toLowerCase() : null) },
    { key: "circuit", label: "Circuits", value: (i) => (circuitsOfCell[CELLS.names[i]] || []).length, num: true },
  ];
  function renderCellTable() {
    const words = CT.query.toLowerCase().split(/\s+/).filter(Boolean);
    const rows = [];
    for (let i = 0; i < NC; i++) {
      const text = (CELLS.names[i] + " " + (CELLS.group ? groupName(CELLS.group[i]) : "")).toLowerCase();
      if (words.every((w) => text.includes(w))) rows.push(i);
    }
    CT.rows = sortRows(rows, CCOLS, CT);
    const table = $("#cell-table");
    header(table, CCOLS, CT, (key) => { CT.dir = CT.sort === key ? -CT.dir : key === "circuit" ? -1 : 1; CT.sort = key; renderCellTable(); });
    const start = CT.page * CT.per;
    table.querySelector("tbody").innerHTML = CT.rows.slice(start, start + CT.per).map((i) => {
      const name = CELLS.names[i], cs = circuitsOfCell[name] || [];
      return '<tr data-cell="' + esc(name) + '"><td><a href="#/cell/' + encodeURIComponent(name) + '">' + esc(name) + "</a></td><td>" + esc(CELLS.group ? groupName(CELLS.group[i]) : "") + "</td><td>" +
        cs.map((k) => '<a href="#/circuit/' + encodeURIComponent(D.circuits[k].key) + '">' + esc(D.circuits[k].target) + "</a>").join(", ") + "</td></tr>";
    }).join("");
    $("#cell-count").textContent = CT.rows.length.toLocaleString() + " of " + NC.toLocaleString() + " cells" + (M.n_cells > NC ? " (a sample of " + M.n_cells.toLocaleString() + ")" : "");
    pager($("#cell-pager"), CT, CT.rows.length, renderCellTable);
  }
  let cellTableReady = false;
  function setupCellTable() {
    if (cellTableReady) { renderCellTable(); return; }
    cellTableReady = true;
    let timer = null;
    $("#cell-search").addEventListener("input", (e) => { clearTimeout(timer); timer = setTimeout(() => { CT.query = e.target.value; CT.page = 0; renderCellTable(); }, 120); });
    $("#cell-table tbody").addEventListener("click", (e) => {
      const tr = e.target.closest("tr[data-cell]");
      if (tr && !e.target.closest("a")) go("/cell/" + encodeURIComponent(tr.dataset.cell));
    });
    renderCellTable();
  }
  function sentenceOf(i) {
    const S = CELLS.sentences;
    if (!S) return null;
    if (!S._off) { S._off = decode(S.offsets, Uint32Array); S._genes = decode(S.genes, S.wide ? Uint32Array : Uint16Array); }
    const out = [];
    for (let k = S._off[i]; k < S._off[i + 1]; k++) out.push(D.genes[S._genes[k]]);
    return out;
  }
  function influenceColour(v, max) {
    if (!isNum(v) || !max) return "#fff";
    const t = Math.min(1, Math.abs(v) / max) ** 0.6;
    const [r, g, b] = v > 0 ? [33, 102, 172] : [178, 24, 43];
    const mix = (c) => Math.round(255 + (c - 255) * t * 0.75);
    return "rgb(" + mix(r) + "," + mix(g) + "," + mix(b) + ")";
  }
  function renderCell(name) {
    const page = $("#page-cell");
    purge(page);
    const i = CELLS.names.indexOf(name);
    if (i < 0) { page.innerHTML = '<div class="card"><h2>No cell ' + esc(name) + '</h2><p class="note">Only the embedded cells have a page.</p></div>'; return; }
    const cs = circuitsOfCell[name] || [];
    const sentence = sentenceOf(i);
    let ci = cs.length ? cs[0] : -1;
    page.innerHTML =
      '<div class="navline"><a href="#/cells">&larr; all cells</a></div>' +
      '<div class="card"><h2 id="cell-name">' + esc(name) + '</h2><div class="facts">' + (CELLS.group ? "<span>" + esc(M.groupby) + " <b>" + esc(groupName(CELLS.group[i])) + "</b></span>" : "") +
      "<span>" + (sentence ? sentence.length + " genes in its sentence" : "no sentence column") + "</span>" +
      (cs.length ? "<span>circuits: " + cs.map((k) => '<a href="#/circuit/' + encodeURIComponent(D.circuits[k].key) + '">' + esc(D.circuits[k].target) + "</a>").join(", ") + "</span>" : "<span>no traced circuit</span>") + "</div></div>" +
      '<div class="card"><h3>Its sentence' + (ci >= 0 ? ", each gene coloured by its influence on the circuit's target" : "") + '</h3><div id="cell-circuit-select"></div><div class="sentence" id="cell-sentence"></div><div id="cell-legend"></div></div>' +
      (ci >= 0 ? '<div class="card"><h3>Influence of each gene on the target, in sentence order</h3><div class="plot" id="cell-influence"></div></div>' : "") +
      '<div class="grid">' +
      '<div class="card"><h3>Its place on the embedding</h3><div class="plot" id="cell-umap"></div></div>' +
      '<div class="card"><h3>Its most active features</h3><div id="cell-features"></div></div>' +
      "</div>";
    const drawSentence = () => {
      const box = $("#cell-sentence");
      if (!sentence) { box.innerHTML = '<p class="note">No sentences in adata.obs.</p>'; return; }
      let inf = {}, max = 0;
      if (ci >= 0) {
        const G = D.circuits[ci].genes;
        G.gene.forEach((g, k) => { inf[g] = G.influence[k]; max = Math.max(max, Math.abs(G.influence[k] || 0)); });
      }
      box.innerHTML = sentence.map((g, k) => {
        const v = inf[g];
        return '<span class="chip" data-gene="' + esc(g) + '" title="' + esc(g) + " · position " + (k + 1) + (isNum(v) ? " · influence " + fmt(v, 3) : "") + '" style="background:' + influenceColour(v, max) + '">' + esc(g) + (ci >= 0 ? "<small>" + (isNum(v) ? fmt(v, 2) : "·") + "</small>" : "") + "</span>";
      }).join("");
      $("#cell-legend").innerHTML = ci >= 0 ? '<div class="legend">negative <span class="swatch"></span> positive influence on ' + esc(D.circuits[ci].target) + " (· : gene not in the circuit's gene table)</div>" : "";
      if (ci >= 0 && $("#cell-influence")) {
        const xs = sentence.map((g, k) => k), ys = sentence.map((g) => (isNum(inf[g]) ? inf[g] : 0));
        purge($("#cell-influence").parentElement);
        plot($("#cell-influence"), [{ type: "bar", x: xs, y: ys, marker: { color: ys.map((v) => (v >= 0 ? "#2166ac" : "#b2182b")) }, customdata: sentence.map((g) => esc(g)), hovertemplate: "%{customdata} (position %{x}): %{y:.3g}<extra></extra>" }],
          { height: 330, xaxis: { tickvals: xs, ticktext: sentence.map((g) => esc(g)), tickangle: -90, tickfont: { size: 10 }, range: [-0.7, xs.length - 0.3] }, yaxis: { title: { text: "influence" } }, margin: { l: 60, r: 10, t: 10, b: 80 } });
      }
    };
    if (cs.length > 1) {
      $("#cell-circuit-select").innerHTML = '<label>circuit <select id="cell-circuit">' + cs.map((k) => '<option value="' + k + '">' + esc(D.circuits[k].key) + " → " + esc(D.circuits[k].target) + "</option>").join("") + "</select></label>";
      $("#cell-circuit").addEventListener("change", (e) => { ci = +e.target.value; drawSentence(); });
    }
    drawSentence();
    const v = new Float32Array(NC);
    v[i] = 1;
    if (CELLS.x) {
      const size = markerSize();
      plot($("#cell-umap"), [
        { type: "scatter", mode: "markers", x: CELLS.x, y: CELLS.y, text: CELLS.names.map((nm, k) => esc(nm) + (CELLS.group ? "<br>" + esc(groupName(CELLS.group[k])) : "")), hoverinfo: "text", marker: { size: size, color: CELLS.group ? CELLS.group.map((c) => (c >= 0 ? D.groups.colors[c] : "#ccc")) : "#ccc", opacity: 0.35 } },
        { type: "scatter", mode: "markers", x: [CELLS.x[i]], y: [CELLS.y[i]], text: [esc(name)], hoverinfo: "text", marker: { size: 16, symbol: "star", color: "#d62728", line: { color: "#000", width: 1 } } },
      ], { height: 340, showlegend: false, xaxis: { showticklabels: false, showgrid: false, zeroline: false }, yaxis: { showticklabels: false, showgrid: false, zeroline: false }, margin: { l: 10, r: 10, t: 10, b: 10 } });
    } else {
      $("#cell-umap").outerHTML = '<p class="note">No embedding was given (basis=None).</p>';
    }
    $("#cell-features").innerHTML = '<table class="small"><thead><tr><th>feature</th><th>activation</th><th>enriched gene set, else top genes</th></tr></thead><tbody>' +
      M.layers.map((l) => '<tr><th colspan="3">layer ' + l + "</th></tr>" + cellTop(i, l, 6).map(([g, a]) => '<tr><td><a href="#/feature/' + fname(g) + '">' + fname(g) + '</a></td><td class="num">' + fmt(a, 3) + '</td><td class="genes">' + esc(significant(g) ? term(g) : topGenes(g, 4).join(", ")) + "</td></tr>").join("")).join("") +
      '</tbody></table><p class="note">Activations quantised to ' + M.levels + " levels of each feature's largest.</p>";
  }

  // -- about ----------------------------------------------------------------------------------------

  function renderAbout() {
    const page = $("#page-about");
    if (page.dataset.done) return;
    page.dataset.done = "1";
    const comment = [...document.head.childNodes].find((n) => n.nodeType === Node.COMMENT_NODE);
    const rows = [
      ["activations", "adata.uns[" + JSON.stringify(M.activations_key) + "] (" + (M.aggregate || "") + " over each cell's tokens; firing rate per " + M.unit + ")"],
      ["annotation", M.annotation ? "adata.uns[" + JSON.stringify(M.annotation.key) + "]: " + M.annotation.method + " against " + M.annotation.gene_sets + ", FDR < " + M.annotation.fdr : "none"],
      ["feature ranking", M.ranking ? "by " + M.ranking.groupby + ", layers " + M.ranking.layers.join(", ") : "none (groups computed from " + (M.groupby || "no column") + ")"],
      ["cells", NC + " embedded of " + M.n_cells + (M.basis ? ", on " + M.basis : "")],
      ["features", M.n_features.reduce((a, b) => a + b, 0) + " in layers " + M.layers.join(", ")],
      ["circuits", String(D.circuits.length)],
      ["written by", "sctranscoder " + M.version],
    ];
    page.innerHTML = '<div class="card"><h3>What this file holds</h3><table class="small"><tbody>' + rows.map((r) => "<tr><th>" + esc(r[0]) + "</th><td>" + esc(r[1]) + "</td></tr>").join("") + "</tbody></table>" +
      '<p class="note">Per-cell activations are quantised to ' + M.levels + " levels of each feature's largest activation; firing rates, top genes and gene sets are the stored values.</p></div>" +
      '<div class="card"><h3>Licences</h3><pre class="licence">' + esc(comment ? comment.textContent.trim() : "") + "</pre></div>";
  }

  // -- navigation -----------------------------------------------------------------------------------

  function route() { return decodeURIComponent((location.hash || "").replace(/^#/, "")) || "/features"; }
  function show(id, tab) {
    document.querySelectorAll(".page").forEach((p) => p.classList.toggle("active", p.id === "page-" + id));
    document.querySelectorAll(".tabs a").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
  }
  let current = null;
  function render(r) {
    current = r;
    const parts = r.replace(/^\//, "").split("/");
    const what = parts[0], arg = parts.slice(1).join("/");
    if (what === "feature" && arg) { show("feature", "features"); renderFeature(arg); }
    else if (what === "circuits") { show("circuits", "circuits"); renderCircuitList(); }
    else if (what === "circuit" && arg) { show("circuit", "circuits"); renderCircuit(arg); }
    else if (what === "cells") { show("cells", "cells"); setupCellTable(); }
    else if (what === "cell" && arg) { show("cell", "cells"); renderCell(arg); }
    else if (what === "about") { show("about", "about"); renderAbout(); }
    else { show("features", "features"); }
    window.scrollTo(0, 0);
  }
  function go(r) {
    const want = "#" + r;
    let changed = false;
    try {
      if (location.hash !== want) { location.hash = r; changed = location.hash === want; }
    } catch (err) { changed = false; }
    if (!changed) render(decodeURIComponent(r));
  }
  window.addEventListener("hashchange", () => { if (route() !== current) render(route()); });

  // the page's API (tests, and a console user)
  window.sctExplorer = {
    data: D,
    go: go,
    route: () => current,
    featureIndex: findex,
    column: (name) => Array.from(column(findex(name))),
    drawnEdges: () => CS.drawn,
    drawnNodes: () => CS.drawnNodes,
    /** Viewport coordinates of a node of the open circuit (scrolled into view first). */
    nodePosition: (id) => {
      const c = D.circuits[CS.index], k = c.nodes.id.indexOf(id), gd = $("#circuit-graph");
      if (k < 0) return null;
      const fl = gd._fullLayout, wrap = $("#circuit-graph-wrap");
      const px = fl.xaxis.l2p(CS.layout.x[k]) + fl.xaxis._offset, py = fl.yaxis.l2p(CS.layout.y[k]) + fl.yaxis._offset;
      window.scrollBy(0, gd.getBoundingClientRect().top + py - window.innerHeight / 2);
      wrap.scrollLeft = Math.max(0, px - wrap.clientWidth / 2);
      const rect = gd.getBoundingClientRect();
      return { x: rect.left + px, y: rect.top + py };
    },
  };

  $("#sct-title").textContent = M.title;
  setupFeatureTable();
  render(route());
})();
