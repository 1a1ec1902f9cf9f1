"""The `transcoders` command. Each module in `COMMAND_MODULES` exposes `register(subparsers)`."""

from __future__ import annotations

import argparse
import sys

from gemma_lm import jobs

COMMAND_MODULES = [
    "transcoders.formats",
    "transcoders.train",
    "transcoders.evaluate",
    "transcoders.dashboards",
    "transcoders.distributed",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="transcoders",
        description="Train, evaluate and convert transcoders for Gemma 3 (PLT, skip, CLT).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    """`transcoders ARGV...`; returns the exit status."""
    return jobs.run(build_parser(), argv)


def main() -> None:
    sys.exit(run())
