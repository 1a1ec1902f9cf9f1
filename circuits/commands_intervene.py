"""`circuits intervene`, `circuits label` and `circuits attach-dashboards`."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write_text, check_output_file, write_failure_as_user_error
from gemma_lm.jobs import Command, option
from gemma_lm.models import check_text
from transcoders.dashboards import dashboards_location, load_dashboards

from .comparison import compare
from .graph import load_graph, load_supernodes
from .interventions import (
    InterventionConfig,
    comparison_supernodes,
    intervene,
    normalize,
    resolve,
)
from .labels import attach_dashboards, label_file, labels_by_id


class _Edit(argparse.Action):
    """Collect --set/--scale/--zero into one list, in command-line order (order matters on one
    node): (op, node, number)."""

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
        setattr(
            namespace, self.dest, list(getattr(namespace, self.dest) or []) + [(op, target, number)]
        )


EDIT_FLAGS = {
    "--set": ("NODE=VALUE", "set activations to VALUE (repeatable)"),
    "--scale": ("NODE=FACTOR", "multiply activations (repeatable)"),
    "--zero": ("NODE", "zero activations or error terms (repeatable)"),
}


@dataclass(kw_only=True)
class InterveneJob:
    """Constrained patching: transcoders spliced in, error terms held at their clean values. Nodes
    as in the graph: f:LAYER:POS:FEATURE, e:LAYER:POS (POS may be *), or a supernode name from
    --groups."""

    target: str = option(positional=True, metavar="GRAPH_OR_PROMPT")
    """a graph file from `circuits trace`, or prompt text"""
    edits: list = option(default_factory=list, flags=EDIT_FLAGS, action=_Edit)
    """the edits, in command-line order"""
    groups: str | None = option(default=None, metavar="JSON")
    """supernodes: {"supernodes": {"name": [node ids]}} (the viewer saves it)"""
    compare: str | None = option(default=None, metavar="OTHER_GRAPH")
    """adds supernodes 'only-here' (features of GRAPH's circuit missing from OTHER's) and
    'shared'"""
    json: str | None = option(default=None, metavar="OUT")
    """also write the result as JSON"""
    intervention: InterventionConfig = field(default_factory=InterventionConfig)

    def check(self) -> None:
        """What can be checked before the model loads: a prompt's text, the edits' numbers, the
        --json path."""
        if not is_graph_file(self.target):
            if not self.target and not self.intervention.chat:
                raise UserError("the prompt is empty; give at least one token of text")
            check_text(self.target)
        normalize(self.edits)
        if self.json:
            check_output_file(self.json, "--json")


def is_graph_file(target: str) -> bool:
    """Whether GRAPH_OR_PROMPT names a file (else it is prompt text, which may be too long or
    odd to be a path at all)."""
    try:
        return Path(target).is_file()
    except (OSError, ValueError):  # a name too long; a NUL character
        return False


# the sizes are known once the model and the prompt are; before, only the syntax is checked
_NO_LIMIT = 2**62


def check_edits(edits: list, supernodes: dict) -> None:
    """The edits' targets, before the model loads: supernode names known, node ids well formed
    (their numbers are checked against the model and the prompt later)."""
    for _, target, _ in edits:
        if target in supernodes or ":" not in target:
            continue
        if any(part.strip().startswith("-") for part in target.split(":")[1:]):
            raise UserError(
                f"cannot read node {target!r}: LAYER, POS and FEATURE are numbers from 0 "
                "(POS may be *), e.g. f:3:5:1021"
            )
    resolve(edits, supernodes, _NO_LIMIT, _NO_LIMIT, _NO_LIMIT)


def run_intervene(job: InterveneJob) -> int:
    graph = load_graph(job.target) if is_graph_file(job.target) else None
    if graph is not None and job.intervention.chat:
        raise UserError("--chat applies to prompts; a graph already holds its (templated) tokens")
    if job.compare and graph is None:
        raise UserError("--compare needs a graph file as GRAPH_OR_PROMPT (the circuit to compare)")
    if not job.edits:
        print("no --set, --scale or --zero given: showing the clean predictions")
    supernodes = load_supernodes(job.groups) if job.groups else {}
    if job.compare:
        supernodes.update(comparison_supernodes(compare(graph, load_graph(job.compare)), "a"))
    check_edits(job.edits, {**(graph.supernodes if graph is not None else {}), **supernodes})
    prompt = graph if graph is not None else job.target
    result = intervene(None, prompt, job.edits, config=job.intervention, supernodes=supernodes)
    print(result.table())
    if job.json:
        with write_failure_as_user_error(job.json):
            atomic_write_text(job.json, json.dumps(result.to_dict(), indent=1))
        print(f"wrote {job.json}")
    return 0


@dataclass(kw_only=True)
class LabelJob:
    """Attach a human label to a node of a saved graph (or remove it, or list them all)."""

    graph: str = option(positional=True, metavar="GRAPH")
    """the graph file, changed in place"""
    node: str | None = option(default=None, positional=True, metavar="NODE_ID")
    """e.g. f:3:5:1021"""
    text: str | None = option(default=None, positional=True, metavar="TEXT")
    """the label"""
    remove: bool = False
    """remove NODE_ID's label"""
    list_labels: bool = option(default=False, flag="--list")
    """print every label"""


def run_label(job: LabelJob) -> int:
    if job.list_labels:
        for node, text in labels_by_id(load_graph(job.graph)).items():
            print(f"{node}\t{text}")
        return 0
    if job.node is None or (job.text is None and not job.remove):
        raise UserError("give NODE_ID and TEXT (or NODE_ID --remove, or --list)")
    label_file(job.graph, job.node, None if job.remove else job.text)
    print(f"{'removed the label of' if job.remove else 'labelled'} {job.node} in {job.graph}")
    return 0


@dataclass(kw_only=True)
class AttachJob:
    """Copy the dashboards of the graph's feature nodes (from `transcoders dashboards`) into
    the graph, for the viewer and every later file (`circuits trace` attaches them already)."""

    graph: str = option(positional=True, metavar="GRAPH")
    """the graph file"""
    dashboards: str | None = option(default=None, metavar="DIR")
    """dashboards folder (default: beside the graph's transcoders)"""
    contexts: int = 5
    """top contexts kept per feature"""
    out: str | None = option(default=None, metavar="PATH")
    """write here instead of over GRAPH"""

    def check(self) -> None:
        if self.out:
            check_output_file(self.out, "--out")


def run_attach(job: AttachJob) -> int:
    graph = load_graph(job.graph)
    spec = job.dashboards or dashboards_location(graph.settings.get("transcoders") or "default")
    n = attach_dashboards(graph, load_dashboards(spec), n_contexts=job.contexts)
    out = job.out or job.graph
    with write_failure_as_user_error(out):
        graph.save(out)
    print(f"attached dashboards of {n} feature nodes from {spec}; wrote {out}")
    return 0


COMMANDS = [
    Command(
        "intervene",
        InterveneJob,
        run_intervene,
        "set, scale or zero features and compare the logits before and after",
    ),
    Command("label", LabelJob, run_label, "attach a human label to a node of a saved graph"),
    Command(
        "attach-dashboards",
        AttachJob,
        run_attach,
        "store feature dashboards in a graph for the viewer",
    ),
]
