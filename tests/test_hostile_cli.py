"""Hostile input on the command line (issue 23): unwritable outputs, prompts that are not text,
non-finite intervention values and malformed node ids all end in one `error:` line, exit status 2,
before the model is loaded; a write that fails halfway names its path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import serve_model

from circuits.batch import BatchConfig, trace_batch
from circuits.cli import run
from circuits.graph import load_graph
from gemma_lm.errors import UserError
from gemma_lm.files import check_output_dir, check_output_file
from gemma_lm.testing import tiny_model
from transcoders.formats import save_native
from transcoders.testing import random_transcoders

PROMPT = "The cat sat on the"
UNDECODABLE = "abc \udcff def"  # what Python makes of argv bytes b"abc \xff def"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A tiny model served to every `load_model` (each call recorded), transcoders on disk."""
    lm = tiny_model(seed=0)
    tc = random_transcoders(3, 64, 96, kind="skip", seed=1, l0=6, model_name=lm.name)
    save_native(tc, tmp_path / "tc")
    calls = []

    def recording_load(name, device="cpu", dtype="float32"):
        calls.append(name)
        return lm

    serve_model(monkeypatch, recording_load)
    return tmp_path, calls, lm, tc


def _refused(argv: list[str], capsys, *fragments: str) -> str:
    """Run `circuits ARGV`; it must exit 2 with one `error:` line holding every fragment."""
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _trace(tmp, *args: str) -> list[str]:
    flags = ["--transcoders", str(tmp / "tc"), "--no-progress", "--no-dashboards"]
    return ["trace", PROMPT, *flags, "--batch-size", "16", *args]


# -- item 2: outputs checked before the model loads ------------------------------------------------


def test_trace_out_at_a_folder_is_refused_before_the_model_loads(world, capsys):
    tmp, calls, _, _ = world
    folder = tmp / "DIR.npz"
    folder.mkdir()
    _refused(_trace(tmp, "--out", str(folder)), capsys, "--out", str(folder), "is a folder")
    assert calls == []


def test_trace_out_under_a_regular_file_is_refused(world, capsys):
    tmp, calls, _, _ = world
    (tmp / "file.txt").write_text("not a folder")
    out = tmp / "file.txt" / "x.npz"
    _refused(_trace(tmp, "--out", str(out)), capsys, str(out), "file.txt is a file")
    deeper = tmp / "file.txt" / "a" / "b" / "x.npz"
    _refused(_trace(tmp, "--out", str(deeper)), capsys, "file.txt is a file")
    assert calls == []


@pytest.mark.skipif(IS_ROOT, reason="root may write into a read-only folder")
def test_trace_out_in_a_read_only_folder_is_refused(world, capsys):
    tmp, calls, _, _ = world
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _refused(_trace(tmp, "--out", str(locked / "g.npz")), capsys, "not writable")
        _refused(_trace(tmp, "--out", str(locked / "new" / "g.npz")), capsys, "not writable")
    finally:
        locked.chmod(0o700)
    assert calls == []


@pytest.mark.skipif(IS_ROOT, reason="root may write over a read-only file")
def test_trace_over_a_read_only_file_is_refused(world, capsys):
    tmp, calls, _, _ = world
    out = tmp / "g.npz"
    out.write_bytes(b"old")
    out.chmod(0o400)
    _refused(_trace(tmp, "--out", str(out)), capsys, "read-only")
    assert calls == [] and out.read_bytes() == b"old"


@pytest.mark.parametrize("flag", ["--svg", "--html"])
def test_trace_picture_at_a_folder_is_refused_before_the_model_loads(world, capsys, flag):
    tmp, calls, _, _ = world
    (tmp / "pic").mkdir()
    argv = _trace(tmp, "--out", str(tmp / "g.npz"), flag, str(tmp / "pic"))
    _refused(argv, capsys, flag, "is a folder")
    assert calls == [] and not (tmp / "g.npz").exists()  # no graph written, then a traceback


def test_trace_pruned_file_at_a_folder_is_refused(world, capsys):
    tmp, calls, _, _ = world
    (tmp / "g.pruned.npz").mkdir()
    _refused(_trace(tmp, "--out", str(tmp / "g.npz"), "--prune"), capsys, "g.pruned.npz")
    assert calls == []


def test_a_write_that_fails_names_its_path(world, capsys, monkeypatch):
    """Disk full (or a file system gone read-only) after the checks: one line naming the file."""
    import circuits.graph as graph_module

    tmp, calls, _, _ = world

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(graph_module.AttributionGraph, "save", disk_full)
    out = tmp / "g.npz"
    _refused(_trace(tmp, "--out", str(out)), capsys, str(out), "No space left on device")
    assert calls  # this one fails at the write, after the trace


def test_trace_batch_out_at_a_file_is_refused(world, capsys):
    tmp, calls, _, _ = world
    (tmp / "p.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n")
    (tmp / "taken").write_text("a file")
    argv = ["trace-batch", str(tmp / "p.jsonl"), "--out", str(tmp / "taken"), "--no-progress"]
    _refused(argv, capsys, "--out", "is a file, not a folder")
    _refused([*argv[:-2], str(tmp / "taken" / "sub"), "--no-progress"], capsys, "taken is a file")
    assert calls == []


