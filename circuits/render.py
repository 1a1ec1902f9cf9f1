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
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import scipy.sparse as sp

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
LABEL_CHARS = 24  # a feature's label is cut (…) to this many characters; the tooltip has it all
SUB_FONT = 6.0  # font size of a node's second line (a labelled feature's L/F id, a logit's p)


@dataclass
class _Node:
    """What the layout and the pictures need to know about one node."""

    id: str
    kind: int
    layer: int
    pos: int
    label: str  # the main line drawn in the box (a feature's label, shortened)
    score: float  # 0..1, drawn size
    detail: str  # tooltip text
    index: int = -1
    sub: str = ""  # a smaller second line: a labelled feature's L/F id, a logit's probability
    name: str = ""  # the whole display label (`display_label`), for lists and the side panel
    label_source: str = "default"  # "human", "auto" or "default", as in `display_label`
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


def _one_line(s: str) -> str:
    """A label as one drawable line: runs of whitespace become one space, control characters
    (which graphviz's label parser refuses) are dropped."""
    return "".join(c for c in " ".join(s.split()) if c.isprintable())


def _texts(graph: AttributionGraph, i: int, text: str, source: str) -> tuple[str, str, list[str]]:
    """(main line, small second line, tooltip lines) of node i, whose `display_label` is (text,
    source)."""
    k, L, p = int(graph.kind[i]), int(graph.layer[i]), int(graph.pos[i])
    tok = graph.token_strings[p] if 0 <= p < len(graph.token_strings) else "?"
    if k == FEATURE:
        base = f"L{L}/{int(graph.feature[i])}"
        label = _short(_one_line(text), LABEL_CHARS) if source != "default" else ""
        about = f"feature {base} at position {p} ({tok!r})"
        return (label, base, [about]) if label else (base, "", [about])
    if k == ERROR:
        return f"err L{L}", "", [f"transcoder error, layer {L}, position {p} ({tok!r})"]
    if k == TOKEN:
        return _short(_token_text(tok), 14), "", [f"token {tok!r} at position {p}"]
    j = int(np.flatnonzero(graph.logit_nodes == i)[0])
    strings = graph.logit_strings
    s = strings[j] if j < len(strings) else str(int(graph.feature[i]))
    probs = graph.logit_probabilities
    prob = float(probs[j]) if j < len(probs) else float("nan")
    about = f"logit {s!r} (id {int(graph.feature[i])}), p={prob:.3f}"
    return _short(_token_text(s), 12), f"p={prob:.2f}", [about]


def _nodes_of(graph: AttributionGraph, scores: np.ndarray | None = None) -> list[_Node]:
    scores = node_scores(graph) if scores is None else scores
    out = []
    for i in range(graph.n_nodes):
        name, source = display_label(graph, i)
        label, sub, lines = _texts(graph, i, name, source)
        if source != "default":
            lines.append(f"{'label' if source == 'human' else 'auto label'}: {name}")
        lines.append(f"activation {float(graph.activation[i]):.4g}")
        if graph.influence is not None:
            lines.append(f"influence {float(graph.influence[i]):.4g}")
        out.append(
            _Node(
                id=graph.node_id(i),
                kind=int(graph.kind[i]),
                layer=int(graph.layer[i]),
                pos=int(graph.pos[i]),
                label=label,
                score=float(scores[i]),
                detail="\n".join(lines),
                index=i,
                sub=sub,
                name=_one_line(name) or label,
                label_source=source,
            )
        )
    return out


# -- layout ----------------------------------------------------------------------------------------


def font_size(n: _Node) -> float:
    """The font size of node n's main line, in points: stronger features are drawn larger."""
    if n.kind == FEATURE:
        return round(7 + 2 * n.score, 1)
    return 7.0 if n.kind == ERROR else 9.0


def text_width(s: str, size: float) -> float:
    """About how wide `s` is in Helvetica at font size `size`, in points (wide East Asian
    characters take a full em, the others about half of one)."""
    return size * sum(1.0 if unicodedata.east_asian_width(c) in "WF" else 0.56 for c in s)


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
            n.w = max(n.w, text_width(n.label, font_size(n)) + 8)
            if n.sub:  # a label above the small L/feature line
                n.h = max(n.h, 26.0)
                n.w = max(n.w, text_width(n.sub, SUB_FONT) + 8)
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
        )
    elif n.kind == ERROR:
        a = dict(
            shape="box",
            style="dashed,filled",
            fillcolor=fill or "#f3f4f6",
            color="#6b7280",
            fontcolor="#4b5563",
        )
    elif n.kind == TOKEN:
        a = dict(shape="box", style="filled", fillcolor=fill or "#fef3c7", color="#92400e")
    else:
        a = dict(
            shape="box", style="rounded,filled,bold", fillcolor=fill or "#dcfce7", color="#166534"
        )
    a.update(
        fontsize=f"{font_size(n):.1f}",
        width=f"{n.w / 72:.3f}",
        height=f"{n.h / 72:.3f}",
        fixedsize="true",
        pos=f"{n.x:.1f},{height - n.y:.1f}!",
        tooltip=n.detail,
        id=n.id,
    )
    return a


