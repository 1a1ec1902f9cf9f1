"""How did the model get to this token: the strongest paths from the prompt to one logit node.

Path score (the influence of Ameisen et al., 2025, "Circuit Tracing", taken one path at a time):
with A the |adjacency| normalised so that each node's incoming weights sum to 1
(`circuits.pruning.normalized_adjacency`), a path's score is the product of A along its edges. The
scores of all paths from a node s to the target logit add up to s's influence on that logit
(`compute_influence` with weight 1 on the target and 0 on the other logits; the graph's own
influence weighs each logit by its probability). Since every row of A sums to 1, the scores of all
paths from all starts add up to 1: a score is the share of the logit's input that flows along it.

Paths start at the graph's sources, the nodes with no incoming edge of nonzero weight: prompt
tokens, error nodes (the part of each MLP output the transcoders miss) and features whose inputs
were not traced (beyond `max_feature_nodes`). Each path says where it starts; `tokens_only`
keeps the paths that start at a token.

The top paths are found exactly, best first, by a search backwards from the logit on
cost = -log(score): each node's best cost from any start (one pass over the edges, in topological
order) is an exact A* heuristic, and each expanded partial path pushes only its best extension and
its next sibling, so the work is about `n_paths` x path length heap operations plus one sort of
the incoming edges of each node it visits.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from gemma_lm.errors import UserError

from .graph import ERROR, KIND_NAMES, LOGIT, TOKEN, AttributionGraph, display_label
from .pruning import compute_influence, normalized_adjacency, prune, topological_levels

START_KINDS = ("token", "error", "untraced feature")


@dataclass
class Step:
    """One node of a path, and the edge from it to the next node."""

    node: str  # node id (`AttributionGraph.node_id`)
    kind: str  # "feature", "error", "token" or "logit"
    layer: int  # -1 for tokens, n_layers for logits
    position: int
    token: str  # the prompt token at `position`; for the logit, the token it predicts
    label: str  # `display_label`
    label_source: str  # "human", "auto" or "default"
    weight: float | None = None  # raw edge weight into the next node; None for the logit
    normalized_weight: float | None = None  # |weight| / the next node's total |incoming weight|


@dataclass
class Path:
    steps: list[Step]  # from the start to the logit
    score: float  # product of the normalised weights
    start: str  # what it starts at: one of START_KINDS


@dataclass
class ErrorShare:
    """The share of the target logit's input that comes from error nodes, in normalised |weight|.

    direct: the error nodes' part of the logit's own incoming weight (paths of one edge).
    total: the scores of all paths that start at an error node, summed (every length).
    indirect: total - direct, the part that runs through at least one feature."""

    direct: float
    indirect: float
    total: float


@dataclass
class Explanation:
    prompt: str
    target_node: str  # node id of the target logit
    target_token: str
    target_probability: float
    paths: list[Path]  # best first
    error_share: ErrorShare
    pruned_here: bool  # the graph given was not pruned; `explain` pruned it with the defaults
    pruning: dict  # the pruning thresholds and sizes of the graph searched
    n_nodes: int  # of the graph searched
    n_edges: int
    tokens_only: bool = False
    logit_tokens: list[str] = field(default_factory=list)  # every logit node's token

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)

    def text(self) -> str:
        """What `circuits explain` prints (`explanation_text`)."""
        return explanation_text(self)


# -- the target ------------------------------------------------------------------------------------


def logit_names(graph: AttributionGraph) -> list[str]:
    """The token of each logit node (its vocabulary id as text where the graph has no strings)."""
    strings = graph.logit_strings
    ids = graph.logit_tokens
    return [strings[j] if j < len(strings) else str(int(ids[j])) for j in range(len(ids))]


def find_target(graph: AttributionGraph, target: str | None) -> int:
    """The rank among the logit nodes of token `target` (the first logit node for None). An exact
    match first, then one ignoring surrounding spaces (`basketball` for " basketball") if unique."""
    names = logit_names(graph)
    if not names:
        raise UserError("the graph has no logit nodes; trace it again with `circuits trace`")
    if target is None:
        return 0
    if target in names:
        return names.index(target)
    loose = [j for j, s in enumerate(names) if s.strip() == target.strip()]
    if len(loose) == 1:
        return loose[0]
    listed = ", ".join(json.dumps(s, ensure_ascii=False) for s in names)
    raise UserError(
        f"--target {json.dumps(target, ensure_ascii=False)} is not a logit node of this graph; "
        f"its logit nodes are {listed}"
    )


# -- the search ------------------------------------------------------------------------------------


def _levels(graph: AttributionGraph, a: sp.csr_array) -> np.ndarray:
    """Topological levels: tokens, then the layers, then the logits (longest-path depths if an edge
    of a graph made elsewhere breaks that order)."""
    key = graph.layer.astype(np.int64).copy()
    key[graph.kind == TOKEN] = -1
    key[graph.kind == LOGIT] = max(int(graph.layer.max(initial=0)), graph.n_layers) + 1
    return topological_levels(a, key)


def _edge_costs(a: sp.csr_array) -> sp.csr_array:
    """-log of the normalised weights, same structure as `a` (inf for a weight of 0)."""
    with np.errstate(divide="ignore"):
        cost = -np.log(a.data)
    return sp.csr_array((cost, a.indices, a.indptr), shape=a.shape)


def start_nodes(a: sp.csr_array) -> np.ndarray:
    """`[n_nodes]` bool: no incoming edge of nonzero weight (the sources of the graph)."""
    rows = np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))
    has_in = np.zeros(a.shape[0], dtype=bool)
    has_in[rows[a.data > 0]] = True
    return ~has_in


def best_costs(
    costs: sp.csr_array, levels: np.ndarray, start: np.ndarray, allowed: np.ndarray
) -> np.ndarray:
    """`[n_nodes]`: each node's least -log(score) over the paths to it from a start that is
    `allowed` (0 at such a start, inf where no path comes from one); `start` as `start_nodes`."""
    best = np.where(start & allowed, 0.0, np.inf)
    for lv in np.unique(levels[~start]):
        rows = np.flatnonzero((levels == lv) & ~start)
        sub = costs[rows]  # every row has an edge: these are not starts
        best[rows] = np.minimum.reduceat(sub.data + best[sub.indices], sub.indptr[:-1])
    return best


class _PathSearch:
    """Best-first search backwards from the target. A partial path is a suffix ending at the target,
    held as (node, cost from it to the target, the rest of the suffix, CSR position of its edge into
    the rest); its priority is its cost plus the node's best cost from a start, the cost of its best
    completion. The search pops complete paths in order of score."""

    def __init__(self, costs: sp.csr_array, best: np.ndarray, is_start: np.ndarray):
        self.costs, self.best, self.is_start = costs, best, is_start
        self.sorted_in: dict[int, np.ndarray] = {}
        self.heap: list = []
        self.order = itertools.count()

    def sources(self, v: int) -> np.ndarray:
        """CSR positions of v's incoming edges that a path can use, best completion first."""
        if v not in self.sorted_in:
            lo, hi = self.costs.indptr[v], self.costs.indptr[v + 1]
            through = self.costs.data[lo:hi] + self.best[self.costs.indices[lo:hi]]
            order = np.argsort(through, kind="stable")
            self.sorted_in[v] = lo + order[np.isfinite(through[order])]
        return self.sorted_in[v]

    def push(self, suffix: tuple, rank: int) -> None:
        """Push the extension of `suffix` by its rank-th best incoming edge."""
        pos = int(self.sources(suffix[0])[rank])
        s = int(self.costs.indices[pos])
        cost = suffix[1] + float(self.costs.data[pos])
        # on equal priority the newest entry first: ties go depth first, to a complete path
        entry = (cost + self.best[s], -next(self.order), (s, cost, suffix, pos), suffix, rank)
        heapq.heappush(self.heap, entry)

    def top(self, target: int, n_paths: int) -> list[tuple[list[int], list[int]]]:
        """The n_paths best paths into `target`: (nodes from start to target, CSR positions of
        their edges)."""
        root = (target, 0.0, None, -1)
        if len(self.sources(target)):
            self.push(root, 0)
        found = []
        while self.heap and len(found) < n_paths:
            _, _, suffix, parent, rank = heapq.heappop(self.heap)
            if rank + 1 < len(self.sources(parent[0])):
                self.push(parent, rank + 1)
            if self.is_start[suffix[0]]:
                found.append(_unwind(suffix))
            else:
                self.push(suffix, 0)
        return found