def test_render_and_intervene_outputs_are_checked_first(world, capsys):
    tmp, calls, lm, tc = world
    from circuits.attribution import attribute

    attribute(lm, PROMPT, transcoders=tc, progress=False).save(tmp / "g.npz")
    (tmp / "d").mkdir()
    for flag in ("--svg", "--html", "--json"):
        _refused(["render", str(tmp / "g.npz"), flag, str(tmp / "d")], capsys, flag, "folder")
    (tmp / "f").write_text("a file")
    _refused(["render", str(tmp / "g.npz"), "--index", str(tmp / "f")], capsys, "--index")
    argv = ["intervene", PROMPT, "--transcoders", str(tmp / "tc"), "--json", str(tmp / "d")]
    _refused(argv, capsys, "--json", "is a folder")
    _refused(["attach-dashboards", str(tmp / "g.npz"), "--out", str(tmp / "d")], capsys, "--out")
    assert calls == []


def test_prune_and_compare_outputs_are_checked_before_any_work(world, capsys, monkeypatch):
    tmp, calls, lm, tc = world
    import circuits.commands_graph as commands_graph
    from circuits.attribution import attribute

    attribute(lm, PROMPT, transcoders=tc, progress=False).save(tmp / "g.npz")
    (tmp / "d").mkdir()
    monkeypatch.setattr(commands_graph, "load_graph", lambda *a: pytest.fail("the graph loaded"))
    _refused(["prune", str(tmp / "g.npz"), "--out", str(tmp / "d")], capsys, "--out", "folder")
    for flag in ("--svg", "--json"):
        argv = ["compare", str(tmp / "g.npz"), str(tmp / "g.npz"), flag, str(tmp / "d")]
        _refused(argv, capsys, flag, "folder")


def test_output_checks_create_nothing_and_accept_new_paths(tmp_path):
    assert check_output_file(tmp_path / "a" / "b" / "g.npz") == tmp_path / "a" / "b" / "g.npz"
    check_output_dir(tmp_path / "new" / "folder")
    check_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(tmp_path)


# -- item 4: prompts that are not text -------------------------------------------------------------


def test_trace_of_an_undecodable_prompt_is_refused_before_the_model_loads(world, capsys):
    tmp, calls, _, _ = world
    argv = _trace(tmp, "--out", str(tmp / "g.npz"))
    argv[1] = UNDECODABLE
    _refused(argv, capsys, "not valid text", "U+DCFF", "0xff")
    argv = _trace(tmp, "--out", str(tmp / "g.npz"), "--target", " \udcfe")
    _refused(argv, capsys, "--target", "not valid text")
    assert calls == [] and not (tmp / "g.npz").exists()


def test_intervene_on_an_undecodable_prompt_is_refused(world, capsys):
    tmp, calls, _, _ = world
    _refused(["intervene", UNDECODABLE, "--zero", "f:0:1:2"], capsys, "not valid text")
    assert calls == []


def test_the_tokenizer_refuses_an_undecodable_prompt_in_one_line(tiny):
    with pytest.raises(UserError, match="U\\+DCFF"):
        tiny.tokenize(UNDECODABLE)


def test_undecodable_argv_bytes_give_one_error_line_in_a_real_process(tmp_path):
    """`circuits trace "$(printf 'abc \\xff')"`: the check runs before the model (which does not
    exist here) would be looked for."""
    argv = [sys.executable, "-m", "circuits", "trace", b"abc \xff def", "--out"]
    argv += [str(tmp_path / "g.npz"), "--model", "no-such-model", "--no-progress"]
    env = dict(os.environ, LC_ALL="C.UTF-8", PYTHONUTF8="1")
    repo = Path(__file__).resolve().parents[1]  # this checkout's `circuits`, not an installed one
    r = subprocess.run(argv, capture_output=True, timeout=120, env=env, cwd=repo)
    err = r.stderr.decode(errors="replace").strip()
    assert r.returncode == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert "not valid text" in err and "0xff" in err and "no-such-model" not in err


