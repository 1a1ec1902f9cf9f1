"""Pictures of attribution graphs: a static SVG/PNG (graphviz), one self-contained interactive HTML
file, and a two-graph comparison SVG.

Layout (shared by every picture): layers are rows (token embeddings at the bottom, logits at the
top; layers with no nodes are left out), token positions are columns. Nodes of one (layer, position)
cell sit side by side, strongest first. Positions are computed here and handed to graphviz
`neato -n2`, which only draws, so pictures are deterministic and the columns line up with the
prompt.
"""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write, atomic_write_text

from .graph import (
    ERROR,
    FEATURE,
    LOGIT,
    TOKEN,
    AttributionGraph,
    display_label,
)
from .pruning import compute_influence

POS_COLOR, NEG_COLOR = "#2563eb", "#dc2626"
STATUS_COLORS = {"a": "#f59e0b", "b": "#8b5cf6", "both": "#d1d5db"}
STATUS_NAMES = {"a": "only in A", "b": "only in B", "both": "in both"}
DEFAULT_MAX_NODES = 300

# layout constants, in points (1/72 inch)
CELL_W, ROW_H, LOGIT_W, TOKEN_W = 64.0, 46.0, 78.0, 70.0
MAX_CELL_W = 6 * CELL_W  # wider cells wrap onto more lines


@dataclass
class _Node:
    """What the layout and the pictures need to know about one node."""

    id: str
    kind: int
    layer: int
    pos: int
    label: str
    score: float  # 0..1, drawn size
    detail: str  # tooltip text
    index: int = -1
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = 0.0
    fill: str | None = None


# -- node scores and selection ---------------------------------------------------------------------


def importance(graph: AttributionGraph) -> np.ndarray:
    """|influence on the logits| per node: the pruning's where it ran, else computed here."""
    if graph.influence is not None:
        raw = graph.influence
    else:
        raw = compute_influence(graph)
    return np.nan_to_num(np.abs(np.asarray(raw, dtype=np.float64)))


def node_scores(graph: AttributionGraph) -> np.ndarray:
    """Drawn size of each node in [0, 1]: sqrt of its influence over the largest influence of a
    feature or error node (tokens and logits get 1)."""
    raw = importance(graph)
    inner = (graph.kind == FEATURE) | (graph.kind == ERROR)
    top = raw[inner].max() if inner.any() else 0.0
    s = np.sqrt(np.clip(raw / top, 0.0, 1.0)) if top > 0 else np.full(graph.n_nodes, 0.5)
    s[~inner] = 1.0
    return s


def select_nodes(graph: AttributionGraph, max_nodes: int | None) -> AttributionGraph:
    """The graph itself, or (when it has more than max_nodes nodes) the subgraph of its token and
    logit nodes plus its most influential feature and error nodes."""
    if max_nodes is None or graph.n_nodes <= max_nodes:
        return graph
    always = (graph.kind == TOKEN) | (graph.kind == LOGIT)
    room = max(max_nodes - int(always.sum()), 0)
    raw = importance(graph)
    cand = np.flatnonzero(~always)
    best = cand[np.argsort(-raw[cand], kind="stable")[:room]]
    return graph.subgraph(np.sort(np.concatenate([np.flatnonzero(always), best])))


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _token_text(s: str) -> str:
    """A token string made visible: spaces as ·, newlines as ⏎."""
    return s.replace("\n", "⏎").replace(" ", "·") or "∅"


