"""One dataclass per job, and its command line.

A job (trace, prune, train, convert, ...) is a dataclass whose fields are its options, and each
field's docstring (the string literal under it) is its documentation. The command line is made from
the class: `add_arguments` gives one flag per field, with the field's docstring as its help and its
default written once, in the class; `from_args` builds the config back from the parsed flags;
`with_overrides` gives the Python API the same options as keywords, applied to a copy. A field
holding another job dataclass (`attribution: AttributionConfig`) is flattened: its fields become
flags of the job, in a group of their own.

How a field becomes a flag (`--name-with-dashes` unless `option(flag=...)` says otherwise):
  bool                  `--x` / `--no-x` (or the `off_flag` `option` names)
  Literal[...]          a value among the listed ones
  int, float, str       a value of that type; `X | None` the same, None when not given
  list[int]             one comma-separated value, N,N,...
  list[str]             the flag repeated, once per item
  no default            a required flag (or argument, with `option(positional=True)`)
A `Command` names a job's class and the function that runs it; `run` parses, runs, and turns a
`UserError` into one line (`error: ...`, exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UserError

CLI_KEY = "gemma_lm.cli"  # where `option` keeps its settings in a field's metadata


def option(
    default=dataclasses.MISSING,
    *,
    default_factory=dataclasses.MISSING,
    flag: str | None = None,
    off_flag: str | None = None,
    positional: bool = False,
    metavar: str | None = None,
    flags: dict[str, tuple[str, str]] | None = None,
    action: type[argparse.Action] | None = None,
    nargs: int | None = None,
) -> dataclasses.Field:
    """A dataclass field with command-line settings: its `flag` name, the `off_flag` of a bool
    (`--hold` for `propagate=False`), `positional`, `metavar`; or several `flags` ({flag: (metavar,
    help)}) sharing one custom argparse `action` (edits collected into one list, in order); or
    `nargs` values after one flag, kept as a list (`--edge SRC TGT`, metavar a tuple of names)."""
    cli = dict(flag=flag, off_flag=off_flag, positional=positional, metavar=metavar)
    cli.update(flags=flags, action=action, nargs=nargs)
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={CLI_KEY: cli}
    )


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field name: its docstring, on one line} of dataclass `cls` and its dataclass bases."""
    docs = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass) if dataclasses.is_dataclass(klass) else None
        except OSError:  # defined where no source is kept (an interactive session)
            source = None
        if source is None:
            continue
        body = ast.parse(inspect.cleandoc("\n" + source)).body[0].body
        for stmt, after in zip(body, body[1:]):
            doc = after.value.value if isinstance(after, ast.Expr) else None
            if isinstance(stmt, ast.AnnAssign) and isinstance(doc, str):
                docs[stmt.target.id] = " ".join(doc.split())
    return docs


