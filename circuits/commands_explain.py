"""`circuits explain`: the strongest paths from the prompt to one predicted token, as text."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write_text
from gemma_lm.jobs import Command, option

from .explain import explain, explanation_text
from .graph import load_graph


@dataclass(kw_only=True)
class ExplainJob:
    """Print how the model got to one token: its strongest paths from the prompt through the pruned
    graph (an unpruned graph is pruned with the default thresholds), each edge's weight, and the
    share of the logit's input that comes from error nodes."""

    graph: str = option(positional=True)
    """graph file (from `circuits trace` or `circuits prune`)"""
    target: str | None = None
    """the logit node's token, e.g. " basketball" (default: the most probable one)"""
    paths: int = 5
    """how many paths to print, strongest first"""
    tokens_only: bool = False
    """only paths that start at a prompt token (by default error nodes and untraced features start
    paths too, marked)"""
    json: str | None = None
    """also write the explanation as JSON"""

    def check(self) -> None:
        if self.paths < 1:
            raise UserError(f"--paths must be >= 1, got {self.paths}")


def run_explain(job: ExplainJob) -> int:
    result = explain(load_graph(job.graph), job.target, job.paths, tokens_only=job.tokens_only)
    print(explanation_text(result))
    if job.json:
        atomic_write_text(Path(job.json), result.to_json())
        print(f"wrote {job.json}", file=sys.stderr)
    return 0


COMMANDS = [
    Command(
        "explain",
        ExplainJob,
        run_explain,
        "how the model got to a token: the strongest paths to its logit, as text",
    )
]