def _unwind(suffix: tuple) -> tuple[list[int], list[int]]:
    nodes, positions = [], []
    while suffix is not None:
        nodes.append(suffix[0])
        positions.append(suffix[3])
        suffix = suffix[2]
    return nodes, positions[:-1]


def _start_kind(graph: AttributionGraph, i: int) -> str:
    return {TOKEN: "token", ERROR: "error"}.get(int(graph.kind[i]), "untraced feature")


def _step(graph: AttributionGraph, i: int, names: list[str]) -> Step:
    label, source = display_label(graph, i)
    if graph.kind[i] == LOGIT:
        token = names[int(np.flatnonzero(graph.logit_nodes == i)[0])]
    else:
        token = graph.token_strings[graph.pos[i]]
    return Step(
        node=graph.node_id(i),
        kind=KIND_NAMES[graph.kind[i]],
        layer=int(graph.layer[i]),
        position=int(graph.pos[i]),
        token=token,
        label=label,
        label_source=source,
    )


def top_paths(
    graph: AttributionGraph, target: int, n_paths: int = 5, tokens_only: bool = False
) -> list[Path]:
    """The `n_paths` highest-scoring paths from a start to node `target` of `graph` as it is (not
    pruned here), best first. `tokens_only`: only paths that start at a prompt token."""
    raw = sp.csr_array(graph.adjacency, dtype=np.float64, copy=True)
    raw.sum_duplicates()
    a = normalized_adjacency(raw)  # the same structure as raw: positions index both
    costs = _edge_costs(a)
    is_start = start_nodes(a)
    allowed = graph.kind == TOKEN if tokens_only else np.ones(graph.n_nodes, dtype=bool)
    best = best_costs(costs, _levels(graph, a), is_start, allowed)
    found = _PathSearch(costs, best, is_start).top(target, n_paths)
    names = logit_names(graph)
    # each node once: paths share most of their nodes, and a label can cost a dashboard lookup
    made = {i: _step(graph, i, names) for i in {i for nodes, _ in found for i in nodes}}
    paths = []
    for nodes, positions in found:
        steps = [dataclasses.replace(made[i]) for i in nodes]
        for step, pos in zip(steps, positions):
            step.weight, step.normalized_weight = float(raw.data[pos]), float(a.data[pos])
        score = float(np.prod([s.normalized_weight for s in steps[:-1]]))
        paths.append(Path(steps=steps, score=score, start=_start_kind(graph, nodes[0])))
    return paths


