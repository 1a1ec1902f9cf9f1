"""The `circuits` command. Subcommands live beside the stage they drive; each module listed in
`COMMAND_MODULES` exposes `register(subparsers)` and sets `func` on its parser."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

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


def run(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main() -> None:
    sys.exit(run())