def _dot_label(n: _Node) -> str:
    """Node n's DOT label: its main line, and its second line (if any) smaller beneath it, as a
    graphviz HTML-like label."""
    if not n.sub:
        return _q(n.label)
    main, sub = (html_lib.escape(_one_line(t), quote=True) for t in (n.label, n.sub))
    return f'<{main}<BR/><FONT POINT-SIZE="{SUB_FONT:g}" COLOR="#475569">{sub}</FONT>>'


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
        attrs = [f"{k}={_q(str(v))}" for k, v in _node_attrs(n, height, n.fill).items()]
        out.append(f"  {_q(n.id)} [" + ", ".join(attrs + [f"label={_dot_label(n)}"]) + "];")
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


def _picture_format(path: str | Path) -> str:
    return {".png": "png", ".pdf": "pdf", ".dot": "dot", ".gv": "dot"}.get(
        Path(path).suffix.lower(), "svg"
    )


def check_graphviz_for(path: str | Path) -> None:
    """Refuse, before any work, a picture at `path` that needs graphviz when it is not installed
    (DOT text, `.dot`/`.gv`, needs none)."""
    if _picture_format(path) != "dot":
        _graphviz()


def _graphviz() -> str:
    exe = shutil.which("neato")
    if exe is None:
        raise UserError(
            "graphviz is not installed (no `neato`/`dot` on PATH); install it "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz)"
        )
    return exe


def _run_graphviz(dot_text: str, fmt: str) -> bytes:
    args = [_graphviz(), "-n2", f"-T{fmt}"] + (["-Gdpi=110"] if fmt == "png" else [])
    r = subprocess.run(args, input=dot_text.encode(), capture_output=True, timeout=300)
    if r.returncode != 0:
        raise UserError(f"graphviz failed: {r.stderr.decode(errors='replace').strip()[:500]}")
    return r.stdout


def _write_picture(dot_text: str, path: str | Path) -> Path:
    path = Path(path)
    fmt = _picture_format(path)
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


N_STRONGEST = 5  # inputs and outputs the viewer's side panel lists per node


def strongest_links(
    graph: AttributionGraph, k: int = N_STRONGEST
) -> tuple[list[list[list]], list[list[list]], np.ndarray, np.ndarray]:
    """Every node's k strongest inputs and outputs by |weight| (self-loops left out):
    (inputs, outputs, n_inputs [n_nodes], n_outputs [n_nodes]); inputs[i] is
    [[source index, weight], ...], strongest first, and outputs[i] [[target index, weight], ...]."""
    coo = graph.adjacency.tocoo()
    keep = (coo.row != coo.col) & (coo.data != 0)
    shape = graph.adjacency.shape
    incoming = sp.csr_array((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=shape)
    outgoing = sp.csr_array((coo.data[keep], (coo.col[keep], coo.row[keep])), shape=shape)
    inputs, outputs = _top_of_rows(incoming, k), _top_of_rows(outgoing, k)
    return inputs, outputs, np.diff(incoming.indptr), np.diff(outgoing.indptr)


def _top_of_rows(m: sp.csr_array, k: int) -> list[list[list]]:
    """For each row of m, its k entries of largest |value|: [[column, value], ...], largest
    first."""
    out = []
    for r in range(m.shape[0]):
        cols, vals = m.indices[m.indptr[r] : m.indptr[r + 1]], m.data[m.indptr[r] : m.indptr[r + 1]]
        order = np.lexsort((cols, -np.abs(vals)))[:k]
        out.append([[int(cols[o]), float(f"{vals[o]:.4g}")] for o in order])
    return out


def _feature_key(graph: AttributionGraph, i: int) -> str | None:
    """The `L/F` key of feature node i's dashboard, or None when it has none."""
    if graph.feature_dashboard(i) is None:
        return None
    return f"{int(graph.layer[i])}/{int(graph.feature[i])}"


def html_data(
    graph: AttributionGraph, max_nodes: int | None = None, max_edges: int = 20000
) -> dict:
    """The JSON the HTML viewer draws: nodes with layout positions, labels and strongest links,
    edges with weights, dashboards by feature key `L/F` (shared by one feature's positions)."""
    g = select_nodes(graph, max_nodes)
    nodes = _nodes_of(g)
    width, height, rows, cols = layout(nodes, g.n_pos)
    adj = g.adjacency.tocoo()
    keep = adj.row != adj.col
    t, s, w = adj.row[keep], adj.col[keep], adj.data[keep]
    if len(w) > max_edges:
        top = np.argsort(-np.abs(w), kind="stable")[:max_edges]
        t, s, w = t[top], s[top], w[top]
    inputs, outputs, n_in, n_out = strongest_links(g)
    keys = [_feature_key(g, i) for i in range(g.n_nodes)]
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
                "sub": n.sub,
                "name": n.name,
                "label_source": n.label_source,
                "detail": n.detail,
                "score": round(n.score, 4),
                "font": font_size(n),
                "x": round(n.x, 1),
                "y": round(n.y, 1),
                "w": round(n.w, 1),
                "h": round(n.h, 1),
                "dashboard": keys[n.index],
                "inputs": inputs[n.index],
                "outputs": outputs[n.index],
                "n_inputs": int(n_in[n.index]),
                "n_outputs": int(n_out[n.index]),
            }
            for n in nodes
        ],
        "edges": [[int(a), int(b), float(f"{c:.4g}")] for a, b, c in zip(s, t, w)],
        "dashboards": {k: g.feature_dashboard(i) for i, k in enumerate(keys) if k is not None},
        "supernodes": [
            {"name": name, "members": [m for m in members if m in ids]}
            for name, members in g.supernodes.items()
        ],
        "scores": g.scores or None,
        "model": (g.metadata or {}).get("model", ""),
        "head_loadings": head_loadings_data(g, ids),
    }


