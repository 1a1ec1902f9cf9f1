"""networkx round trip and the circuit-tracer / Neuronpedia graph JSON (circuits/export.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from test_prune import brute_force_influence
from test_render import example_dashboard, synthetic_graph

from circuits.export import (
    VIEWER_INDEX,
    add_to_viewer_index,
    neuronpedia_model_id,
    neuronpedia_node_ids,
    neuronpedia_upload_problem,
    to_neuronpedia_json,
    write_feature_details,
    write_neuronpedia_json,
)
from circuits.graph import ERROR, FEATURE, TOKEN, graph_from_networkx, graph_to_networkx, load_graph
from circuits.pruning import prune
from gemma_lm.errors import UserError

# The attribution-graph JSON schema of Neuronpedia's viewer (neuronpedia, apps/webapp/app/api/graph/
# graph-schema.json, "Anthropic Attribution Graph" v1.0.0): its fields, types and required lists.
NEURONPEDIA_GRAPH_SCHEMA = {
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["slug", "scan", "prompt_tokens", "prompt"],
            "properties": {
                "slug": {"type": "string"},
                "scan": {"type": "string"},
                "prompt_tokens": {"type": "array", "items": {"type": "string"}},
                "prompt": {"type": "string"},
                "feature_details": {
                    "type": "object",
                    "properties": {
                        "feature_json_base_url": {"type": "string"},
                        "neuronpedia_source_set": {"type": "string"},
                        "neuronpedia_lorsa_source_set": {"type": "string"},
                    },
                },
                "node_threshold": {"type": "number"},
                "info": {
                    "type": "object",
                    "properties": {
                        "description": {"type": "string"},
                        "creator_name": {"type": "string"},
                        "creator_url": {"type": "string"},
                        "source_urls": {"type": "array"},
                        "generator": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "version": {"type": "string"},
                                "url": {"type": "string"},
                                "email": {"type": "string"},
                            },
                        },
                        "create_time_ms": {"type": "number"},
                    },
                },
                "generation_settings": {
                    "type": "object",
                    "properties": {
                        "max_n_logits": {"type": "integer"},
                        "desired_logit_prob": {"type": "number"},
                        "batch_size": {"type": "integer"},
                        "max_feature_nodes": {"type": "integer"},
                    },
                },
                "pruning_settings": {
                    "type": "object",
                    "properties": {
                        "node_threshold": {"type": "number"},
                        "edge_threshold": {"type": "number"},
                    },
                },
            },
        },
        "qParams": {
            "type": "object",
            "required": [],
            "properties": {
                "pinnedIds": {"type": "array", "items": {"type": "string"}},
                "supernodes": {"type": "array"},
                "linkType": {"type": "string"},
                "clickedId": {"type": "string"},
                "sg_pos": {"type": "string"},
            },
        },
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "node_id",
                    "feature",
                    "layer",
                    "ctx_idx",
                    "feature_type",
                    "jsNodeId",
                    "clerp",
                ],
                "properties": {
                    "node_id": {"type": "string"},
                    "feature": {"type": ["integer", "null"]},
                    "layer": {"type": ["string", "integer"]},
                    "ctx_idx": {"type": "integer"},
                    "feature_type": {"type": "string"},
                    "jsNodeId": {"type": "string"},
                    "clerp": {"type": "string"},
                    "influence": {"type": ["number", "null"]},
                    "activation": {"type": ["number", "null"]},
                },
            },
        },
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["source", "target", "weight"],
                "properties": {
                    "source": {"type": "string"},
                    "target": {"type": "string"},
                    "weight": {"type": "number"},
                },
            },
        },
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "null": type(None), "boolean": bool}


def _is(value, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[t])


def schema_errors(value, schema: dict, where: str = "$") -> list[str]:
    """The draft-07 subset the schema uses: type (one or a list), required, properties, items."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(value, t) for t in types):
            return [f"{where}: {type(value).__name__} is not {'/'.join(types)}"]
    errors = []
    if isinstance(value, dict):
        errors += [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                errors += schema_errors(value[k], sub, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


# -- networkx --------------------------------------------------------------------------------------


def assert_same_graph(a, b):
    assert a.prompt == b.prompt and a.token_strings == b.token_strings and a.n_layers == b.n_layers
    np.testing.assert_array_equal(a.tokens, b.tokens)
    for name in ("kind", "layer", "pos", "feature", "has_row", "logit_probabilities"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("activation", "node_input", "row_constant"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6, err_msg=name)
    assert (a.adjacency != b.adjacency).nnz == 0
    assert a.labels == b.labels and a.metadata == b.metadata
    if a.influence is None:
        assert b.influence is None
    else:
        np.testing.assert_allclose(a.influence, b.influence, rtol=1e-6)


def test_networkx_carries_everything():
    g = synthetic_graph(n_features=50, seed=3)
    i_label = next(iter(g.labels))
    nxg = graph_to_networkx(g)
    assert nxg.number_of_nodes() == g.n_nodes and nxg.number_of_edges() == g.adjacency.nnz
    for i, nid in enumerate(g.node_ids()):
        d = nxg.nodes[nid]
        assert {
            "kind",
            "layer",
            "pos",
            "token",
            "feature",
            "activation",
            "influence",
            "label",
        } <= set(d)
        assert d["layer"] == g.layer[i] and d["pos"] == g.pos[i] and d["feature"] == g.feature[i]
        assert d["influence"] == pytest.approx(float(g.influence[i]))
    assert nxg.nodes[g.node_id(i_label)]["label"] == g.labels[i_label]
    assert nxg.nodes[g.node_id(i_label)]["label_source"] == "human"
    tok = g.nodes_of(TOKEN)[3]
    assert nxg.nodes[g.node_id(tok)]["token"] == g.token_strings[3]
    logit = g.logit_nodes[0]
    assert nxg.nodes[g.node_id(logit)]["token"] == " Austin"
    assert nxg.nodes[g.node_id(logit)]["probability"] == pytest.approx(
        float(g.logit_probabilities[0])
    )
    coo = g.adjacency.tocoo()
    t, s, w = coo.row[0], coo.col[0], coo.data[0]
    assert nxg.edges[g.node_id(s), g.node_id(t)]["weight"] == pytest.approx(float(w))


@pytest.mark.parametrize("influence", [True, False])
def test_networkx_round_trip(influence):
    g = synthetic_graph(n_features=70, seed=4, with_influence=influence)
    assert_same_graph(g, graph_from_networkx(graph_to_networkx(g)))
    assert_same_graph(g, g.from_networkx(g.to_networkx()))


def test_networkx_round_trip_restores_node_order():
    import networkx as nx

    g = prune(synthetic_graph(n_features=90, seed=5))
    nxg = graph_to_networkx(g)
    ids = list(nxg.nodes)
    random.Random(0).shuffle(ids)
    shuffled = nx.DiGraph(**nxg.graph)
    shuffled.add_nodes_from((i, nxg.nodes[i]) for i in ids)
    shuffled.add_edges_from(nxg.edges(data=True))
    assert_same_graph(g, graph_from_networkx(shuffled))


def test_networkx_bad_input():
    import networkx as nx

    bad = nx.DiGraph()
    bad.add_node("x", kind="feature", layer=0)
    with pytest.raises(UserError, match="lacks"):
        graph_from_networkx(bad)
    bad.add_node("y", kind="neuron", layer=0, pos=0, feature=1)
    bad.nodes["x"].update(pos=0, feature=0)
    with pytest.raises(UserError, match="kind"):
        graph_from_networkx(bad)


def test_auto_labels_from_dashboards():
    g = synthetic_graph(n_features=40, seed=6, with_labels=False)
    f = int(g.nodes_of(FEATURE)[0])
    g.metadata["dashboards"] = {g.node_id(f): {"auto_label": "Texas cities", "density": 0.01}}
    d = graph_to_networkx(g).nodes[g.node_id(f)]
    assert d["label"] == "Texas cities" and d["label_source"] == "auto"
    # auto labels are not human labels
    assert graph_from_networkx(graph_to_networkx(g)).labels == {}
    doc = to_neuronpedia_json(g)
    assert doc["nodes"][f]["clerp"] == "Texas cities"


# -- Neuronpedia / circuit-tracer JSON -------------------------------------------------------------


def test_schema_validator_can_fail():
    doc = to_neuronpedia_json(prune(synthetic_graph(n_features=30)))
    assert schema_errors(doc, NEURONPEDIA_GRAPH_SCHEMA) == []
    broken = json.loads(json.dumps(doc))
    del broken["metadata"]["scan"]
    broken["nodes"][0]["ctx_idx"] = "3"
    broken["links"][0]["weight"] = None
    errors = schema_errors(broken, NEURONPEDIA_GRAPH_SCHEMA)
    assert len(errors) == 3 and any("scan" in e for e in errors)


@pytest.mark.parametrize("pruned", [True, False])
def test_neuronpedia_json_matches_the_schema(tmp_path, pruned):
    g = synthetic_graph(n_features=150, seed=7, with_influence=False)
    g.metadata["settings"] = {
        "max_n_logits": 10,
        "desired_logit_prob": 0.95,
        "batch_size": 256,
        "max_feature_nodes": 8192,
        "device": "cpu",
    }
    if pruned:
        g = prune(g)
    path = write_neuronpedia_json(g, tmp_path / "dallas-austin.json", scan="gemma-3-270m")
    doc = json.loads(path.read_text())
    assert schema_errors(doc, NEURONPEDIA_GRAPH_SCHEMA) == []
    meta = doc["metadata"]
    assert meta["slug"] == "dallas-austin" and meta["scan"] == "gemma-3-270m"
    assert meta["prompt_tokens"] == g.token_strings and meta["prompt"] == g.prompt
    assert meta["generation_settings"] == {
        "max_n_logits": 10,
        "desired_logit_prob": 0.95,
        "batch_size": 256,
        "max_feature_nodes": 8192,
    }
    if pruned:
        assert meta["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}

    nodes = doc["nodes"]
    ids = [n["node_id"] for n in nodes]
    assert len(set(ids)) == len(ids) == g.n_nodes and ids == neuronpedia_node_ids(g)
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    assert len(doc["links"]) == g.adjacency.nnz
    kinds = {
        t: [n for n in nodes if n["feature_type"] == t]
        for t in ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")
    }
    assert len(kinds["embedding"]) == g.n_pos and len(kinds["logit"]) == len(g.logit_nodes)
    for n, i in zip(kinds["cross layer transcoder"], g.nodes_of(FEATURE)):
        L, f, p = int(g.layer[i]), int(g.feature[i]), int(g.pos[i])
        assert n["node_id"] == f"{L}_{f}_{p}" and n["layer"] == str(L) and n["ctx_idx"] == p
        assert n["feature"] == (L + f) * (L + f + 1) // 2 + f  # Cantor pairing of (layer, feature)
        assert n["jsNodeId"] == f"{L}_{f}-0" and n["activation"] == pytest.approx(
            float(g.activation[i])
        )
    for n, i in zip(kinds["mlp reconstruction error"], g.nodes_of(ERROR)):
        assert n["node_id"] == f"{g.layer[i]}_-1_{g.pos[i]}" and n["feature"] == -1
    for n in kinds["embedding"]:
        assert (
            n["layer"] == "E" and n["node_id"] == f"E_{int(g.tokens[n['ctx_idx']])}_{n['ctx_idx']}"
        )
    logits = kinds["logit"]
    assert logits[0]["is_target_logit"] and not any(n["is_target_logit"] for n in logits[1:])
    for n, s, p in zip(logits, g.logit_strings, g.logit_probabilities):
        assert n["layer"] == str(g.n_layers + 1)
        # the viewer reads the token and probability back out of the clerp
        assert n["clerp"].split('"')[1] == s and float(
            n["clerp"].split("(p=")[1].split(")")[0]
        ) == pytest.approx(p, abs=5e-4)
        assert n["token_prob"] == pytest.approx(float(p))
    infl = [n["influence"] for n in nodes if n["feature_type"] != "logit"]
    assert all(v is not None and 0 < v <= 1.0 for v in infl)
    assert all(n["influence"] is None for n in logits)
    if pruned:  # the viewer's slider starts where it shows every node of the circuit
        inner = [n["influence"] for n in nodes if n["feature_type"] not in ("embedding", "logit")]
        assert max(inner) <= meta["node_threshold"] < max(inner) + 0.01
    else:  # shares of the whole graph, tokens included: the least influential node holds 1.0
        assert max(infl) == pytest.approx(1.0) and "node_threshold" not in meta


def test_neuronpedia_json_supernodes():
    g = prune(synthetic_graph(n_features=80, seed=8))
    members = [g.node_id(i) for i in g.nodes_of(FEATURE)[:3]]
    g.metadata["supernodes"] = {"Texas": members + ["f:99:99:99"]}
    doc = to_neuronpedia_json(g)
    ids = neuronpedia_node_ids(g)
    assert doc["qParams"]["supernodes"] == [["Texas"] + [ids[g.index_of(m)] for m in members]]
    assert schema_errors(doc, NEURONPEDIA_GRAPH_SCHEMA) == []


def test_neuronpedia_json_with_jsonschema():
    jsonschema = pytest.importorskip("jsonschema")
    doc = to_neuronpedia_json(prune(synthetic_graph(n_features=60, seed=9)))
    jsonschema.validate(doc, NEURONPEDIA_GRAPH_SCHEMA)
    assert all(
        n["feature_type"]
        in ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")
        for n in doc["nodes"]
    )
    assert {n["feature_type"] for n in doc["nodes"] if n["influence"] is None} <= {
        "embedding",
        "logit",
    }
    assert (
        np.asarray([n["ctx_idx"] for n in doc["nodes"] if n["feature_type"] == "logit"]) == 8
    ).all()
    del doc["links"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, NEURONPEDIA_GRAPH_SCHEMA)


def test_supernode_groups_accepts_every_grouping_form():
    from circuits.graph import supernode_groups

    want = {"Texas": ["f:1:2:3"], "say a capital": ["e:0:1", "f:5:6:7"]}
    assert supernode_groups(want) == want
    assert supernode_groups({"format": "gemma-circuits-supernodes", "supernodes": want}) == want
    assert supernode_groups([{"name": k, "members": v} for k, v in want.items()]) == want
    # Neuronpedia's qParams form
    assert supernode_groups([[k, *v] for k, v in want.items()]) == want
    for bad in ([1, 2], {"Texas": "f:1:2:3"}, "Texas"):
        with pytest.raises(UserError):
            supernode_groups(bad)


# -- labels and feature dashboards in the viewers' formats ----------------------------------------

# The per-feature JSON Neuronpedia's viewer fetches from `feature_json_base_url`/<feature>.json
# (neuronpedia, apps/webapp/app/api/graph/feature-details-schema.json), with the fields
# circuit-tracer's local viewer reads besides (circuit_tracer/frontend/assets/feature_examples/ and
# attribution_graph/render-act-histogram.js: act_min/act_max colour scale, train_token_ind,
# is_repeated_datapoint, activation_frequency).
NEURONPEDIA_FEATURE_SCHEMA = {
    "type": "object",
    "required": ["index", "examples_quantiles"],
    "properties": {
        "index": {"type": "number"},
        "examples_quantiles": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["quantile_name", "examples"],
                "properties": {
                    "quantile_name": {"type": "string"},
                    "examples": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["tokens_acts_list", "tokens"],
                            "properties": {
                                "tokens_acts_list": {"type": "array", "items": {"type": "number"}},
                                "tokens": {"type": "array", "items": {"type": "string"}},
                                "train_token_ind": {"type": "integer"},
                                "is_repeated_datapoint": {"type": "boolean"},
                            },
                        },
                    },
                },
            },
        },
        "top_logits": {"type": "array", "items": {"type": "string"}},
        "bottom_logits": {"type": "array", "items": {"type": "string"}},
        "act_min": {"type": "number"},
        "act_max": {"type": "number"},
        "activation_frequency": {"type": "number"},
    },
}


