"""Static pictures: SVG/PNG via graphviz, the comparison picture, and `circuits render`.

`synthetic_graph` builds a realistic AttributionGraph without a model: a layered, position-causal
DAG (features only read from earlier layers at the same or earlier positions), error nodes, token
nodes with the strings of a real prompt, and logit nodes at the last position. Other render tests
import it.
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import scipy.sparse as sp

from circuits.graph import ERROR, FEATURE, LOGIT, TOKEN, AttributionGraph

PROMPT_TOKENS = [
    "<bos>",
    "The",
    " capital",
    " of",
    " the",
    " state",
    " containing",
    " Dallas",
    " is",
]
needs_graphviz = pytest.mark.skipif(
    shutil.which("neato") is None, reason="graphviz (neato) is not installed"
)


def synthetic_graph(
    n_features: int = 120,
    n_layers: int = 18,
    seed: int = 0,
    tokens=PROMPT_TOKENS,
    n_logits: int = 3,
    with_influence: bool = True,
    with_labels: bool = True,
    dashboards: bool = False,
) -> AttributionGraph:
    rng = np.random.default_rng(seed)
    n_pos = len(tokens)
    # features: concentrated on later positions, spread over layers
    f_layer = rng.integers(0, n_layers, n_features)
    f_pos = np.minimum(n_pos - 1, (n_pos * rng.beta(2.2, 1.0, n_features)).astype(int))
    f_feat = rng.integers(0, 16384, n_features)
    order = np.lexsort((f_feat, f_pos, f_layer))
    f_layer, f_pos, f_feat = f_layer[order], f_pos[order], f_feat[order]
    e_cells = sorted({(int(a), int(b)) for a, b in zip(f_layer, f_pos)})[: max(4, n_features // 8)]
    kind = np.concatenate(
        [
            np.full(n_features, FEATURE),
            np.full(len(e_cells), ERROR),
            np.full(n_pos, TOKEN),
            np.full(n_logits, LOGIT),
        ]
    ).astype(np.int8)
    layer = np.concatenate(
        [f_layer, [c[0] for c in e_cells], np.full(n_pos, -1), np.full(n_logits, n_layers)]
    )
    pos = np.concatenate(
        [f_pos, [c[1] for c in e_cells], np.arange(n_pos), np.full(n_logits, n_pos - 1)]
    )
    feature = np.concatenate(
        [f_feat, np.full(len(e_cells) + n_pos, -1), rng.integers(0, 262144, n_logits)]
    )
    n = len(kind)
    activation = np.abs(rng.lognormal(0, 1, n)).astype(np.float32)
    rows, cols, vals = [], [], []
    for t in range(n):
        if kind[t] not in (FEATURE, LOGIT):
            continue
        src = np.flatnonzero(
            ((layer < layer[t]) & (pos <= pos[t]) & (kind != LOGIT))
            | ((kind == TOKEN) & (pos <= pos[t]))
        )
        if len(src) == 0:
            continue
        k = min(len(src), int(rng.integers(3, 14)))
        pick = rng.choice(src, k, replace=False)
        rows += [t] * k
        cols += list(pick)
        vals += list(rng.normal(0.4, 1.0, k) * rng.lognormal(0, 0.8, k))
    adj = sp.csr_array((np.asarray(vals, np.float32), (rows, cols)), shape=(n, n))
    node_input = np.where(np.isin(kind, (FEATURE, LOGIT)), adj.sum(axis=1) + 0.1, np.nan).astype(
        np.float32
    )
    probs = np.sort(rng.dirichlet(np.ones(n_logits) * 0.5))[::-1].astype(np.float32)
    g = AttributionGraph(
        prompt="".join(t for t in tokens if t != "<bos>"),
        tokens=np.arange(n_pos) + 100,
        token_strings=list(tokens),
        kind=kind,
        layer=layer.astype(np.int32),
        pos=pos.astype(np.int32),
        feature=feature.astype(np.int64),
        activation=activation,
        node_input=node_input,
        row_constant=np.full(n, 0.1, np.float32),
        has_row=np.isin(kind, (FEATURE, LOGIT)),
        adjacency=adj,
        logit_probabilities=probs,
        n_layers=n_layers,
        metadata={
            "logit_strings": [" Austin", " Texas", " the"][:n_logits]
            + [f" tok{i}" for i in range(3, n_logits)],
            "model": "synthetic",
        },
    )
    if with_influence:
        g.influence = (rng.pareto(1.5, n) * (kind == FEATURE) + 0.3 * (kind == ERROR)).astype(
            np.float32
        )
    if with_labels:
        feats = np.flatnonzero(kind == FEATURE)
        for i, text in zip(
            feats[-6:],
            [
                "Texas",
                "say a capital",
                "state names",
                "Dallas",
                "capital cities",
                "US geography & politics",
            ],
        ):
            g.labels[int(i)] = text
    if dashboards:  # the schema of docs/graphs.md, one dashboard per feature key L/F
        g.feature_dashboards = {
            f"{g.layer[i]}/{g.feature[i]}": example_dashboard(j)
            for j, i in enumerate(np.flatnonzero(kind == FEATURE)[-10:])
        }
    return g


def example_dashboard(j: int = 0) -> dict:
    """A feature dashboard of the schema `transcoders.dashboards` writes."""
    return {
        "density": 0.002 * (j + 1),
        "max_activation": 10.0 + j,
        "top_contexts": [
            {
                "tokens": ["lives", " in", " Dallas", " near", f" {k}"],
                "acts": [0.0, 0.5, 9.0 + j, 1.0, 0.0],
                "max_act": 9.0 + j,
                "context": 40 + k,
            }
            for k in range(3)
        ],
        "top_promoted": [[" Texas", 1.2], [" Austin", 0.9]],
        "top_suppressed": [[" Paris", -0.7]],
        "auto_label": f"Dallas/Texas {j}",
    }


def test_synthetic_graph_is_causal():
    g = synthetic_graph()
    coo = g.adjacency.tocoo()
    assert (g.pos[coo.col] <= g.pos[coo.row]).all()
    assert ((g.layer[coo.col] < g.layer[coo.row]) | (g.kind[coo.col] == TOKEN)).all()
    assert 50 <= g.n_nodes <= 300


def test_layout_rows_and_columns():
    from circuits.render import _nodes_of, layout

    g = synthetic_graph()
    nodes = _nodes_of(g)
    width, height, rows, cols = layout(nodes, g.n_pos)
    tok = [n for n in nodes if n.kind == TOKEN]
    logit = [n for n in nodes if n.kind == LOGIT]
    feat = [n for n in nodes if n.kind == FEATURE]
    # tokens at the bottom (largest y in SVG coordinates), logits at the top
    assert min(n.y for n in tok) > max(n.y for n in feat) > max(n.y for n in logit)
    assert [n.x for n in sorted(tok, key=lambda n: n.pos)] == sorted(n.x for n in tok)
    # no two nodes overlap
    boxes = [(n.x - n.w / 2, n.x + n.w / 2, n.y - n.h / 2, n.y + n.h / 2) for n in nodes]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2]
    assert all(0 < n.x < width and 0 < n.y < height for n in nodes)


def test_select_nodes_keeps_tokens_and_logits():
    from circuits.render import select_nodes

    g = synthetic_graph(n_features=250)
    s = select_nodes(g, 60)
    assert s.n_nodes == 60
    assert (s.kind == TOKEN).sum() == g.n_pos and (s.kind == LOGIT).sum() == 3
    kept = s.influence[s.kind == FEATURE].min()
    dropped = set(g.node_ids()) - set(s.node_ids())
    assert all(g.influence[g.index_of(d)] <= kept for d in dropped)


@needs_graphviz
@pytest.mark.parametrize("n_features,influence", [(40, True), (120, True), (260, False)])
def test_render_svg(tmp_path, n_features, influence):
    from circuits.render import render_svg

    g = synthetic_graph(n_features=n_features, with_influence=influence, seed=n_features)
    out = render_svg(g, tmp_path / "g.svg", max_nodes=None)
    root = ET.parse(out).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    node_ids = {e.get("id") for e in root.iter(f"{ns}g") if e.get("class") == "node"}
    assert set(g.node_ids()) <= node_ids
    edges = [e for e in root.iter(f"{ns}g") if e.get("class") == "edge"]
    assert len(edges) > g.n_nodes // 2
    text = out.read_text()
    assert "#2563eb" in text and "#dc2626" in text  # both signs drawn
    assert "Austin" in text and "Dallas" in text and "L" in text
    assert "say a capital" in text  # human labels
    assert "stroke-dasharray" in text  # error nodes dashed


@needs_graphviz
def test_render_svg_writes_png_and_max_nodes(tmp_path):
    from PIL import Image

    from circuits.render import render_svg

    g = synthetic_graph(n_features=280)
    png = render_svg(g, tmp_path / "g.png", max_nodes=80)
    im = np.asarray(Image.open(png).convert("L"))
    assert im.shape[0] > 200 and im.shape[1] > 300
    assert (im < 200).mean() > 0.01
    svg = render_svg(g, tmp_path / "g.svg", max_nodes=80).read_text()
    drawn = re.findall(r'<g id="([^"]+)" class="node"', svg)
    assert len([d for d in drawn if d[:2] in ("f:", "e:", "t:", "l:")]) == 80
    assert len(drawn) > 80 + g.n_pos  # plus the row and column captions


@needs_graphviz
def test_render_comparison(tmp_path):
    from circuits.render import STATUS_COLORS, render_comparison_svg

    a = synthetic_graph(n_features=60, seed=1)
    b = a.subgraph(np.flatnonzero(np.arange(a.n_nodes) % 3 != 0))
    ids_a, ids_b = set(a.node_ids()), set(b.node_ids())
    status = {i: "both" if i in ids_b else "a" for i in ids_a}
    out = render_comparison_svg(status, a, b, tmp_path / "c.svg")
    text = out.read_text()
    assert STATUS_COLORS["a"] in text and STATUS_COLORS["both"] in text

    class Comparison:
        node_status = status

    out2 = render_comparison_svg(Comparison(), a, b, tmp_path / "c2.svg")
    assert out2.read_text().count("<g id=") == text.count("<g id=")


def feature_key(g: AttributionGraph, i: int) -> str:
    return f"{g.layer[i]}/{g.feature[i]}"


LONG_LABEL = "cities of the southern United States and their capitals"


def labelled_graph() -> tuple[AttributionGraph, dict[str, int]]:
    """A small graph whose last features carry a human label (over a dashboard's auto label), an
    auto label, a long auto label and hostile markup; the other features have no label."""
    g = synthetic_graph(n_features=30, seed=5, with_labels=False)
    feats = [int(i) for i in g.nodes_of(FEATURE)]
    which = dict(zip(["human", "auto", "long", "markup"], feats[-4:]))
    assert len({feature_key(g, i) for i in feats}) == len(feats)  # one node per feature key
    g.labels[which["human"]] = "say a capital"
    auto = {"human": "overridden", "auto": "Texas cities", "long": LONG_LABEL}
    auto["markup"] = 'a <b>&"x" \\ y'
    g.feature_dashboards = {
        feature_key(g, which[k]): example_dashboard(j) | {"auto_label": text}
        for j, (k, text) in enumerate(auto.items())
    }
    return g, which


def feature_id(g: AttributionGraph, i: int) -> str:
    """How pictures name feature node i: `L12/1017`."""
    return f"L{g.layer[i]}/{g.feature[i]}"


def test_node_texts_carry_labels_and_ids():
    from circuits.render import LABEL_CHARS, _nodes_of, font_size, layout, text_width

    g, which = labelled_graph()
    nodes = _nodes_of(g)
    layout(nodes, g.n_pos)
    human, auto, long = (nodes[which[k]] for k in ("human", "auto", "long"))
    assert (human.label, human.label_source) == ("say a capital", "human")  # over "overridden"
    assert (auto.label, auto.label_source) == ("Texas cities", "auto")
    assert long.label == LONG_LABEL[: LABEL_CHARS - 1] + "…"
    assert long.name == LONG_LABEL and LONG_LABEL in long.detail  # all of it in the tooltip
    for n in (human, auto, long):  # the id beneath; both lines fit the box
        assert n.sub == feature_id(g, n.index) and human.h >= 26
        assert n.w >= text_width(n.label, font_size(n)) + 8 and n.w > text_width(n.sub, 6)
    assert long.w > auto.w
    plain = [n for n in nodes if n.kind == FEATURE and n.index not in which.values()]
    assert plain and all(n.label == feature_id(g, n.index) and not n.sub for n in plain)
    assert all(n.label_source == "default" for n in plain)


def svg_node_texts(path) -> dict[str, list[tuple[str, float]]]:
    """The text lines graphviz drew in each node: node id -> [(text, font size)]."""
    ns = "{http://www.w3.org/2000/svg}"
    return {
        e.get("id"): [(t.text or "", float(t.get("font-size"))) for t in e.iter(f"{ns}text")]
        for e in ET.parse(path).getroot().iter(f"{ns}g")
        if e.get("class") == "node"
    }


@needs_graphviz
def test_svg_draws_feature_labels_above_their_ids(tmp_path):
    from circuits.render import render_svg

    g, which = labelled_graph()
    drawn = svg_node_texts(render_svg(g, tmp_path / "g.svg", max_nodes=None))
    for kind, label in [
        ("human", "say a capital"),
        ("auto", "Texas cities"),
        ("markup", 'a <b>&"x" \\ y'),
    ]:
        i = which[kind]
        (main, main_size), (sub, sub_size) = drawn[g.node_id(i)]
        assert (main, sub) == (label, feature_id(g, i)) and sub_size < main_size
    (main, _), _ = drawn[g.node_id(which["long"])]
    assert main.endswith("…") and LONG_LABEL.startswith(main[:-1])
    # a graph without labels or dashboards names its features by their ids
    bare = synthetic_graph(n_features=30, seed=5, with_labels=False)
    drawn = svg_node_texts(render_svg(bare, tmp_path / "bare.svg", max_nodes=None))
    for i in bare.nodes_of(FEATURE):
        assert [t for t, _ in drawn[bare.node_id(int(i))]] == [feature_id(bare, int(i))]


def test_networkx_label_is_the_auto_label_unless_a_human_one_wins():
    g, which = labelled_graph()
    nx_graph = g.to_networkx()
    human, auto = (nx_graph.nodes[g.node_id(which[k])] for k in ("human", "auto"))
    assert (auto["label"], auto["label_source"]) == ("Texas cities", "auto")
    assert (human["label"], human["label_source"]) == ("say a capital", "human")
    plain = nx_graph.nodes[g.node_id(int(g.nodes_of(FEATURE)[0]))]
    assert (plain["label"], plain["label_source"]) == (feature_id(g, 0), "default")
    # a round trip keeps the human label only: auto labels come back with the dashboards
    back = type(g).from_networkx(nx_graph)
    assert list(back.labels.values()) == ["say a capital"]
