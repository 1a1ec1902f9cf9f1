"""Every command line is made from its job's dataclass by one mechanism (`gemma_lm.jobs`): each
job's flags and its fields match one for one, every field is documented and its doc is its help, the
defaults are the dataclass's, and `--help` works for every command of both programs."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing

import pytest

from circuits import cli as circuits_cli
from circuits.attribution import AttributionConfig
from circuits.commands_intervene import InterveneJob
from circuits.pruning import PruneConfig, prune
from gemma_lm.jobs import CLI_KEY, field_docs, flat_fields, from_args, to_argv, with_overrides
from transcoders import cli as transcoders_cli

PROGRAMS = {"circuits": circuits_cli, "transcoders": transcoders_cli}
COMMANDS = [(prog, c) for prog, module in PROGRAMS.items() for c in module.COMMANDS]
IDS = [f"{prog} {c.name}" for prog, c in COMMANDS]


def _subparser(prog: str, name: str) -> argparse.ArgumentParser:
    parser = PROGRAMS[prog].build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flags_of(field: dataclasses.Field) -> list[str]:
    """The flags a field should get: its own (`option(flag=...)`), several (`option(flags=...)`),
    none for a positional, else --name-with-dashes."""
    cli = field.metadata.get(CLI_KEY, {})
    if cli.get("flags"):
        return list(cli["flags"])
    if cli.get("positional"):
        return []
    return [cli.get("flag") or "--" + field.name.replace("_", "-")]


@pytest.mark.parametrize("prog,command", COMMANDS, ids=IDS)
def test_flags_and_fields_match_one_for_one(prog, command):
    parser = _subparser(prog, command.name)
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    names = [f.name for f, _, _ in flat_fields(command.job)]
    assert len(set(names)) == len(names), "two fields of the job would share a flag"
    assert {a.dest for a in actions} == set(names)
    by_dest: dict[str, set[str]] = {}
    for a in actions:
        by_dest.setdefault(a.dest, set()).update(a.option_strings)
    for f, tp, _ in flat_fields(command.job):
        expected = set(_flags_of(f))
        if tp is bool:
            cli = f.metadata.get(CLI_KEY, {})
            off = cli.get("off_flag") or next(iter(expected)).replace("--", "--no-", 1)
            expected.add(off)
        assert by_dest[f.name] == expected, f.name


@pytest.mark.parametrize("prog,command", COMMANDS, ids=IDS)
def test_every_field_is_documented_in_the_help(prog, command):
    help_text = " ".join(_subparser(prog, command.name).format_help().split())
    for f, _, owner in flat_fields(command.job):
        doc = field_docs(owner).get(f.name)
        assert doc, f"{owner.__name__}.{f.name} has no docstring"
        cli = f.metadata.get(CLI_KEY, {})
        texts = [text for _, text in cli["flags"].values()] if cli.get("flags") else [doc]
        for text in texts:
            assert " ".join(text.split())[:40] in help_text, f"{f.name}: {text!r} not in the help"


@pytest.mark.parametrize("prog,command", COMMANDS, ids=IDS)
def test_defaults_come_from_the_dataclass(prog, command):
    """Parsing only the required arguments gives the job's own defaults."""
    required, argv = {}, []
    for f, tp, _ in flat_fields(command.job):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            cli = f.metadata.get(CLI_KEY, {})
            value = "native" if f.name == "to" else "0" if tp is int else "x.npz"
            required[f.name] = value
            argv += [value] if cli.get("positional") else [_flags_of(f)[0], value]
    args = _subparser(prog, command.name).parse_args(argv)
    for f, _, owner in flat_fields(command.job):
        if f.name in required:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(args, f.name) == default, f"{owner.__name__}.{f.name}"


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_help_of_every_command_runs(prog):
    """`python -m PROG --help` lists every command; `PROG COMMAND --help` prints its usage (all of
    them from one process: each start imports torch)."""
    names = [c.name for p, c in COMMANDS if p == prog]
    top = subprocess.run([sys.executable, "-m", prog, "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and all(name in top.stdout for name in names), top.stderr
    code = (
        f"import contextlib, io, sys\nfrom {prog}.cli import run\n"
        f"for name in {names!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        run([name, '--help'])\n"
        "    assert out.getvalue().startswith('usage:'), name\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_trace_command_line_builds_the_nested_configs():
    parser = circuits_cli.build_parser()
    argv = ["trace", "Hi", "--out", "g.npz", "--target", " a", "--target", " b", "--no-progress"]
    argv += ["--node-threshold", "0.5", "--dtype", "bfloat16"]
    args = parser.parse_args(argv)
    job = from_args(args._command.job, args)
    assert job.attribution == AttributionConfig(
        targets=[" a", " b"], progress=False, dtype="bfloat16"
    )
    assert job.pruning == PruneConfig(node_threshold=0.5) and job.prompt == "Hi"


def test_overrides_copy_the_config_and_refuse_unknown_options():
    base = AttributionConfig(batch_size=7)
    new = with_overrides(base, AttributionConfig, {"max_feature_nodes": 5})
    assert (base.max_feature_nodes, new.max_feature_nodes, new.batch_size) == (8192, 5, 7)
    with pytest.raises(TypeError, match="unknown option 'max_nodes'"):
        with_overrides(base, AttributionConfig, {"max_nodes": 5})
    with pytest.raises(TypeError, match="must be a PruneConfig"):
        prune(None, 0.5)  # thresholds go by name, or in a PruneConfig


@pytest.mark.parametrize("prog,command", COMMANDS, ids=IDS)
def test_to_argv_gives_the_config_back(prog, command):
    """`to_argv` is the inverse of parsing: every field away from its default survives the round
    trip (what the default set's first-use training relies on)."""
    if command.job is InterveneJob:
        pytest.skip("its edits are several flags sharing one list")
    values = {}
    for f, tp, _ in flat_fields(command.job):
        values[f.name] = _some_value(f, tp)
    if command.name == "trace-batch":  # targets come from the prompts file there
        values.update(targets=[], contrast=None)
    config = _build(command.job, values)
    args = _subparser(prog, command.name).parse_args(to_argv(config))
    assert from_args(command.job, args) == config


def _some_value(f: dataclasses.Field, tp):
    """A value for field f other than its default that its checks accept."""
    base = typing.get_args(tp)[0] if type(None) in typing.get_args(tp) else tp
    if typing.get_origin(base) is typing.Literal:
        choices = typing.get_args(base)
        return choices[-1] if choices[-1] != f.default else choices[0]
    if base is bool:
        return not f.default
    if typing.get_origin(base) is list:
        return [3, 5] if typing.get_args(base) == (int,) else ["a", "b c"]
    if base is float:
        return 0.5  # inside every range the checks allow
    if base is int:
        return {"d_sae": 64, "k": 8, "tokens": 4096, "batch_size": 512}.get(f.name, 2)
    # names Neuronpedia accepts (the render command checks them)
    named = {"out": "o.npz", "prompts": "p.jsonl", "slug": "some-text", "scan": "gemma-3-1b"}
    named["features_url"] = "https://example.org/features"
    named["recipe"] = "large"  # a recipe the train commands know
    return named.get(f.name, "some text")


def _build(cls, values: dict):
    kwargs = {}
    for f, tp in zip(dataclasses.fields(cls), typing.get_type_hints(cls).values()):
        kwargs[f.name] = _build(tp, values) if dataclasses.is_dataclass(tp) else values[f.name]
    return cls(**kwargs)
