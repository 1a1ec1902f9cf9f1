"""The `circuits` command. Subcommands live beside the stage they drive; each module listed in
`COMMAND_MODULES` exposes `register(subparsers)` and sets `func` on its parser."""

from __future__ import annotations

import argparse
import importlib
import sys

from gemma_lm import jobs

COMMAND_MODULES = [
    "circuits.info",
    "circuits.commands",
    "circuits.commands_graph",
    "circuits.commands_render",
    "circuits.commands_intervene",
    "circuits.commands_batch",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuits",
        description="Trace, prune, render and compare attribution graphs of Gemma 3 models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    """`circuits ARGV...`; returns the exit status."""
    return jobs.run(build_parser(), argv)


def main() -> None:
    sys.exit(run())
