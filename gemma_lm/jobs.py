"""Command lines of every job: the error handling they share.

A `UserError` is printed as one line (`error: ...`) with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .errors import UserError


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand's `func`; returns the exit status."""
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
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def with_overrides(config, cls, overrides: dict):
    """A new config: `config` (an instance of dataclass `cls`, or None for its defaults) with the
    keyword `overrides` applied, checked (`check()` where the class has one). The caller's config is
    never changed; an unknown keyword is a TypeError, as for any function."""
    config = config if config is not None else cls()
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, not {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; options: {', '.join(sorted(names))}")
    out = dataclasses.replace(config, **overrides)
    if hasattr(out, "check"):
        out.check()
    return out