def _is_job(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fields(cls) -> list[tuple[dataclasses.Field, object]]:
    """(field, resolved type) of every field of `cls`, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def flat_fields(cls) -> list[tuple[dataclasses.Field, object, type]]:
    """(field, type, owning class) of every flag of job `cls`, nested jobs flattened."""
    out = []
    for f, tp in _fields(cls):
        out += flat_fields(tp) if _is_job(tp) else [(f, tp, cls)]
    return out


def field_default(f: dataclasses.Field):
    """A dataclass field's default (its factory called), or MISSING where it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _base_type(tp):
    """`X` of `X | None` (and of `X | list` from Python), else `tp`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return str if str in args else args[0]
    return tp


def _flag(f: dataclasses.Field) -> str:
    """The flag of field f: its `option(flag=...)`, else --name-with-dashes."""
    return f.metadata.get(CLI_KEY, {}).get("flag") or "--" + f.name.replace("_", "-")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _value_kwargs(tp, default) -> dict:
    """The argparse settings that parse one value of type `tp`."""
    tp = _base_type(tp)
    if typing.get_origin(tp) is typing.Literal:
        return {"choices": list(typing.get_args(tp))}
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (str,)
        if item is int:
            return {"type": _int_list, "metavar": "N,N,..."}
        return {"action": "append", "default": list(default or [])}
    kind = tp if tp in (int, float, str) else str
    return {"type": kind, "metavar": {int: "N", float: "X", str: "TEXT"}[kind]}


def _help(doc: str, default) -> str:
    shown = default not in (None, "", [], dataclasses.MISSING)
    return (doc + (f" (default: {default})" if shown else "")).replace("%", "%%")


def _add_field(parser, f: dataclasses.Field, tp, doc: str) -> None:
    cli = f.metadata.get(CLI_KEY, {})
    default = field_default(f)
    given = {"help": _help(doc, default)} | (
        {"metavar": cli["metavar"]} if cli.get("metavar") else {}
    )
    if cli.get("flags"):  # several flags, one custom action, one list
        for flag, (metavar, text) in cli["flags"].items():
            parser.add_argument(
                flag, action=cli["action"], dest=f.name, metavar=metavar, help=text, default=default
            )
        return
    if cli.get("positional"):
        nargs = {} if default is dataclasses.MISSING else {"nargs": "?", "default": default}
        value = _value_kwargs(tp, default)
        value.pop("metavar", None)  # a positional shows its name
        parser.add_argument(f.name, **value | nargs | given)
        return
    flag = _flag(f)
    if cli.get("nargs"):
        value = {"dest": f.name, "default": default, "nargs": cli["nargs"]}
        parser.add_argument(flag, **value | given)
    elif tp is bool and cli.get("off_flag"):
        parser.add_argument(flag, action="store_true", dest=f.name, default=default, **given)
        off = {"action": "store_false", "dest": f.name, "help": f"the opposite of {flag}"}
        parser.add_argument(cli["off_flag"], **off)
    elif tp is bool:
        on_off = {"action": argparse.BooleanOptionalAction, "dest": f.name, "default": default}
        parser.add_argument(flag, **on_off | given)
    elif default is dataclasses.MISSING:
        parser.add_argument(flag, dest=f.name, required=True, **_value_kwargs(tp, None) | given)
    else:
        value = {"dest": f.name, "default": default} | _value_kwargs(tp, default)
        parser.add_argument(flag, **value | given)


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per field of job `cls` (see the module docstring); nested jobs in groups."""
    docs = field_docs(cls)
    seen = {a.dest for a in parser._actions}
    for f, tp in _fields(cls):
        if _is_job(tp):
            title = " ".join((inspect.getdoc(tp) or tp.__name__).split("\n\n")[0].split())
            add_arguments(parser.add_argument_group(title.rstrip(".")), tp)
            continue
        if f.name in seen:
            raise TypeError(f"{cls.__name__}.{f.name}: another field of the job has that flag")
        _add_field(parser, f, tp, docs.get(f.name, ""))


def from_args(cls, args: argparse.Namespace):
    """The job config `cls` that parsed flags `args` describe (nested jobs rebuilt), checked."""
    values = {}
    for f, tp in _fields(cls):
        values[f.name] = from_args(tp, args) if _is_job(tp) else getattr(args, f.name)
    config = cls(**values)
    if hasattr(config, "check"):
        config.check()
    return config


def to_argv(config) -> list[str]:
    """The command-line arguments that give back `config` (a job dataclass): `from_args` of them,
    parsed, equals it. Fields at their defaults are left out. For running a job as a command of its
    own (`python -m transcoders train ...` in a process of its own)."""
    argv = []
    for f, tp in _fields(type(config)):
        value = getattr(config, f.name)
        if _is_job(tp):
            argv += to_argv(value)
            continue
        cli = f.metadata.get(CLI_KEY, {})
        if cli.get("positional"):
            argv += [] if value is None else [str(value)]
        elif value != field_default(f) and value is not None:
            argv += _flag_and_value(f, tp, value)
    return argv


def _flag_and_value(f: dataclasses.Field, tp, value) -> list[str]:
    cli = f.metadata.get(CLI_KEY, {})
    if cli.get("flags"):
        raise ValueError(f"{f.name}: a field of several flags has no single command-line form")
    flag = _flag(f)
    if cli.get("nargs"):
        return [flag, *(str(v) for v in value)]
    if tp is bool:
        return [flag] if value else [cli.get("off_flag") or flag.replace("--", "--no-", 1)]
    if isinstance(value, list):
        if typing.get_args(_base_type(tp)) == (int,):
            return [flag, ",".join(str(v) for v in value)]
        return [part for item in value for part in (flag, str(item))]
    return [flag, str(value)]


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


# -- commands -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A subcommand: `name`, the job dataclass whose fields are its options (its docstring is the
    command's description), the function that runs a config of it (returns the exit status), and a
    one-line `help` for the list of commands."""

    name: str
    job: type
    run: Callable[[object], int | None]
    help: str


def build_parser(prog: str, description: str, commands: list[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(metavar="COMMAND")
    for command in commands:
        doc = inspect.getdoc(command.job) or command.help
        p = sub.add_parser(command.name, help=command.help, description=doc)
        add_arguments(p, command.job)
        p.set_defaults(_command=command)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv`, build the chosen command's job config and run it; returns the exit status."""
    args = parser.parse_args(argv)
    command = getattr(args, "_command", None)
    if not isinstance(command, Command):
        parser.print_help()
        return 2
    try:
        return int(command.run(from_args(command.job, args)) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