def _nodes_of(graph: AttributionGraph, scores: np.ndarray | None = None) -> list[_Node]:
    scores = node_scores(graph) if scores is None else scores
    logit_nodes = graph.logit_nodes
    strings = graph.logit_strings
    act = graph.activation
    infl = graph.influence
    out = []
    for i in range(graph.n_nodes):
        k, L, p = int(graph.kind[i]), int(graph.layer[i]), int(graph.pos[i])
        tok = graph.token_strings[p] if 0 <= p < len(graph.token_strings) else "?"
        lines = []
        text, source = display_label(graph, i)
        if k == FEATURE:
            base = f"L{L}/{int(graph.feature[i])}"
            label = f"{_short(text, 22)}\n{base}" if source != "default" else base
            lines.append(f"feature {base} at position {p} ({tok!r})")
        elif k == ERROR:
            label = f"err L{L}"
            lines.append(f"transcoder error, layer {L}, position {p} ({tok!r})")
        elif k == TOKEN:
            label = _short(_token_text(tok), 14)
            lines.append(f"token {tok!r} at position {p}")
        else:
            j = int(np.flatnonzero(logit_nodes == i)[0])
            s = strings[j] if j < len(strings) else str(int(graph.feature[i]))
            prob = (
                float(graph.logit_probabilities[j])
                if j < len(graph.logit_probabilities)
                else float("nan")
            )
            label = f"{_short(_token_text(s), 12)}\np={prob:.2f}"
            lines.append(f"logit {s!r} (id {int(graph.feature[i])}), p={prob:.3f}")
        if source != "default":
            lines.append(f"{'label' if source == 'human' else 'auto label'}: {text}")
        lines.append(f"activation {float(act[i]):.4g}")
        if infl is not None:
            lines.append(f"influence {float(infl[i]):.4g}")
        out.append(
            _Node(graph.node_id(i), k, L, p, label, float(scores[i]), "\n".join(lines), index=i)
        )
    return out


# -- layout ----------------------------------------------------------------------------------------

_LOGIT_ROW = 10**6


def _row_key(n: _Node) -> int:
    return {TOKEN: -1, LOGIT: _LOGIT_ROW}.get(n.kind, n.layer)


def layout(
    nodes: list[_Node], n_pos: int
) -> tuple[float, float, list[tuple[str, float]], list[float]]:
    """Set x, y, w, h of every node. Returns (width, height, row labels [(text, y)], column
    centres)."""
    for n in nodes:
        if n.kind == TOKEN:
            n.w, n.h = TOKEN_W - 8, 22.0
        elif n.kind == LOGIT:
            n.w, n.h = LOGIT_W - 8, 30.0
        else:
            n.w = CELL_W * (0.55 + 0.35 * n.score) - 4
            n.h = 14.0 + 12.0 * n.score
            if "\n" in n.label:  # a human label above the L/feature line
                n.h = max(n.h, 26.0)
                n.w = max(n.w, 4.6 * max(len(t) for t in n.label.split("\n")) + 6)
    cells: dict[tuple[int, int], list[_Node]] = {}
    for n in nodes:
        cells.setdefault((_row_key(n), n.pos), []).append(n)
    n_cols = max([n_pos] + [n.pos + 1 for n in nodes])
    col_w = [TOKEN_W] * n_cols
    lines: dict[tuple[int, int], list[list[_Node]]] = {}
    for (r, p), cell in cells.items():
        if r == _LOGIT_ROW:
            # most probable first; the row spreads left over the empty top of the picture
            cell.sort(key=lambda n: n.index)
            lines[(r, p)] = [cell]
            continue
        cell.sort(key=lambda n: (-n.score, n.id))
        # a crowded cell wraps onto several lines, strongest first, so no column grows too wide
        lines[(r, p)] = cell_lines = [[]]
        used = 0.0
        for n in cell:
            if cell_lines[-1] and used + n.w + 6 > MAX_CELL_W:
                cell_lines.append([])
                used = 0.0
            cell_lines[-1].append(n)
            used += n.w + 6
        col_w[p] = max(col_w[p], max(sum(n.w + 6 for n in line) for line in cell_lines) + 4)
    line_h = {key: [max(n.h for n in line) + 6 for line in ls] for key, ls in lines.items()}
    rows = sorted({r for r, _ in cells})
    row_h = {
        r: max([ROW_H] + [sum(hs) + 10 for (rr, _), hs in line_h.items() if rr == r]) for r in rows
    }
    # rows bottom-up (tokens first); y grows upwards here and is flipped at the end
    row_y, y = {}, 30.0
    for r in rows:
        row_y[r] = y + row_h[r] / 2
        y += row_h[r]
    left = 54.0
    right = left + sum(col_w)
    col_x = list(np.concatenate([[left], left + np.cumsum(col_w)[:-1]]))
    centres = [col_x[p] + col_w[p] / 2 for p in range(n_cols)]
    for (r, p), cell_lines in lines.items():
        hs = line_h[(r, p)]
        top = row_y[r] + sum(hs) / 2  # the first line is drawn on top
        for line, h in zip(cell_lines, hs):
            total = sum(n.w + 6 for n in line) - 6
            x = centres[p] - total / 2
            if r == _LOGIT_ROW:
                x = max(left, min(x, right - total))
                right = max(right, x + total)
            for n in line:
                n.x, n.y = x + n.w / 2, top - h / 2
                x += n.w + 6
            top -= h
    names = {-1: "emb", _LOGIT_ROW: "logit"}
    labels = [(names.get(r, f"L{r}"), y) for r, y in row_y.items()]
    width = right + 20
    height = y + 10
    # flip so tokens are at the bottom (y grows downwards, as in SVG)
    for n in nodes:
        n.y = height - n.y
    labels = [(t, height - y) for t, y in labels]
    return width, height, labels, centres


