"""`circuits trace`: end to end on a tiny model (graph, circuit, SVG and HTML files), its options
mirror `AttributionConfig`, and bad input ends in one line on stderr."""

from __future__ import annotations

import pytest
from conftest import serve_model

from circuits.cli import run
from circuits.graph import FEATURE, load_graph
from gemma_lm.testing import tiny_model
from transcoders.testing import random_transcoders

PROMPT = "The cat sat on the"


@pytest.fixture
def tiny_setup(tmp_path, monkeypatch):
    """`circuits trace` on a tiny random model (load_model patched) with random transcoders on
    disk."""
    from transcoders.formats import save_native

    lm = tiny_model(seed=0)
    tc = random_transcoders(3, 64, 96, kind="skip", seed=1, l0=6, model_name=lm.name)
    save_native(tc, tmp_path / "tc")
    calls = []

    def fake_load(name, device="cpu", dtype="float32"):
        calls.append((name, device, dtype))
        return lm

    serve_model(monkeypatch, fake_load)
    return tmp_path, calls


def test_trace_writes_graph_circuit_and_pictures(tiny_setup, capsys):
    tmp, calls = tiny_setup
    out = tmp / "out" / "g.npz"
    code = run(
        [
            "trace",
            "--no-dashboards",
            PROMPT,
            "--out",
            str(out),
            "--transcoders",
            str(tmp / "tc"),
            "--prune",
            "--svg",
            str(tmp / "out" / "g.svg"),
            "--html",
            str(tmp / "out" / "g.html"),
            "--no-progress",
            "--max-feature-nodes",
            "40",
            "--batch-size",
            "16",
            "--model",
            "tiny",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert calls == [("tiny", "cpu", "float32")]
    graph = load_graph(out)
    assert graph.metadata["n_feature_rows"] == 40 and graph.metadata["settings"]["batch_size"] == 16
    assert "model_load" in graph.metadata["timing_s"]
    pruned = load_graph(tmp / "out" / "g.pruned.npz")
    assert 0 < pruned.n_nodes < graph.n_nodes
    assert (tmp / "out" / "g.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert "<html" in (tmp / "out" / "g.html").read_text().lower()
    for line in (
        "top predictions:",
        "logit nodes:",
        "active features (40 with incoming edges)",
        "time:",
        "circuit:",
    ):
        assert line in text


def test_trace_targets_and_contrast(tiny_setup, capsys):
    tmp, _ = tiny_setup
    out = tmp / "d.npz"
    assert (
        run(
            [
                "trace",
                "--no-dashboards",
                PROMPT,
                "--out",
                str(out),
                "--transcoders",
                str(tmp / "tc"),
                "--target",
                "a",
                "--contrast",
                "b",
                "--no-progress",
                "--max-feature-nodes",
                "0",
            ]
        )
        == 0
    )
    graph = load_graph(out)
    assert graph.logit_strings == ["a - b"] and int((graph.kind == FEATURE).sum()) > 0
    assert not graph.has_row[graph.kind == FEATURE].any()
    assert "[logit difference]" in capsys.readouterr().out
    assert (
        run(
            [
                "trace",
                "--no-dashboards",
                PROMPT,
                "--out",
                str(out),
                "--transcoders",
                str(tmp / "tc"),
                "--target",
                "a",
                "--target",
                "b",
                "--no-progress",
                "--max-feature-nodes",
                "0",
            ]
        )
        == 0
    )
    assert load_graph(out).logit_strings == ["a", "b"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--target", "ab"], "not one"),
        (["--out-suffix"], "must end in .npz"),
        (["--batch-size", "0"], "batch-size"),
        (["--prompt", ""], "empty"),
        (["--svg", "same"], "same file"),
        (["--prune", "--node-threshold", "2"], "node-threshold"),
    ],
)
def test_bad_input_is_one_line(tiny_setup, capsys, argv, message):
    tmp, _ = tiny_setup
    out = tmp / "g.npz"
    prompt = PROMPT
    if argv == ["--out-suffix"]:
        argv, out = [], tmp / "g.svg"
    if argv[:1] == ["--prompt"]:
        prompt, argv = argv[1], []
    if argv == ["--svg", "same"]:
        argv = ["--svg", str(out)]
    code = run(
        [
            "trace",
            "--no-dashboards",
            prompt,
            "--out",
            str(out),
            "--transcoders",
            str(tmp / "tc"),
            "--no-progress",
            *argv,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err
    assert not out.exists() or out.suffix != ".npz"
