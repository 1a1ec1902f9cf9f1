"""networkx round trip and the circuit-tracer / Neuronpedia graph JSON (circuits/export.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from test_render import synthetic_graph

from circuits.export import neuronpedia_node_ids, to_neuronpedia_json, write_neuronpedia_json
from circuits.graph import ERROR, FEATURE, TOKEN, graph_from_networkx, graph_to_networkx
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
    infl = [
        n["influence"]
        for n in nodes
        if n["feature_type"] in ("cross layer transcoder", "mlp reconstruction error")
    ]
    assert all(v is not None and 0 < v <= 1.0 for v in infl)
    if (
        pruned
    ):  # cumulative shares relative to the full graph: the kept nodes stay near the node threshold
        assert max(infl) <= 0.8 + 0.1
    else:
        assert max(infl) == pytest.approx(1.0)


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