# -- edges -----------------------------------------------------------------------------------------


def select_edges(
    graph: AttributionGraph,
    per_target: int = 4,
    max_edges: int | None = None,
    min_frac: float = 0.05,
) -> list[tuple[int, int, float]]:
    """The strongest incoming edges of each node (at most per_target each, and at least min_frac of
    that node's strongest input), then the max_edges strongest overall. Returns
    [(source, target, weight)]."""
    adj = graph.adjacency.tocsr()
    if adj.nnz == 0:
        return []
    edges = []
    for t in range(adj.shape[0]):
        a, b = adj.indptr[t], adj.indptr[t + 1]
        if a == b:
            continue
        w = adj.data[a:b]
        order = np.argsort(-np.abs(w), kind="stable")[:per_target]
        top = abs(w[order[0]])
        for o in order:
            if abs(w[o]) >= min_frac * top and abs(w[o]) > 0 and adj.indices[a + o] != t:
                edges.append((int(adj.indices[a + o]), t, float(w[o])))
    max_edges = max_edges if max_edges is not None else max(3 * graph.n_nodes, 150)
    edges.sort(key=lambda e: -abs(e[2]))
    return edges[:max_edges]


def _hex_alpha(color: str, a: float) -> str:
    return f"{color}{int(round(255 * min(max(a, 0.0), 1.0))):02x}"


def _edge_style(w: float, wmax: float) -> tuple[str, float]:
    r = (abs(w) / wmax) ** 0.5 if wmax > 0 else 0.0
    return _hex_alpha(POS_COLOR if w >= 0 else NEG_COLOR, 0.12 + 0.78 * r), 0.3 + 3.4 * r


# -- DOT and graphviz ------------------------------------------------------------------------------


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_attrs(n: _Node, height: float, fill: str | None = None) -> dict:
    if n.kind == FEATURE:
        shade = int(round(240 - 110 * n.score))
        a = dict(
            shape="box",
            style="rounded,filled",
            fillcolor=fill or f"#{shade:02x}{shade + 8:02x}ff",
            color="#1e3a8a" if n.score > 0.5 else "#64748b",
            fontsize=f"{7 + 2 * n.score:.1f}",
        )
    elif n.kind == ERROR:
        a = dict(
            shape="box",
            style="dashed,filled",
            fillcolor=fill or "#f3f4f6",
            color="#6b7280",
            fontcolor="#4b5563",
            fontsize="7",
        )
    elif n.kind == TOKEN:
        a = dict(
            shape="box", style="filled", fillcolor=fill or "#fef3c7", color="#92400e", fontsize="9"
        )
    else:
        a = dict(
            shape="box",
            style="rounded,filled,bold",
            fillcolor=fill or "#dcfce7",
            color="#166534",
            fontsize="9",
        )
    a.update(
        width=f"{n.w / 72:.3f}",
        height=f"{n.h / 72:.3f}",
        fixedsize="true",
        pos=f"{n.x:.1f},{height - n.y:.1f}!",
        label=n.label,
        tooltip=n.detail,
        id=n.id,
    )
    return a


