"""`circuits intervene`, `circuits label`, `circuits attach-dashboards`, and the label helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import serve_model

from circuits.attribution import attribute
from circuits.cli import run
from circuits.graph import FEATURE, load_graph
from circuits.interventions import intervene
from circuits.labels import label_file, labels_by_id, remove_label, set_label
from gemma_lm.errors import UserError
from gemma_lm.testing import tiny_model
from transcoders.formats import save_native
from transcoders.testing import random_transcoders

PROMPT = "the big red house"


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A tiny model the CLI loads by any name, native transcoders on disk, and a saved graph."""
    lm = tiny_model(seed=12)
    tc = random_transcoders(lm.sites.n_layers, lm.sites.d_model, 24, seed=4)
    save_native(tc, tmp_path / "tc")

    serve_model(monkeypatch, lm)
    g = attribute(lm, PROMPT, transcoders=tc, progress=False)
    g.save(tmp_path / "g.npz")
    return lm, tc, g, tmp_path


def test_intervene_on_a_prompt_prints_the_table_and_writes_json(world, capsys):
    lm, tc, g, tmp = world
    node = g.node_id(g.nodes_of(FEATURE)[-1])
    argv = [
        "intervene",
        PROMPT,
        "--transcoders",
        str(tmp / "tc"),
        "--zero",
        node,
        "--scale",
        f"{node}=2",
        "--set",
        "f:0:1:3=4.5",
        "--mode",
        "full",
        "--generate",
        "3",
        "--top",
        "4",
        "--json",
        str(tmp / "r.json"),
    ]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert (
        f"zero {node}; scale {node} x2; set f:0:1:3 = 4.5" in out
        and "continuation, intervened" in out
    )
    saved = json.loads((tmp / "r.json").read_text())
    want = intervene(
        lm,
        PROMPT,
        [("zero", node), ("scale", node, 2.0), ("set", "f:0:1:3", 4.5)],
        transcoders=tc,
        mode="full",
        generate=3,
        top_k=4,
        progress=False,
    )
    assert saved["top"] == json.loads(json.dumps(want.top))
    assert saved["continuation"] == want.continuation and saved["mode"] == "full"


def test_intervene_on_a_graph_with_groups_and_hold(world, capsys):
    lm, tc, g, tmp = world
    feats = g.nodes_of(FEATURE)[:3]
    (tmp / "groups.json").write_text(
        json.dumps({"supernodes": {"early": [g.node_id(i) for i in feats]}})
    )
    argv = [
        "intervene",
        str(tmp / "g.npz"),
        "--transcoders",
        str(tmp / "tc"),
        "--groups",
        str(tmp / "groups.json"),
        "--scale",
        "early=-1",
        "--hold",
        "--json",
        str(tmp / "r.json"),
    ]
    assert run(argv) == 0
    saved = json.loads((tmp / "r.json").read_text())
    want = intervene(
        lm,
        g,
        [("scale", [g.node_id(i) for i in feats], -1.0)],
        transcoders=tc,
        propagate=False,
        progress=False,
    )
    assert saved["top"] == json.loads(json.dumps(want.top)) and saved["propagate"] is False
    assert saved["n_changed_features"] == 3
    assert "other features held" in capsys.readouterr().out


def test_intervene_errors_are_one_line(world, capsys):
    lm, tc, g, tmp = world
    assert run(["intervene", PROMPT, "--transcoders", str(tmp / "tc"), "--zero", "f:7:0:0"]) == 2
    assert "layer 7 is outside" in capsys.readouterr().err
    assert run(["intervene", PROMPT, "--transcoders", str(tmp / "tc"), "--zero", "capital"]) == 2
    assert "unknown node or supernode 'capital'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own usage error
        run(["intervene", PROMPT, "--set", "f:0:1:3"])


def test_labels_travel_with_the_graph(world):
    lm, tc, g, tmp = world
    i = int(g.nodes_of(FEATURE)[0])
    assert set_label(g, g.node_id(i), "  says a colour ") == i
    set_label(g, int(g.logit_nodes[0]), "the answer")
    g.save(tmp / "labelled.npz")
    back = load_graph(tmp / "labelled.npz")
    assert back.labels == {i: "says a colour", int(g.logit_nodes[0]): "the answer"}
    assert labels_by_id(back)[g.node_id(i)] == "says a colour"
    assert back.node_label(i) == "says a colour"
    pruned = back.subgraph(np.array([i] + list(back.logit_nodes)))
    assert pruned.labels[0] == "says a colour"  # node 0 of the subgraph is node i
    assert remove_label(back, g.node_id(i)) and not remove_label(back, g.node_id(i))
    with pytest.raises(UserError, match="empty"):
        set_label(back, i, "  ")
    with pytest.raises(UserError, match="not in this graph"):
        set_label(back, "f:0:0:99999", "x")


def test_label_command(world, capsys):
    lm, tc, g, tmp = world
    node = g.node_id(g.nodes_of(FEATURE)[2])
    assert run(["label", str(tmp / "g.npz"), node, "red things"]) == 0
    assert load_graph(tmp / "g.npz").labels[g.index_of(node)] == "red things"
    assert run(["label", str(tmp / "g.npz"), "--list"]) == 0
    assert f"{node}\tred things" in capsys.readouterr().out
    assert run(["label", str(tmp / "g.npz"), node, "--remove"]) == 0
    assert load_graph(tmp / "g.npz").labels == {}
    assert run(["label", str(tmp / "g.npz"), node, "--remove"]) == 2
    label_file(tmp / "g.npz", node, "again")
    assert load_graph(tmp / "g.npz").labels == {g.index_of(node): "again"}


def test_attach_dashboards_command(world, tmp_path, monkeypatch):
    lm, tc, g, tmp = world
    from transcoders.dashboards import build_dashboards

    text = tmp / "text.txt"
    text.write_text(
        "\n\n".join(
            f"the big red house number {i} stands by the river and the tree" for i in range(40)
        )
    )
    build_dashboards(
        lm,
        tc,
        text=f"file:{text}",
        out=str(tmp / "tc" / "dashboards"),
        k=3,
        context=24,
        max_tokens=960,
        gen_samples=0,
        progress=False,
    )
    assert (
        run(
            [
                "attach-dashboards",
                str(tmp / "g.npz"),
                "--dashboards",
                str(tmp / "tc" / "dashboards"),
                "--contexts",
                "2",
                "--out",
                str(tmp / "with.npz"),
            ]
        )
        == 0
    )
    back = load_graph(tmp / "with.npz")
    assert len(back.dashboards) == len(g.nodes_of(FEATURE))  # every feature node has one
    assert all(len(v["top_contexts"]) <= 2 for v in back.feature_dashboards.values())
    assert run(["attach-dashboards", str(tmp / "g.npz"), "--dashboards", str(tmp / "nowhere")]) == 2


def test_result_change_properties(world):
    lm, tc, g, tmp = world
    r = intervene(lm, PROMPT, {"f:2:3:5": 10.0}, transcoders=tc, progress=False)
    assert torch.equal(r.logit_change, r.logits - r.logits_clean)
    assert abs(float(r.prob_change.sum())) < 1e-5
