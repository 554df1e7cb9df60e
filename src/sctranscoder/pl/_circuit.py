"""Draw a traced circuit, and its genes."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import NodeType, feature_name
from .._records import circuit_record
from .._validate import check_positive_int
from ._utils import check_ax, check_figsize, check_save, finish

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Node type -> (marker, face colour, legend label); drawn bottom-up in this order.
_NODE_STYLE = {
    NodeType.EMBEDDING.label: ("s", "#59a14f", "token embedding"),
    NodeType.ERROR.label: ("D", "#a0a0a0", "error (MLP − transcoder)"),
    NodeType.FEATURE.label: ("o", "#f28e2b", "transcoder feature"),
    NodeType.TARGET.label: ("*", "#8e44ad", "target"),
}
_TARGET, _FEATURE = NodeType.TARGET.label, NodeType.FEATURE.label
#: Diverging colormap for edge weights: red negative, blue positive.
_EDGE_CMAP = "RdBu"
#: Nodes in one (layer, position) cell are wrapped into sub-rows beyond this many per row.
_ROW_NODES = 12
#: Vertical distance between sub-rows of one layer (a layer is one unit high).
_SUBROW_DY = 0.22


def circuit(
    adata: AnnData,
    circuit: str,
    *,
    max_nodes: int = 80,
    min_edge_weight_fraction: float = 0.0,
    title: str | None = None,
    label_features: bool | int = True,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Draw a traced circuit: layers bottom to top, the prompt's genes left to right.

    Rows are the token embeddings (bottom), the layers and the target (top). Columns are the token
    positions that have nodes, in prompt order and evenly spaced, labelled with the gene at that
    position (prompt text in grey italics). Nodes sharing a layer and position sit side by side,
    wrapped into sub-rows when there are many. Node size grows with the square root of the node's
    influence on the target; marker and colour give its type. Edges are coloured by sign (blue
    positive, red negative) and get thicker and more opaque with ``|weight|``; they point upwards
    (from a lower layer, or an earlier position, to a higher one).

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.trace_circuit`.
    circuit
        The circuit's key in ``adata.uns`` (``"circuit_<cell>"``; the cell name alone also
        works).
    max_nodes
        Draw at most this many nodes: the most influential ones and the target, with the edges
        among them.
    min_edge_weight_fraction
        Hide edges whose ``|weight|`` is below this fraction of the largest drawn ``|weight|``.
    title
        Title (default: the cell, the target and the replacement/completeness scores).
    label_features
        Label the most influential features ``"L<layer>F<id>"``: ``True`` for the top 10, a
        non-negative integer for that many, ``False`` (or 0) for none.
    figsize
        Size of the new figure (default: grows with the number of columns and layers).
    ax
        Axes to draw into (default: a new figure).
    show
        Show the plot (default: ``scanpy.settings.autoshow``).
    save
        ``True`` or a file-name suffix: save to ``sc.settings.figdir`` as scanpy does
        (``<key><suffix>.<format>``; an extension matplotlib writes, such as ``.png``, ``.svg``
        or ``.jpg``, sets the format). A path is refused: use ``return_fig=True`` and
        ``fig.savefig(path)``.
    return_fig
        Return the figure.

    Returns
    -------
    The figure with ``return_fig``; else the axes, unless shown.
    """
    import matplotlib.pyplot as plt

    max_nodes = check_positive_int(max_nodes, "max_nodes")
    if isinstance(label_features, bool):
        n_labels = 10 if label_features else 0
    elif isinstance(label_features, numbers.Integral) and label_features >= 0:
        n_labels = int(label_features)
    else:
        raise ValueError(
            "label_features takes True (the top 10), False, or how many features to label "
            f"(a non-negative integer), got {label_features!r}."
        )
    real = isinstance(min_edge_weight_fraction, numbers.Real)
    if (
        isinstance(min_edge_weight_fraction, bool)
        or not real
        or not 0 <= min_edge_weight_fraction <= 1
    ):
        raise ValueError(
            f"min_edge_weight_fraction must be in [0, 1], got {min_edge_weight_fraction!r}."
        )
    check_figsize(figsize)
    check_ax(ax)
    check_save(save)
    name, record = circuit_record(adata, circuit)
    nodes, edges = _drawn(record["nodes"], record["edges"], max_nodes)
    if len(edges):
        w = edges["weight"].abs()
        edges = edges[w >= min_edge_weight_fraction * w.max()]

    layout, columns, rows = _layout(nodes)
    x_max = columns["right"].max()
    if ax is None:
        if figsize is None:
            figsize = (
                float(np.clip(0.24 * x_max + 3.5, 7.0, 30.0)),
                float(np.clip(1.0 * len(rows) + 2.8, 4.5, 13.0)),
            )
        fig, ax = plt.subplots(figsize=figsize)
    fig = ax.figure
    ax.set_xlim(0, x_max)
    ax.set_ylim(min(rows) - 0.6, max(rows) + 0.6)
    # points per data unit, so node sizes and label offsets fit the actual axes
    bbox = ax.get_window_extent().transformed(fig.dpi_scale_trans.inverted())
    ppu_x = bbox.width * 72 / x_max
    ppu_y = bbox.height * 72 / (max(rows) - min(rows) + 1.2)

    for y in rows:
        ax.axhline(y, color="0.92", lw=0.8, zorder=0)

    if len(edges):
        _draw_edges(ax, edges, layout, ppu_x, ppu_y)

    s_max = float(np.clip(min(0.85 * ppu_x, 3.2 * _SUBROW_DY * ppu_y), 4.0, 22.0)) ** 2
    s_min = max(s_max / 16, 6.0)
    scale = nodes.loc[nodes["type"] != _TARGET, "influence"].abs().max()
    scale = scale if scale and np.isfinite(scale) else 1.0
    for kind, (marker, colour, label) in _NODE_STYLE.items():
        sub = nodes[nodes["type"] == kind]
        if sub.empty:
            continue
        if kind == _TARGET:
            sizes = np.full(len(sub), 2.5 * s_max)
        else:
            rel = np.sqrt(np.clip(sub["influence"].abs().to_numpy() / scale, 0, 1))
            sizes = s_min + (s_max - s_min) * rel
        xy = layout.loc[sub.index]
        pc = ax.scatter(
            xy["x"],
            xy["y"],
            s=sizes,
            marker=marker,
            c=colour,
            edgecolors="0.25",
            linewidths=0.5,
            zorder=3,
            label=label,
        )
        pc.set_gid(f"circuit-nodes-{kind}")

    if n_labels > 0:
        _label_features(ax, nodes, layout, n_labels, ppu_x, ppu_y, math.sqrt(s_max))

    _axes_labels(ax, nodes, columns, rows)
    ax.set_title(
        title if title is not None else _title(record, len(nodes), len(edges)), fontsize=10
    )
    _legend(ax)
    return finish(fig, ax, writekey=name, show=show, save=save, return_fig=return_fig)