def _dot(
    nodes: list[_Node],
    edges: list[tuple[str, str, float]],
    width: float,
    height: float,
    row_labels: list[tuple[str, float]],
    col_centres: list[float],
    token_strings: list[str],
    title: str,
    legend: list[tuple[str, str]] | None = None,
) -> str:
    out = [
        "digraph G {",
        f'  graph [bgcolor="white", outputorder="edgesfirst", splines="false", pad="0.2", '
        f'bb="0,0,{width:.0f},{height + 40:.0f}", label={_q(title)}, labelloc="t", fontsize="12", '
        f'fontname="Helvetica"];',
        '  node [fontname="Helvetica", penwidth="0.8", margin="0.02,0.01"];',
        '  edge [arrowsize="0.35"];',
    ]
    for text, y in row_labels:
        out.append(
            f'  {_q("row:" + text)} [shape=plaintext, label={_q(text)}, fontsize="9", '
            f'fontcolor="#6b7280", pos="22,{height - y:.1f}!", width="0.4", height="0.2"];'
        )
    for p, x in enumerate(col_centres):
        if p < len(token_strings):
            out.append(
                f'  {_q(f"col:{p}")} [shape=plaintext, label={_q(str(p))}, fontsize="7", '
                f'fontcolor="#9ca3af", pos="{x:.1f},8!", width="0.3", height="0.15"];'
            )
    for n in nodes:
        attrs = _node_attrs(n, height, n.fill)
        out.append(
            f"  {_q(n.id)} [" + ", ".join(f"{k}={_q(str(v))}" for k, v in attrs.items()) + "];"
        )
    wmax = max((abs(w) for _, _, w in edges), default=1.0)
    for s, t, w in sorted(edges, key=lambda e: abs(e[2])):
        color, pw = _edge_style(w, wmax)
        out.append(
            f'  {_q(s)} -> {_q(t)} [color="{color}", penwidth="{pw:.2f}", '
            f"tooltip={_q(f'{w:+.4g}')}];"
        )
    if legend:
        x = 60.0
        for i, (text, color) in enumerate(legend):
            out.append(
                f'  {_q(f"legend:{i}")} [shape=box, style="filled", fillcolor="{color}", '
                f'label={_q(text)}, fontsize="8", width="0.9", height="0.22", fixedsize="true", '
                f'pos="{x:.0f},{height + 22:.0f}!"];'
            )
            x += 74
    out.append("}")
    return "\n".join(out) + "\n"


def _run_graphviz(dot_text: str, fmt: str) -> bytes:
    exe = shutil.which("neato")
    if exe is None:
        raise UserError(
            "graphviz is not installed (no `neato`/`dot` on PATH); install it "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz)"
        )
    args = [exe, "-n2", f"-T{fmt}"] + (["-Gdpi=110"] if fmt == "png" else [])
    r = subprocess.run(args, input=dot_text.encode(), capture_output=True, timeout=300)
    if r.returncode != 0:
        raise UserError(f"graphviz failed: {r.stderr.decode(errors='replace').strip()[:500]}")
    return r.stdout


def _write_picture(dot_text: str, path: str | Path) -> Path:
    path = Path(path)
    fmt = {".png": "png", ".pdf": "pdf", ".dot": "dot", ".gv": "dot"}.get(
        path.suffix.lower(), "svg"
    )
    data = dot_text.encode() if fmt == "dot" else _run_graphviz(dot_text, fmt)
    atomic_write(path, lambda f: f.write(data))
    return path


