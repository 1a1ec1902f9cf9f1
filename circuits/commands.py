"""`circuits trace "PROMPT" --out graph.npz`: the attribution graph of one prompt, and optionally its circuit
(pruned graph), a static picture and the interactive page.

    circuits trace "Fact: Michael Jordan plays the sport of" --out out/jordan.npz \\
        --svg out/jordan.svg --html out/jordan.html
    circuits trace "The capital of the state containing Dallas is" --out dallas.npz \\
        --target " Austin" --contrast " Dallas"
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

from gemma_lm.errors import UserError

from .attribution import AttributionConfig

# AttributionConfig fields and their flags; --target is repeatable and fills `targets`
_FLAGS = {"targets": "--target"}
_HELP = {
    "model": "gemma-3-270m (default, embedded), a .gguf file, a Hugging Face directory or Hub id",
    "transcoders": "'default' (the embedded set for gemma-3-270m) or a directory: native, Gemma Scope 2 "
    "or circuit-tracer layout",
    "max_feature_nodes": "compute the incoming edges of at most this many features, most influential first",
    "batch_size": "targets per backward pass",
    "max_n_logits": "at most this many logit nodes",
    "desired_logit_prob": "logit nodes: the most probable tokens until their probabilities sum to this",
    "targets": "attribute this token instead of the top predictions (repeatable; one token each, "
    "mind the leading space: ' Paris')",
    "contrast": "attribute logit(--target) - logit(CONTRAST)",
    "chat": "wrap the prompt in the model's chat template",
    "device": "cpu or cuda",
    "dtype": "float32 (exact) or bfloat16 (the model's forward pass; attribution runs in float32)",
    "max_tokens": "refuse prompts longer than this many tokens",
    "memory_gb": "bound on the working memory of one batch",
    "bos_features": "keep feature nodes at the <bos> position (by default its MLP outputs are error nodes: "
    "position 0 is the same attention sink for every prompt)",
}


def add_trace_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per `AttributionConfig` field (except `progress`: --no-progress)."""
    d = AttributionConfig()
    for f in fields(AttributionConfig):
        if f.name == "progress":
            continue
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        default = getattr(d, f.name)
        help_text = _HELP.get(f.name, "")
        if f.name == "targets":
            p.add_argument(
                flag, dest="targets", action="append", default=[], metavar="TOKEN", help=help_text
            )
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default, help=help_text)
        elif f.name == "device":
            p.add_argument(flag, choices=["cpu", "cuda"], default=default, help=help_text)
        elif f.name == "dtype":
            p.add_argument(flag, choices=["float32", "bfloat16"], default=default, help=help_text)
        else:
            kind = type(default) if default is not None else str
            p.add_argument(
                flag,
                type=kind,
                default=default,
                help=f"{help_text} (default {default})" if default is not None else help_text,
            )


def trace_config(args: argparse.Namespace) -> AttributionConfig:
    cfg = AttributionConfig(
        **{
            f.name: getattr(args, f.name)
            for f in fields(AttributionConfig)
            if hasattr(args, f.name)
        }
    )
    cfg.progress = not args.no_progress
    cfg.check()
    return cfg


def _graph_stage(name: str):
    """`circuits.prune` / `circuits.render` functions, imported when used."""
    import importlib

    module, attr = name.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(
            f"{name} is not available in this installation ({e}); the graph was written, "
            f"render it later with `circuits render`"
        )