# -- error share -----------------------------------------------------------------------------------


def influence_on(graph: AttributionGraph, target: int) -> np.ndarray:
    """`[n_nodes]`: each node's influence on logit node `target` alone, the sum of the scores of
    all its paths to it."""
    onehot = (graph.logit_nodes == target).astype(np.float32)
    return compute_influence(dataclasses.replace(graph, logit_probabilities=onehot))


def error_share(graph: AttributionGraph, target: int) -> ErrorShare:
    """See `ErrorShare`; 0 everywhere for a logit without incoming edges."""
    a = normalized_adjacency(graph.adjacency)
    is_error = graph.kind == ERROR
    direct = float((a[[target]] @ is_error.astype(np.float64))[0])
    flow = influence_on(graph, target)
    from_starts = float(flow[start_nodes(a)].sum())  # 1 when the logit has incoming edges
    total = float(flow[is_error].sum()) / from_starts if from_starts > 0 else 0.0
    return ErrorShare(direct=direct, indirect=max(total - direct, 0.0), total=total)


# -- the explanation -------------------------------------------------------------------------------


def explain(
    graph: AttributionGraph,
    target: str | None = None,
    n_paths: int = 5,
    *,
    tokens_only: bool = False,
) -> Explanation:
    """The `n_paths` strongest paths to the logit of token `target` (default: the first logit node,
    the most probable), and the error nodes' share of its input, in the pruned graph (an unpruned
    graph is pruned here with `circuits.prune`'s default thresholds: `pruned_here`)."""
    if not (isinstance(n_paths, int) and n_paths >= 1):
        raise UserError(f"--paths must be a whole number >= 1, got {n_paths!r}")
    rank = find_target(graph, target)
    pruned_here = not graph.is_pruned
    if pruned_here:
        graph = prune(graph)
    node = int(graph.logit_nodes[rank])
    names = logit_names(graph)
    return Explanation(
        prompt=graph.prompt,
        target_node=graph.node_id(node),
        target_token=names[rank],
        target_probability=float(graph.logit_probabilities[rank]),
        paths=top_paths(graph, node, n_paths, tokens_only),
        error_share=error_share(graph, node),
        pruned_here=pruned_here,
        pruning=dict(graph.pruning or {}),
        n_nodes=int(graph.n_nodes),
        n_edges=int(graph.adjacency.nnz),
        tokens_only=tokens_only,
        logit_tokens=names,
    )


