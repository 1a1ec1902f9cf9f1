"""`circuits prune`, `circuits show` and `circuits compare`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gemma_lm.files import atomic_write_text, check_output_file, write_failure_as_user_error
from gemma_lm.jobs import Command, option

from .comparison import CompareConfig, compare
from .graph import ERROR, FEATURE, KIND_NAMES, AttributionGraph, display_label, load_graph
from .pruning import PruneConfig, compute_influence, graph_scores, prune, scores_table
from .render import DEFAULT_MAX_NODES, check_graphviz_for, render_comparison_svg


@dataclass(kw_only=True)
class PruneJob:
    """Prune an attribution graph by influence on the logits and print the replacement and
    completeness scores of the full and the pruned graph."""

    graph: str = option(positional=True)
    """graph file written by `circuits trace`"""
    out: str
    """where to write the pruned graph (.npz)"""
    pruning: PruneConfig = field(default_factory=PruneConfig)

    def check(self) -> None:
        check_output_file(self.out, "--out")


def run_prune(job: PruneJob) -> int:
    pruned = prune(load_graph(job.graph), job.pruning)
    with write_failure_as_user_error(job.out):
        pruned.save(job.out)
    m = pruned.pruning
    print(
        f"pruned {job.graph}: {m['n_nodes_before']} -> {m['n_nodes_after']} nodes "
        f"({m['n_features_after']} features, {m['n_errors_after']} error nodes), "
        f"{m['n_edges_before']} -> {m['n_edges_after']} edges; wrote {job.out}"
    )
    print(scores_table(pruned))
    return 0


@dataclass(kw_only=True)
class ShowJob:
    """Print a graph's summary, its scores and its most influential nodes with their labels (human
    labels, else the auto labels of the feature dashboards)."""

    graph: str = option(positional=True)
    """graph file (from `circuits trace` or `circuits prune`)"""
    top: int = 15
    """how many top nodes to list"""


def top_nodes(
    graph: AttributionGraph, n: int, kinds: tuple[int, ...] = (FEATURE, ERROR)
) -> list[tuple[int, float]]:
    """The n nodes of `kinds` (feature and error nodes) with the largest influence on the logits:
    [(index, influence)]."""
    influence = graph.influence if graph.influence is not None else compute_influence(graph)
    inner = np.flatnonzero(np.isin(graph.kind, kinds))
    order = inner[np.argsort(-np.asarray(influence)[inner], kind="stable")][:n]
    return [(int(i), float(influence[i])) for i in order]


def show_text(graph: AttributionGraph, n_top: int = 15) -> str:
    meta = graph.metadata or {}
    lines = [f"prompt: {graph.prompt!r}", f"tokens: {graph.token_strings}", graph.summary()]
    if meta.get("model"):
        tc = meta.get("transcoders") or {}
        lines.append(
            f"model: {meta['model']}; transcoders: {tc.get('kind', '?')} "
            f"({tc.get('d_sae', '?')} features per layer) {tc.get('source', '')}".rstrip()
        )
    if graph.is_pruned:
        p = graph.pruning
        lines.append(
            f"pruned with node threshold {p['node_threshold']}, "
            f"edge threshold {p['edge_threshold']}: "
            f"{p['n_nodes_before']} -> {p['n_nodes_after']} nodes"
        )
    scores = graph.scores or {"graph": graph_scores(graph)}
    lines.append("scores:")
    lines += ["  " + line for line in scores_table(scores).splitlines()]
    lines.append(f"top {n_top} nodes by influence on the logits:")
    for i, infl in top_nodes(graph, n_top):
        tok = graph.token_strings[graph.pos[i]]
        lines.append(
            f"  {graph.node_id(i):<20} {node_label_column(graph, i):<36} "
            f"{KIND_NAMES[graph.kind[i]]:<7} at {tok!r:<14} "
            f"influence {infl:.4f}  activation {graph.activation[i]:.3g}"
        )
    return "\n".join(lines)


def node_label_column(graph: AttributionGraph, i: int, width: int = 36) -> str:
    """Node i's label on one line, cut to `width` characters, with where it came from: `Texas
    cities (auto)`, `say a capital (human)`; "-" for a node with no label."""
    label, source = display_label(graph, i)
    if source == "default":
        return "-"
    text = " ".join(label.split())
    room = width - len(source) - 3
    text = text if len(text) <= room else text[: room - 1] + "…"
    return f"{text} ({source})"


def run_show(job: ShowJob) -> int:
    print(show_text(load_graph(job.graph), job.top))
    return 0


@dataclass(kw_only=True)
class CompareJob:
    """Compare two graphs: features matched by (layer, feature id) at aligned positions; unpruned
    graphs are pruned first."""

    a: str = option(positional=True)
    """graph A"""
    b: str = option(positional=True)
    """graph B"""
    svg: str | None = None
    """draw both circuits in one picture (.svg, .png or .pdf)"""
    json: str | None = None
    """write the comparison as JSON"""
    max_nodes: int = DEFAULT_MAX_NODES
    """nodes per graph in the picture"""
    comparison: CompareConfig = field(default_factory=CompareConfig)

    def check(self) -> None:
        for flag in ("svg", "json"):
            if getattr(self, flag):
                check_output_file(getattr(self, flag), f"--{flag}")
        if self.svg:
            check_graphviz_for(self.svg)


def run_compare(job: CompareJob) -> int:
    result = compare(load_graph(job.a), load_graph(job.b), config=job.comparison)
    print(result.summary())
    if job.svg:
        with write_failure_as_user_error(job.svg):
            path = render_comparison_svg(result, None, None, job.svg, job.max_nodes)
        print(f"wrote {path}", file=sys.stderr)
    if job.json:
        text = json.dumps(result.to_dict(), indent=1, ensure_ascii=False)
        with write_failure_as_user_error(job.json):
            atomic_write_text(Path(job.json), text)
        print(f"wrote {job.json}", file=sys.stderr)
    return 0


COMMANDS = [
    Command(
        "prune",
        PruneJob,
        run_prune,
        "keep the nodes and edges that matter; print replacement/completeness scores",
    ),
    Command("show", ShowJob, run_show, "summary, scores and the most influential nodes of a graph"),
    Command(
        "compare",
        CompareJob,
        run_compare,
        "compare the circuits of two graphs (shared/unique nodes, changes)",
    ),
]