def dashboard_graph(seed: int = 30):
    """A graph whose last 10 features carry dashboards (6 of them human labels too)."""
    return synthetic_graph(n_features=60, seed=seed, dashboards=True)


def test_clerps_are_human_else_auto_labels():
    g = dashboard_graph()
    doc = to_neuronpedia_json(g)
    seen = {"human": 0, "auto": 0, "default": 0}
    for i in g.nodes_of(FEATURE):
        dash = g.feature_dashboard(int(i))
        clerp = doc["nodes"][i]["clerp"]
        if int(i) in g.labels:
            assert clerp == g.labels[int(i)]
            seen["human"] += 1
        elif dash:
            assert clerp == dash["auto_label"] and clerp.startswith("Dallas/Texas")
            seen["auto"] += 1
        else:
            assert clerp == ""
            seen["default"] += 1
    assert all(seen.values()), seen  # the graph exercises all three cases


def test_feature_files_in_the_viewers_format(tmp_path):
    g = dashboard_graph()
    doc = to_neuronpedia_json(g)
    n = write_feature_details(g, tmp_path / "f")
    with_dash = {
        doc["nodes"][i]["feature"]: g.feature_dashboard(int(i))
        for i in g.nodes_of(FEATURE)
        if g.feature_dashboard(int(i))
    }
    assert n == len(with_dash) > 0
    assert {int(p.stem) for p in (tmp_path / "f").glob("*.json")} == set(with_dash)
    for index, dash in with_dash.items():
        detail = json.loads((tmp_path / "f" / f"{index}.json").read_text())
        assert schema_errors(detail, NEURONPEDIA_FEATURE_SCHEMA) == []
        assert detail["index"] == index
        assert detail["top_logits"] == [t for t, _ in dash["top_promoted"]]
        assert detail["bottom_logits"] == [t for t, _ in dash["top_suppressed"]]
        examples = detail["examples_quantiles"][0]["examples"]
        assert [e["tokens"] for e in examples] == [c["tokens"] for c in dash["top_contexts"]]
        assert [e["tokens_acts_list"] for e in examples] == [
            c["acts"] for c in dash["top_contexts"]
        ]
        assert all(e["tokens"][e["train_token_ind"]] == " Dallas" for e in examples)
        assert detail["act_max"] >= max(max(c["acts"]) for c in dash["top_contexts"])
        assert detail["activation_frequency"] == dash["density"]
    # a later export of a smaller circuit removes the files of the features it no longer has
    (tmp_path / "f" / "notes.txt").write_text("mine")
    g.feature_dashboards = {}
    assert write_feature_details(g, tmp_path / "f") == 0
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["notes.txt"]
    assert schema_errors({"index": 1}, NEURONPEDIA_FEATURE_SCHEMA)  # the schema can fail


