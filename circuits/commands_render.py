"""`circuits render`: SVG/PNG (graphviz), the interactive HTML page and the Neuronpedia graph JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gemma_lm.errors import UserError

from .graph import load_graph


def load_supernodes(path: str | Path) -> dict[str, list[str]]:
    """The grouping the HTML viewer's 'download grouping' button saves: {"supernodes": {name: [node ids]}}."""
    from .graph import supernode_groups

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read supernodes file {path} ({e}); pass the JSON the viewer's "
            f"'download grouping' button saves"
        )
    try:
        return supernode_groups(doc)
    except (UserError, AttributeError, TypeError, IndexError):
        raise UserError(
            f'{path} holds no supernodes; expected {{"supernodes": {{"name": [node ids]}}}}'
        )


def cmd_render(args) -> int:
    from .render import DEFAULT_MAX_NODES, render_html, render_svg

    if not (args.svg or args.html or args.json):
        raise UserError(
            "nothing to write: pass --svg OUT.svg (or .png/.pdf), --html OUT.html and/or --json OUT.json"
        )
    if args.max_nodes is not None and args.max_nodes < 1:
        raise UserError("--max-nodes must be >= 1")
    graph = load_graph(args.graph)
    if args.supernodes:
        graph.metadata["supernodes"] = load_supernodes(args.supernodes)
    if args.svg:
        print(f"wrote {render_svg(graph, args.svg, args.max_nodes or DEFAULT_MAX_NODES)}")
    if args.html:
        print(f"wrote {render_html(graph, args.html, args.max_nodes)}")
    if args.json:
        from .export import write_neuronpedia_json

        if "pruning" not in graph.metadata:
            from .pruning import prune

            print(
                "the graph is not pruned; pruning with the default thresholds for the JSON "
                "(run `circuits prune` to choose them)",
                file=sys.stderr,
            )
            graph = prune(graph)
        print(f"wrote {write_neuronpedia_json(graph, args.json, slug=args.slug, scan=args.scan)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "render",
        help="draw a graph: SVG/PNG, interactive HTML, Neuronpedia JSON",
        description="Draw an attribution graph. --svg follows the suffix (.svg, .png, .pdf, .dot); "
        "--html writes one self-contained page that works offline; --json writes the "
        "graph JSON of circuit-tracer / Neuronpedia's attribution-graph viewer.",
    )
    p.add_argument("graph", help="graph file (from `circuits trace` or `circuits prune`)")
    p.add_argument("--svg", help="static picture (graphviz)")
    p.add_argument("--html", help="interactive page")
    p.add_argument("--json", help="Neuronpedia / circuit-tracer graph JSON")
    p.add_argument(
        "--max-nodes",
        type=int,
        default=None,
        help="draw at most this many nodes, the most influential (default: 300 in the SVG, all in HTML)",
    )
    p.add_argument(
        "--supernodes",
        help="a grouping JSON saved by the HTML viewer, drawn in the page and the JSON",
    )
    p.add_argument("--slug", help="graph name in the JSON (default: the file name)")
    p.add_argument(
        "--scan", help="model id in the JSON (default: the graph's model, e.g. gemma-3-270m)"
    )
    p.set_defaults(func=cmd_render)
