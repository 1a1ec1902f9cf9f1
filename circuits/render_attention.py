"""Pictures of a QK attribution (`attention.qk_view`): one self-contained SVG, written element by
element (no graphviz), with

- a title: the head, the query and key tokens and positions, the score;
- the head's attention row at the query as a strip of bars, one per key position (the key and a
  contrast key marked), so a reader sees which keys the head looks at;
- the pair table as a heatmap: rows the strongest query-side sources, columns the strongest key-side
  sources, each cell one term scaling * q^(s) . k^(t) of the score, blue positive and red negative
  (the edge colours of `render`), its value written in when it fits;
- a bar chart of each side's strongest sources, with their values.

Every text passes through `_one_line` and `html.escape`, as `render` does for graphviz's labels.
"""

from __future__ import annotations

import html as html_lib

from .render import NEG_COLOR, POS_COLOR, _one_line, _short, _token_text, text_width

FONT = "Helvetica, Arial, sans-serif"
MARGIN = 16.0
LABEL_CHARS = 30  # a source's label is cut (…) to this many characters; its <title> has it all
CELL_W, CELL_H = 48.0, 22.0  # a heatmap cell, in px
VALUE_FONT, LABEL_FONT, TITLE_FONT = 8.0, 9.0, 13.0
BAR_W, BAR_ROW = 150.0, 15.0  # half-width of a bar chart (zero in the middle), height of one bar
VALUE_W = 44.0  # room beside a bar for its value
STRIP_H, STRIP_MAX_W = 46.0, 760.0  # the attention strip: bar height at p = 1, its widest
STRIP_LABEL_EVERY = 14.0  # px a token label needs below its bar
MUTED = "#6b7280"


def _x(s) -> str:
    """Text made safe for SVG: one printable line, XML-escaped (quotes too, for attributes)."""
    return html_lib.escape(_one_line(str(s)), quote=True)


def _num(v: float) -> str:
    return f"{v:+.3g}"


def _mix(color: str, t: float) -> str:
    """`color` (#rrggbb) blended with white: t = 0 white, t = 1 the colour."""
    t = min(max(t, 0.0), 1.0)
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 + (c - 255) * t):02x}" for c in rgb)


def cell_color(v: float, vmax: float) -> tuple[str, float]:
    """(fill, strength in [0, 1]) of a heatmap cell of value v: blue +, red -, the strength the
    square root of |v| / vmax as `render`'s edges."""
    t = (abs(v) / vmax) ** 0.5 if vmax > 0 else 0.0
    return _mix(POS_COLOR if v >= 0 else NEG_COLOR, 0.9 * t), t


def _text(x: float, y: float, s: str, size: float = LABEL_FONT, anchor: str = "start", **attrs):
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size:g}" text-anchor="{anchor}"{extra}>'
        f"{_x(s)}</text>"
    )


def _title_lines(view: dict) -> list[str]:
    """The heading: which head, which query and key, the score (and soft-capped score)."""
    q, k = _token_text(str(view["query_token"])), _token_text(str(view["key_token"]))
    head = (
        f"layer {view['layer']} head {view['head']}: query {q!r} @{view['query_pos']} -> "
        f"key {k!r} @{view['key_pos']}"
    )
    versus = view.get("versus_pos")
    tokens = view.get("tokens") or []
    if versus is not None:
        vt = f"{_token_text(str(tokens[versus]))!r} " if versus < len(tokens) else ""
        head += f" rather than {vt}@{versus}"
    facts = f"score {view['score']:+.4f}" + (" (contrast)" if versus is not None else "")
    if view.get("capped_score") is not None:
        facts += f", after soft-capping {view['capped_score']:+.4f}"
    row = view.get("pattern_row") or []
    if view["key_pos"] < len(row):
        facts += f"; attention probability {row[view['key_pos']]:.3f}"
    if view.get("residual") is not None:
        facts += f"; unexplained {view['residual']:+.1e}"
    return [head, facts]


