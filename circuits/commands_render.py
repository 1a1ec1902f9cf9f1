"""`circuits render`: SVG/PNG (graphviz), the interactive HTML page, the Neuronpedia /
circuit-tracer graph JSON and circuit-tracer's local viewer folder."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from gemma_lm.errors import UserError
from gemma_lm.files import check_output_dir, check_output_file, write_failure_as_user_error
from gemma_lm.jobs import Command, option

from .export import (
    VIEWER_INDEX,
    add_to_viewer_index,
    check_scan,
    check_slug,
    feature_details_dir,
    neuronpedia_upload_problem,
    safe_slug,
    write_feature_details,
    write_neuronpedia_json,
)
from .graph import AttributionGraph, load_graph, load_supernodes
from .pruning import prune
from .render import DEFAULT_MAX_NODES, check_graphviz_for, render_html, render_svg


@dataclass(kw_only=True)
class RenderJob:
    """Draw an attribution graph. --svg follows the suffix (.svg, .png, .pdf, .dot); --html writes
    one self-contained page that works offline; --json writes the graph JSON of circuit-tracer /
    Neuronpedia's attribution-graph viewer (and the feature dashboards beside it); --index adds
    the graph to a data folder of circuit-tracer's local viewer."""

    graph: str = option(positional=True)
    """graph file (from `circuits trace` or `circuits prune`)"""
    svg: str | None = None
    """static picture (graphviz)"""
    html: str | None = None
    """interactive page"""
    json: str | None = None
    """Neuronpedia / circuit-tracer graph JSON (feature dashboards go to NAME-features/)"""
    index: str | None = option(default=None, metavar="DIR")
    """add the graph to circuit-tracer's local viewer folder DIR (graph-metadata.json)"""
    max_nodes: int | None = None
    """draw at most this many nodes, the most influential (default: 300 in the SVG, all in HTML)"""
    supernodes: str | None = None
    """a grouping JSON saved by the HTML viewer, drawn in the page and the JSON"""
    slug: str | None = None
    """graph name in the JSON: a-z A-Z 0-9 _ . - (default: the JSON's or the graph's file name)"""
    scan: str | None = None
    """Neuronpedia model id in the JSON (default: from the graph's model, e.g. gemma-3-1b-it)"""
    features_url: str | None = option(default=None, metavar="URL")
    """https address where NAME-features/ will be served, for Neuronpedia to show the dashboards"""

    def check(self) -> None:
        if not (self.svg or self.html or self.json or self.index):
            raise UserError(
                "nothing to write: pass --svg OUT.svg (or .png/.pdf), --html OUT.html, "
                "--json OUT.json and/or --index DIR"
            )
        if self.max_nodes is not None and self.max_nodes < 1:
            raise UserError("--max-nodes must be >= 1")
        if (self.slug or self.scan or self.features_url) and not (self.json or self.index):
            raise UserError("--slug, --scan and --features-url go with --json OUT.json or --index")
        if self.slug:
            check_slug(self.slug)
        if self.scan:
            check_scan(self.scan)
        if self.features_url and not self.features_url.startswith(("https://", "http://")):
            raise UserError(f"--features-url {self.features_url!r} must be an http(s):// address")
        self.check_outputs()

    def check_outputs(self) -> None:
        """Every path the job writes, before the graph is read and drawn."""
        for flag in ("svg", "html", "json"):
            if getattr(self, flag):
                check_output_file(getattr(self, flag), f"--{flag}")
        if self.svg:
            check_graphviz_for(self.svg)
        if self.json:
            check_output_dir(feature_details_dir(self.json), "--json (its dashboards folder)")
        if self.index:
            check_output_dir(self.index, "--index")


def run_render(job: RenderJob) -> int:
    graph = load_graph(job.graph)
    if job.supernodes:
        graph.supernodes = load_supernodes(job.supernodes)
    if job.svg:
        with write_failure_as_user_error(job.svg):
            print(f"wrote {render_svg(graph, job.svg, job.max_nodes or DEFAULT_MAX_NODES)}")
    if job.html:
        with write_failure_as_user_error(job.html):
            print(f"wrote {render_html(graph, job.html, job.max_nodes)}")
    if job.json or job.index:
        write_graph_json(graph, job)
    return 0


def write_graph_json(graph: AttributionGraph, job: RenderJob) -> None:
    """--json and --index: the graph pruned (unless it is already), with its dashboards."""
    full = None
    if not graph.is_pruned:
        print(
            "the graph is not pruned; pruning with the default thresholds for the JSON "
            "(run `circuits prune` to choose them)",
            file=sys.stderr,
        )
        full, graph = graph, prune(graph)  # the full graph gives the viewer its exact influence
    slug = job.slug or safe_slug(Path(job.json or job.graph).stem)
    if job.json:
        with write_failure_as_user_error(job.json):
            path = write_neuronpedia_json(graph, job.json, slug, job.scan, full, job.features_url)
        print(f"wrote {path}")
        with write_failure_as_user_error(feature_details_dir(path)):
            n = write_feature_details(graph, feature_details_dir(path))
        if n:
            print(f"wrote the dashboards of {n} features to {feature_details_dir(path)}")
        elif job.features_url:
            print(
                "the graph carries no feature dashboards (`circuits attach-dashboards`), so "
                "--features-url points at nothing",
                file=sys.stderr,
            )
        if problem := neuronpedia_upload_problem(path):
            print(f"note: {problem}", file=sys.stderr)
    if job.index:
        with write_failure_as_user_error(job.index):
            path = add_to_viewer_index(graph, job.index, slug, job.scan, full)
        print(f"wrote {path} and its entry in {Path(job.index) / VIEWER_INDEX}")


COMMANDS = [
    Command(
        "render",
        RenderJob,
        run_render,
        "draw a graph: SVG/PNG, interactive HTML, Neuronpedia / circuit-tracer JSON",
    )
]
