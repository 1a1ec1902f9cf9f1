"""Pictures of attention: the QK attribution SVG (`render_attention.qk_svg`) and the HTML viewer's
head loadings and QK pair tables (`render.html_data`, circuits/frontend/), built from real QK
attributions and head loadings of a tiny random Gemma 3 with random transcoders."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np
import pytest
from test_html import Browser, embedded_data, needs_chromium

import circuits
from circuits.attention import QKAttribution, qk, qk_view
from circuits.graph import AttributionGraph
from circuits.heads import HeadLoadings, attach_head_loadings, head_loadings
from circuits.pruning import prune
from circuits.render import html_data, render_html
from circuits.render_attention import cell_color, qk_svg
from gemma_lm.errors import UserError
from gemma_lm.testing import tiny_model
from transcoders.testing import random_transcoders

SVG = "{http://www.w3.org/2000/svg}"
PROMPT = "When Mary and John went to the store, John gave a drink to"
HOSTILE = 'x<&">y </script><!--<script>'


@dataclass
class Traced:
    lm: object
    tc: object
    circuit: AttributionGraph  # pruned
    loadings: HeadLoadings  # of the circuit's 5 strongest edges between positions
    edge: int  # the first of them whose top head is above layer 0 (its query reads features)
    edge_qk: QKAttribution  # of that head, at the edge's target and the key it moved from
    last: QKAttribution  # of head 0 of the last layer at the last position, its strongest key


@pytest.fixture(scope="module")
def traced() -> Traced:
    lm = tiny_model(seed=0)
    s = lm.sites
    tc = random_transcoders(
        s.n_layers, s.d_model, 96, kind="skip", seed=1, l0=6, model_name=lm.name
    )
    graph = circuits.attribute(lm, PROMPT, transcoders=tc, progress=False)
    circuit = prune(graph, node_threshold=0.8, edge_threshold=0.95)
    hl = head_loadings(lm, circuit, n_edges=5, transcoders=tc)
    edge = next(e for e in range(len(hl.sources)) if hl.top_heads(e, 1)[0][0] > 0)
    l, h, _, k = hl.top_heads(edge, 1)[0]
    q = int(circuit.pos[hl.targets[edge]])
    edge_qk = qk(lm, circuit, l, h, q, k, transcoders=tc)
    last = qk(lm, circuit, s.n_layers - 1, 0, transcoders=tc)
    return Traced(lm, tc, circuit, hl, edge, edge_qk, last)


@pytest.fixture
def view(traced):
    return copy.deepcopy(qk_view(traced.last, 6))


def _parse(text: str) -> ET.Element:
    return ET.fromstring(text.encode())


def _texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_qk_svg_is_one_well_formed_svg_with_a_cell_per_pair(view):
    root = _parse(qk_svg(view))
    assert root.tag == f"{SVG}svg" and float(root.get("width")) > 0
    assert not list(root.iter(f"{SVG}image")) and "href" not in qk_svg(view)  # self-contained
    m = view["matrix"]
    n_q, n_k = len(m["query_ids"]), len(m["key_ids"])
    assert n_q == n_k == 6
    cells = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "cell"]
    assert len(cells) == n_q * n_k
    drawn = np.zeros((n_q, n_k))
    for c in cells:
        drawn[int(c.get("data-row")), int(c.get("data-col"))] = float(c.get("data-value"))
    assert drawn == pytest.approx(np.array(m["values"]), rel=1e-5, abs=1e-9)
    # the title names the head, both tokens with positions and the score
    title = _texts(root)[0]
    assert f"layer {view['layer']} head {view['head']}" in title
    assert f"@{view['query_pos']}" in title and f"@{view['key_pos']}" in title
    assert f"{view['score']:+.4f}" in _texts(root)[1]


def test_qk_svg_colours_cells_blue_positive_red_negative(view):
    root = _parse(qk_svg(view))
    cells = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "cell"]
    values = [float(c.get("data-value")) for c in cells]
    vmax = max(abs(v) for v in values)
    assert any(v > 0 for v in values) and any(v < 0 for v in values)
    for c, v in zip(cells, values):
        r, g, b = (int(c.get("fill")[i : i + 2], 16) for i in (1, 3, 5))
        assert c.get("fill") == cell_color(v, vmax)[0]
        if abs(v) > 0.05 * vmax:
            assert (b > r) if v > 0 else (r > b)
    # the strongest cell is the most saturated; every cell's value is written in (they fit)
    strongest = cells[int(np.argmax(np.abs(values)))]
    assert cell_color(vmax, vmax)[1] == 1.0 and strongest.get("fill") in (
        cell_color(vmax, vmax)[0],
        cell_color(-vmax, vmax)[0],
    )
    written = _texts(root)
    assert all(f"{v:+.3g}" in written for v in values)


def test_qk_svg_has_bars_for_each_side_and_the_attention_row(view):
    root = _parse(qk_svg(view))
    rects = list(root.iter(f"{SVG}rect"))
    for side in ("query", "key"):
        bars = [r for r in rects if r.get("class") == f"bar {side}"]
        assert len(bars) == len(view[f"{side}_side"])
        widths = [float(b.get("width")) for b in bars]
        assert widths[0] == pytest.approx(max(widths))  # the strongest first, the longest
    attn = [r for r in rects if r.get("class") == "attn"]
    assert len(attn) == len(view["pattern_row"]) == view["query_pos"] + 1
    heights = [float(r.get("height")) for r in attn]
    assert int(np.argmax(heights)) == int(np.argmax(view["pattern_row"]))
    assert attn[view["key_pos"]].get("fill") == "#2563eb"  # the key is marked
    texts = _texts(root)
    for s in view["query_side"] + view["key_side"]:
        assert f"{s['value']:+.3g}" in texts


def test_qk_svg_escapes_every_label(view):
    view["matrix"]["query_labels"][0] = HOSTILE
    view["matrix"]["key_labels"][1] = HOSTILE + "\n\x01two lines"
    view["key_side"][0]["label"] = HOSTILE
    view["query_token"] = "<&>"
    text = qk_svg(view)
    root = _parse(text)  # well-formed: nothing raw broke the markup
    assert HOSTILE not in text and "<script" not in text and "\x01" not in text
    shown = _texts(root)
    assert any(t.startswith(HOSTILE[:20]) for t in shown)
    assert any("<&>" in t for t in shown[:1])
    # full labels in the tooltips, as text
    tips = ["".join(t.itertext()) for t in root.iter(f"{SVG}title")]
    assert any(HOSTILE in t for t in tips)


def test_qk_svg_of_a_contrast_names_both_keys(traced):
    lm, tc, circuit, r = traced.lm, traced.tc, traced.circuit, traced.last
    j = r.query_pos if r.key_pos != r.query_pos else r.query_pos - 1  # in any sliding window
    versus = qk(lm, circuit, r.layer, r.head, r.query_pos, r.key_pos, versus=j, transcoders=tc)
    v = qk_view(versus, 4) | {"tokens": circuit.token_strings}
    root = _parse(qk_svg(v))
    token = circuit.token_strings[j].replace(" ", "·")
    assert f"rather than {token!r} @{j}" in _texts(root)[0] and "(contrast)" in _texts(root)[1]
    attn = [x for x in root.iter(f"{SVG}rect") if x.get("class") == "attn"]
    assert attn[j].get("fill") == "#dc2626" and attn[r.key_pos].get("fill") == "#2563eb"
    cells = [x for x in root.iter(f"{SVG}rect") if x.get("class") == "cell"]
    assert len(cells) == 16


def _with_loadings(traced: Traced, qk_label: str | None = None):
    """(a copy of the circuit with its head loadings and the QK table of edge `traced.edge`, the
    loadings, that table)."""
    g, hl = copy.deepcopy(traced.circuit), traced.loadings
    table = qk_view(traced.edge_qk, 6)
    if qk_label is not None:
        table["matrix"]["query_labels"][0] = qk_label
    attach_head_loadings(g, hl, {traced.edge: table})
    return g, hl, table


def test_page_embeds_the_head_loadings_and_qk_table(traced, tmp_path):
    g, hl, table = _with_loadings(traced, HOSTILE)
    text = render_html(g, tmp_path / "heads.html").read_text(encoding="utf-8")
    data = embedded_data(text)
    assert "<" not in data and "&" not in data and text.count("</script") == 2
    loaded = json.loads(data)["head_loadings"]
    stored = hl.to_dict(g, n=5)
    assert [(e["source"], e["target"]) for e in loaded["edges"]] == [
        (e["source"], e["target"]) for e in stored
    ]
    for e, s in zip(loaded["edges"], stored):
        assert e["weight"] == pytest.approx(s["weight"]) and e["heads"] == s["heads"]
    qk_table = loaded["edges"][traced.edge]["qk"]
    assert (
        qk_table["matrix"] == table["matrix"] and qk_table["matrix"]["query_labels"][0] == HOSTILE
    )
    assert qk_table["query_side"] == table["query_side"] and "prompt" not in qk_table
    assert [e for e, x in enumerate(loaded["edges"]) if "qk" in x] == [traced.edge]


def test_page_data_without_loadings_and_with_broken_ones(traced):
    circuit = traced.circuit
    assert html_data(circuit)["head_loadings"] is None
    g = copy.deepcopy(circuit)
    g.metadata["head_loadings"] = {"edges": "nope"}
    with pytest.raises(UserError, match="head_loadings is malformed"):
        html_data(g)
    # edges whose nodes are not on the page are left out
    g.metadata["head_loadings"] = {"edges": [{"source": "f:0:0:0", "target": "nowhere"}]}
    assert html_data(g)["head_loadings"]["edges"] == []


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def _js_fmt(w: float) -> str:
    """A number as the viewer writes it (`fmt`, signed)."""
    text = f"{abs(w):.2e}".replace("e-0", "e-").replace("e+0", "e+")
    body = text if abs(w) >= 100 or abs(w) < 0.01 else f"{abs(w):.3f}"
    return ("+" if w >= 0 else "-") + body


def _panel(browser) -> str:
    """The side panel's text, lower case (its headings are drawn in capitals)."""
    return browser.js("document.getElementById('panel-body').innerText").lower()


