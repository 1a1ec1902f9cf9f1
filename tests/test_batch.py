"""Batch tracing (`circuits trace-batch`): prompts files, resume, and two-rank runs on the CPU with
gloo.

The two-rank tests start this file as a script (see `_driver` at the bottom) under torchrun, or as
two plain processes with the torchrun environment set by hand, on a tiny random model with random
transcoders.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from circuits.attribution import AttributionConfig, attribute
from circuits.batch import BatchConfig, read_prompts, trace_batch
from circuits.graph import load_graph
from gemma_lm.errors import UserError


def _quiet() -> AttributionConfig:
    return AttributionConfig(progress=False)  # no progress bars in the tests


PROMPTS = [
    "The cat sat on the mat",
    "Hello there, world",
    "abc abc ab",
    "1 2 3 4 5",
    "Once upon a time",
    "zzz yyy",
    "A B C D",
    "to be or not to be",
]


def _setup():
    """The tiny model and transcoders every process of a test builds for itself (seeded, so
    identical)."""
    from gemma_lm.testing import tiny_model
    from transcoders.testing import random_transcoders

    return tiny_model(seed=0), random_transcoders(3, 64, 128, seed=0, l0=4.0)


def _write_prompts(path: Path, n: int) -> list[dict]:
    items = []
    for i in range(n):
        item = {"prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}"}
        if i % 3 == 1:
            item["target"] = "x"
        if i % 3 == 2:
            item.update(target="a", contrast="b", id=f"contrast-{i}")
        items.append(item)
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return items


def _single_trace(lm, tc, item: dict):
    target = item.get("target")
    return attribute(
        lm,
        item["prompt"],
        transcoders=tc,
        config=AttributionConfig(
            targets=[target] if target else [], contrast=item.get("contrast"), progress=False
        ),
    )


def _assert_same_graph(a, b):
    assert a.prompt == b.prompt
    for name in ("tokens", "kind", "layer", "pos", "feature", "has_row"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("activation", "node_input", "row_constant", "logit_probabilities"):
        np.testing.assert_allclose(
            getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6, err_msg=name
        )
    np.testing.assert_allclose(a.adjacency.toarray(), b.adjacency.toarray(), rtol=1e-4, atol=1e-6)


def _graph_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "graphs").glob("*.npz"))


def _check_index(out: Path, specs) -> list[dict]:
    lines = (out / "index.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["id"] for r in records] == [s.id for s in specs]  # each prompt once, in file order
    assert all(r["status"] == "ok" for r in records), records
    assert sorted(Path(r["file"]).name for r in records) == _graph_files(out)
    return records


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# -- prompts files ---------------------------------------------------------------------------------


def test_read_prompts_ids_targets_and_extra_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "a b", "topic": "t"}\n\n{"prompt": "c", "target": [" x", " y"], "id": 7}\n'
        '{"prompt": "d", "target": " x", "contrast": " y"}\n'
    )
    a, b, c = read_prompts(path)
    assert (a.id, a.targets, a.extra, a.line) == ("00001", [], {"topic": "t"}, 1)
    assert (b.id, b.targets) == ("7", [" x", " y"])
    assert (c.id, c.targets, c.contrast) == ("00004", [" x"], " y")
    assert read_prompts(["just a string"])[0].prompt == "just a string"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"prompt": "a"}\nnot json\n', "line 2 is not JSON"),
        ('{"text": "a"}\n', '"prompt" string'),
        ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', "used already on line 1"),
        ('{"prompt": "a", "id": "../evil"}\n', "cannot name a file"),
        ('{"prompt": "a", "contrast": " b"}\n', "needs exactly one"),
        ('{"prompt": "a", "target": 3}\n', "string or a list"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_read_prompts_refuses_bad_files(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_prompts(path)


def test_missing_prompts_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl")


def test_bad_target_refused_before_tracing(tmp_path):
    lm, tc = _setup()
    with pytest.raises(UserError, match=r"line 2.*not one"):
        trace_batch(
            BatchConfig(
                prompts=["ok", {"prompt": "a", "target": "two tokens"}],
                out=str(tmp_path / "o"),
                attribution=_quiet(),
            ),
            lm=lm,
            transcoders=tc,
        )
    assert not list((tmp_path / "o" / "graphs").glob("*.npz"))


# -- one process -----------------------------------------------------------------------------------


def test_one_process_equals_single_traces_and_resumes(tmp_path):
    lm, tc = _setup()
    items = _write_prompts(tmp_path / "p.jsonl", 4)
    cfg = BatchConfig(
        prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "out"), attribution=_quiet()
    )
    result = trace_batch(cfg, lm=lm, transcoders=tc)
    specs = read_prompts(cfg.prompts)
    assert (result.n_traced, result.n_skipped, result.n_failed) == (4, 0, 0)
    records = _check_index(tmp_path / "out", specs)
    for item, spec, record in zip(items, specs, records):
        g = load_graph(tmp_path / "out" / "graphs" / spec.filename)
        _assert_same_graph(g, _single_trace(lm, tc, item))
        assert record["n_nodes"] == g.n_nodes and record["n_edges"] == g.adjacency.nnz
        assert 0.0 <= record["replacement"] <= 1.0
        assert g.metadata["batch"]["id"] == spec.id
    assert "| 00001 |" in result.table() and "'x'" in result.table()

    # a rerun traces nothing; a changed prompt is retraced under its id; the index stays one line
    # each
    assert trace_batch(cfg, lm=lm, transcoders=tc).n_skipped == 4
    items[0]["prompt"] = "a different prompt"
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    again = trace_batch(cfg, lm=lm, transcoders=tc)
    assert (again.n_traced, again.n_skipped) == (1, 3)
    records = _check_index(tmp_path / "out", read_prompts(cfg.prompts))
    assert records[0]["prompt"] == "a different prompt"
    assert load_graph(tmp_path / "out" / "graphs" / "00001.npz").prompt == "a different prompt"


def test_resume_with_other_options_is_refused(tmp_path):
    lm, tc = _setup()
    cfg = BatchConfig(prompts=["a b c"], out=str(tmp_path / "out"), attribution=_quiet())
    trace_batch(cfg, lm=lm, transcoders=tc)
    cfg.attribution.max_feature_nodes = 5
    with pytest.raises(UserError, match="max_feature_nodes 8192 -> 5"):
        trace_batch(cfg, lm=lm, transcoders=tc)
    cfg.overwrite = True
    assert trace_batch(cfg, lm=lm, transcoders=tc).n_traced == 1
    assert load_graph(tmp_path / "out" / "graphs" / "00001.npz").metadata["n_feature_rows"] <= 5


def test_a_failing_prompt_is_reported_and_retried(tmp_path, monkeypatch):
    import circuits.batch as batch

    lm, tc = _setup()
    real = batch.attribute

    def flaky(lm, prompt, **kw):
        if prompt == "bad one":
            raise RuntimeError("out of memory (simulated)")
        return real(lm, prompt, **kw)

    monkeypatch.setattr(batch, "attribute", flaky)
    cfg = BatchConfig(
        prompts=["good one", "bad one", "good two"], out=str(tmp_path / "out"), attribution=_quiet()
    )
    result = trace_batch(cfg, lm=lm, transcoders=tc)
    assert (result.n_traced, result.n_failed) == (2, 1)
    assert [r["status"] for r in result.records] == ["ok", "failed", "ok"]
    assert (
        "out of memory" in result.records[1]["error"] and "failed: RuntimeError" in result.table()
    )
    monkeypatch.setattr(batch, "attribute", real)
    result = trace_batch(cfg, lm=lm, transcoders=tc)
    assert (result.n_traced, result.n_skipped, result.n_failed) == (1, 2, 0)


def test_cli_options_mirror_circuits_trace(tmp_path):
    from circuits.cli import build_parser
    from gemma_lm.jobs import from_args

    argv = ["trace-batch", "p.jsonl", "--out", "d", "--max-feature-nodes", "7", "--chat"]
    argv += ["--desired-logit-prob", "0.5", "--dtype", "bfloat16", "--no-progress"]
    args = build_parser().parse_args(argv)
    job = from_args(args._command.job, args)
    expected = AttributionConfig(
        max_feature_nodes=7, desired_logit_prob=0.5, chat=True, dtype="bfloat16", progress=False
    )
    assert isinstance(job, BatchConfig) and job.attribution == expected
    assert (job.prompts, job.out) == ("p.jsonl", "d")


def test_cli_refuses_a_global_target(tmp_path, capsys):
    from circuits.cli import run

    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    assert (
        run(
            [
                "trace-batch",
                str(tmp_path / "p.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--target",
                " x",
            ]
        )
        == 2
    )
    assert "per prompt" in capsys.readouterr().err


def test_cli_reports_a_bad_prompts_file_in_one_line(tmp_path, capsys):
    from circuits.cli import run

    (tmp_path / "p.jsonl").write_text("{oops\n")
    assert run(["trace-batch", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err


# -- two ranks (gloo) ------------------------------------------------------------------------------


def test_two_ranks_under_torchrun_equal_single_traces(tmp_path):
    items = _write_prompts(tmp_path / "p.jsonl", 6)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        __file__,
        str(tmp_path / "p.jsonl"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    specs = read_prompts(tmp_path / "p.jsonl")
    records = _check_index(out, specs)
    assert {r["rank"] for r in records} == {0, 1}  # the work was split
    assert sorted(p.name for p in (out / "progress").iterdir()) == ["rank-0.jsonl", "rank-1.jsonl"]
    lm, tc = _setup()
    for item, spec in zip(items, specs):
        _assert_same_graph(load_graph(out / "graphs" / spec.filename), _single_trace(lm, tc, item))


def test_sigkill_halfway_then_resume_loses_and_duplicates_nothing(tmp_path):
    n = 16
    items = _write_prompts(tmp_path / "p.jsonl", n)
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):  # the environment torchrun gives its workers
        env = dict(
            _env(),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(tmp_path / "p.jsonl"), str(out), "--sleep", "0.4"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    deadline = time.time() + 240
    try:
        while len(_graph_files(out) if (out / "graphs").exists() else []) < 4:
            assert time.time() < deadline and all(p.poll() is None for p in procs), b"".join(
                p.stderr.read() for p in procs if p.poll() is not None
            ).decode()[-3000:]
            time.sleep(0.05)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
            p.stderr.close()
    before = _graph_files(out)
    assert 4 <= len(before) < n, before
    assert not (out / "index.jsonl").exists()

    # resume on one process (another world size): only the missing prompts are traced
    lm, tc = _setup()
    result = trace_batch(
        BatchConfig(prompts=str(tmp_path / "p.jsonl"), out=str(out), attribution=_quiet()),
        lm=lm,
        transcoders=tc,
    )
    assert result.n_skipped >= len(before) and result.n_traced == n - result.n_skipped
    specs = read_prompts(tmp_path / "p.jsonl")
    _check_index(out, specs)
    assert len(_graph_files(out)) == n and not list((out / "graphs").glob(".*"))
    for item, spec in list(zip(items, specs))[::5]:
        _assert_same_graph(load_graph(out / "graphs" / spec.filename), _single_trace(lm, tc, item))


@pytest.mark.slow
def test_real_model_batch_of_the_shipped_prompts(tmp_path, real_model, default_transcoders):
    """Every prompt of tests/data/batch_prompts_20.jsonl passes the up-front checks on the real
    tokenizer; two of them trace to the same graphs as `circuits.attribute`."""
    from circuits.batch import check_prompts

    path = Path(__file__).parent / "data" / "batch_prompts_20.jsonl"
    specs = read_prompts(path)
    assert len(specs) == 20
    options = AttributionConfig(max_feature_nodes=32, progress=False)
    check_prompts(real_model, specs, options)
    # a target, a contrast
    picked = [json.loads(line) for line in path.read_text().splitlines()][16:18]
    result = trace_batch(
        BatchConfig(prompts=picked, out=str(tmp_path / "out"), attribution=options),
        lm=real_model,
        transcoders=default_transcoders,
    )
    assert result.n_traced == 2 and [r["top_logit"] for r in result.records][0] == " mice"
    for item, record in zip(picked, result.records):
        single = attribute(
            real_model,
            item["prompt"],
            transcoders=default_transcoders,
            config=AttributionConfig(
                targets=[item["target"]],
                contrast=item.get("contrast"),
                max_feature_nodes=32,
                progress=False,
            ),
        )
        _assert_same_graph(load_graph(tmp_path / "out" / record["file"]), single)


def _driver(argv: list[str]) -> None:
    """One rank of a test job: trace PROMPTS into OUT with the tiny setup (optionally slowly, to be
    killed)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("prompts")
    p.add_argument("out")
    p.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    import circuits.batch as batch

    if args.sleep:
        real = batch.attribute

        def slow(*a, **kw):
            time.sleep(args.sleep)
            return real(*a, **kw)

        batch.attribute = slow
    lm, tc = _setup()
    trace_batch(
        BatchConfig(prompts=args.prompts, out=args.out, attribution=_quiet()), lm=lm, transcoders=tc
    )


if __name__ == "__main__":
    _driver(sys.argv[1:])