def test_features_url_goes_into_feature_details():
    doc = to_neuronpedia_json(dashboard_graph(), features_url="https://example.org/f/")
    assert doc["metadata"]["feature_details"] == {"feature_json_base_url": "https://example.org/f"}
    assert schema_errors(doc, NEURONPEDIA_GRAPH_SCHEMA) == []
    assert "feature_details" not in to_neuronpedia_json(dashboard_graph())["metadata"]


# -- slug and scan ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file_name, slug",
    [
        ("dallas-austin", "dallas-austin"),
        ("Dallas → Austin (v2)", "Dallas-Austin-v2"),
        ("café au lait", "cafe-au-lait"),
        (".hidden_graph.", "hidden_graph"),
        ("日本", "graph"),
        ("x", "x"),
    ],
)
def test_default_slug_is_made_safe(tmp_path, file_name, slug):
    g = synthetic_graph(n_features=30, seed=31)
    path = write_neuronpedia_json(g, tmp_path / f"{file_name}.json")
    assert json.loads(path.read_text())["metadata"]["slug"] == slug


def test_prompt_slug_is_made_safe():
    g = synthetic_graph(n_features=30, seed=31)
    g.prompt = "Où est Zürich? 日本"
    assert to_neuronpedia_json(g)["metadata"]["slug"] == "ou-est-zurich"


