"""Every trace carries its features' dashboards: `circuits trace`, `trace-batch` and
`circuits.attribute` attach them (building them once for a set that has none), `--no-dashboards`
skips them, a circuit keeps only its own features' dashboards, and the dashboards of another
transcoder set are refused."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
from conftest import serve_model

import transcoders.dashboards as dashboards
from circuits.attribution import attribute
from circuits.cli import run
from circuits.graph import FEATURE, attach_dashboards, display_label, load_graph
from circuits.pruning import prune
from gemma_lm.errors import UserError
from gemma_lm.testing import tiny_model
from transcoders.dashboards import build_dashboards, dashboards_location, load_dashboards
from transcoders.formats import save_native
from transcoders.testing import random_transcoders

PROMPT = "the cat sat on the mat"
WORDS = "the cat dog sat on mat ran far away big small red blue house tree river".split()


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny model served to every loader, its transcoders saved in tmp/tc, a small text file, and
    the dashboard pass patched to small settings on that text (the defaults read a lot of text)."""
    lm = tiny_model(seed=0)
    tc = random_transcoders(3, 64, 96, kind="skip", seed=1, l0=6, model_name=lm.name)
    save_native(tc, tmp_path / "tc")
    rng = np.random.default_rng(0)
    paragraphs = [". ".join(" ".join(rng.choice(WORDS, 10)) for _ in range(3)) for _ in range(40)]
    (tmp_path / "text.txt").write_text("\n\n".join(paragraphs))
    small = dict(text=f"file:{tmp_path / 'text.txt'}", k=3, context=24, max_tokens=1200)
    small.update(batch=5, gen_samples=0)
    monkeypatch.setattr(
        dashboards, "build_dashboards", functools.partial(build_dashboards, **small)
    )
    serve_model(monkeypatch, lambda *a, **k: lm)
    return lm, tmp_path


def trace(tmp, *extra) -> int:
    argv = ["trace", PROMPT, "--out", str(tmp / "g.npz"), "--transcoders", str(tmp / "tc")]
    return run([*argv, "--model", "tiny", "--no-progress", "--max-feature-nodes", "30", *extra])


def test_trace_builds_dashboards_once_and_attaches_them_to_every_feature(tiny, capsys):
    lm, tmp = tiny
    assert trace(tmp) == 0
    assert "building the feature dashboards" in capsys.readouterr().err
    assert (tmp / "tc" / "dashboards" / "dashboards.json").exists()
    g = load_graph(tmp / "g.npz")
    features = g.nodes_of(FEATURE)
    assert len(features) > 0
    for i in features:
        d = g.feature_dashboard(int(i))
        assert d is not None and {"top_contexts", "top_promoted", "auto_label"} <= set(d)
    # one entry per distinct feature, not per node: the file grows by a bound per feature
    keys = {f"{g.layer[i]}/{g.feature[i]}" for i in features}
    assert set(g.feature_dashboards) == keys
    assert any(display_label(g, int(i))[1] == "auto" for i in features)

    assert trace(tmp) == 0  # the second trace finds them
    assert "building the feature dashboards" not in capsys.readouterr().err


def test_no_dashboards_traces_without_them(tiny):
    lm, tmp = tiny
    assert trace(tmp, "--no-dashboards") == 0
    g = load_graph(tmp / "g.npz")
    assert g.feature_dashboards == {} and not (tmp / "tc" / "dashboards").exists()
    i = int(g.nodes_of(FEATURE)[0])
    assert display_label(g, i) == (g.node_label(i), "default")


def test_attribute_attaches_them_and_a_circuit_keeps_only_its_own(tiny):
    lm, tmp = tiny
    g = attribute(lm, PROMPT, transcoders=str(tmp / "tc"), max_feature_nodes=30, progress=False)
    assert len(g.feature_dashboards) == len(
        {(g.layer[i], g.feature[i]) for i in g.nodes_of(FEATURE)}
    )
    circuit = prune(g, node_threshold=0.5, edge_threshold=0.9)
    kept = {f"{circuit.layer[i]}/{circuit.feature[i]}" for i in circuit.nodes_of(FEATURE)}
    assert set(circuit.feature_dashboards) == kept
    assert len(kept) < len(g.feature_dashboards)
    # a set given as an object has no folder for dashboards: none, and no error
    tc = random_transcoders(3, 64, 96, kind="skip", seed=1, l0=6, model_name=lm.name)
    assert attribute(lm, PROMPT, transcoders=tc, progress=False).feature_dashboards == {}


def test_dashboards_of_another_set_are_refused_naming_both(tiny, tmp_path):
    lm, tmp = tiny
    g = attribute(lm, PROMPT, transcoders=str(tmp / "tc"), progress=False)
    other = random_transcoders(3, 64, 96, kind="skip", seed=2, l0=6, model_name=lm.name)
    save_native(other, tmp_path / "other")
    built = dashboards.build_dashboards(lm, other, out=str(tmp_path / "other-d"), progress=False)
    with pytest.raises(UserError, match="describe .*fingerprint.* but this graph was traced with"):
        attach_dashboards(g, load_dashboards(built))
    assert run(["attach-dashboards", str(tmp / "g.npz"), "--dashboards", str(built)]) == 2


def test_trace_batch_attaches_dashboards(tiny):
    lm, tmp = tiny
    prompts = tmp / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in (PROMPT, "a big red house")))
    argv = ["trace-batch", str(prompts), "--out", str(tmp / "batch"), "--transcoders"]
    assert run([*argv, str(tmp / "tc"), "--model", "tiny", "--no-progress"]) == 0
    graphs = sorted((tmp / "batch" / "graphs").glob("*.npz"))
    assert len(graphs) == 2
    for path in graphs:
        g = load_graph(path)
        assert all(g.feature_dashboard(int(i)) for i in g.nodes_of(FEATURE))


def test_read_only_transcoders_keep_their_dashboards_in_the_cache(tiny, monkeypatch):
    lm, tmp = tiny
    monkeypatch.setenv("GEMMA_CIRCUITS_CACHE", str(tmp / "cache"))
    (tmp / "tc").chmod(0o555)
    try:
        where = dashboards_location(str(tmp / "tc"))
        if os.access(tmp / "tc", os.W_OK):  # root writes anywhere: beside the transcoders
            assert where == tmp / "tc" / "dashboards"
        else:
            assert where.is_relative_to(tmp / "cache")
            assert trace(tmp) == 0
            assert (where / "dashboards.json").exists()
            assert load_graph(tmp / "g.npz").feature_dashboards
            assert run(["attach-dashboards", str(tmp / "g.npz")]) == 0  # found there too
    finally:
        (tmp / "tc").chmod(0o755)
    assert dashboards_location("hf://google/some-repo").is_relative_to(tmp / "cache")


def test_default_set_traces_with_readable_labels(real_model, default_transcoders):
    """The embedded default: its dashboards come with it (built at first use, or by the first trace
    of a set cached before they were), and every feature of a real graph has an auto label."""
    from transcoders.default import default_transcoders_dir

    g = attribute(
        real_model, "Fact: Michael Jordan plays the sport of", max_feature_nodes=64, progress=False
    )
    assert (default_transcoders_dir() / "dashboards" / "dashboards.json").exists()
    labels = [display_label(g, int(i)) for i in g.nodes_of(FEATURE)]
    assert labels and all(source == "auto" and text for text, source in labels)