def circuit_genes(
    adata: AnnData,
    circuit: str,
    *,
    n_top: int = 20,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Bar chart of a circuit's most influential genes.

    Each bar is a gene's influence on the target, split into the influence of its token
    embeddings and of the transcoder features on its tokens; the number of features is written at
    the end of the bar.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.trace_circuit`.
    circuit
        The circuit's key in ``adata.uns`` (or its cell's name).
    n_top
        Number of genes, from the top of the circuit's gene table.
    ax, show, return_fig
        As in :func:`sctranscoder.pl.circuit`.
    save
        ``True`` or a file-name suffix: save to ``sc.settings.figdir``
        (``<key>_genes<suffix>.<format>``).

    Returns
    -------
    The figure with ``return_fig``; else the axes, unless shown.
    """
    import matplotlib.pyplot as plt

    check_positive_int(n_top, "n_top")
    check_ax(ax)
    check_save(save)
    name, record = circuit_record(adata, circuit)
    genes = record["genes"].sort_values("influence", ascending=False).head(n_top)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 0.27 * max(len(genes), 4) + 1.3))
    y = np.arange(len(genes))
    emb = genes["embedding_influence"].to_numpy()
    feat = genes["feature_influence"].to_numpy()
    ax.barh(
        y,
        emb,
        color=_NODE_STYLE[NodeType.EMBEDDING.label][1],
        label="token embeddings",
        gid="genes-embedding",
    )
    ax.barh(
        y,
        feat,
        left=emb,
        color=_NODE_STYLE[NodeType.FEATURE.label][1],
        label="features",
        gid="genes-feature",
    )
    for yi, total, n in zip(y, emb + feat, genes["n_features"], strict=True):
        if n:
            ax.text(total, yi, f" {int(n)}", va="center", fontsize=7, color="0.35")
    ax.set_yticks(y, genes.index.astype(str), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("influence on the target")
    ax.margins(x=0.08)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(
        loc="lower right",
        fontsize=8,
        frameon=False,
        title="end of bar: number of features",
        title_fontsize=7,
    )
    target = _target_label(record.get("params", {}))
    ax.set_title(
        f"Top genes · {record.get('params', {}).get('cell', name)} → {target}", fontsize=10
    )
    return finish(
        ax.figure, ax, writekey=f"{name}_genes", show=show, save=save, return_fig=return_fig
    )


def _drawn(nodes: pd.DataFrame, edges: pd.DataFrame, max_nodes: int):
    """The target and the ``max_nodes - 1`` most influential other nodes, and edges among them."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be at least 1, got {max_nodes}.")
    is_target = nodes["type"] == _TARGET
    others = nodes[~is_target]
    others = others.loc[others["influence"].abs().sort_values(ascending=False).index]
    keep = nodes[is_target].index.append(others.index[: max(max_nodes - int(is_target.sum()), 0)])
    nodes = nodes.loc[keep]
    edges = edges[edges["source"].isin(keep) & edges["target"].isin(keep)]
    return nodes, edges


def _row(nodes: pd.DataFrame) -> pd.Series:
    """Row of each node: embeddings -1, layers 0..L-1, the target on a row of its own on top."""
    row = nodes["layer"].astype(float).copy()
    is_target = nodes["type"] == _TARGET
    if is_target.any():
        below = row[~is_target].max() if (~is_target).any() else -1.0
        row[is_target] = np.maximum(row[is_target], below + 1)
    return row


def _layout(nodes: pd.DataFrame):
    """Node coordinates, the compressed columns (one per position) and the rows.

    A column is as wide as its widest (row, position) cell, so nodes sharing a cell sit one unit
    apart, like neighbouring columns; cells with more than ``_ROW_NODES`` nodes wrap into sub-rows.
    """
    row = _row(nodes)
    order = nodes.assign(_row=row, _inf=nodes["influence"].abs()).sort_values(
        ["_row", "position", "_inf"], ascending=[True, True, False]
    )
    cells = order.groupby(["_row", "position"], sort=False)
    per_row = {k: _per_row(len(g)) for k, g in cells}
    positions = np.sort(nodes["position"].unique())
    width = {p: max(w for (r, q), w in per_row.items() if q == p) for p in positions}
    width = {p: w + (1 if w > 1 else 0) for p, w in width.items()}  # gap around wide columns
    right = np.cumsum([width[p] for p in positions])
    columns = pd.DataFrame(
        {"x": right - np.array([width[p] for p in positions]) / 2, "right": right},
        index=pd.Index(positions, name="position"),
    )
    x = pd.Series(0.0, index=nodes.index)
    y = pd.Series(0.0, index=nodes.index)
    for (r, p), g in cells:
        k = per_row[(r, p)]
        n_sub = math.ceil(len(g) / k)
        for j, name in enumerate(g.index):
            sub, i = divmod(j, k)
            in_row = min(k, len(g) - sub * k)
            x[name] = columns.at[p, "x"] + (i - (in_row - 1) / 2)
            y[name] = r + ((n_sub - 1) / 2 - sub) * _SUBROW_DY  # most influential sub-row on top
    rows = sorted(set(row.tolist()) | {-1.0})
    return pd.DataFrame({"x": x, "y": y}), columns, rows


def _per_row(n: int) -> int:
    """Nodes per sub-row for a cell of ``n`` nodes: one row up to ``_ROW_NODES``, at most 4 rows."""
    if n <= _ROW_NODES:
        return n
    n_sub = min(4, math.ceil(n / _ROW_NODES))
    return math.ceil(n / n_sub)


def _draw_edges(ax, edges: pd.DataFrame, layout: pd.DataFrame, ppu_x: float, ppu_y: float):
    """Edges as gently curved lines, weakest first, coloured by sign and weighted by size."""
    import matplotlib as mpl
    from matplotlib.collections import LineCollection

    edges = edges.loc[edges["weight"].abs().sort_values().index]
    w = edges["weight"].to_numpy()
    rel = np.abs(w) / np.abs(w).max() if np.abs(w).max() > 0 else np.zeros_like(w)
    p0 = layout.loc[edges["source"], ["x", "y"]].to_numpy()
    p1 = layout.loc[edges["target"], ["x", "y"]].to_numpy()
    # bend each edge sideways (in inches, so the bend looks alike in x and y), so that edges
    # between nodes of one column do not run through the nodes between them
    d = (p1 - p0) * [ppu_x, ppu_y]
    length = np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)[:, None]
    bend = np.minimum(0.12 * length, 14.0)  # points; long edges do not bow out of the plot
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) / length * bend
    control = (p0 + p1) / 2 + normal / [ppu_x, ppu_y]
    t = np.linspace(0, 1, 16)[None, :, None]
    curves = (1 - t) ** 2 * p0[:, None] + 2 * (1 - t) * t * control[:, None] + t**2 * p1[:, None]
    cmap = mpl.colormaps[_EDGE_CMAP]
    colours = cmap(0.5 + np.sign(w) * (0.25 + 0.25 * rel))
    colours[:, 3] = 0.12 + 0.78 * rel**0.6
    lc = LineCollection(
        list(curves), colors=colours, linewidths=0.3 + 2.7 * rel, zorder=1, capstyle="round"
    )
    lc.set_gid("circuit-edges")
    ax.add_collection(lc)


def _label_features(ax, nodes, layout, n_labels, ppu_x, ppu_y, radius_pt):
    """Name the most influential features, placing each label where it overlaps the least."""
    feats = nodes[nodes["type"] == _FEATURE]
    feats = feats.loc[feats["influence"].abs().sort_values(ascending=False).index[:n_labels]]
    fontsize = 6.5
    placed: list[tuple[float, float, float, float]] = []  # label boxes, in points
    pts = layout[["x", "y"]].to_numpy() * [ppu_x, ppu_y]
    offset = radius_pt / 2 + 2
    near = [(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, 1), (1, -1), (-1, -1)]
    candidates = near + [(dx * 2, dy * 2) for dx, dy in near]
    for name, f in feats.iterrows():
        text = feature_name(int(f["layer"]), int(f["feature"]))
        w, h = 0.7 * fontsize * len(text), 1.3 * fontsize
        cx, cy = layout.at[name, "x"] * ppu_x, layout.at[name, "y"] * ppu_y
        best = None
        for dx, dy in candidates:
            # box centre: beside the node in the candidate direction
            bx = cx + dx * (offset + w / 2)
            by = cy + dy * (offset + h / 2)
            box = (bx - w / 2, by - h / 2, bx + w / 2, by + h / 2)
            # overlapping another label is worst, then covering nodes, then being far away
            cost = 100 * sum(_overlap(box, other) for other in placed) / (w * h)
            inside = (
                (pts[:, 0] > box[0] - 2)
                & (pts[:, 0] < box[2] + 2)
                & (pts[:, 1] > box[1] - 2)
                & (pts[:, 1] < box[3] + 2)
            )
            cost += 20 * inside.sum() + 5 * (abs(dx) + abs(dy))
            if best is None or cost < best[0]:
                best = (cost, box, dx, dy)
        _, box, dx, dy = best
        placed.append(box)
        ax.annotate(
            text,
            (layout.at[name, "x"], layout.at[name, "y"]),
            xytext=(dx * (offset + w / 2), dy * (offset + h / 2)),
            textcoords="offset points",
            ha="center",
            va="center",
            fontsize=fontsize,
            zorder=4,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        )


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _axes_labels(ax, nodes, columns, rows):
    first = nodes.sort_values("layer").groupby("position").first()
    labels, is_gene = [], []
    for p in columns.index:
        gene, token = str(first.at[p, "gene"]), str(first.at[p, "token"])
        is_gene.append(bool(gene))
        labels.append(gene if gene else (token.strip() or repr(token)))
    fontsize = 8 if len(columns) <= 40 else 6.5
    ax.set_xticks(columns["x"], labels, rotation=90, fontsize=fontsize)
    for tick, gene in zip(ax.get_xticklabels(), is_gene, strict=True):
        if not gene:
            tick.set_color("0.45")
            tick.set_style("italic")
    top = max(rows)
    has_target = (nodes["type"] == _TARGET).any()
    names = {-1.0: "embeddings"}
    ax.set_yticks(
        rows,
        [names.get(r, "target" if has_target and r == top else f"layer {int(r)}") for r in rows],
        fontsize=8,
    )
    ax.tick_params(length=0)
    ax.spines[["top", "right", "left"]].set_visible(False)
    ax.set_xlabel("token position (gene; prompt text in grey)", fontsize=8)


def _legend(ax):
    import matplotlib as mpl
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [], [], ls="", marker=m, mfc=c, mec="0.25", mew=0.5, ms=8 if m == "*" else 6, label=lab
        )
        for m, c, lab in _NODE_STYLE.values()
    ]
    cmap = mpl.colormaps[_EDGE_CMAP]
    handles += [
        Line2D([], [], color=cmap(0.9), lw=2, label="positive edge"),
        Line2D([], [], color=cmap(0.1), lw=2, label="negative edge"),
    ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.005, 1.0),
        fontsize=7.5,
        frameon=False,
        title="size ∝ √influence\nwidth, opacity ∝ |weight|",
        title_fontsize=7,
        alignment="left",
    )


def _target_label(params: dict) -> str:
    target = params.get("target", {})
    if target.get("kind") == "feature":
        return f"feature L{target.get('layer')}F{target.get('feature')}"
    return str(target.get("label", "target"))


def _title(record: dict, n_nodes: int, n_edges: int) -> str:
    params, scores = record.get("params", {}), record.get("scores", {})
    target = params.get("target", {})
    head = f"{params.get('cell', '')} → {_target_label(params)}"
    if target.get("kind") == "logit":
        head += f" (token {target.get('token', '')!r}"
        if target.get("predicted") and target.get("predicted") != target.get("label"):
            head += f"; predicted {target['predicted']}"
        head += ")"
    total = len(record["nodes"])
    shown = f"{n_nodes} nodes" + (f" of {total}" if n_nodes < total else "") + f", {n_edges} edges"
    parts = [
        f"{name} {scores[k]:.2f}"
        for k, name in (
            ("replacement_score", "replacement"),
            ("completeness_score", "completeness"),
        )
        if k in scores
    ]
    return head + "\n" + " · ".join([*parts, shown])


def circuit_heads(
    adata: AnnData,
    circuit: str,
    *,
    node: str = "target",
    value: str = "attribution",
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Heatmap of what flows through each attention head (layer x head) into a circuit's node.

    Cells show the node's incoming edges that pass last through that head (see the ``heads``
    table of :func:`sctranscoder.tl.trace_circuit`); the part that passes through no attention
    (the residual stream at the node's position) is given in the title. Each cell is annotated
    with the gene that sends most through the head when it takes at least 5% of the total.

    Parameters
    ----------
    adata
        Annotated data after :func:`sctranscoder.tl.trace_circuit`.
    circuit
        The circuit's key in ``adata.uns`` (or its cell's name).
    node
        A node of the circuit's ``head_nodes`` (default the target).
    value
        ``"attribution"`` (signed, diverging colours) or ``"fraction"`` (share of the node's
        total absolute attribution).
    ax, show, return_fig
        As in :func:`sctranscoder.pl.circuit`.
    save
        ``True`` or a file-name suffix: save to ``sc.settings.figdir``
        (``<key>_heads<suffix>.<format>``).

    Returns
    -------
    The figure with ``return_fig``; else the axes, unless shown.
    """
    import matplotlib.pyplot as plt

    if value not in ("attribution", "fraction"):
        raise ValueError(f"value must be 'attribution' or 'fraction', got {value!r}.")
    check_ax(ax)
    check_save(save)
    name, record = circuit_record(adata, circuit)
    heads = record.get("heads")
    if heads is None:
        raise KeyError(
            f"Circuit {name!r} has no attention-head table; trace it again with this version of "
            "sct.tl.trace_circuit."
        )
    table = heads[heads["node"] == node]
    if table.empty:
        nodes = sorted(set(heads["node"]))
        raise KeyError(
            f"Node {node!r} has no head table in circuit {name!r}; it has: {nodes}. Trace with "
            f"head_nodes=[..., {node!r}]."
        )
    direct = table[table["head"] < 0]
    per_head = table[table["head"] >= 0]
    grid = per_head.pivot(index="layer", columns="head", values=value)
    genes = per_head.pivot(index="layer", columns="head", values="top_source_gene")
    share = per_head.pivot(index="layer", columns="head", values="fraction")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.55 * grid.shape[1], 1.0 + 0.32 * grid.shape[0]))
    data = grid.to_numpy(dtype=float)
    vmax = float(np.nanmax(np.abs(data))) or 1.0
    if value == "attribution":
        im = ax.imshow(data, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    else:
        im = ax.imshow(data, cmap="Reds", vmin=0, aspect="auto")
    for (i, j), frac in np.ndenumerate(share.to_numpy(dtype=float)):
        gene = genes.iat[i, j]
        if frac >= 0.05 and gene:
            dark = abs(data[i, j]) / vmax > 0.6
            ax.text(j, i, gene, ha="center", va="center", fontsize=6, color="w" if dark else "k")
    ax.set_xticks(range(grid.shape[1]), grid.columns.astype(int))
    ax.set_yticks(range(grid.shape[0]), grid.index.astype(int))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.figure.colorbar(im, ax=ax, label=value, shrink=0.8)
    d = direct[value].iloc[0] if len(direct) else float("nan")
    target = _target_label(record.get("params", {})) if node == "target" else node
    ax.set_title(f"Attention heads into {target}\n(no attention: {value} {d:.3g})", fontsize=9)
    return finish(
        ax.figure, ax, writekey=f"{name}_heads", show=show, save=save, return_fig=return_fig
    )