@pytest.mark.parametrize("slug", ["my graph", "-x1", "..", "../up", "dallas/austin", "é-1"])
def test_explicit_bad_slug_is_refused(slug):
    with pytest.raises(UserError, match=r"a-z A-Z 0-9 _ \. -") as e:
        to_neuronpedia_json(synthetic_graph(n_features=30, seed=31), slug=slug)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "model, scan",
    [
        ("gemma-3-270m", "gemma-3-270m"),  # gemma_lm.models.DEFAULT_MODEL
        ("google/gemma-3-270m", "gemma-3-270m"),
        ("google/gemma-3-1b-pt", "gemma-3-1b"),
        ("google/gemma-3-1b-it", "gemma-3-1b-it"),
        ("google/gemma-3-4b-it", "gemma-3-4b-it"),
        ("google/gemma-3-27b-pt", "gemma-3-27b"),
        ("gemma-3-270m-it-Q4_K_M", "gemma-3-270m-it"),  # a .gguf file's stem
        ("models/gemma-3-12b-it-qat-q4_0.gguf", "gemma-3-12b-it"),
        ("gemma3-270m-q4-k-m", "gemma-3-270m"),
        ("/data/ckpt/Gemma-3-1B-IT", "gemma-3-1b-it"),
        ("my finetune", "my-finetune"),  # unknown: only made safe
    ],
)
def test_scan_is_neuronpedias_model_id(model, scan):
    g = synthetic_graph(n_features=30, seed=31)
    g.metadata["model"] = model
    assert neuronpedia_model_id(model) == scan
    assert to_neuronpedia_json(g)["metadata"]["scan"] == scan
    assert to_neuronpedia_json(g, scan="gemma-2-2b")["metadata"]["scan"] == "gemma-2-2b"