def test_trace_batch_fails_only_the_undecodable_prompt(world):
    tmp, _, lm, tc = world
    lines = [
        json.dumps({"prompt": "good one", "id": "good"}),
        json.dumps({"prompt": UNDECODABLE, "id": "escaped"}),  # written as "\udcff" in JSON
    ]
    raw = b'{"prompt": "raw \xff bytes", "id": "raw"}'  # a line that is not UTF-8 at all
    (tmp / "p.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + raw + b"\n")
    cfg = BatchConfig(prompts=str(tmp / "p.jsonl"), out=str(tmp / "out"))
    cfg.attribution.progress = False
    result = trace_batch(cfg, lm=lm, transcoders=tc)
    assert (result.n_traced, result.n_failed) == (1, 2)
    status = {r["id"]: r for r in result.records}
    assert status["good"]["status"] == "ok"
    for bad in ("escaped", "raw"):
        assert status[bad]["status"] == "failed" and "not valid text" in status[bad]["error"]
    assert load_graph(tmp / "out" / "graphs" / "good.npz").prompt == "good one"
    index = [json.loads(x) for x in (tmp / "out" / "index.jsonl").read_text().splitlines()]
    assert [r["status"] for r in index] == ["ok", "failed", "failed"]


def test_trace_batch_cli_reports_the_failed_prompt_at_the_end(world, capsys):
    tmp, _, _, _ = world
    lines = [json.dumps({"prompt": PROMPT, "id": "ok"}), json.dumps({"prompt": UNDECODABLE})]
    (tmp / "p.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["trace-batch", str(tmp / "p.jsonl"), "--out", str(tmp / "out"), "--no-progress"]
    argv += ["--transcoders", str(tmp / "tc"), "--no-dashboards", "--batch-size", "16"]
    assert run(argv) == 1
    out = capsys.readouterr().out
    assert "1 traced, 0 done before, 1 failed" in out
    assert "failed: 00002: UserError: the prompt is not valid text" in out


# -- item 8: intervene values and node ids before the model loads ----------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("op", ["--set", "--scale"])
def test_intervene_refuses_non_finite_values(world, capsys, op, value):
    tmp, calls, _, _ = world
    argv = ["intervene", PROMPT, op, f"f:0:1:2={value}"]
    _refused(argv, capsys, "f:0:1:2", "not a finite number")
    assert calls == []


def test_intervene_api_refuses_non_finite_values_before_loading(world):
    from circuits.interventions import intervene

    _, calls, _, _ = world
    with pytest.raises(UserError, match="not a finite number"):
        intervene("tiny", PROMPT, {"f:0:1:2": float("nan")})
    assert calls == []


def test_intervene_refuses_an_empty_prompt_before_the_model_loads(world, capsys):
    _, calls, _, _ = world
    _refused(["intervene", "", "--zero", "f:0:1:2"], capsys, "the prompt is empty")
    assert calls == []


def test_trace_refuses_an_empty_prompt_before_the_model_loads(world, capsys):
    tmp, calls, _, _ = world
    argv = _trace(tmp, "--out", str(tmp / "g.npz"))
    argv[1] = ""
    _refused(argv, capsys, "the prompt is empty")
    assert calls == []


@pytest.mark.parametrize(
    "node, message",
    [
        ("f:1:2", "cannot read node"),
        ("f:x:2:3", "must be integers"),
        ("t:0:1", "token node"),
        ("f:-1:2:3", "numbers from 0"),
        ("e:0:-3", "numbers from 0"),
        ("nosuch", "unknown node or supernode"),
    ],
)
def test_intervene_node_ids_are_checked_before_the_model_loads(world, capsys, node, message):
    _, calls, _, _ = world
    _refused(["intervene", PROMPT, "--zero", node], capsys, message)
    assert calls == []


def test_intervene_still_accepts_node_ids_and_supernodes(world, capsys):
    tmp, calls, _, _ = world
    (tmp / "groups.json").write_text(json.dumps({"supernodes": {"odd:name": ["f:0:1:2"]}}))
    argv = ["intervene", PROMPT, "--transcoders", str(tmp / "tc"), "--no-progress"]
    argv += ["--groups", str(tmp / "groups.json"), "--zero", "odd:name", "--set", "f:1:*:3=2"]
    assert run(argv) == 0
    assert "zero supernode 'odd:name' (1 nodes); set f:1:*:3 = 2" in capsys.readouterr().out
    assert calls == ["gemma-3-270m"]


def test_a_prompt_too_long_to_be_a_file_name_is_a_prompt(world, capsys, monkeypatch):
    tmp, _, _, _ = world
    serve_model(monkeypatch, tiny_model(seed=0, max_positions=512))  # the tiny tokenizer: bytes
    long_prompt = "word " * 60  # over the 255 bytes a file name may have
    argv = ["intervene", long_prompt, "--transcoders", str(tmp / "tc"), "--no-progress"]
    assert run(argv) == 0
    assert "showing the clean predictions" in capsys.readouterr().out


def test_a_picture_without_graphviz_is_refused_before_any_work(world, capsys, monkeypatch):
    tmp, calls, lm, tc = world
    import circuits.render as render

    real_which = render.shutil.which
    monkeypatch.setattr(render.shutil, "which", lambda n: None if n == "neato" else real_which(n))
    svg = str(tmp / "g.svg")
    _refused([*_trace(tmp, "--out", str(tmp / "g.npz"), "--svg", svg)], capsys, "graphviz")
    from circuits.attribution import attribute

    attribute(lm, PROMPT, transcoders=tc, progress=False).save(tmp / "g.npz")
    _refused(["render", str(tmp / "g.npz"), "--svg", svg], capsys, "graphviz")
    _refused(["compare", str(tmp / "g.npz"), str(tmp / "g.npz"), "--svg", svg], capsys, "graphviz")
    assert calls == [] and not (tmp / "g.svg").exists()
    assert run(["render", str(tmp / "g.npz"), "--svg", str(tmp / "g.dot")]) == 0  # DOT needs none
