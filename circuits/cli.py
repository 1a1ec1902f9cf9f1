"""The `circuits` command. Each subcommand is a job dataclass beside the stage it drives, listed in
its module's `COMMANDS` (see `gemma_lm.jobs`)."""

from __future__ import annotations

import argparse
import sys

from gemma_lm import jobs

from . import (
    commands,
    commands_attention,
    commands_batch,
    commands_explain,
    commands_graph,
    commands_intervene,
    commands_render,
    info,
)

COMMANDS = [
    *info.COMMANDS,
    *commands.COMMANDS,
    *commands_graph.COMMANDS,
    *commands_render.COMMANDS,
    *commands_explain.COMMANDS,
    *commands_intervene.COMMANDS,
    *commands_attention.COMMANDS,
    *commands_batch.COMMANDS,
]


def build_parser() -> argparse.ArgumentParser:
    description = "Trace, prune, render and compare attribution graphs of Gemma 3 models."
    return jobs.build_parser("circuits", description, COMMANDS)


def run(argv: list[str] | None = None) -> int:
    """`circuits ARGV...`; returns the exit status."""
    return jobs.run(build_parser(), argv)


def main() -> None:
    sys.exit(run())