@pytest.mark.parametrize("scan", ["google/gemma-3-1b-pt", "gemma 3", "gemma-3-1b.gguf?", ""])
def test_explicit_bad_scan_is_refused(scan):
    g = synthetic_graph(n_features=30, seed=31)
    if not scan:  # an empty --scan means "the default"
        assert to_neuronpedia_json(g, scan=scan)["metadata"]["scan"] == "synthetic"
        return
    with pytest.raises(UserError, match="model id") as e:
        to_neuronpedia_json(g, scan=scan)
    assert "\n" not in str(e.value)


# -- the pruning slider ----------------------------------------------------------------------------


def slider_keeps(node_influence: dict[str, float | None], slider: float) -> set[str]:
    """The feature and error nodes the viewers show at `slider` (circuit-tracer's util-cg.js
    formatData: embeddings and logits always, other nodes while influence <= slider)."""
    return {k for k, v in node_influence.items() if v is not None and v <= slider}


def circuit_tracer_shares(graph) -> dict[str, float]:
    """The definition circuit-tracer's prune_graph writes as node influence: node influence
    w^T (A + A^2 + ...) over every node of the full graph (tokens included), and for each node the
    share of the total held by the nodes at least as influential as it."""
    influence = brute_force_influence(graph)
    total = influence.sum()
    ids = neuronpedia_node_ids(graph)
    return {
        ids[i]: influence[influence >= influence[i]].sum() / total
        for i in range(graph.n_nodes)
        if graph.kind[i] in (FEATURE, ERROR)
    }


