"""`circuits prune`, `circuits show` and `circuits compare`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write_text

from .pruning import PruneConfig
from .graph import ERROR, FEATURE, KIND_NAMES, AttributionGraph, load_graph


def cmd_prune(args) -> int:
    from .pruning import PruneConfig, prune, scores_table

    cfg = PruneConfig(node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    cfg.check()
    graph = load_graph(args.graph)
    pruned = prune(graph, config=cfg)
    pruned.save(args.out)
    m = pruned.metadata["pruning"]
    print(
        f"pruned {args.graph}: {m['n_nodes_before']} -> {m['n_nodes_after']} nodes "
        f"({m['n_features_after']} features, {m['n_errors_after']} error nodes), "
        f"{m['n_edges_before']} -> {m['n_edges_after']} edges; wrote {args.out}"
    )
    print(scores_table(pruned))
    return 0


def top_nodes(graph: AttributionGraph, n: int) -> list[tuple[int, float]]:
    """The n feature and error nodes with the largest influence on the logits: [(index, influence)]."""
    from .pruning import compute_influence

    influence = graph.influence if graph.influence is not None else compute_influence(graph)
    inner = np.flatnonzero((graph.kind == FEATURE) | (graph.kind == ERROR))
    order = inner[np.argsort(-np.asarray(influence)[inner], kind="stable")][:n]
    return [(int(i), float(influence[i])) for i in order]


def show_text(graph: AttributionGraph, n_top: int = 15) -> str:
    from .graph import display_label
    from .pruning import graph_scores, scores_table

    meta = graph.metadata or {}
    lines = [f"prompt: {graph.prompt!r}", f"tokens: {graph.token_strings}", graph.summary()]
    if meta.get("model"):
        tc = meta.get("transcoders") or {}
        lines.append(
            f"model: {meta['model']}; transcoders: {tc.get('kind', '?')} ({tc.get('d_sae', '?')} features "
            f"per layer) {tc.get('source', '')}".rstrip()
        )
    if "pruning" in meta:
        p = meta["pruning"]
        lines.append(
            f"pruned with node threshold {p['node_threshold']}, edge threshold {p['edge_threshold']}: "
            f"{p['n_nodes_before']} -> {p['n_nodes_after']} nodes"
        )
    if not meta.get("scores"):
        meta = {**meta, "scores": {"graph": graph_scores(graph)}}
    lines.append("scores:")
    lines += [
        "  " + line
        for line in scores_table(
            AttributionGraph(**{**graph.__dict__, "metadata": meta})
        ).splitlines()
    ]
    lines.append(f"top {n_top} nodes by influence on the logits:")
    for i, infl in top_nodes(graph, n_top):
        label, source = display_label(graph, i)
        tok = graph.token_strings[graph.pos[i]]
        extra = f"  {label!r}" if source != "default" else ""
        lines.append(
            f"  {graph.node_id(i):<20} {KIND_NAMES[graph.kind[i]]:<7} at {tok!r:<14} "
            f"influence {infl:.4f}  activation {graph.activation[i]:.3g}{extra}"
        )
    return "\n".join(lines)


def cmd_show(args) -> int:
    print(show_text(load_graph(args.graph), args.top))
    return 0


def cmd_compare(args) -> int:
    from .comparison import CompareConfig, compare
    from .pruning import PruneConfig

    PruneConfig(args.node_threshold, args.edge_threshold).check()
    if args.top_k < 0:
        raise UserError("--top-k must be >= 0")
    cfg = CompareConfig(
        node_threshold=args.node_threshold, edge_threshold=args.edge_threshold, top_k=args.top_k
    )
    result = compare(load_graph(args.a), load_graph(args.b), config=cfg)
    print(result.summary())
    if args.svg:
        from .render import DEFAULT_MAX_NODES, render_comparison_svg

        path = render_comparison_svg(
            result, None, None, args.svg, args.max_nodes or DEFAULT_MAX_NODES
        )
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        atomic_write_text(
            Path(args.json), json.dumps(result.to_dict(), indent=1, ensure_ascii=False)
        )
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def register(sub) -> None:

    p = sub.add_parser(
        "prune",
        help="keep the nodes and edges that matter; print replacement/completeness scores",
        description="Prune an attribution graph by influence on the logits and print the "
        "replacement and completeness scores of the full and the pruned graph.",
    )
    p.add_argument("graph", help="graph file written by `circuits trace`")
    p.add_argument("--out", required=True, help="where to write the pruned graph (.npz)")
    add_prune_arguments(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("show", help="summary, scores and the most influential nodes of a graph")
    p.add_argument("graph")
    p.add_argument("--top", type=int, default=15, help="how many top nodes to list (default 15)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "compare",
        help="compare the circuits of two graphs (shared/unique nodes, changes)",
        description="Compare two graphs: features matched by (layer, feature id) at aligned "
        "positions; unpruned graphs are pruned first.",
    )
    p.add_argument("a", help="graph A")
    p.add_argument("b", help="graph B")
    p.add_argument("--svg", help="draw both circuits in one picture (.svg, .png or .pdf)")
    p.add_argument("--json", help="write the comparison as JSON")
    p.add_argument("--top-k", type=int, default=10, help="largest changes to list (default 10)")
    p.add_argument(
        "--max-nodes", type=int, default=None, help="nodes per graph in the picture (default 300)"
    )
    add_prune_arguments(p)
    p.set_defaults(func=cmd_compare)


def add_prune_arguments(p) -> None:
    d = PruneConfig()
    p.add_argument("--node-threshold", type=float, default=d.node_threshold)
    p.add_argument("--edge-threshold", type=float, default=d.edge_threshold)