# what the viewer shows of an edge's QK attribution (`attention.qk_view`)
_QK_KEYS = (
    "layer",
    "head",
    "query_pos",
    "key_pos",
    "versus_pos",
    "query_token",
    "key_token",
    "score",
    "capped_score",
    "pattern_row",
    "query_side",
    "key_side",
    "matrix",
    "residual",
)


def head_loadings_data(graph: AttributionGraph, ids: set[str]) -> dict | None:
    """The head loadings `heads.attach_head_loadings` stored in the graph's metadata, for the
    viewer: the edges whose two nodes are on the page, each with its top heads and (where stored)
    the QK attribution of its top head. None when the graph has none."""
    stored = (graph.metadata or {}).get("head_loadings")
    if stored is None:
        return None
    edges = stored.get("edges") if isinstance(stored, dict) else None
    if not isinstance(edges, list) or not all(isinstance(e, dict) for e in edges):
        raise UserError(
            "the graph's metadata head_loadings is malformed (no list of edges); write it again "
            "with `circuits heads --out`"
        )
    out = []
    for e in edges:
        if e.get("source") not in ids or e.get("target") not in ids:
            continue
        edge = {k: e.get(k) for k in ("source", "target", "weight", "stay")}
        edge["heads"] = [dict(h) for h in e.get("heads") or [] if isinstance(h, dict)]
        if isinstance(e.get("qk"), dict):
            edge["qk"] = {k: e["qk"].get(k) for k in _QK_KEYS}
        out.append(edge)
    return {"definition": str(stored.get("definition", "")), "edges": out}


# what must not appear raw in data inside a <script>: `<` (`</script>` ends it early, `<!--` makes
# the parser hunt for a later end), `>` and `&` for good measure, and the two line separators that
# older JS engines refuse in string literals
_SCRIPT_SAFE = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def script_json(value) -> str:
    """`value` as JSON that is safe to inline in an HTML <script> element: the same value for JS,
    with no `<`, `>`, `&` or line separator left raw (all are \\uXXXX escapes; outside strings JSON
    has none of them)."""
    return json.dumps(value, separators=(",", ":"), default=str).translate(_SCRIPT_SAFE)


def render_html(graph: AttributionGraph, path: str | Path, max_nodes: int | None = None) -> Path:
    """Write one self-contained HTML file (inline JS and CSS; works offline from file://)."""
    data = script_json(html_data(graph, max_nodes))  # NaN, as json writes it, is a JS literal
    parts = {
        "__TITLE__": html_lib.escape(_short(graph.prompt, 80)),
        "/*__CSS__*/": _frontend("viewer.css"),
        "/*__JS__*/": _frontend("viewer.js"),
        "/*__DATA__*/null": data,
    }
    # one pass, so nothing substituted (a prompt, the data) is itself searched for markers
    page = re.sub(
        "|".join(re.escape(k) for k in parts), lambda m: parts[m.group(0)], _frontend("viewer.html")
    )
    path = Path(path)
    atomic_write_text(path, page)
    return path