def json_influence(doc) -> dict[str, float | None]:
    inner = ("cross layer transcoder", "mlp reconstruction error")
    return {n["node_id"]: n["influence"] for n in doc["nodes"] if n["feature_type"] in inner}


@pytest.mark.parametrize("seed", [7, 32])
def test_slider_keeps_what_circuit_tracer_keeps(seed):
    g = synthetic_graph(n_features=150, seed=seed, with_influence=False)
    reference = circuit_tracer_shares(g)
    ranked = [v for v in reference.values() if v < 1.0]  # the rest have no influence at all
    assert len(set(ranked)) == len(ranked) > 20  # no ties: the order is the definition's
    ours = json_influence(to_neuronpedia_json(g))
    for slider in (0.3, 0.5, 0.8, 0.95):
        assert slider_keeps(ours, slider) == slider_keeps(reference, slider), slider
    # tokens hold influence here, so leaving them out (the old convention) keeps other nodes
    influence = brute_force_influence(g)
    inner = np.isin(g.kind, (FEATURE, ERROR))
    share = {
        nid: influence[inner & (influence >= influence[i])].sum() / influence[inner].sum()
        for nid, i in zip(neuronpedia_node_ids(g), range(g.n_nodes))
        if inner[i]
    }
    assert slider_keeps(share, 0.8) != slider_keeps(reference, 0.8)


def test_slider_on_a_pruned_graph():
    g = synthetic_graph(n_features=150, seed=7, with_influence=False)
    p = prune(g)
    reference = circuit_tracer_shares(g)
    exact = json_influence(to_neuronpedia_json(p, full=g))
    assert set(exact) <= set(reference)
    for slider in (0.5, 0.8):
        assert slider_keeps(exact, slider) == slider_keeps(reference, slider) & set(exact)
    # without the full graph: ranked among the kept nodes, against the full graph's total, so a
    # share misses at most the influence of the nodes pruning dropped
    alone = json_influence(to_neuronpedia_json(p))
    influence = brute_force_influence(g)
    kept = set(neuronpedia_node_ids(p))
    dropped = sum(v for v, nid in zip(influence, neuronpedia_node_ids(g)) if nid not in kept)
    for nid, v in alone.items():
        assert exact[nid] - dropped / influence.sum() - 1e-6 <= v <= exact[nid] + 1e-6
    with pytest.raises(UserError, match="full graph"):
        to_neuronpedia_json(g, full=p)