def _click_edge(browser, source: str, target: str) -> None:
    """Click the drawn edge source -> target at a point of it no other element covers."""
    point = browser.js(
        f"""(() => {{
        const ids = viewer.visibleIds(), a = ids.indexOf({json.dumps(source)}),
          b = ids.indexOf({json.dumps(target)});
        const p = [...document.querySelectorAll('#layer-edges path')]
          .find((p) => +p.dataset.from === a && +p.dataset.to === b);
        const m = p.getScreenCTM(), n = p.getTotalLength();
        for (let f = 0.5; f > 0.02; f -= 0.02) {{
          for (const g of [f, 1 - f]) {{
            const q = p.getPointAtLength(g * n);
            const x = m.a * q.x + m.c * q.y + m.e, y = m.b * q.x + m.d * q.y + m.f;
            if (document.elementFromPoint(x, y) === p) return [x, y];
          }}
        }}
        return null; }})()"""
    )
    assert point is not None, "the edge is covered everywhere"
    browser.click(*point)


@needs_chromium
def test_clicked_edge_shows_its_head_loadings_and_qk_table(browser, traced, tmp_path):
    g, hl, table = _with_loadings(traced, HOSTILE)
    browser.open(render_html(g, tmp_path / "heads.html"))
    assert browser.js("document.body.dataset.ready") == "true" and browser.exceptions() == []
    browser.js("viewer.setEdgeSlider(0); viewer.setNodeSlider(0)")
    assert browser.js("document.querySelectorAll('#layer-edges path.loaded').length") == len(
        hl.sources
    )
    e = traced.edge
    source, target = g.node_id(int(hl.sources[e])), g.node_id(int(hl.targets[e]))
    _click_edge(browser, source, target)
    assert browser.js("viewer.state.edge") is not None
    assert browser.js("document.querySelectorAll('#layer-edges path.hl').length") == 1
    panel = _panel(browser)
    assert "attention heads that carry it" in panel
    rows = browser.js(
        "[...document.querySelectorAll('#panel-body table.loadings tr')].slice(1)"
        ".map(tr => [...tr.cells].map(c => c.innerText))"
    )
    heads = hl.top_heads(e, 5)
    assert [r[0] for r in rows[: len(heads)]] == [f"L{l}.H{h}" for l, h, _, _ in heads]
    w = float(hl.weights[e])
    for r, (_, _, v, k) in zip(rows, heads):
        assert float(r[1]) == pytest.approx(v, rel=1e-2, abs=6e-4)
        assert r[2] == f"{100 * v / w:.1f}%" and r[3].endswith(f"@{k}")
    # the top head's QK pair table: one coloured cell per pair, the hostile label as text
    n = len(table["matrix"]["query_ids"])
    assert browser.js("document.querySelectorAll('#panel-body table.qk-pairs td.cell').length") == (
        n * len(table["matrix"]["key_ids"])
    )
    first = browser.js(
        "(() => { const td = document.querySelector('#panel-body table.qk-pairs td.cell');"
        " return [+td.dataset.value, getComputedStyle(td).backgroundColor]; })()"
    )
    v0 = table["matrix"]["values"][0][0]
    vmax = max(abs(x) for row in table["matrix"]["values"] for x in row)
    assert first[0] == pytest.approx(v0)
    fill = cell_color(v0, vmax)[0]
    assert first[1] == "rgb({}, {}, {})".format(*(int(fill[i : i + 2], 16) for i in (1, 3, 5)))
    assert HOSTILE in browser.js(
        "document.querySelector('#panel-body table.qk-pairs th.row').textContent"
    )
    assert f"score {_js_fmt(table['score'])}" in panel
    n_side = browser.js("document.querySelectorAll('#panel-body table.query-side tr').length")
    assert n_side == min(8, len(table["query_side"]))
    assert browser.js("document.querySelectorAll('img').length") == 0
    # an edge without a QK table shows its loadings only
    other = (e + 1) % len(hl.sources)
    assert browser.js(
        f"viewer.focusEdge({json.dumps(g.node_id(int(hl.sources[other])))}, "
        f"{json.dumps(g.node_id(int(hl.targets[other])))})"
    )
    assert browser.js("document.querySelectorAll('#panel-body table.loadings').length") == 1
    assert browser.js("document.querySelectorAll('#panel-body table.qk-pairs').length") == 0
    # the target node's panel lists its loaded edges; a row opens that edge
    assert browser.js(f"viewer.focus({json.dumps(target)})")
    assert "edges with head loadings" in _panel(browser)
    browser.js("document.querySelector('#panel-body table.loaded-edges tr.link').click()")
    assert browser.js("viewer.state.edge") is not None and browser.js("viewer.state.focus") is None
    assert "attention heads that carry it" in _panel(browser)
    browser.js("window.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'}))")
    assert browser.js("viewer.state.edge") is None
    assert browser.exceptions() == []
