"""Influence, pruning and graph scores (Ameisen et al., 2025, "Circuit Tracing", methods section).

Influence: with A the |adjacency| normalised so each target's incoming edges sum to 1, the indirect
influence of every path length is B = A + A^2 + ... = (I - A)^-1 - I. A node's influence on the
output is w^T B, w the logit probabilities. The graph is a DAG, so instead of inverting we solve
(I - A)^T x = w by back-substitution over topological levels (logits first, tokens last); each
level is one sparse matrix-vector product, and every edge is read once.

Pruning keeps the feature and error nodes that account for `node_threshold` of the total influence,
then the edges that account for `edge_threshold` of the edge influence in the remaining graph;
tokens and logits always stay. Input carried by a dropped edge moves into the target's
`row_constant`, so a pruned graph keeps the invariant
`adjacency[t].sum() + row_constant[t] == node_input[t]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from gemma_lm.errors import UserError
from gemma_lm.jobs import with_overrides

from .graph import ERROR, FEATURE, LOGIT, TOKEN, AttributionGraph


@dataclass
class PruneConfig:
    """Pruning: how much of the influence the circuit keeps (`circuits.prune` takes these as
    keywords)."""

    node_threshold: float = 0.8
    """keep the nodes carrying this fraction of the influence on the logits"""
    edge_threshold: float = 0.98
    """then keep the edges carrying this fraction of the edge influence"""

    def check(self) -> None:
        for name in ("node_threshold", "edge_threshold"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                flag = name.replace("_", "-")
                raise UserError(f"--{flag} must be a number in [0, 1], got {v!r}")


# -- influence -------------------------------------------------------------------------------------


def normalized_adjacency(adjacency: sp.sparray) -> sp.csr_array:
    """|adjacency| with each row scaled to sum to 1 (empty rows stay empty), float64 `[n, n]`."""
    a = sp.csr_array(adjacency, dtype=np.float64, copy=True)
    a.data = np.abs(a.data)
    sums = np.asarray(a.sum(axis=1)).ravel()
    scale = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
    a.data *= np.repeat(scale, np.diff(a.indptr))
    return a


def _layer_key(graph: AttributionGraph) -> np.ndarray:
    """A topological key for attribution graphs: tokens, then layers, then logits."""
    key = graph.layer.astype(np.int64).copy()
    key[graph.kind == TOKEN] = -1
    key[graph.kind == LOGIT] = max(int(graph.layer.max(initial=0)), graph.n_layers) + 1
    return key


def _edge_rows(a: sp.csr_array) -> np.ndarray:
    return np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))


def topological_levels(a: sp.csr_array, key: np.ndarray | None = None) -> np.ndarray:
    """A level per node: every edge goes from a lower level (source) to a higher one (target).

    `key` (e.g. layers) is used when it already has that property, which is the case for every graph
    `circuits.attribute` builds; otherwise levels are longest-path depths from the sources."""
    rows, cols = _edge_rows(a), a.indices
    if key is not None and (key[cols] < key[rows]).all():
        return key
    n = a.shape[0]
    depth = np.zeros(n, dtype=np.int64)
    for _ in range(n + 1):
        cand = np.zeros(n, dtype=np.int64)
        np.maximum.at(cand, rows, depth[cols] + 1)
        new = np.maximum(depth, cand)
        if (new == depth).all():
            return depth
        depth = new
    raise UserError(
        "the graph has a cycle (an edge path returns to its start); attribution graphs are DAGs"
    )


def _solve_influence(a: sp.csr_array, weights: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """x - w where (I - A)^T x = w, i.e. w^T (A + A^2 + ...), by back-substitution over levels."""
    x = weights.astype(np.float64).copy()
    has_in = np.diff(a.indptr) > 0
    for lv in np.unique(levels[has_in])[::-1]:
        rows = np.flatnonzero((levels == lv) & has_in)
        # every target of these nodes sits on a higher level and is final already
        x += a[rows].T @ x[rows]
    return x - weights


def logit_weights(graph: AttributionGraph) -> np.ndarray:
    """`[n_nodes]`: each logit node's probability, 0 elsewhere."""
    w = np.zeros(graph.n_nodes)
    w[graph.logit_nodes] = np.asarray(graph.logit_probabilities, dtype=np.float64)[
        : len(graph.logit_nodes)
    ]
    return w