def summary_lines(graph, out: Path, seconds: float) -> list[str]:
    from .graph import ERROR, FEATURE, LOGIT, TOKEN

    m = graph.metadata
    top = ", ".join(f"{s!r} {p:.3f}" for s, p in m["top_predictions"])
    logits = ", ".join(
        f"{s!r} (p={p:.3f})" for s, p in zip(graph.logit_strings, graph.logit_probabilities)
    )
    t = m["timing_s"]
    return [
        f"prompt: {graph.prompt!r} ({graph.n_pos} tokens)",
        f"top predictions: {top}",
        f"logit nodes: {logits}"
        + ("  [logit difference]" if m.get("contrast_token") is not None else ""),
        f"nodes: {int((graph.kind == FEATURE).sum())} active features ({m['n_feature_rows']} with incoming "
        f"edges), {int((graph.kind == ERROR).sum())} error, {int((graph.kind == TOKEN).sum())} token, "
        f"{int((graph.kind == LOGIT).sum())} logit; {graph.adjacency.nnz} edges",
        f"time: {seconds:.1f} s (model {t.get('model_load', 0.0):.1f} s, transcoders and tokens {t['load']:.1f} s, "
        f"forward {t['forward']:.1f} s, "
        f"attribution {t['attribution']:.1f} s; edge kernel {m['edge_backend']})",
        f"wrote {out}",
    ]


def cmd_trace(args) -> int:
    cfg = trace_config(args)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise UserError(
            f"--out {out}: the graph file must end in .npz (pictures go to --svg / --html)"
        )
    for flag in ("svg", "html"):
        path = getattr(args, flag)
        if path and Path(path).resolve() == out.resolve():
            raise UserError(f"--{flag} and --out are the same file; give the picture its own name")
    if args.prune or args.svg or args.html:
        for name in ("node_threshold", "edge_threshold"):
            if not 0.0 <= getattr(args, name) <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1]")
    from gemma_lm.models import load_model

    from .attribution import attribute

    t0 = time.perf_counter()
    if cfg.progress:
        print(f"loading {cfg.model} ({cfg.dtype}, {cfg.device})", file=sys.stderr)
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    model_seconds = time.perf_counter() - t0
    graph = attribute(lm, args.prompt, config=cfg)
    graph.metadata["timing_s"]["model_load"] = model_seconds
    graph.save(out)
    print("\n".join(summary_lines(graph, out, time.perf_counter() - t0)))
    if args.prune or args.svg or args.html:
        prune = _graph_stage("circuits.pruning.prune")
        circuit = prune(
            graph, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold
        )
        p = circuit.metadata.get("pruning", {})
        print(
            f"circuit: {p.get('n_nodes_after', circuit.n_nodes)} nodes, {circuit.adjacency.nnz} edges "
            f"(node threshold {args.node_threshold}, edge threshold {args.edge_threshold})"
        )
        if circuit.metadata.get("scores"):
            print(_graph_stage("circuits.pruning.scores_table")(circuit))
        if args.prune:
            pruned_path = out.with_name(out.stem + ".pruned.npz")
            circuit.save(pruned_path)
            print(f"wrote {pruned_path}")
        if args.svg:
            print(f"wrote {_graph_stage('circuits.render.render_svg')(circuit, args.svg)}")
        if args.html:
            print(f"wrote {_graph_stage('circuits.render.render_html')(circuit, args.html)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "trace",
        help="build the attribution graph of a prompt",
        description="Trace PROMPT through the local replacement model (transcoders spliced in, "
        "attention patterns and norms frozen, error nodes where the transcoders miss) "
        "and write its attribution graph. --svg/--html also prune it to its circuit "
        "and draw that.",
    )
    p.add_argument("prompt", help="the prompt text (quote it)")
    p.add_argument("--out", required=True, metavar="GRAPH.npz", help="where to write the graph")
    add_trace_arguments(p)
    p.add_argument(
        "--prune",
        action="store_true",
        help="also write the circuit (pruned graph) as GRAPH.pruned.npz",
    )
    p.add_argument("--svg", metavar="PATH", help="draw the circuit (graphviz; .svg, .png or .pdf)")
    p.add_argument(
        "--html", metavar="PATH", help="write the circuit as one interactive page (works offline)"
    )
    p.add_argument(
        "--node-threshold",
        type=float,
        default=0.8,
        help="pruning: keep nodes carrying this fraction of the influence on the logits (default 0.8)",
    )
    p.add_argument(
        "--edge-threshold",
        type=float,
        default=0.98,
        help="pruning: keep edges carrying this fraction of the edge influence (default 0.98)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_trace)