# -- circuit-tracer's local viewer -----------------------------------------------------------------


def viewer_feature_file(directory, doc, node) -> Path:
    """Where circuit-tracer's local viewer fetches a feature node's dashboard from: a `scan` that
    starts with ./ is a path beside the page (init-feature-examples.js loadFeature:
    `${scan}/${feature}.json`), and its local server answers /graph_data/X from its data folder
    (local_server.py)."""
    scan = doc["metadata"]["scan"]
    assert scan.startswith("./graph_data/")
    return Path(directory) / scan[len("./graph_data/") :] / f"{node['feature']}.json"


def test_viewer_index(tmp_path):
    folder = tmp_path / "viewer"
    g = dashboard_graph()
    path = add_to_viewer_index(g, folder, slug="dallas")
    assert path == folder / "dallas.json"
    doc = json.loads(path.read_text())
    assert schema_errors(doc, NEURONPEDIA_GRAPH_SCHEMA) == []
    index = json.loads((folder / VIEWER_INDEX).read_text())
    assert index == {"graphs": [doc["metadata"]]}
    with_dash = [n for i, n in enumerate(doc["nodes"]) if g.feature_dashboard(i)]
    assert with_dash
    for node in with_dash:
        detail = json.loads(viewer_feature_file(folder, doc, node).read_text())
        assert detail["index"] == node["feature"]

    # another graph, then the first again: its entry is replaced, the others stay, in order
    other = synthetic_graph(n_features=40, seed=33)
    add_to_viewer_index(other, folder, slug="other", scan="gemma-3-1b")
    entries = json.loads((folder / VIEWER_INDEX).read_text())["graphs"]
    assert [e["slug"] for e in entries] == ["dallas", "other"]
    assert entries[1]["scan"] == "gemma-3-1b"  # no dashboards: the model id stays
    g.prompt = "changed"
    add_to_viewer_index(g, folder, slug="dallas")
    entries = json.loads((folder / VIEWER_INDEX).read_text())["graphs"]
    assert [(e["slug"], e["prompt"]) for e in entries][-1] == ("dallas", "changed")
    assert [e["slug"] for e in entries] == ["other", "dallas"]
    assert not list(folder.glob(".graph-metadata.json.*.partial"))


