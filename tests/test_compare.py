"""Comparing two circuits (circuits/comparison.py) and the comparison picture."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_render import synthetic_graph

import circuits
from circuits.comparison import CompareConfig, align_tokens, compare
from circuits.graph import ERROR, FEATURE, graph_from_networkx, graph_to_networkx
from circuits.pruning import prune


def shifted(g, at: int, new_tokens: list[str], replace: int = 0):
    """g with `replace` tokens at position `at` swapped for new_tokens: later positions move; every
    other node keeps its layer, feature and edges (as if the new words changed nothing else)."""
    nxg = graph_to_networkx(g)
    shift = len(new_tokens) - replace
    for nid, d in list(nxg.nodes(data=True)):
        if d["kind"] == "token" and at <= d["pos"] < at + replace:
            nxg.remove_node(nid)
        elif d["pos"] >= at + replace:
            d["pos"] += shift
    for k, tok in enumerate(new_tokens):
        nxg.add_node(
            f"new{k}",
            kind="token",
            layer=-1,
            pos=at + k,
            feature=-1,
            activation=1.0,
            has_row=False,
            influence=0.0,
            token=tok,
        )
    strings = g.token_strings[:at] + new_tokens + g.token_strings[at + replace :]
    ids = (
        list(g.tokens[:at])
        + [1000 + k for k in range(len(new_tokens))]
        + list(g.tokens[at + replace :])
    )
    nxg.graph.update(
        token_strings=strings, token_ids=[int(i) for i in ids], prompt="".join(strings[1:])
    )
    return graph_from_networkx(nxg)


def test_align_tokens():
    a = ["<bos>", "The", " capital", " of", " Texas", " is"]
    assert align_tokens(a, a) == [(i, i) for i in range(6)]
    b = ["<bos>", "The", " capital", " of", " New", " York", " is"]
    cols = align_tokens(a, b)
    assert (4, None) in cols and (None, 4) in cols and (None, 5) in cols and cols[-1] == (5, 6)
    assert [c[0] for c in cols if c[0] is not None] == list(range(6))
    assert [c[1] for c in cols if c[1] is not None] == list(range(7))
    # the final positions align even when their tokens differ
    cols = align_tokens(["<bos>", "Hi", " there"], ["<bos>", "Hi", " you", " all"])
    assert cols[-1] == (2, 3) and (0, 0) in cols and (1, 1) in cols


def test_compare_with_itself():
    g = prune(synthetic_graph(n_features=120, seed=1))
    c = compare(g, g)
    assert c.jaccard == 1.0 and c.feature_jaccard_any_position == 1.0
    assert set(c.node_status.values()) == {"both"} and not c.only_a and not c.only_b
    assert len(c.shared) == int(((g.kind == FEATURE) | (g.kind == ERROR)).sum())
    assert all(ch["delta"] == 0 for ch in c.influence_changes + c.edge_changes)


def test_compare_subgraph_and_changes():
    a = prune(synthetic_graph(n_features=150, seed=2))
    feats = a.nodes_of(FEATURE)
    drop = feats[::4]
    b = a.subgraph(np.setdiff1d(np.arange(a.n_nodes), drop))
    b.metadata = {**b.metadata}
    bumped = int(b.nodes_of(FEATURE)[0])
    b.influence = b.influence.copy()
    b.influence[bumped] += 5.0
    c = compare(a, b, top_k=3)
    assert set(c.only_a) == {a.node_id(int(i)) for i in drop} and not c.only_b
    n_inner = int(((a.kind == FEATURE) | (a.kind == ERROR)).sum())
    assert c.jaccard == pytest.approx((n_inner - len(drop)) / n_inner)
    assert c.influence_changes[0]["id"] == b.node_id(bumped) and c.influence_changes[0][
        "delta"
    ] == pytest.approx(5.0)
    assert len(c.influence_changes) == 3
    # edges of dropped nodes vanish: the largest edge change is one of them, with b == 0
    top = c.edge_changes[0]
    assert top["b"] == 0.0 and (top["source"] in c.only_a or top["target"] in c.only_a)


def test_compare_prompts_of_different_lengths():
    a = prune(synthetic_graph(n_features=120, seed=3))
    b = shifted(a, 7, [" San", " Francisco"], replace=1)  # " Dallas" -> " San Francisco"
    assert b.n_pos == a.n_pos + 1
    c = compare(a, b)
    assert len(c.columns) == a.n_pos + 2  # " Dallas" | " San", " Francisco" are unaligned
    # nodes match wherever the prompts align; those at " Dallas" / " San" sit in different columns
    at_dallas = {i for i in range(a.n_nodes) if a.pos[i] == 7 and a.kind[i] in (FEATURE, ERROR)}
    assert at_dallas and len(c.only_a) == len(c.only_b) == len(at_dallas)
    assert {m.split(":")[2] for m in c.only_a} == {"7"} and {m.split(":")[2] for m in c.only_b} == {
        "8"
    }
    n_inner = int(((a.kind == FEATURE) | (a.kind == ERROR)).sum())
    assert c.jaccard == pytest.approx((n_inner - len(at_dallas)) / (n_inner + len(at_dallas)))
    early = next(int(i) for i in a.nodes_of(FEATURE) if a.pos[i] < 7)
    assert c.node_status[a.node_id(early)] == "both"  # columns before the change equal positions
    assert "t:7:a" in c.node_status and c.node_status["t:7:a"] == "a"
    assert [s for m, s in c.node_status.items() if m.startswith("t:") and m.endswith(":b")] == [
        "b",
        "b",
    ]
    assert "San" in "".join(c.column_tokens()) and c.column_tokens()[0] == "<bos>"
    text = c.summary()
    assert "aligned positions: 8" in text and "Jaccard" in text


def test_compare_prunes_unpruned_graphs():
    a = synthetic_graph(n_features=100, seed=4, with_influence=False)
    b = synthetic_graph(n_features=100, seed=5, with_influence=False)
    c = circuits.compare(a, b, config=CompareConfig(node_threshold=0.6))
    assert c.a.metadata["pruning"]["node_threshold"] == 0.6 and c.b.n_nodes < b.n_nodes
    assert 0.0 <= c.jaccard < 1.0
    d = c.to_dict()
    assert d["jaccard"] == c.jaccard and set(d["only_a"]) == set(c.only_a)
    with pytest.raises(TypeError):
        compare(a, b, thresholds=1)


@pytest.mark.skipif(shutil.which("neato") is None, reason="graphviz (neato) is not installed")
def test_comparison_picture_across_prompts(tmp_path):
    from circuits.render import STATUS_COLORS, render_comparison_svg

    a = prune(synthetic_graph(n_features=120, seed=6))
    b = shifted(a, 7, [" Houston"], replace=1)
    b = b.subgraph(np.setdiff1d(np.arange(b.n_nodes), b.nodes_of(FEATURE)[::3]))
    c = compare(a, b)
    svg = render_comparison_svg(c, None, None, tmp_path / "diff.svg").read_text()
    for color in STATUS_COLORS.values():
        assert color in svg
    assert "Houston" in svg and "Dallas" in svg
    # " Dallas" and " Houston" get their own columns
    assert 'id="t:7:a"' in svg and 'id="t:8:b"' in svg
    assert svg.count('class="node"') > len(c.node_status)  # every node plus captions and the legend
