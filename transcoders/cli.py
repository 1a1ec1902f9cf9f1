"""The `transcoders` command. Each subcommand is a job dataclass beside the stage it drives, listed
in its module's `COMMANDS` (see `gemma_lm.jobs`)."""

from __future__ import annotations

import argparse
import sys

from gemma_lm import jobs

from . import dashboards, distributed, evaluate, formats, train

COMMANDS = [
    *formats.COMMANDS,
    *train.COMMANDS,
    *evaluate.COMMANDS,
    *dashboards.COMMANDS,
    *distributed.COMMANDS,
]


def build_parser() -> argparse.ArgumentParser:
    description = "Train, evaluate and convert transcoders for Gemma 3 (PLT, skip, CLT)."
    return jobs.build_parser("transcoders", description, COMMANDS)


def run(argv: list[str] | None = None) -> int:
    """`transcoders ARGV...`; returns the exit status."""
    return jobs.run(build_parser(), argv)


def main() -> None:
    sys.exit(run())
