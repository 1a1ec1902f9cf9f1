"""`circuits trace "PROMPT" --out graph.npz`: the attribution graph of one prompt, and optionally
its circuit (pruned graph), a static picture and the interactive page.

    circuits trace "Fact: Michael Jordan plays the sport of" --out out/jordan.npz \\
        --svg out/jordan.svg --html out/jordan.html
    circuits trace "The capital of the state containing Dallas is" --out dallas.npz \\
        --target " Austin" --contrast " Dallas"
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gemma_lm.errors import UserError
from gemma_lm.files import check_output_file, write_failure_as_user_error
from gemma_lm.jobs import Command, option
from gemma_lm.models import check_text, load_model

from .attribution import AttributionConfig, attribute
from .commands_graph import node_label_column, top_nodes
from .graph import ERROR, FEATURE, LOGIT, TOKEN, AttributionGraph
from .pruning import PruneConfig, prune, scores_table
from .render import check_graphviz_for, render_html, render_svg


@dataclass(kw_only=True)
class TraceJob:
    """Trace PROMPT through the local replacement model (transcoders spliced in, attention patterns
    and norms frozen, error nodes where the transcoders miss) and write its attribution graph.
    --svg/--html also prune it to its circuit and draw that."""

    prompt: str = option(positional=True)
    """the prompt text (quote it)"""
    out: str = option(metavar="GRAPH.npz")
    """where to write the graph"""
    prune: bool = False
    """also write the circuit (pruned graph) as GRAPH.pruned.npz"""
    svg: str | None = option(default=None, metavar="PATH")
    """draw the circuit (graphviz; .svg, .png or .pdf)"""
    html: str | None = option(default=None, metavar="PATH")
    """write the circuit as one interactive page (works offline)"""
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    pruning: PruneConfig = field(default_factory=PruneConfig)

    def check(self) -> None:
        out = Path(self.out)
        if out.suffix != ".npz":
            raise UserError(
                f"--out {out}: the graph file must end in .npz (pictures go to --svg / --html)"
            )
        for flag in ("svg", "html"):
            path = getattr(self, flag)
            if path and Path(path).resolve() == out.resolve():
                raise UserError(
                    f"--{flag} and --out are the same file; give the picture its own name"
                )
        self.check_inputs()
        self.check_outputs()

    def check_inputs(self) -> None:
        """The prompt and target texts, before the model loads."""
        if not self.prompt and not self.attribution.chat:
            raise UserError("the prompt is empty; give at least one token of text")
        check_text(self.prompt)
        for target in self.attribution.targets:
            check_text(target, f"--target {target!r}")
        if self.attribution.contrast:
            check_text(self.attribution.contrast, f"--contrast {self.attribution.contrast!r}")

    def check_outputs(self) -> None:
        """Every file the job writes, before the model loads (not after the trace)."""
        check_output_file(self.out, "--out")
        if self.prune:
            check_output_file(pruned_path(self.out), "--prune")
        for flag in ("svg", "html"):
            if getattr(self, flag):
                check_output_file(getattr(self, flag), f"--{flag}")
        if self.svg:
            check_graphviz_for(self.svg)


def pruned_path(out: str | Path) -> Path:
    """Where --prune writes the circuit of the graph written to `out`: GRAPH.pruned.npz."""
    out = Path(out)
    return out.with_name(out.stem + ".pruned.npz")


def summary_lines(graph: AttributionGraph, out: Path, seconds: float) -> list[str]:
    """What `circuits trace` prints about the graph it wrote."""
    m = graph.metadata
    top = ", ".join(f"{s!r} {p:.3f}" for s, p in m["top_predictions"])
    logits = ", ".join(
        f"{s!r} (p={p:.3f})" for s, p in zip(graph.logit_strings, graph.logit_probabilities)
    )
    difference = "  [logit difference]" if m.get("contrast_token") is not None else ""
    count = {k: int((graph.kind == k).sum()) for k in (FEATURE, ERROR, TOKEN, LOGIT)}
    t = m["timing_s"]
    return [
        f"prompt: {graph.prompt!r} ({graph.n_pos} tokens)",
        f"top predictions: {top}",
        f"logit nodes: {logits}{difference}",
        f"nodes: {count[FEATURE]} active features ({m['n_feature_rows']} with incoming edges), "
        f"{count[ERROR]} error, {count[TOKEN]} token, {count[LOGIT]} logit; "
        f"{graph.adjacency.nnz} edges",
        f"time: {seconds:.1f} s (model {t.get('model_load', 0.0):.1f} s, transcoders and tokens "
        f"{t['load']:.1f} s, forward {t['forward']:.1f} s, attribution {t['attribution']:.1f} s; "
        f"edge kernel {m['edge_backend']})",
        f"wrote {out}",
    ]


def run_trace(job: TraceJob) -> int:
    cfg = job.attribution
    t0 = time.perf_counter()
    if cfg.progress:
        print(f"loading {cfg.model} ({cfg.dtype}, {cfg.device})", file=sys.stderr)
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    model_seconds = time.perf_counter() - t0
    graph = attribute(lm, job.prompt, config=cfg)
    graph.metadata["timing_s"]["model_load"] = model_seconds
    out = Path(job.out)
    with write_failure_as_user_error(out):
        graph.save(out)
    print("\n".join(summary_lines(graph, out, time.perf_counter() - t0)))
    if job.prune or job.svg or job.html:
        write_circuit(graph, job)
    return 0


def write_circuit(graph: AttributionGraph, job: TraceJob) -> None:
    """Prune the traced graph and write what the job asks for: the circuit, its SVG, its page."""
    circuit = prune(graph, job.pruning)
    p = circuit.pruning or {}
    print(
        f"circuit: {p.get('n_nodes_after', circuit.n_nodes)} nodes, {circuit.adjacency.nnz} edges "
        f"(node threshold {job.pruning.node_threshold}, "
        f"edge threshold {job.pruning.edge_threshold})"
    )
    if circuit.scores:
        print(scores_table(circuit))
    print("\n".join(top_feature_lines(circuit)))
    if job.prune:
        path = pruned_path(job.out)
        with write_failure_as_user_error(path):
            circuit.save(path)
        print(f"wrote {path}")
    if job.svg:
        with write_failure_as_user_error(job.svg):
            print(f"wrote {render_svg(circuit, job.svg)}")
    if job.html:
        with write_failure_as_user_error(job.html):
            print(f"wrote {render_html(circuit, job.html)}")


def top_feature_lines(circuit: AttributionGraph, n: int = 8) -> list[str]:
    """The circuit's n most influential features, one line each: id, label, the prompt token it
    sits on, its influence on the logits."""
    top = top_nodes(circuit, n, kinds=(FEATURE,))
    lines = [f"top {len(top)} features of the circuit (of {len(circuit.nodes_of(FEATURE))}):"]
    for i, influence in top:
        token = circuit.token_strings[circuit.pos[i]]
        lines.append(
            f"  {f'L{circuit.layer[i]}/{circuit.feature[i]}':<9} "
            f"{node_label_column(circuit, i):<38} at {token!r:<12} influence {influence:.3f}"
        )
    return lines


COMMANDS = [Command("trace", TraceJob, run_trace, "build the attribution graph of a prompt")]