def _strip(view: dict, x0: float, y0: float) -> tuple[list[str], float]:
    """The head's attention row at the query: (SVG elements, height used)."""
    row = [float(p) for p in view.get("pattern_row") or []]
    if not row:
        return [], 0.0
    tokens = view.get("tokens") or []
    marked = {view["key_pos"]: "key", view.get("versus_pos"): "versus"}
    w = min(STRIP_MAX_W / len(row), 28.0)
    top = max(row) or 1.0
    base = y0 + 24 + STRIP_H  # the bars' foot; room above them for the heading and a value
    label_y = base + 10
    out = [
        _text(x0, y0 + 9, "attention at the query (probability per key position)", fill=MUTED),
    ]
    # label every key when there is room, else the marked keys and every n-th one
    every = max(1, int(-(-STRIP_LABEL_EVERY // w)))
    for j, p in enumerate(row):
        h = STRIP_H * p / top
        x = x0 + j * w
        tok = _token_text(str(tokens[j])) if j < len(tokens) else ""
        name = f"@{j} {tok!r}" if tok else f"@{j}"
        fill = {"key": POS_COLOR, "versus": NEG_COLOR}.get(marked.get(j, ""), "#94a3b8")
        out.append(
            f'<rect class="attn" data-pos="{j}" x="{x + 0.5:.1f}" y="{base - h:.1f}" '
            f'width="{max(w - 1, 0.5):.1f}" height="{max(h, 0.5):.1f}" fill="{fill}">'
            f"<title>{_x(f'{name}: p = {p:.4f}')}</title></rect>"
        )
        if text_width(f"{p:.2f}", 7) <= w or j in marked:
            out.append(_text(x + w / 2, base - h - 2, f"{p:.2f}", 7, "middle", fill=MUTED))
        if j % every == 0 or j in marked:
            out.append(
                _text(
                    x + w / 2,
                    label_y,
                    _short(tok, 6) if tok else str(j),
                    8,
                    "end",
                    transform=f"rotate(-60 {x + w / 2:.1f} {label_y:.1f})",
                    fill="#111827" if j in marked else MUTED,
                )
            )
    return out, label_y - y0 + 34


def source_name(label: str, nid: str) -> str:
    """A source's label, cut to LABEL_CHARS, with its position (`@p`) where its id has one: one
    feature, error node or token at several positions reads apart."""
    parts = str(nid).split(":")
    at = {"f": 2, "e": 2, "t": 1}.get(parts[0])
    name = _short(_one_line(str(label)), LABEL_CHARS)
    return name if at is None or len(parts) <= at else f"{name} @{parts[at]}"


def _names(labels: list, ids: list) -> tuple[list[str], list[str]]:
    """(drawn names, tooltips) of sources."""
    return [source_name(a, b) for a, b in zip(labels, ids)], [
        f"{a} [{b}]" for a, b in zip(labels, ids)
    ]


def _label(x: float, y: float, name: str, tip: str, anchor: str = "end", extra: str = "") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{LABEL_FONT:g}" text-anchor="{anchor}"{extra}>'
        f"<title>{_x(tip)}</title>{_x(name)}</text>"
    )


def _label_width(names: list[str], size: float = LABEL_FONT) -> float:
    return max([text_width(s, size) for s in names] + [20.0])


def _heatmap(view: dict, x0: float, y0: float) -> tuple[list[str], float, float]:
    """The pair table: (SVG elements, width, height used)."""
    m = view["matrix"]
    values = [[float(v) for v in row] for row in m["values"]]
    rows, row_tips = _names(m["query_labels"], m["query_ids"])
    cols, col_tips = _names(m["key_labels"], m["key_ids"])
    left = x0 + _label_width(rows) + 6
    top = y0 + 16 + _label_width(cols) * 0.71 + 8  # column labels at -45 degrees
    vmax = max([abs(v) for row in values for v in row] + [0.0])
    out = [
        _text(x0, y0 + 9, "pairs: query-side source (row) x key-side source (column)", fill=MUTED)
    ]
    for c, (name, tip) in enumerate(zip(cols, col_tips)):
        x, y = left + c * CELL_W + CELL_W / 2, top - 4
        out.append(_label(x, y, name, tip, "start", f' transform="rotate(-45 {x:.1f} {y:.1f})"'))
    for r, (name, tip) in enumerate(zip(rows, row_tips)):
        out.append(_label(left - 6, top + r * CELL_H + CELL_H / 2 + 3, name, tip))
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            where = (left + c * CELL_W, top + r * CELL_H)
            out += _cell(v, vmax, where, (r, c), f"{rows[r]} x {cols[c]}")
    width = left - x0 + CELL_W * max(len(cols), 1)
    legend, legend_h = _legend(vmax, left, top + CELL_H * len(values) + 10)
    return out + legend, width, top - y0 + CELL_H * len(values) + 10 + legend_h


def _cell(v: float, vmax: float, where: tuple, rc: tuple, pair: str) -> list[str]:
    """One heatmap cell at `where` (x, y), row and column `rc`, its value written in if it fits."""
    (x, y), (r, c) = where, rc
    fill, t = cell_color(v, vmax)
    out = [
        f'<rect class="cell" data-row="{r}" data-col="{c}" data-value="{v:.6g}" x="{x:.1f}" '
        f'y="{y:.1f}" width="{CELL_W - 1:g}" height="{CELL_H - 1:g}" fill="{fill}">'
        f"<title>{_x(f'{pair}: {v:+.5g}')}</title></rect>"
    ]
    text = _num(v)
    if text_width(text, VALUE_FONT) + 4 <= CELL_W - 1:
        colour = "#ffffff" if t > 0.6 else "#111827"
        out.append(
            _text(x + CELL_W / 2, y + CELL_H / 2 + 3, text, VALUE_FONT, "middle", fill=colour)
        )
    return out


def _legend(vmax: float, x0: float, y0: float) -> tuple[list[str], float]:
    """The colour scale: -vmax (red) through 0 (white) to +vmax (blue)."""
    steps, w = 21, 8.0
    out = []
    for s in range(steps):
        v = vmax * (2 * s / (steps - 1) - 1)
        fill, _ = cell_color(v, vmax)
        out.append(
            f'<rect class="legend" x="{x0 + s * w:.1f}" y="{y0:.1f}" width="{w:g}" height="8" '
            f'fill="{fill}"/>'
        )
    y = y0 + 19
    out += [
        _text(x0, y, _num(-vmax), 8, "start", fill=MUTED),
        _text(x0 + steps * w / 2, y, "0", 8, "middle", fill=MUTED),
        _text(x0 + steps * w, y, _num(vmax), 8, "end", fill=MUTED),
    ]
    return out, 24.0


def _bars(title: str, side: list[dict], x0: float, y0: float, kind: str) -> tuple[list, float]:
    """One side's strongest sources as bars from a zero line: (SVG elements, width used)."""
    names, tips = _names([s["label"] for s in side], [s["id"] for s in side])
    values = [float(s["value"]) for s in side]
    vmax = max([abs(v) for v in values] + [0.0]) or 1.0
    label_w = _label_width(names)
    zero = x0 + label_w + 6 + VALUE_W + BAR_W
    top = y0 + 16
    out = [_text(x0, y0 + 9, title, fill=MUTED)]
    for r, (name, tip) in enumerate(zip(names, tips)):
        out.append(_label(x0 + label_w, top + r * BAR_ROW + BAR_ROW / 2 + 3, name, tip))
    for r, v in enumerate(values):
        length = BAR_W * abs(v) / vmax
        x = zero if v >= 0 else zero - length
        y = top + r * BAR_ROW + 2
        out.append(
            f'<rect class="bar {kind}" x="{x:.1f}" y="{y:.1f}" width="{max(length, 0.5):.1f}" '
            f'height="{BAR_ROW - 4:g}" fill="{POS_COLOR if v >= 0 else NEG_COLOR}"/>'
        )
        tx, anchor = (x + length + 3, "start") if v >= 0 else (x - 3, "end")
        out.append(_text(tx, y + BAR_ROW / 2 + 1, _num(v), VALUE_FONT, anchor))
    bottom = top + BAR_ROW * max(len(values), 1)
    out.append(
        f'<line x1="{zero:.1f}" x2="{zero:.1f}" y1="{top:.1f}" y2="{bottom:.1f}" '
        'stroke="#9ca3af" stroke-width="0.8"/>'
    )
    return out, label_w + 6 + 2 * (VALUE_W + BAR_W) + 16


def qk_svg(view: dict) -> str:
    """The QK attribution `view` (`attention.qk_view`; a "tokens" list, where given, names the
    keys of the attention strip) as one self-contained SVG document."""
    body: list[str] = []
    y = MARGIN
    for i, line in enumerate(_title_lines(view)):
        size = TITLE_FONT if i == 0 else LABEL_FONT + 1
        bold = {"font_weight": "600"} if i == 0 else {}
        body.append(_text(MARGIN, y + size, line, size, **bold))
        y += size + 6
    y += 8
    strip, h = _strip(view, MARGIN, y)
    body += strip
    y += h + (10 if h else 0)
    heat, heat_w, heat_h = _heatmap(view, MARGIN, y)
    body += heat
    y += heat_h + 16
    q_bars, q_w = _bars("query side: q^(s) . k", view["query_side"], MARGIN, y, "query")
    k_bars, k_w = _bars("key side: q . k^(t)", view["key_side"], MARGIN + q_w, y, "key")
    body += q_bars + k_bars
    n_bars = max(len(view["query_side"]), len(view["key_side"]), 1)
    y += 16 + BAR_ROW * n_bars
    strip_w = min(STRIP_MAX_W, 28.0 * len(view.get("pattern_row") or []))
    title_w = max(text_width(line, TITLE_FONT) for line in _title_lines(view))
    width = MARGIN * 2 + max(heat_w, q_w + k_w, strip_w, title_w)
    height = y + MARGIN
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}">\n'
        f'<rect width="100%" height="100%" fill="#ffffff"/>\n' + "\n".join(body) + "\n</svg>\n"
    )