# -- as text ---------------------------------------------------------------------------------------


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def step_text(step: Step) -> str:
    """`"Michael"@3`, `[L4/512@3 "label"]`, `[error L4@3]`, `logit " basketball"`."""
    label = f" {_quoted(step.label)}" if step.label_source != "default" else ""
    if step.kind == "token":
        return f"{_quoted(step.token)}@{step.position}" + (f" ({label.strip()})" if label else "")
    if step.kind == "error":
        return f"[error L{step.layer}@{step.position}]"
    if step.kind == "logit":
        return f"logit {_quoted(step.token)}"
    feature = step.node.split(":")[-1]
    return f"[L{step.layer}/{feature}@{step.position}{label}]"


def path_text(path: Path) -> str:
    """One line: the steps, each edge with its raw weight and its normalised share."""
    parts = []
    for step in path.steps:
        parts.append(step_text(step))
        if step.weight is not None:
            parts.append(f"—{step.weight:+.3g} ({step.normalized_weight:.1%})→")
    start = "" if path.start == "token" else f"  (starts at an {path.start} node)"
    return " ".join(parts) + start


def _header(ex: Explanation) -> list[str]:
    """The target, the graph searched and the error share."""
    target = f"target: logit {_quoted(ex.target_token)} ({ex.target_node})"
    sizes = f"{ex.n_nodes} nodes, {ex.n_edges} edges"
    if ex.pruned_here:
        thresholds = (
            f"node {ex.pruning.get('node_threshold')}, edge {ex.pruning.get('edge_threshold')}"
        )
        graph = (
            f"graph: not pruned; pruned here with the default thresholds ({thresholds}): {sizes} "
            f"(run `circuits prune` to choose them)"
        )
    else:
        graph = f"graph: pruned, {sizes}"
    share = ex.error_share
    errors = (
        f"error nodes: {share.total:.1%} of the logit's input over all paths "
        f"({share.direct:.1%} directly, {share.indirect:.1%} through features)"
    )
    return [f"{target}, p = {ex.target_probability:.3f}", graph, errors]


def explanation_text(ex: Explanation) -> str:
    """What `circuits explain` prints: the header, then one numbered line per path."""
    lines = _header(ex)
    if not ex.paths:
        why = "no path from a prompt token reaches it" if ex.tokens_only else "it has no inputs"
        lines.append(f"no paths: {why}")
        return "\n".join(lines)
    which = "from prompt tokens " if ex.tokens_only else ""
    lines.append(
        f"top {len(ex.paths)} paths {which}(score: the product of the edges' normalised |weights|, "
        f"the share of the logit's input along the path; each edge: raw weight (normalised)):"
    )
    width = len(str(len(ex.paths)))
    for k, path in enumerate(ex.paths, 1):
        lines.append(f"{k:>{width}}. {path.score:.4f}  {path_text(path)}")
    return "\n".join(lines)
