"""Influence maths, pruning thresholds and graph scores (circuits/pruning.py)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from test_render import synthetic_graph

from circuits.graph import ERROR, FEATURE, LOGIT, TOKEN, AttributionGraph, load_graph
from circuits.pruning import (
    PruneConfig,
    _keep_top,
    compute_influence,
    cumulative_influence,
    graph_scores,
    logit_weights,
    normalized_adjacency,
    prune,
    prune_masks,
)
from gemma_lm.errors import UserError


def brute_force_influence(graph: AttributionGraph) -> np.ndarray:
    """w^T (A + A^2 + ... + A^n) with dense matrix powers: the definition, no cleverness."""
    a = np.abs(graph.adjacency.toarray().astype(np.float64))
    sums = a.sum(axis=1, keepdims=True)
    a = np.divide(a, sums, out=np.zeros_like(a), where=sums > 0)
    w = logit_weights(graph)
    total, v = np.zeros_like(w), w.copy()
    for _ in range(graph.n_nodes):
        v = v @ a
        if not v.any():
            break
        total += v
    return total


def tiny_graph(
    edges: list[tuple[int, int, float]], kind: list[int], layer: list[int], probs: list[float]
):
    """A hand-made graph: edges as (source, target, weight)."""
    n = len(kind)
    s, t, w = zip(*edges) if edges else ((), (), ())
    adj = sp.csr_array(
        (np.asarray(w, np.float32), (np.asarray(t, int), np.asarray(s, int))), shape=(n, n)
    )
    kind = np.asarray(kind, np.int8)
    has_row = np.isin(kind, (FEATURE, LOGIT))
    node_input = np.where(has_row, adj.sum(axis=1), np.nan).astype(np.float32)
    n_pos = int((kind == TOKEN).sum())
    return AttributionGraph(
        prompt="x" * n_pos,
        tokens=np.arange(n_pos),
        token_strings=[f"t{i}" for i in range(n_pos)],
        kind=kind,
        layer=np.asarray(layer, np.int32),
        pos=np.zeros(n, np.int32),
        feature=np.arange(n, dtype=np.int64),
        activation=np.ones(n, np.float32),
        node_input=node_input,
        row_constant=np.zeros(n, np.float32),
        has_row=has_row,
        adjacency=adj,
        logit_probabilities=np.asarray(probs, np.float32),
        n_layers=2,
        metadata={"logit_strings": [f"l{i}" for i in range(len(probs))]},
    )


@pytest.mark.parametrize("seed", range(5))
def test_influence_matches_matrix_power_series(seed):
    g = synthetic_graph(n_features=30 + 20 * seed, n_layers=6, seed=seed, with_influence=False)
    np.testing.assert_allclose(
        compute_influence(g), brute_force_influence(g), rtol=1e-9, atol=1e-12
    )


def test_influence_equals_inverse_formula():
    g = synthetic_graph(n_features=40, n_layers=5, seed=7, with_influence=False)
    a = normalized_adjacency(g.adjacency).toarray()
    b = np.linalg.inv(np.eye(len(a)) - a) - np.eye(len(a))
    np.testing.assert_allclose(compute_influence(g), logit_weights(g) @ b, rtol=1e-9, atol=1e-12)


def test_influence_on_a_shuffled_dag_without_layer_order():
    """Layers that do not order the edges (e.g. a graph from networkx) fall back to path depths."""
    g = synthetic_graph(n_features=50, n_layers=6, seed=3, with_influence=False)
    g.layer = np.zeros_like(g.layer)  # useless as a topological key
    np.testing.assert_allclose(
        compute_influence(g), brute_force_influence(g), rtol=1e-9, atol=1e-12
    )


def test_cycle_is_a_user_error():
    g = tiny_graph(
        [(0, 1, 1.0), (1, 0, 1.0), (1, 2, 1.0)], [FEATURE, FEATURE, LOGIT], [0, 0, 0], [1.0]
    )
    with pytest.raises(UserError, match="cycle"):
        compute_influence(g)


def test_hand_computed_influence_and_scores():
    # token(0) -3-> f(2) ; error(1) -1-> f(2) ; f(2) -(-2)-> logit(3)
    g = tiny_graph(
        [(0, 2, 3.0), (1, 2, 1.0), (2, 3, -2.0)],
        [TOKEN, ERROR, FEATURE, LOGIT],
        [-1, 0, 1, 2],
        [1.0],
    )
    np.testing.assert_allclose(compute_influence(g), [0.75, 0.25, 1.0, 0.0])
    s = graph_scores(g)
    assert s["replacement"] == pytest.approx(0.75)
    assert s["completeness"] == pytest.approx((0.75 * 1.0 + 1.0 * 1.0) / 2.0)


@pytest.mark.parametrize("seed", range(4))
def test_scores_are_in_unit_interval(seed):
    g = synthetic_graph(n_features=80, seed=seed, with_influence=False)
    for s in (graph_scores(g), prune(g).metadata["scores"]["pruned"]):
        assert 0.0 <= s["replacement"] <= 1.0 and 0.0 <= s["completeness"] <= 1.0
    # both tokens and errors reach the logits here
    assert 0.0 < graph_scores(g)["replacement"] < 1.0


def test_all_zero_errors_score_one():
    g = synthetic_graph(n_features=80, seed=2, with_influence=False)
    adj = g.adjacency.tocsr(copy=True)
    adj.data[g.kind[adj.indices] == ERROR] = 0.0  # errors present as nodes, contributing nothing
    g.adjacency = adj
    s = graph_scores(g)
    assert s["replacement"] == 1.0 and s["completeness"] == pytest.approx(1.0)
    p = prune(g)
    assert p.metadata["scores"]["pruned"]["replacement"] == 1.0
    assert (p.kind == ERROR).sum() == 0  # zero-influence error nodes are pruned


def test_errors_only_score_zero():
    g = tiny_graph([(0, 1, 2.0), (1, 2, 1.0)], [ERROR, FEATURE, LOGIT], [0, 1, 2], [1.0])
    s = graph_scores(g)
    assert s["replacement"] == 0.0 and s["completeness"] == pytest.approx(0.5)


def test_keep_top_is_the_smallest_sufficient_set():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.pareto(1.2, 200)
        for t in (0.0, 0.3, 0.8, 0.98):
            m = _keep_top(x, t)
            assert x[m].sum() >= t * x.sum() - 1e-12
            assert x[m].min() >= x[~m].max()
            smallest = x[m].min()
            assert x[m].sum() - smallest < t * x.sum() or t == 0.0
    assert _keep_top(np.array([1.0, 0.0, 2.0]), 1.0).all()
    assert not _keep_top(np.zeros(3), 0.5).any()


def test_cumulative_influence_matches_thresholds():
    g = synthetic_graph(n_features=100, seed=4, with_influence=False)
    infl = compute_influence(g)
    inner = (g.kind == FEATURE) | (g.kind == ERROR)
    c = cumulative_influence(infl, inner)
    assert np.isnan(c[~inner]).all() and c[inner].max() == pytest.approx(1.0)
    # the strongest node has the smallest cumulative value
    assert np.argmin(np.where(inner, c, np.inf)) == np.argmax(np.where(inner, infl, -1))


def test_thresholds_control_the_size():
    g = synthetic_graph(n_features=250, seed=5, with_influence=False)
    sizes = [prune(g, node_threshold=t, edge_threshold=0.98).n_nodes for t in (0.3, 0.6, 0.8, 0.95)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    edges = [prune(g, node_threshold=0.8, edge_threshold=t).adjacency.nnz for t in (0.5, 0.8, 0.98)]
    assert edges == sorted(edges) and edges[0] < edges[-1]
    # with both thresholds at 1 every node with influence stays
    full = prune(g, node_threshold=1.0, edge_threshold=1.0)
    infl = compute_influence(g)
    assert set(full.node_ids()) >= {g.node_id(i) for i in np.flatnonzero(infl > 1e-9)}


def test_pruned_graph_is_consistent():
    g = synthetic_graph(n_features=200, seed=6, with_influence=False, with_labels=True)
    p = prune(g, node_threshold=0.7, edge_threshold=0.9)
    assert (p.kind == TOKEN).sum() == g.n_pos and (p.kind == LOGIT).sum() == len(g.logit_nodes)
    adj = p.adjacency.tocsr()
    out_deg = np.bincount(adj.indices, minlength=p.n_nodes)
    in_deg = np.diff(adj.indptr)
    inner = (p.kind == FEATURE) | (p.kind == ERROR)
    assert (out_deg[inner] > 0).all()
    assert (in_deg[(p.kind == FEATURE) & p.has_row] > 0).all()
    # dropped input moved into the row constant: the attribution invariant still holds
    rows = p.has_row
    np.testing.assert_allclose(
        (adj.sum(axis=1) + p.row_constant)[rows], p.node_input[rows], rtol=1e-4, atol=1e-4
    )
    # node ids keep their meaning; influence comes from the full graph
    infl = compute_influence(g)
    for i in range(p.n_nodes):
        assert p.influence[i] == pytest.approx(infl[g.index_of(p.node_id(i))], rel=1e-5, abs=1e-7)
    assert {p.node_id(i) for i in p.labels} <= set(p.node_ids())
    meta = p.metadata["pruning"]
    assert meta["n_nodes_after"] == p.n_nodes and meta["node_threshold"] == 0.7
    assert set(p.metadata["scores"]) == {"full", "pruned"}


def test_zero_threshold_keeps_tokens_and_logits():
    g = synthetic_graph(n_features=60, seed=8, with_influence=False)
    p = prune(g, node_threshold=0.0, edge_threshold=0.0)
    assert (p.kind == TOKEN).sum() == g.n_pos and (p.kind == LOGIT).sum() == 3
    assert (p.kind == FEATURE).sum() <= 3


def test_features_without_rows_need_no_inputs():
    """A feature whose row was not computed (over the row budget) may still matter as a source."""
    g = tiny_graph(
        [(0, 1, 1.0), (0, 2, 1.0), (1, 3, 1.0), (2, 3, 5.0)],
        [TOKEN, FEATURE, FEATURE, LOGIT],
        [-1, 0, 0, 2],
        [1.0],
    )
    adj = g.adjacency.tolil()
    adj[2, 0] = 0.0  # row of feature 2 not computed
    g.adjacency = sp.csr_array(adj)
    g.adjacency.eliminate_zeros()
    g.has_row[2] = False
    p = prune(g, node_threshold=0.8, edge_threshold=1.0)
    assert "f:0:0:2" in p.node_ids()
    assert p.metadata["scores"]["full"]["unexplained_fraction"] == pytest.approx(5 / 6)


def test_bad_thresholds():
    g = synthetic_graph(n_features=20)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="threshold"):
            prune(g, node_threshold=bad)
        with pytest.raises(UserError, match="threshold"):
            PruneConfig(edge_threshold=bad).check()


def test_prune_masks_node_selection_reaches_threshold():
    g = synthetic_graph(n_features=150, seed=9, with_influence=False)
    infl = compute_influence(g)
    inner = (g.kind == FEATURE) | (g.kind == ERROR)
    mask, edges, _ = prune_masks(g, PruneConfig(node_threshold=0.8, edge_threshold=1.0))
    assert mask[~inner].all()
    assert edges.shape == g.adjacency.shape
    # nodes that survive cleanup are a subset of the selection, which held >= 80% of the influence
    selection = _keep_top(infl[inner], 0.8)
    assert set(np.flatnonzero(mask & inner)) <= set(np.flatnonzero(inner)[selection])


def test_attribute_then_prune_on_a_tiny_model(tiny):
    import circuits
    from transcoders.testing import random_transcoders

    s = tiny.sites
    tc = random_transcoders(s.n_layers, s.d_model, 64, kind="skip", l0=6, seed=1)
    g = circuits.attribute(tiny, "the cat sat on the", transcoders=tc, progress=False)
    np.testing.assert_allclose(
        compute_influence(g), brute_force_influence(g), rtol=1e-7, atol=1e-10
    )
    p = circuits.prune(g)
    assert p.n_nodes < g.n_nodes and p.influence is not None
    for s_ in p.metadata["scores"].values():
        assert 0.0 <= s_["replacement"] <= 1.0 and 0.0 <= s_["completeness"] <= 1.0


def test_graph_accessors_of_what_the_stages_record(tmp_path):
    """Pruning writes `scores` and `pruning`; supernodes and dashboards go through their
    accessors too; all of it is stored in the file's header and read back the same way."""
    g = synthetic_graph(n_features=40, seed=3)
    assert (g.scores, g.pruning, g.is_pruned, g.supernodes, g.feature_dashboards) == (
        {},
        None,
        False,
        {},
        {},
    )
    p = prune(g, node_threshold=0.8)
    assert (
        p.is_pruned and p.pruning["node_threshold"] == 0.8 and set(p.scores) == {"full", "pruned"}
    )
    first = int(p.nodes_of(FEATURE)[0])
    fid, key = p.node_id(first), f"{p.layer[first]}/{p.feature[first]}"
    p.supernodes = {"supernodes": {"group": [fid]}}  # the viewer's file wrapper is unwrapped
    p.feature_dashboards = {key: {"auto_label": "x"}}
    p.save(tmp_path / "p.npz")
    q = load_graph(tmp_path / "p.npz")
    assert (q.scores, q.pruning) == (p.scores, p.pruning)
    assert q.supernodes == {"group": [fid]} and q.feature_dashboards == {key: {"auto_label": "x"}}
    assert q.feature_dashboard(first) == {"auto_label": "x"} and fid in q.dashboards
    assert q.metadata["supernodes"] == {"group": [fid]}  # the file layout is as before