def compute_influence(graph: AttributionGraph, adjacency: sp.sparray | None = None) -> np.ndarray:
    """Influence of every node on the logits, `[n_nodes]` float64: w^T ((I - A)^-1 - I) with A the
    normalised |adjacency| and w the logit probabilities. Logits themselves get 0."""
    a = normalized_adjacency(graph.adjacency if adjacency is None else adjacency)
    return _solve_influence(a, logit_weights(graph), topological_levels(a, _layer_key(graph)))


def cumulative_influence(influence: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """For each candidate node, the fraction of the candidates' total influence carried by it and
    every more influential candidate (0 < c <= 1; the strongest node has the smallest value). NaN
    elsewhere. Keeping nodes with c <= t keeps those that account for t of the influence."""
    out = np.full(len(influence), np.nan)
    idx = np.flatnonzero(candidates)
    if len(idx) == 0:
        return out
    vals = np.clip(influence[idx], 0.0, None)
    order = np.argsort(-vals, kind="stable")
    total = vals.sum()
    cum = np.cumsum(vals[order]) / total if total > 0 else np.ones(len(idx))
    out[idx[order]] = cum
    return out


def _keep_top(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of the smallest set of largest scores whose sum reaches `threshold` of the total (ties
    at the cut are kept together; threshold 1 keeps everything, a zero total keeps nothing)."""
    scores = np.clip(scores, 0.0, None)
    total = scores.sum()
    if total <= 0 or len(scores) == 0:
        return np.zeros(len(scores), dtype=bool)
    if threshold >= 1.0:
        return np.ones(len(scores), dtype=bool)
    order = np.sort(scores)[::-1]
    cut = int(np.searchsorted(np.cumsum(order) / total, threshold))
    return scores >= order[min(cut, len(order) - 1)]


# -- scores ----------------------------------------------------------------------------------------


def graph_scores(graph: AttributionGraph, influence: np.ndarray | None = None) -> dict:
    """Replacement and completeness scores (Ameisen et al., 2025), both in [0, 1]; 1 means the graph
    explains the output through features alone.

    replacement: of the influence on the logits that starts at the graph's inputs (token embeddings
      and error nodes), the fraction that starts at tokens -- i.e. strength-weighted token -> logit
      paths that run through features only, over all end-to-end paths.
    completeness: for every node with incoming edges (features and logits), the fraction of its
      normalised input that does not come from error nodes, averaged with weights influence + logit
      probability. Unlike circuit-tracer's implementation, source-only nodes (tokens, errors) are
      not counted as complete, so the score is not inflated by the error nodes themselves.
    Features whose rows were not computed (beyond `max_feature_nodes`) end paths without a verdict;
    their share is reported as `unexplained_fraction`."""
    a = normalized_adjacency(graph.adjacency)
    w = logit_weights(graph)
    if influence is None:
        influence = _solve_influence(a, w, topological_levels(a, _layer_key(graph)))
    is_err = graph.kind == ERROR
    tok = float(influence[graph.kind == TOKEN].sum())
    err = float(influence[is_err].sum())
    rowless = (graph.kind == FEATURE) & (np.diff(a.indptr) == 0)
    lost = float(influence[rowless].sum())
    replacement = tok / (tok + err) if tok + err > 0 else 0.0
    has_in = np.diff(a.indptr) > 0
    err_share = a @ is_err.astype(np.float64)  # per row: fraction of normalised input from errors
    weight = (influence + w) * has_in
    completeness = (
        float(((1.0 - err_share) * weight).sum() / weight.sum()) if weight.sum() > 0 else 0.0
    )
    total = tok + err + lost
    return {
        "replacement": float(np.clip(replacement, 0.0, 1.0)),
        "completeness": float(np.clip(completeness, 0.0, 1.0)),
        "unexplained_fraction": lost / total if total > 0 else 0.0,
    }


# -- pruning ---------------------------------------------------------------------------------------


def prune_masks(
    graph: AttributionGraph, config: PruneConfig, influence: np.ndarray | None = None
) -> tuple[np.ndarray, sp.csr_array, np.ndarray]:
    """(node mask `[n_nodes]`, kept edges as a 0/1 CSR mask `[n_nodes, n_nodes]`, influence
    `[n_nodes]`)."""
    config.check()
    always = (graph.kind == TOKEN) | (graph.kind == LOGIT)
    if influence is None:
        influence = compute_influence(graph)
    w = logit_weights(graph)
    node_mask = always.copy()
    node_mask[~always] = _keep_top(influence[~always], config.node_threshold)

    # edge influence inside the graph of kept nodes, with its own normalisation
    a = sp.csr_array(graph.adjacency, copy=True)
    rows = _edge_rows(a)
    live = node_mask[rows] & node_mask[a.indices]
    a.data = np.where(live, a.data, 0)
    a.eliminate_zeros()
    an = normalized_adjacency(a)
    infl_kept = _solve_influence(an, w, topological_levels(an, _layer_key(graph)))
    edge_score = an.data * (infl_kept + w)[_edge_rows(an)]
    keep_edge = _keep_top(edge_score, config.edge_threshold)
    edges = sp.csr_array(
        (keep_edge.astype(np.int8), an.indices.copy(), an.indptr.copy()), shape=an.shape
    )
    edges.eliminate_zeros()

    # a feature or error node needs an outgoing edge; a feature whose row was computed needs an
    # incoming one. Dropping one node can strand another, so repeat until nothing changes (at most
    # depth rounds).
    inner = (graph.kind == FEATURE) | (graph.kind == ERROR)
    needs_in = (graph.kind == FEATURE) & graph.has_row.astype(bool)
    while True:
        has_out = np.zeros(graph.n_nodes, dtype=bool)
        has_out[edges.indices] = True
        has_in = np.diff(edges.indptr) > 0
        new = node_mask & ~(inner & ~has_out) & ~(needs_in & ~has_in)
        if (new == node_mask).all():
            break
        node_mask = new
        r = _edge_rows(edges)
        edges.data = np.where(node_mask[r] & node_mask[edges.indices], edges.data, 0).astype(
            np.int8
        )
        edges.eliminate_zeros()
    return node_mask, edges, influence


def prune(
    graph: AttributionGraph, config: PruneConfig | None = None, **overrides
) -> AttributionGraph:
    """The circuit: the nodes and edges that carry most of the influence on the logits.

    Options as in `PruneConfig` (`node_threshold`, `edge_threshold`), given as `config` and/or
    keyword overrides of it. Returns a new graph (node order kept) whose `influence` holds each
    node's influence in the full graph and whose `scores` holds replacement/completeness scores of
    the full and the pruned graph; `pruning` records the thresholds and sizes."""
    cfg = with_overrides(config, PruneConfig, overrides)
    if graph.adjacency.shape != (graph.n_nodes, graph.n_nodes):
        raise UserError(
            f"graph adjacency has shape {graph.adjacency.shape}, expected {(graph.n_nodes,) * 2}"
        )
    influence = compute_influence(graph)
    full_scores = graph_scores(graph, influence)
    node_mask, edges, _ = prune_masks(graph, cfg, influence)

    kept_adj = sp.csr_array(graph.adjacency.multiply(edges), dtype=graph.adjacency.dtype)
    kept_adj.eliminate_zeros()
    dropped = (
        np.asarray(graph.adjacency.sum(axis=1)).ravel() - np.asarray(kept_adj.sum(axis=1)).ravel()
    )
    full = AttributionGraph(
        **{
            **graph.__dict__,
            "adjacency": kept_adj,
            "row_constant": (graph.row_constant + dropped).astype(graph.row_constant.dtype),
            "influence": influence.astype(np.float32),
        }
    )
    pruned = full.subgraph(node_mask)
    pruned.scores = {"full": full_scores, "pruned": graph_scores(pruned)}
    pruned.pruning = {
        **asdict(cfg),
        "n_nodes_before": int(graph.n_nodes),
        "n_nodes_after": int(pruned.n_nodes),
        "n_edges_before": int(graph.adjacency.nnz),
        "n_edges_after": int(pruned.adjacency.nnz),
        "n_features_after": int((pruned.kind == FEATURE).sum()),
        # the full graph's feature + error influence: exports keep cumulative shares relative to it
        "total_influence": float(
            np.clip(influence[(graph.kind == FEATURE) | (graph.kind == ERROR)], 0, None).sum()
        ),
        "n_errors_after": int((pruned.kind == ERROR).sum()),
    }
    return pruned


def scores_table(graph_or_scores: AttributionGraph | dict) -> str:
    """A graph's `scores` (or such a dict itself) as aligned text lines (empty when there are
    none)."""
    scores = (
        graph_or_scores.scores if isinstance(graph_or_scores, AttributionGraph) else graph_or_scores
    )
    lines = []
    for which, s in scores.items():
        lines.append(
            f"{which:>7}: replacement {s['replacement']:.3f}  completeness {s['completeness']:.3f}"
            + (
                f"  (unexplained {s['unexplained_fraction']:.3f})"
                if s.get("unexplained_fraction")
                else ""
            )
        )
    return "\n".join(lines)