def graph_dot(graph: AttributionGraph, max_nodes: int | None = DEFAULT_MAX_NODES) -> str:
    """The DOT text of the static picture (positions fixed; draw with `neato -n2`)."""
    g = select_nodes(graph, max_nodes)
    nodes = _nodes_of(g)
    width, height, rows, cols = layout(nodes, g.n_pos)
    ids = [n.id for n in nodes]
    edges = [(ids[s], ids[t], w) for s, t, w in select_edges(g)]
    n_feat = int((g.kind == FEATURE).sum())
    title = (
        f"{_short(g.prompt, 90)!r} — {n_feat} features, {g.n_nodes - n_feat} other nodes, "
        f"{len(edges)} of {g.adjacency.nnz} edges shown (blue +, red −)"
    )
    return _dot(nodes, edges, width, height, rows, cols, g.token_strings, title)


def render_svg(
    graph: AttributionGraph, path: str | Path, max_nodes: int | None = DEFAULT_MAX_NODES
) -> Path:
    """Draw the graph with graphviz. The format follows the suffix: .svg (default), .png, .pdf,
    .dot."""
    return _write_picture(graph_dot(graph, max_nodes), path)


# -- comparison ------------------------------------------------------------------------------------


def _comparison_frame(comparison, graph_a: AttributionGraph, graph_b: AttributionGraph):
    """(node status by merged id, A id -> merged id, B id -> merged id, A pos -> column,
    B pos -> column, column tokens). A plain dict node id -> status means both graphs share one
    prompt."""
    status = getattr(comparison, "node_status", comparison)
    if not isinstance(status, dict):
        raise UserError(
            "render_comparison_svg needs a Comparison (from circuits.compare) or a dict "
            "node id -> a/b/both"
        )
    status = {str(k): str(v) for k, v in status.items()}
    columns = getattr(comparison, "columns", None)
    if columns is None:
        toks = list(graph_a.token_strings) + list(
            graph_b.token_strings[len(graph_a.token_strings) :]
        )
        ident = {p: p for p in range(len(toks))}
        return status, {}, {}, ident, ident, toks
    col_a = {pa: c for c, (pa, _) in enumerate(columns) if pa is not None}
    col_b = {pb: c for c, (_, pb) in enumerate(columns) if pb is not None}
    return (
        status,
        comparison.a_to_merged,
        comparison.b_to_merged,
        col_a,
        col_b,
        comparison.column_tokens(),
    )


def comparison_dot(
    comparison,
    graph_a: AttributionGraph | None = None,
    graph_b: AttributionGraph | None = None,
    max_nodes: int | None = DEFAULT_MAX_NODES,
) -> str:
    graph_a = graph_a if graph_a is not None else comparison.a
    graph_b = graph_b if graph_b is not None else comparison.b
    status, to_a, to_b, col_a, col_b, toks = _comparison_frame(comparison, graph_a, graph_b)
    ga, gb = select_nodes(graph_a, max_nodes), select_nodes(graph_b, max_nodes)
    merged: dict[str, _Node] = {}
    edges: dict[tuple[str, str], float] = {}
    # A's description wins for shared nodes
    for g, to, col in ((gb, to_b, col_b), (ga, to_a, col_a)):
        nodes = _nodes_of(g)
        ids = [to.get(n.id, n.id) for n in nodes]
        for n, m in zip(nodes, ids):
            n.id, n.pos = m, col[n.pos]
            if n.kind == TOKEN and m.count(":") == 1:
                n.label = _short(_token_text(toks[n.pos]), 14)
            merged[m] = n
        for s, t, w in select_edges(g):
            edges[(ids[s], ids[t])] = w
    nodes = list(merged.values())
    for n in nodes:
        st = status.get(n.id, "both")
        n.fill = STATUS_COLORS.get(st, "#ffffff")
        n.detail += f"\n{STATUS_NAMES.get(st, st)}"
    width, height, rows, cols = layout(nodes, len(toks))
    legend = [(STATUS_NAMES[k], c) for k, c in STATUS_COLORS.items()]
    title = f"A: {_short(graph_a.prompt, 50)!r}   B: {_short(graph_b.prompt, 50)!r}"
    if hasattr(comparison, "jaccard"):
        title += f"   (Jaccard {comparison.jaccard:.2f})"
    return _dot(
        nodes,
        [(s, t, w) for (s, t), w in edges.items()],
        width,
        height,
        rows,
        cols,
        toks,
        title,
        legend,
    )