def test_viewer_index_keeps_every_concurrent_entry(tmp_path):
    import threading

    g = synthetic_graph(n_features=40, seed=34)
    (tmp_path / VIEWER_INDEX).write_text(json.dumps({"graphs": [{"slug": "theirs", "x": 1}]}))
    threads = [
        threading.Thread(target=add_to_viewer_index, args=(g, tmp_path, f"g{k}")) for k in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = json.loads((tmp_path / VIEWER_INDEX).read_text())["graphs"]
    assert {e["slug"] for e in entries} == {"theirs", *(f"g{k}" for k in range(8))}
    assert entries[0] == {"slug": "theirs", "x": 1}


def test_viewer_index_refuses_a_foreign_file(tmp_path):
    (tmp_path / VIEWER_INDEX).write_text('{"graphs": {"a": 1}}')
    with pytest.raises(UserError, match="graph list"):
        add_to_viewer_index(synthetic_graph(n_features=30, seed=35), tmp_path, slug="g1")
    assert json.loads((tmp_path / VIEWER_INDEX).read_text()) == {"graphs": {"a": 1}}


# -- what Neuronpedia's upload checks --------------------------------------------------------------

# Neuronpedia's upload (neuronpedia, apps/webapp/app/api/graph/): signed-put/route.ts takes a file
# name ending in .json and a contentLength of min 1024 and max MAX_GRAPH_UPLOAD_SIZE_BYTES
# (app/[modelId]/graph/utils.ts: 100 * 1024 * 1024); save-to-db/route.ts validates the document
# against graph-schema.json (NEURONPEDIA_GRAPH_SCHEMA above) and refuses a metadata.scan or
# metadata.slug matching /[^a-zA-Z0-9_.-]/ (no length limit: GRAPH_SLUG_MIN in lib/utils/graph.ts
# applies to the graphs Neuronpedia generates itself).
UPLOAD_RULES = {
    "suffix": ".json",
    "min_bytes": 1024,
    "max_bytes": 100 * 1024 * 1024,
    "bad_name_chars": r"[^a-zA-Z0-9_.-]",
}


def upload_refusals(path) -> list[str]:
    """What the upload would refuse in the file `path`, from UPLOAD_RULES and the schema."""
    import re

    size = path.stat().st_size
    out = [] if path.suffix == UPLOAD_RULES["suffix"] else ["suffix"]
    if not UPLOAD_RULES["min_bytes"] <= size <= UPLOAD_RULES["max_bytes"]:
        return [*out, "size"]
    doc = json.loads(path.read_text())
    out += schema_errors(doc, NEURONPEDIA_GRAPH_SCHEMA)
    for key in ("scan", "slug"):
        value = doc["metadata"].get(key, "")
        if re.search(UPLOAD_RULES["bad_name_chars"], value) or not value:
            out.append(key)
    return out


def test_upload_rules(tmp_path):
    from circuits.cli import run

    src = tmp_path / "Dallas → Austin.npz"
    g = synthetic_graph(n_features=120, seed=36, dashboards=True)
    g.metadata["model"] = "google/gemma-3-1b-it"
    g.save(src)
    out = tmp_path / "up load.json"
    assert run(["render", str(src), "--json", str(out)]) == 0
    assert upload_refusals(out) == []
    meta = json.loads(out.read_text())["metadata"]
    assert meta["slug"] == "up-load" and meta["scan"] == "gemma-3-1b-it"
    assert neuronpedia_upload_problem(out) is None
    # the rules can fail, and our check of a file agrees with them
    broken = tmp_path / "broken.json"
    doc = json.loads(out.read_text())
    doc["metadata"]["scan"] = "google/gemma-3-1b-it"
    broken.write_text(json.dumps(doc))
    assert upload_refusals(broken) == ["scan"]
    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: takes no disk
        f.truncate(UPLOAD_RULES["max_bytes"] + 1)
    assert upload_refusals(big) == ["size"] and "upload limit" in neuronpedia_upload_problem(big)
    small = tmp_path / "small.json"
    small.write_text("{}")
    assert upload_refusals(small) == ["size"] and "1024" in neuronpedia_upload_problem(small)
    other = tmp_path / "g.txt"
    other.write_text(out.read_text())
    assert upload_refusals(other) == ["suffix"] and ".json" in neuronpedia_upload_problem(other)


def test_render_json_and_index_command(tmp_path, capsys):
    from circuits.cli import run

    src = tmp_path / "g.npz"
    g = synthetic_graph(n_features=120, seed=37, with_influence=False, dashboards=True)
    g.feature_dashboards = {  # every feature: the circuit keeps some
        f"{g.layer[i]}/{g.feature[i]}": example_dashboard(3) for i in g.nodes_of(FEATURE)
    }
    g.save(src)
    out, folder = tmp_path / "c.json", tmp_path / "viewer"
    argv = ["render", str(src), "--json", str(out), "--index", str(folder)]
    url = ["--features-url", "https://example.org/c-features"]
    assert run([*argv, *url]) == 0
    printed = capsys.readouterr().out
    assert "dashboards of" in printed and VIEWER_INDEX in printed
    doc = json.loads(out.read_text())
    assert doc["metadata"]["slug"] == "c" and doc["metadata"]["scan"] == "synthetic"
    base = doc["metadata"]["feature_details"]["feature_json_base_url"]
    assert base == "https://example.org/c-features"
    features = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    served = {int(p.stem) for p in (tmp_path / "c-features").glob("*.json")}
    assert served and served <= {n["feature"] for n in features}
    local = json.loads((folder / "c.json").read_text())
    assert local["metadata"]["scan"] == "./graph_data/features/c"
    assert json.loads((folder / VIEWER_INDEX).read_text())["graphs"][0]["slug"] == "c"
    # the unpruned graph was pruned here, and the JSON has the exact circuit-tracer shares
    reference = circuit_tracer_shares(load_graph(src))
    ours = json_influence(doc)
    assert slider_keeps(ours, 0.8) == slider_keeps(reference, 0.8) & set(ours)

    for bad, message in [
        (["--slug", "my graph"], "a-z A-Z"),
        (["--scan", "google/gemma-3-1b-pt"], "model id"),
        (["--features-url", "example.org"], "http"),
    ]:
        assert run([*argv, *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert run(["render", str(src), "--html", str(tmp_path / "c.html"), "--slug", "ok1"]) == 2
    assert "go with --json" in capsys.readouterr().err
