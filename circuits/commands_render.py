"""`circuits render`: SVG/PNG (graphviz), the interactive HTML page and the Neuronpedia graph
JSON."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from gemma_lm.errors import UserError
from gemma_lm.jobs import Command, option

from .export import write_neuronpedia_json
from .graph import load_graph, load_supernodes
from .pruning import prune
from .render import DEFAULT_MAX_NODES, render_html, render_svg


@dataclass(kw_only=True)
class RenderJob:
    """Draw an attribution graph. --svg follows the suffix (.svg, .png, .pdf, .dot); --html writes
    one self-contained page that works offline; --json writes the graph JSON of circuit-tracer /
    Neuronpedia's attribution-graph viewer."""

    graph: str = option(positional=True)
    """graph file (from `circuits trace` or `circuits prune`)"""
    svg: str | None = None
    """static picture (graphviz)"""
    html: str | None = None
    """interactive page"""
    json: str | None = None
    """Neuronpedia / circuit-tracer graph JSON"""
    max_nodes: int | None = None
    """draw at most this many nodes, the most influential (default: 300 in the SVG, all in HTML)"""
    supernodes: str | None = None
    """a grouping JSON saved by the HTML viewer, drawn in the page and the JSON"""
    slug: str | None = None
    """graph name in the JSON (default: the file name)"""
    scan: str | None = None
    """model id in the JSON (default: the graph's model, e.g. gemma-3-270m)"""

    def check(self) -> None:
        if not (self.svg or self.html or self.json):
            raise UserError(
                "nothing to write: pass --svg OUT.svg (or .png/.pdf), --html OUT.html and/or "
                "--json OUT.json"
            )
        if self.max_nodes is not None and self.max_nodes < 1:
            raise UserError("--max-nodes must be >= 1")


def run_render(job: RenderJob) -> int:
    graph = load_graph(job.graph)
    if job.supernodes:
        graph.supernodes = load_supernodes(job.supernodes)
    if job.svg:
        print(f"wrote {render_svg(graph, job.svg, job.max_nodes or DEFAULT_MAX_NODES)}")
    if job.html:
        print(f"wrote {render_html(graph, job.html, job.max_nodes)}")
    if job.json:
        if not graph.is_pruned:
            print(
                "the graph is not pruned; pruning with the default thresholds for the JSON "
                "(run `circuits prune` to choose them)",
                file=sys.stderr,
            )
            graph = prune(graph)
        print(f"wrote {write_neuronpedia_json(graph, job.json, slug=job.slug, scan=job.scan)}")
    return 0


COMMANDS = [
    Command(
        "render", RenderJob, run_render, "draw a graph: SVG/PNG, interactive HTML, Neuronpedia JSON"
    )
]