def render_comparison_svg(
    comparison,
    graph_a: AttributionGraph | None,
    graph_b: AttributionGraph | None,
    path: str | Path,
    max_nodes: int | None = DEFAULT_MAX_NODES,
) -> Path:
    """One picture of both graphs in the comparison's shared column frame, nodes coloured by
    `comparison.node_status` ("a" only in A, "b" only in B, "both"). graph_a/graph_b default to the
    comparison's (pruned) graphs; a plain dict node id -> status works for two graphs of one prompt.
    The format follows the suffix, as in `render_svg`."""
    return _write_picture(comparison_dot(comparison, graph_a, graph_b, max_nodes), path)


# -- interactive HTML ------------------------------------------------------------------------------


def _frontend(name: str) -> str:
    return resources.files("circuits").joinpath("frontend", name).read_text(encoding="utf-8")


def html_data(
    graph: AttributionGraph, max_nodes: int | None = None, max_edges: int = 20000
) -> dict:
    """The JSON the HTML viewer draws: nodes with layout positions, edges with weights,
    dashboards."""
    g = select_nodes(graph, max_nodes)
    nodes = _nodes_of(g)
    width, height, rows, cols = layout(nodes, g.n_pos)
    adj = g.adjacency.tocoo()
    keep = adj.row != adj.col
    t, s, w = adj.row[keep], adj.col[keep], adj.data[keep]
    if len(w) > max_edges:
        top = np.argsort(-np.abs(w), kind="stable")[:max_edges]
        t, s, w = t[top], s[top], w[top]
    dashboards = g.dashboards
    ids = {n.id for n in nodes}
    return {
        "prompt": g.prompt,
        "tokens": list(g.token_strings),
        "width": width,
        "height": height,
        "rows": [[text, y] for text, y in rows],
        "cols": cols[: len(g.token_strings)],
        "nodes": [
            {
                "id": n.id,
                "kind": ["feature", "error", "token", "logit"][n.kind],
                "layer": n.layer,
                "pos": n.pos,
                "label": n.label,
                "detail": n.detail,
                "score": round(n.score, 4),
                "x": round(n.x, 1),
                "y": round(n.y, 1),
                "w": round(n.w, 1),
                "h": round(n.h, 1),
            }
            for n in nodes
        ],
        "edges": [[int(a), int(b), float(f"{c:.4g}")] for a, b, c in zip(s, t, w)],
        "dashboards": {k: v for k, v in dashboards.items() if k in ids},
        "supernodes": [
            {"name": name, "members": [m for m in members if m in ids]}
            for name, members in g.supernodes.items()
        ],
        "scores": g.scores or None,
        "model": (g.metadata or {}).get("model", ""),
    }


def render_html(graph: AttributionGraph, path: str | Path, max_nodes: int | None = None) -> Path:
    """Write one self-contained HTML file (inline JS and CSS; works offline from file://)."""
    # NaN is a JS literal
    data = json.dumps(html_data(graph, max_nodes), separators=(",", ":"), default=str)
    parts = {
        "__TITLE__": html_lib.escape(_short(graph.prompt, 80)),
        "/*__CSS__*/": _frontend("viewer.css"),
        "/*__JS__*/": _frontend("viewer.js"),
        "/*__DATA__*/null": data.replace("</", "<\\/"),  # never close the <script> early
    }
    # one pass, so nothing substituted (a prompt, the data) is itself searched for markers
    page = re.sub(
        "|".join(re.escape(k) for k in parts), lambda m: parts[m.group(0)], _frontend("viewer.html")
    )
    path = Path(path)
    atomic_write_text(path, page)
    return path
