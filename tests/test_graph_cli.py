"""`circuits prune | show | render | compare`, and one end-to-end run on the real gemma-3-270m."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_render import labelled_graph, synthetic_graph

from circuits.cli import run
from circuits.graph import FEATURE, load_graph

needs_graphviz = pytest.mark.skipif(
    shutil.which("neato") is None, reason="graphviz (neato) is not installed"
)


@pytest.fixture
def graph_file(tmp_path):
    path = tmp_path / "g.npz"
    synthetic_graph(n_features=150, seed=21, with_influence=False).save(path)
    return path


def test_prune_command(graph_file, tmp_path, capsys):
    out = tmp_path / "p.npz"
    assert (
        run(
            [
                "prune",
                str(graph_file),
                "--out",
                str(out),
                "--node-threshold",
                "0.7",
                "--edge-threshold",
                "0.9",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert (
        "replacement" in text and "completeness" in text and "full:" in text and "pruned:" in text
    )
    p = load_graph(out)
    assert p.metadata["pruning"]["node_threshold"] == 0.7 and p.influence is not None
    assert p.n_nodes < load_graph(graph_file).n_nodes


def test_prune_command_errors(graph_file, tmp_path, capsys):
    assert (
        run(["prune", str(graph_file), "--out", str(tmp_path / "p.npz"), "--node-threshold", "2"])
        == 2
    )
    assert "node-threshold must be a number in [0, 1]" in capsys.readouterr().err
    assert run(["prune", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "p.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_show_command(graph_file, tmp_path, capsys):
    assert run(["show", str(graph_file), "--top", "4"]) == 0
    text = capsys.readouterr().out
    assert "top 4 nodes by influence" in text and "replacement" in text
    assert (
        len([line for line in text.splitlines() if "influence " in line and line.startswith("  ")])
        == 4
    )
    g = load_graph(graph_file)
    assert g.prompt in text


def test_show_command_prints_labels_beside_ids(tmp_path, capsys):
    g, which = labelled_graph()
    g.save(tmp_path / "l.npz")
    assert run(["show", str(tmp_path / "l.npz"), "--top", str(g.n_nodes)]) == 0
    rows = {
        line.split()[0]: line
        for line in capsys.readouterr().out.splitlines()
        if "influence " in line
    }
    human, auto, long = (rows[g.node_id(which[k])] for k in ("human", "auto", "long"))
    assert human.split(maxsplit=1)[1].startswith("say a capital (human) ")
    assert auto.split(maxsplit=1)[1].startswith("Texas cities (auto) ")
    assert "cities of the southern" in long and "… (auto)" in long
    plain = g.node_id(int(g.nodes_of(FEATURE)[0]))
    assert rows[plain].split()[1] == "-"


@needs_graphviz
def test_render_command(graph_file, tmp_path, capsys):
    groups = tmp_path / "groups.json"
    g = load_graph(graph_file)
    members = [g.node_id(int(i)) for i in g.nodes_of(FEATURE)[-2:]]
    groups.write_text(
        json.dumps({"format": "gemma-circuits-supernodes", "supernodes": {"Texas": members}})
    )
    svg, html, js = tmp_path / "g.svg", tmp_path / "g.html", tmp_path / "g.json"
    assert (
        run(
            [
                "render",
                str(graph_file),
                "--svg",
                str(svg),
                "--html",
                str(html),
                "--json",
                str(js),
                "--max-nodes",
                "80",
                "--supernodes",
                str(groups),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "not pruned" in captured.err
    assert svg.read_text().startswith("<?xml") and "Texas" in html.read_text()
    doc = json.loads(js.read_text())
    assert doc["metadata"]["slug"] == "g" and doc["qParams"]["supernodes"][0][0] == "Texas"
    assert run(["render", str(graph_file)]) == 2
    assert "nothing to write" in capsys.readouterr().err
    groups.write_text("[1, 2]")
    assert run(["render", str(graph_file), "--html", str(html), "--supernodes", str(groups)]) == 2
    assert "holds no supernodes" in capsys.readouterr().err


@needs_graphviz
def test_compare_command(tmp_path, capsys):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    synthetic_graph(n_features=120, seed=22).save(a)
    synthetic_graph(n_features=120, seed=23).save(b)
    svg, js = tmp_path / "d.svg", tmp_path / "d.json"
    assert (
        run(["compare", str(a), str(b), "--svg", str(svg), "--json", str(js), "--top-k", "3"]) == 0
    )
    text = capsys.readouterr().out
    assert "Jaccard" in text and "only in A" in text
    assert "#f59e0b" in svg.read_text()
    doc = json.loads(js.read_text())
    assert len(doc["influence_changes"]) == 3 and 0 <= doc["jaccard"] <= 1


@pytest.mark.slow
@needs_graphviz
def test_real_model_graph_end_to_end(real_model, tmp_path):
    """A real 270M graph (random skip transcoders, so it runs anywhere) through prune, scores and
    every picture."""
    from test_export import NEURONPEDIA_GRAPH_SCHEMA, schema_errors
    from test_prune import brute_force_influence

    import circuits
    from circuits.export import to_neuronpedia_json
    from circuits.pruning import compute_influence
    from transcoders.testing import random_transcoders

    s = real_model.sites
    tc = random_transcoders(
        s.n_layers, s.d_model, 2048, kind="skip", l0=16, seed=0, model_name=real_model.name
    )
    g = circuits.attribute(
        real_model, "The capital of France is", transcoders=tc, progress=False, max_feature_nodes=64
    )
    np.testing.assert_allclose(
        compute_influence(g), brute_force_influence(g), rtol=1e-6, atol=1e-12
    )
    p = circuits.prune(g, node_threshold=0.95)
    for scores in p.metadata["scores"].values():
        assert 0 <= scores["replacement"] <= 1 and 0 <= scores["completeness"] <= 1
    p.save(tmp_path / "p.npz")
    assert (
        run(
            [
                "render",
                str(tmp_path / "p.npz"),
                "--svg",
                str(tmp_path / "p.svg"),
                "--html",
                str(tmp_path / "p.html"),
                "--json",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "p.json").read_text())
    assert (
        schema_errors(doc, NEURONPEDIA_GRAPH_SCHEMA) == []
        and doc["metadata"]["scan"] == "gemma-3-270m"
    )
    assert doc["metadata"]["prompt_tokens"][0] == "<bos>" and to_neuronpedia_json(p)["nodes"]


def test_numpy_values_in_metadata_save_and_subgraph(tmp_path):
    g = synthetic_graph(n_features=20, seed=24)
    g.metadata.update(scale=np.float32(1.5), ids=np.arange(3))
    g.save(tmp_path / "g.npz")
    h = load_graph(tmp_path / "g.npz")
    assert h.metadata["scale"] == 1.5 and h.metadata["ids"] == [0, 1, 2]
    assert g.subgraph(np.arange(10)).metadata["ids"] == [0, 1, 2]
