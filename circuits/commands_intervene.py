"""`circuits intervene`, `circuits label` and `circuits attach-dashboards`."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write_text
from gemma_lm.models import load_model

from .graph import load_graph
from .interventions import (
    MODES,
    InterventionConfig,
    comparison_supernodes,
    intervene,
    load_supernodes,
)


class _Op(argparse.Action):
    """Collect --set/--scale/--zero into one list, in command-line order (order matters on one node)."""

    def __call__(self, parser, namespace, value, option_string=None):
        op = option_string.lstrip("-")
        if op == "zero":
            target, number = value, 0.0
        else:
            target, sep, text = value.rpartition("=")
            try:
                number = float(text)
            except ValueError:
                number = None
            if not sep or not target or number is None:
                raise argparse.ArgumentError(
                    self, f"{value!r}: write NODE=NUMBER, e.g. --{op} f:3:5:1021=2.5"
                )
        namespace.ops = (getattr(namespace, "ops", None) or []) + [(op, target, number)]


def _graph_or_prompt(text: str):
    """A graph when `text` names an existing file, else the prompt itself."""
    return load_graph(text) if Path(text).is_file() else None


def cmd_intervene(args) -> int:
    graph = _graph_or_prompt(args.target)
    cfg = InterventionConfig(
        **{
            f.name: getattr(args, f.name)
            for f in fields(InterventionConfig)
            if getattr(args, f.name, None) is not None
        }
    )
    cfg.propagate = not args.hold
    if graph is not None:
        cfg.model = args.model or graph.metadata.get("model") or cfg.model
        settings = graph.metadata.get("settings") or {}
        cfg.transcoders = args.transcoders or settings.get("transcoders") or "default"
        if args.chat:
            raise UserError(
                "--chat applies to prompts; a graph already holds its (templated) tokens"
            )
    if not args.ops:
        print("no --set, --scale or --zero given: showing the clean predictions")
    supernodes = load_supernodes(args.groups) if args.groups else {}
    if args.compare:
        if graph is None:
            raise UserError(
                "--compare needs a graph file as GRAPH_OR_PROMPT (the circuit to compare)"
            )
        from .comparison import compare

        supernodes.update(comparison_supernodes(compare(graph, load_graph(args.compare)), "a"))
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    result = intervene(
        lm,
        graph if graph is not None else args.target,
        args.ops,
        transcoders=cfg.transcoders,
        config=cfg,
        supernodes=supernodes,
    )
    print(result.table())
    if args.json:
        atomic_write_text(args.json, json.dumps(result.to_dict(), indent=1))
        print(f"wrote {args.json}")
    return 0


def cmd_label(args) -> int:
    from .labels import label_file, labels_by_id

    if args.list:
        for node, text in labels_by_id(load_graph(args.graph)).items():
            print(f"{node}\t{text}")
        return 0
    if args.node is None or (args.text is None and not args.remove):
        raise UserError("give NODE_ID and TEXT (or NODE_ID --remove, or --list)")
    label_file(args.graph, args.node, None if args.remove else args.text)
    print(f"{'removed the label of' if args.remove else 'labelled'} {args.node} in {args.graph}")
    return 0


def cmd_attach(args) -> int:
    from transcoders.dashboards import dashboards_dir, load_dashboards

    from .labels import attach_dashboards

    graph = load_graph(args.graph)
    spec = args.dashboards or dashboards_dir(
        (graph.metadata.get("settings") or {}).get("transcoders") or "default"
    )
    n = attach_dashboards(graph, load_dashboards(spec), n_contexts=args.contexts)
    out = args.out or args.graph
    graph.save(out)
    print(f"attached dashboards of {n} feature nodes from {spec}; wrote {out}")
    return 0


def register(sub) -> None:
    d = InterventionConfig()
    p = sub.add_parser(
        "intervene",
        help="set, scale or zero features and compare the logits before and after",
        description="Constrained patching: transcoders spliced in, error terms held at their "
        "clean values. Nodes as in the graph: f:LAYER:POS:FEATURE, e:LAYER:POS (POS may be *), "
        "or a supernode name from --groups.",
    )
    p.add_argument(
        "target",
        metavar="GRAPH_OR_PROMPT",
        help="a graph file from `circuits trace`, or prompt text",
    )
    p.add_argument(
        "--set", action=_Op, metavar="NODE=VALUE", help="set activations to VALUE (repeatable)"
    )
    p.add_argument(
        "--scale", action=_Op, metavar="NODE=FACTOR", help="multiply activations (repeatable)"
    )
    p.add_argument(
        "--zero", action=_Op, metavar="NODE", help="zero activations or error terms (repeatable)"
    )
    p.add_argument(
        "--groups",
        metavar="JSON",
        help='supernodes: {"supernodes": {"name": [node ids]}} (the viewer saves it)',
    )
    p.add_argument(
        "--compare",
        metavar="OTHER_GRAPH",
        help="adds supernodes 'only-here' (features of GRAPH's circuit missing from OTHER's) and 'shared'",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=d.mode,
        help="frozen: attention and norms of the clean run (the graph's world); full: re-run the model",
    )
    p.add_argument(
        "--hold",
        action="store_true",
        help="keep every other feature at its clean activation (direct effects only)",
    )
    p.add_argument(
        "--generate", type=int, default=d.generate, metavar="N", help="greedy continuation tokens"
    )
    p.add_argument(
        "--top", dest="top_k", type=int, default=d.top_k, metavar="K", help="rows of the table"
    )
    p.add_argument(
        "--model", default=None, help=f"model name or path (default: the graph's, else {d.model})"
    )
    p.add_argument("--transcoders", default=None, help="'default' or a path (default: the graph's)")
    p.add_argument(
        "--chat", action="store_true", help="wrap a text prompt in the model's chat template"
    )
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON")
    p.set_defaults(func=cmd_intervene, ops=[])

    p = sub.add_parser("label", help="attach a human label to a node of a saved graph")
    p.add_argument("graph", metavar="GRAPH")
    p.add_argument("node", metavar="NODE_ID", nargs="?", help="e.g. f:3:5:1021")
    p.add_argument("text", metavar="TEXT", nargs="?")
    p.add_argument("--remove", action="store_true", help="remove NODE_ID's label")
    p.add_argument("--list", action="store_true", help="print every label")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser(
        "attach-dashboards",
        help="store feature dashboards in a graph for the viewer",
        description="Copies the dashboards of the graph's feature nodes (from `transcoders "
        "dashboards`) into graph.metadata['dashboards'].",
    )
    p.add_argument("graph", metavar="GRAPH")
    p.add_argument(
        "--dashboards",
        metavar="DIR",
        help="dashboards folder (default: beside the graph's transcoders)",
    )
    p.add_argument("--contexts", type=int, default=5, help="top contexts kept per feature")
    p.add_argument("--out", metavar="PATH", help="write here instead of over GRAPH")
    p.set_defaults(func=cmd_attach)
