"""`circuits explain` and `circuits.explain`: the top paths to a logit, found exactly and best
first; their scores add up to the influence `circuits.pruning` computes; the error share; the
command."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import scipy.sparse as sp
from test_render import synthetic_graph

from circuits.cli import run
from circuits.explain import (
    error_share,
    explain,
    explanation_text,
    influence_on,
    start_nodes,
    top_paths,
)
from circuits.graph import ERROR, FEATURE, LOGIT, TOKEN, AttributionGraph
from circuits.pruning import compute_influence, normalized_adjacency, prune
from gemma_lm.errors import UserError
from gemma_lm.testing import tiny_model
from transcoders.testing import random_transcoders

# nodes of the planted graph, in the graph's node order: features, errors, tokens, logits
FA, FB, E0, T0, T1, L0, L1 = range(7)
PLANTED_EDGES = [  # (source, target, weight)
    (T1, FA, 3.0),
    (T0, FA, -1.0),  # FA's input: 3/4 from T1, 1/4 from T0
    (FA, FB, 3.0),
    (E0, FB, 1.0),  # FB's: 3/4 from FA, 1/4 from the error node
    (FB, L0, 6.0),
    (T1, L0, 1.0),
    (E0, L0, -1.0),  # L0's: 6/8 from FB, 1/8 each from T1 and E0
    (FA, L1, 1.0),
    (T0, L1, 1.0),
]


def planted_graph() -> AttributionGraph:
    """T1 -> FA -> FB -> " basketball" is the strongest path, (3/4)^3; E0 -> FB -> logit is the
    next, 1/4 x 3/4."""
    kind = np.array([FEATURE, FEATURE, ERROR, TOKEN, TOKEN, LOGIT, LOGIT], np.int8)
    s, t, w = zip(*PLANTED_EDGES)
    adj = sp.csr_array((np.asarray(w, np.float32), (t, s)), shape=(7, 7))
    has_row = np.isin(kind, (FEATURE, LOGIT))
    return AttributionGraph(
        prompt="Jordan plays",
        tokens=np.array([10, 11]),
        token_strings=["Jordan", " plays"],
        kind=kind,
        layer=np.array([0, 1, 0, -1, -1, 2, 2], np.int32),
        pos=np.array([1, 1, 1, 0, 1, 1, 1], np.int32),
        feature=np.array([512, 77, -1, -1, -1, 900, 901], np.int64),
        activation=np.ones(7, np.float32),
        node_input=np.where(has_row, adj.sum(axis=1), np.nan).astype(np.float32),
        row_constant=np.zeros(7, np.float32),
        has_row=has_row,
        adjacency=adj,
        logit_probabilities=np.array([0.7, 0.2], np.float32),
        n_layers=2,
        metadata={"logit_strings": [" basketball", " football"]},
        labels={FA: "Jordan → basketball"},
    )


def all_paths(graph: AttributionGraph, target: int) -> list[tuple[list[int], float]]:
    """Every path from a source to `target` with its score, by plain recursion (the definition)."""
    a = normalized_adjacency(graph.adjacency).toarray()
    starts = start_nodes(normalized_adjacency(graph.adjacency))

    def into(v: int) -> list[tuple[list[int], float]]:
        if starts[v]:
            return [([v], 1.0)]
        return [
            (nodes + [v], score * a[v, s])
            for s in np.flatnonzero(a[v] > 0)
            for nodes, score in into(int(s))
        ]

    return into(target)


def test_the_planted_path_comes_first_with_its_score():
    g = prune(planted_graph(), node_threshold=1.0, edge_threshold=1.0)
    assert g.n_nodes == 7 and g.adjacency.nnz == len(PLANTED_EDGES)
    ex = explain(g, n_paths=10)
    assert (
        not ex.pruned_here
        and ex.target_token == " basketball"
        and ex.target_probability == pytest.approx(0.7)
    )
    scores = [p.score for p in ex.paths]
    np.testing.assert_allclose(scores, [27 / 64, 3 / 16, 9 / 64, 1 / 8, 1 / 8])
    assert sum(scores) == pytest.approx(1.0)  # every row sums to 1: all paths carry all the input
    first = ex.paths[0]
    assert [s.node for s in first.steps] == ["t:1", "f:0:1:512", "f:1:1:77", "l:900"]
    assert first.start == "token" and ex.paths[1].start == "error"
    assert [s.weight for s in first.steps] == [3.0, 3.0, 6.0, None]
    assert [s.normalized_weight for s in first.steps[:-1]] == [0.75, 0.75, 0.75]
    assert first.steps[1].label == "Jordan → basketball" and first.steps[1].label_source == "human"
    assert first.steps[0].token == " plays" and first.steps[-1].token == " basketball"
    share = ex.error_share
    assert share.direct == pytest.approx(1 / 8) and share.indirect == pytest.approx(3 / 16)
    assert share.total == pytest.approx(1 / 8 + 3 / 16)


def test_tokens_only_skips_paths_from_error_nodes():
    g = prune(planted_graph(), node_threshold=1.0, edge_threshold=1.0)
    ex = explain(g, n_paths=10, tokens_only=True)
    assert [p.start for p in ex.paths] == ["token"] * 3
    np.testing.assert_allclose([p.score for p in ex.paths], [27 / 64, 9 / 64, 1 / 8])


def test_the_target_by_token_and_unknown_targets():
    g = planted_graph()
    ex = explain(g, target=" football")
    assert ex.target_node == "l:901"
    assert {tuple(s.node for s in p.steps) for p in ex.paths} <= {
        ("t:1", "f:0:1:512", "l:901"),
        ("t:0", "f:0:1:512", "l:901"),
        ("t:0", "l:901"),
    }
    assert explain(g, target="basketball").target_node == "l:900"  # surrounding spaces optional
    with pytest.raises(UserError) as e:
        explain(g, target=" baseball")
    message = str(e.value)
    assert "\n" not in message and '" basketball"' in message and '" football"' in message


def test_an_unpruned_graph_is_pruned_first():
    g = synthetic_graph(n_features=60, n_layers=6, seed=3, with_influence=False)
    assert not g.is_pruned
    ex = explain(g, n_paths=4)
    assert ex.pruned_here and ex.pruning["node_threshold"] == 0.8
    pruned = prune(g)
    assert ex.n_nodes == pruned.n_nodes and ex.n_edges == pruned.adjacency.nnz
    again = explain(pruned, n_paths=4)
    assert not again.pruned_here
    assert [p.score for p in again.paths] == [p.score for p in ex.paths]
    assert "pruned here with the default thresholds" in explanation_text(ex)


@pytest.mark.parametrize("seed", range(3))
def test_top_paths_are_the_best_of_all_paths(seed):
    g = synthetic_graph(n_features=25, n_layers=5, seed=seed, with_influence=False)
    target = int(g.logit_nodes[0])
    every = sorted(all_paths(g, target), key=lambda p: -p[1])
    assert len(every) > 12
    found = top_paths(g, target, n_paths=12)
    np.testing.assert_allclose([p.score for p in found], [s for _, s in every[:12]], rtol=1e-12)
    ids = g.node_ids()
    by_nodes = {tuple(ids[i] for i in nodes): s for nodes, s in every}
    for p in found:  # each is a real path, with the score of its nodes
        assert by_nodes[tuple(s.node for s in p.steps)] == pytest.approx(p.score, rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_path_scores_from_a_source_add_up_to_its_influence(seed):
    """Summed over all paths from each source, the scores give `circuits.pruning`'s influence on
    the one logit; weighted by the logits' probabilities, the graph's influence itself."""
    g = synthetic_graph(n_features=25, n_layers=5, seed=seed, with_influence=False)
    weighted = np.zeros(g.n_nodes)
    for rank, target in enumerate(g.logit_nodes):
        paths = top_paths(g, int(target), n_paths=10**6)
        assert len(paths) == len(all_paths(g, int(target)))  # all of them
        per_start = defaultdict(float)
        for p in paths:
            per_start[g.index_of(p.steps[0].node)] += p.score
        starts = np.fromiter(per_start, int)
        summed = np.fromiter(per_start.values(), float)
        np.testing.assert_allclose(summed, influence_on(g, int(target))[starts], rtol=1e-9)
        weighted[starts] += g.logit_probabilities[rank] * summed
    sources = np.flatnonzero(start_nodes(normalized_adjacency(g.adjacency)))
    np.testing.assert_allclose(weighted[sources], compute_influence(g)[sources], rtol=1e-9)


def test_error_share_of_a_logit_without_inputs_is_zero():
    g = planted_graph()
    g.adjacency = sp.csr_array(g.adjacency.multiply(np.arange(7)[:, None] != L1))
    assert top_paths(g, L1) == []
    share = error_share(g, L1)
    assert (share.direct, share.indirect, share.total) == (0.0, 0.0, 0.0)
    ex = explain(prune(g, node_threshold=1.0, edge_threshold=1.0), target=" football")
    assert ex.paths == [] and explanation_text(ex).endswith("no paths: it has no inputs")


def test_the_command_prints_the_paths_and_writes_json(tmp_path, capsys):
    path = prune(planted_graph(), node_threshold=1.0, edge_threshold=1.0).save(tmp_path / "g.npz")
    out = tmp_path / "sub" / "explain.json"
    argv = ["explain", str(path), "--target", " basketball", "--paths", "3", "--json", str(out)]
    assert run(argv) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == 'target: logit " basketball" (l:900), p = 0.700'
    assert "error nodes: 31.2% of the logit's input over all paths" in lines[2]
    assert lines[4] == (
        '1. 0.4219  " plays"@1 —+3 (75.0%)→ [L0/512@1 "Jordan → basketball"] —+3 (75.0%)→ '
        '[L1/77@1] —+6 (75.0%)→ logit " basketball"'
    )
    assert lines[5].startswith("2. 0.1875  [error L0@1] —+1 (25.0%)→ [L1/77@1]")
    assert lines[5].endswith("(starts at an error node)") and len(lines) == 7
    saved = json.loads(out.read_text())
    assert saved["target_token"] == " basketball" and len(saved["paths"]) == 3
    assert saved["paths"][0]["score"] == pytest.approx(27 / 64)
    assert saved["error_share"]["total"] == pytest.approx(5 / 16)


def test_the_command_refuses_an_unknown_target_in_one_line(tmp_path, capsys):
    path = planted_graph().save(tmp_path / "g.npz")
    assert run(["explain", str(path), "--target", " hockey"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and '" football"' in err
    assert run(["explain", str(path), "--paths", "0"]) == 2
    assert "--paths" in capsys.readouterr().err


def test_explain_a_traced_graph(tmp_path, capsys):
    """End to end on a tiny model: the paths are edges of the pruned graph, best first, ending at
    the target logit, and no path scores more than its start's influence on the logit."""
    from circuits.attribution import attribute

    lm = tiny_model(seed=0)
    s = lm.sites
    tc = random_transcoders(s.n_layers, s.d_model, 96, kind="skip", seed=1, l0=6)
    graph = attribute(lm, "The cat sat on the", transcoders=tc, progress=False)
    ex = explain(graph, n_paths=8)
    assert ex.pruned_here and ex.paths
    pruned = prune(graph)
    ids = pruned.node_ids()
    flow = influence_on(pruned, int(pruned.logit_nodes[0]))
    scores = [p.score for p in ex.paths]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] <= scores[0] <= 1
    for p in ex.paths:
        nodes = [ids.index(st.node) for st in p.steps]
        assert nodes[-1] == int(pruned.logit_nodes[0]) and len(pruned.incoming(nodes[0])[0]) == 0
        for st, (u, v) in zip(p.steps, zip(nodes, nodes[1:])):
            assert pruned.adjacency[v, u] == pytest.approx(st.weight)
        assert p.score <= flow[nodes[0]] * (1 + 1e-9)
    assert 0 <= ex.error_share.direct <= ex.error_share.total <= 1
    graph.save(tmp_path / "g.npz")
    assert run(["explain", str(tmp_path / "g.npz"), "--paths", "2"]) == 0
    text = capsys.readouterr().out
    assert "pruned here" in text and text.count("→ logit ") == 2
