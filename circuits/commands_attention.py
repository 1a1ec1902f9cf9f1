"""`circuits qk` and `circuits heads`: why a head looked where it did, and which heads carry an
edge."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write_text, check_output_file
from gemma_lm.jobs import Command, option
from gemma_lm.models import DEFAULT_MODEL, load_model

from .attention import prompt_sources, qk_of_sources, qk_text, qk_view, resolve_graph_transcoders
from .graph import AttributionGraph, load_graph
from .heads import attach_head_loadings, edge_indices, loadings_of_sources, loadings_text
from .render_attention import qk_svg


@dataclass(kw_only=True)
class QKJob:
    """Attribute one attention score (pre-softmax, query . key) exactly to pairs of the graph's
    sources: features and error nodes of earlier layers, token embeddings, decoder biases. Prints
    the head's attention row at the query, the query-side and key-side attributions and the
    strongest pairs."""

    graph: str = option(positional=True)
    """graph file (from `circuits trace` or `circuits prune`)"""
    layer: int
    """the attention layer"""
    head: int
    """the query head"""
    query: int = -1
    """query position (negative: from the end)"""
    key: int | None = None
    """key position (default: the one the head attends to most at the query)"""
    versus: int | None = None
    """a second key position: attribute score(query, key) - score(query, versus)"""
    top: int = 10
    """sources of each side and pairs to list"""
    model: str | None = None
    """model name or path (default: the graph's)"""
    transcoders: str | None = None
    """'default' or a transcoder directory (default: the graph's)"""
    json: str | None = option(default=None, metavar="OUT")
    """also write the attribution as JSON"""
    svg: str | None = option(default=None, metavar="OUT")
    """also draw it: the pair table as a heatmap and each side as bars"""

    def check(self) -> None:
        if self.top < 1:
            raise UserError(f"--top must be >= 1, got {self.top}")
        for path in (self.json, self.svg):
            if path:
                check_output_file(path)


def _model_of(graph: AttributionGraph, name: str | None):
    return load_model(name or graph.metadata.get("model") or DEFAULT_MODEL)


def _frozen_graph(path: str, model: str | None, transcoders: str | None):
    graph = load_graph(path)
    lm = _model_of(graph, model)
    tc = resolve_graph_transcoders(lm, graph, transcoders)
    return graph, prompt_sources(lm, tc, torch.as_tensor(graph.tokens, dtype=torch.long), graph)


def run_qk(job: QKJob) -> int:
    graph, ps = _frozen_graph(job.graph, job.model, job.transcoders)
    result = qk_of_sources(
        ps, graph.prompt, job.layer, job.head, job.query, job.key, job.versus, max(job.top, 20)
    )
    print(qk_text(result, job.top))
    view = qk_view(result, job.top)
    if job.json:
        atomic_write_text(Path(job.json), json.dumps(view, indent=1))
        print(f"wrote {job.json}", file=sys.stderr)
    if job.svg:
        atomic_write_text(Path(job.svg), qk_svg(view))
        print(f"wrote {job.svg}", file=sys.stderr)
    return 0


@dataclass(kw_only=True)
class HeadsJob:
    """Split edges between positions into the attention heads that carry them: the part of each
    edge's weight whose last move between positions a head makes (docs/attribution.md). Lists the
    circuit's strongest such edges (or one --edge), each with its top heads and the key position the
    hop leaves from, and the `circuits qk` command that explains the top head."""

    circuit: str = option(positional=True)
    """graph file, best a pruned circuit (from `circuits trace` or `circuits prune`)"""
    edge: list[str] | None = option(default=None, nargs=2, metavar=("SRC", "TGT"))
    """one edge, by the node ids of its source and target (e.g. f:3:5:1021 l:7012)"""
    top: int = 10
    """how many of the strongest edges between positions"""
    heads: int = 3
    """heads to list per edge"""
    qk: int = 5
    """with --out: QK attributions of the top head of this many edges, for the viewer"""
    model: str | None = None
    """model name or path (default: the graph's)"""
    transcoders: str | None = None
    """'default' or a transcoder directory (default: the graph's)"""
    out: str | None = option(default=None, metavar="GRAPH")
    """write a copy of the graph with the loadings (and QK tables) that `circuits render --html`
    shows on each edge"""
    json: str | None = option(default=None, metavar="OUT")
    """also write the loadings as JSON"""

    def check(self) -> None:
        if self.top < 1 or self.heads < 1 or self.qk < 0:
            raise UserError("--top and --heads must be >= 1 and --qk >= 0")
        for path in (self.out, self.json):
            if path:
                check_output_file(path)


def run_heads(job: HeadsJob) -> int:
    graph, ps = _frozen_graph(job.circuit, job.model, job.transcoders)
    edges = edge_indices(graph, [job.edge] if job.edge else None, job.top)
    loadings = loadings_of_sources(ps, graph, edges)
    print(loadings_text(graph, loadings, job.heads))
    if job.json:
        atomic_write_text(Path(job.json), json.dumps(loadings.to_dict(graph, job.heads), indent=1))
        print(f"wrote {job.json}", file=sys.stderr)
    if job.out:
        tables = {}
        for e in range(min(job.qk, len(edges))):
            l, h, _, k = loadings.top_heads(e, 1)[0]
            q = int(graph.pos[edges[e, 1]])
            tables[e] = qk_view(qk_of_sources(ps, graph.prompt, l, h, q, k), 10)
        attach_head_loadings(graph, loadings, tables)
        graph.save(job.out)
        print(f"wrote {job.out}", file=sys.stderr)
    return 0


COMMANDS = [
    Command("qk", QKJob, run_qk, "why a head attends where it does: exact QK attribution"),
    Command("heads", HeadsJob, run_heads, "which attention heads carry a circuit's edges"),
]
