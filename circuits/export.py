"""Attribution graphs for other tools: networkx (both ways) and the graph JSON of circuit-tracer and
Neuronpedia's attribution-graph viewer (`metadata`, `qParams`, `nodes`, `links`; see
neuronpedia's `graph-schema.json`), so a graph opens there.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from . import __version__
from .errors import UserError
from .graph import ERROR, FEATURE, KIND_NAMES, LOGIT, TOKEN, AttributionGraph, atomic_write_text

NEURONPEDIA_FEATURE_TYPES = {
    FEATURE: "cross layer transcoder",
    ERROR: "mlp reconstruction error",
    TOKEN: "embedding",
    LOGIT: "logit",
}


# -- labels -------------------------------------------------------------------------------------------


def auto_label(graph: AttributionGraph, i: int) -> str | None:
    """The feature dashboard's automatic label of node i (`metadata["dashboards"][id]["auto_label"]`)."""
    dash = (graph.metadata or {}).get("dashboards") or {}
    label = (dash.get(graph.node_id(i)) or {}).get("auto_label") if isinstance(dash, dict) else None
    return str(label) if label else None


def display_label(graph: AttributionGraph, i: int) -> tuple[str, str]:
    """(label, source): the human label, else the dashboard's auto label, else the default short label."""
    if i in graph.labels:
        return graph.labels[i], "human"
    auto = auto_label(graph, i)
    if auto:
        return auto, "auto"
    return graph.node_label(i), "default"


def supernode_groups(value) -> dict[str, list[str]]:
    """Supernodes as {name: [node ids]}, the form graphs and the viewer's grouping file use
    (`metadata["supernodes"]`, `{"supernodes": {...}}`). Also accepts a list of {"name", "members"} and
    Neuronpedia's [[name, id, ...], ...]."""
    inner = value.get("supernodes") if isinstance(value, dict) else None
    if isinstance(inner, dict) or (
        isinstance(inner, list) and all(isinstance(g, dict | list) for g in inner)
    ):
        value = inner  # the file wrapper, not a group named "supernodes"
    out: dict[str, list[str]] = {}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and all(
        isinstance(g, dict) or (isinstance(g, list) and g) for g in value
    ):
        items = [
            (g.get("name", ""), g.get("members", [])) if isinstance(g, dict) else (g[0], g[1:])
            for g in value
        ]
    else:
        raise UserError(
            "supernodes must be {name: [node ids]} (the viewer's 'download grouping' file)"
        )
    for name, members in items:
        if not isinstance(members, list):
            raise UserError(f"supernode {name!r} must list node ids, got {type(members).__name__}")
        out[str(name)] = [str(m) for m in members]
    return out


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


# -- networkx -----------------------------------------------------------------------------------------


def graph_to_networkx(graph: AttributionGraph):
    """A `networkx.DiGraph`: nodes keyed by `AttributionGraph.node_id`, edges source -> target.

    Node attributes: kind ("feature"/"error"/"token"/"logit"), layer, pos, token (the prompt token at pos,
    or the predicted token for logits), feature (feature id; vocabulary id for logits; -1 otherwise),
    activation, influence (None before pruning), label and label_source ("human"/"auto"/"default"),
    node_input, row_constant, has_row; logits also probability and rank. Edge attribute: weight (the direct effect).
    Graph attributes: prompt, token_ids, token_strings, n_layers, metadata."""
    import networkx as nx

    g = nx.DiGraph(
        prompt=graph.prompt,
        token_ids=[int(t) for t in graph.tokens],
        token_strings=list(graph.token_strings),
        n_layers=int(graph.n_layers),
        metadata=json.loads(json.dumps(graph.metadata, default=str)),
    )
    ids = graph.node_ids()
    logit_rank = {int(n): j for j, n in enumerate(graph.logit_nodes)}
    strings = graph.logit_strings
    for i, nid in enumerate(ids):
        k = int(graph.kind[i])
        p = int(graph.pos[i])
        label, source = display_label(graph, i)
        attrs = dict(
            kind=KIND_NAMES[k],
            layer=int(graph.layer[i]),
            pos=p,
            feature=int(graph.feature[i]),
            activation=float(graph.activation[i]),
            node_input=_num(graph.node_input[i]),
            row_constant=float(graph.row_constant[i]),
            has_row=bool(graph.has_row[i]),
            influence=None if graph.influence is None else float(graph.influence[i]),
            label=label,
            label_source=source,
            token=graph.token_strings[p] if 0 <= p < len(graph.token_strings) else None,
        )
        if k == LOGIT:
            j = logit_rank[i]
            attrs["probability"] = float(graph.logit_probabilities[j])
            attrs["rank"] = j  # order among the logit nodes
            attrs["token"] = strings[j] if j < len(strings) else None
        g.add_node(nid, **attrs)
    coo = graph.adjacency.tocoo()
    g.add_weighted_edges_from(
        (ids[s], ids[t], float(w)) for t, s, w in zip(coo.row, coo.col, coo.data)
    )
    return g


def graph_from_networkx(g) -> AttributionGraph:
    """Back from `graph_to_networkx` (or any DiGraph with the same node attributes and edge `weight`)."""
    need = ("kind", "layer", "pos", "feature")
    kinds = {name: k for k, name in enumerate(KIND_NAMES)}
    nodes = list(g.nodes(data=True))
    for nid, d in nodes:
        missing = [a for a in need if a not in d]
        if missing:
            raise UserError(
                f"networkx node {nid!r} lacks attribute(s) {', '.join(missing)}; "
                f"every node needs {', '.join(need)}"
            )
        if d["kind"] not in kinds:
            raise UserError(
                f"networkx node {nid!r} has kind {d['kind']!r}; use one of {', '.join(KIND_NAMES)}"
            )
    # canonical node order: features, errors, tokens by (layer, pos, feature); logits by rank
    order = sorted(
        range(len(nodes)),
        key=lambda i: (
            (kinds[nodes[i][1]["kind"]],)
            + (
                (nodes[i][1].get("rank", i), 0, 0)
                if nodes[i][1]["kind"] == "logit"
                else (nodes[i][1]["layer"], nodes[i][1]["pos"], nodes[i][1]["feature"])
            )
        ),
    )
    nodes = [nodes[i] for i in order]
    index = {nid: i for i, (nid, _) in enumerate(nodes)}
    n = len(nodes)
    col = lambda key, default, dtype: np.array(
        [d.get(key, default) if d.get(key) is not None else default for _, d in nodes], dtype=dtype
    )
    kind = np.array([kinds[d["kind"]] for _, d in nodes], dtype=np.int8)
    rows, cols, vals = [], [], []
    for s, t, d in g.edges(data=True):
        rows.append(index[t])
        cols.append(index[s])
        vals.append(float(d.get("weight", 0.0)))
    adj = sp.csr_array(
        (np.asarray(vals, np.float32), (np.asarray(rows, np.int64), np.asarray(cols, np.int64))),
        shape=(n, n),
    )
    has_row = np.array(
        [d.get("has_row", d["kind"] in ("feature", "logit")) for _, d in nodes], dtype=bool
    )
    influence = None
    if all(d.get("influence") is not None for _, d in nodes) and n:
        influence = col("influence", 0.0, np.float32)
    logit_idx = np.flatnonzero(kind == LOGIT)
    meta = dict(g.graph.get("metadata") or {})
    if "logit_strings" not in meta:
        meta["logit_strings"] = [nodes[i][1].get("token") or "" for i in logit_idx]
    token_strings = list(g.graph.get("token_strings") or [])
    n_pos = len(token_strings) or int(max((d["pos"] for _, d in nodes), default=-1)) + 1
    token_ids = g.graph.get("token_ids") or [-1] * n_pos
    return AttributionGraph(
        prompt=str(g.graph.get("prompt", "")),
        tokens=np.asarray(token_ids, dtype=np.int64),
        token_strings=token_strings or [""] * n_pos,
        kind=kind,
        layer=col("layer", -1, np.int32),
        pos=col("pos", 0, np.int32),
        feature=col("feature", -1, np.int64),
        activation=col("activation", 0.0, np.float32),
        node_input=col("node_input", np.nan, np.float32),
        row_constant=col("row_constant", 0.0, np.float32),
        has_row=has_row,
        adjacency=adj,
        logit_probabilities=np.array(
            [nodes[i][1].get("probability", 0.0) for i in logit_idx], np.float32
        ),
        n_layers=int(g.graph.get("n_layers", int(max((d["layer"] for _, d in nodes), default=0)))),
        metadata=meta,
        influence=influence,
        labels={
            i: d["label"] for i, (_, d) in enumerate(nodes) if d.get("label_source") == "human"
        },
    )


# -- circuit-tracer / Neuronpedia graph JSON ---------------------------------------------------------


def _cantor(x: int, y: int) -> int:
    """The viewer's single integer per (layer, feature): the Cantor pairing."""
    return (x + y) * (x + y + 1) // 2 + y


def _js_token(s: str) -> str:
    return s.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def neuronpedia_node_ids(graph: AttributionGraph) -> list[str]:
    """The viewer's node ids: `L_F_P` features, `L_-1_P` errors, `E_TOKEN_P` embeddings, `(n_layers+1)_V_P`
    logits."""
    out = []
    for i in range(graph.n_nodes):
        k, L, p, f = (
            int(graph.kind[i]),
            int(graph.layer[i]),
            int(graph.pos[i]),
            int(graph.feature[i]),
        )
        if k == FEATURE:
            out.append(f"{L}_{f}_{p}")
        elif k == ERROR:
            out.append(f"{L}_-1_{p}")
        elif k == TOKEN:
            out.append(f"E_{int(graph.tokens[p])}_{p}")
        else:
            out.append(f"{graph.n_layers + 1}_{f}_{p}")
    return out


def to_neuronpedia_json(
    graph: AttributionGraph, slug: str | None = None, scan: str | None = None
) -> dict:
    """The graph as the viewer's JSON document (every node and edge of `graph`: prune it first).

    `influence` is the viewer's pruning key: the cumulative share of influence of the node and every more
    influential one (nodes with influence <= the viewer's threshold stay), relative to the full graph when
    the graph was pruned by `circuits.prune`."""
    from .prune import compute_influence

    meta = graph.metadata or {}
    influence = graph.influence if graph.influence is not None else compute_influence(graph)
    influence = np.nan_to_num(np.asarray(influence, dtype=np.float64))
    inner = (graph.kind == FEATURE) | (graph.kind == ERROR)
    total = (meta.get("pruning") or {}).get("total_influence") or float(
        np.clip(influence[inner], 0, None).sum()
    )
    cumulative = np.full(graph.n_nodes, np.nan)
    idx = np.flatnonzero(inner)
    order = idx[np.argsort(-influence[idx], kind="stable")]
    if total > 0:
        cumulative[order] = np.minimum(np.cumsum(np.clip(influence[order], 0, None)) / total, 1.0)
    ids = neuronpedia_node_ids(graph)
    logit_rank = {int(n): j for j, n in enumerate(graph.logit_nodes)}
    strings = graph.logit_strings
    nodes = []
    for i in range(graph.n_nodes):
        k, L, p, f = (
            int(graph.kind[i]),
            int(graph.layer[i]),
            int(graph.pos[i]),
            int(graph.feature[i]),
        )
        node = {
            "node_id": ids[i],
            "feature": None,
            "layer": str(L),
            "ctx_idx": p,
            "feature_type": NEURONPEDIA_FEATURE_TYPES[k],
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": "",
            "clerp": "",
            "influence": _num(cumulative[i]),
            "activation": None,
        }
        if k == FEATURE:
            label, source = display_label(graph, i)
            node.update(
                feature=_cantor(L, f),
                jsNodeId=f"{L}_{f}-0",
                activation=float(graph.activation[i]),
                clerp=label if source != "default" else "",
            )
        elif k == ERROR:
            node.update(feature=-1, jsNodeId=f"{L}_-1-{p}")
        elif k == TOKEN:
            node.update(feature=p, layer="E", jsNodeId=f"E_{int(graph.tokens[p])}-{p}")
        else:
            j = logit_rank[i]
            prob = float(graph.logit_probabilities[j])
            tok = strings[j] if j < len(strings) else str(f)
            node.update(
                feature=f,
                layer=str(graph.n_layers + 1),
                token_prob=prob,
                is_target_logit=j == 0,
                jsNodeId=f"L_{f}-{p}",
                clerp=f'Output "{_js_token(tok)}" (p={prob:.3f})',
            )
        nodes.append(node)
    coo = graph.adjacency.tocoo()
    links = [
        {"source": ids[s], "target": ids[t], "weight": float(w)}
        for t, s, w in zip(coo.row, coo.col, coo.data)
        if w != 0 and s != t
    ]
    settings = meta.get("settings") or {}
    pruning = meta.get("pruning") or {}
    ours = {nid: ids[i] for i, nid in enumerate(graph.node_ids())}
    supernodes = [
        [name, *[ours[m] for m in members if m in ours]]
        for name, members in supernode_groups(meta.get("supernodes") or {}).items()
    ]
    document = {
        "metadata": {
            "slug": slug or _slug(graph.prompt),
            "scan": scan or str(meta.get("model") or "gemma-3-270m"),
            "transcoder_list": [],
            "prompt_tokens": [_js_token(t) for t in graph.token_strings],
            "prompt": graph.prompt,
            "schema_version": 1,
            "info": {
                "description": f"{graph.summary()}",
                "generator": {"name": "gemma-circuits", "version": __version__},
                "create_time_ms": int(time.time() * 1000),
            },
            "generation_settings": {
                k: settings[k]
                for k in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
                if k in settings
            },
            "pruning_settings": {
                k: pruning[k] for k in ("node_threshold", "edge_threshold") if k in pruning
            },
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": supernodes,
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }
    if "node_threshold" in pruning:
        document["metadata"]["node_threshold"] = float(pruning["node_threshold"])
    transcoders = meta.get("transcoders") or {}
    if transcoders.get("source"):
        document["metadata"]["info"]["source_urls"] = [str(transcoders["source"])]
    return document


def _slug(prompt: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in prompt.lower()).split()
    return "-".join(words[:8]) or "graph"


def write_neuronpedia_json(
    graph: AttributionGraph, path: str | Path, slug: str | None = None, scan: str | None = None
) -> Path:
    """Write `to_neuronpedia_json` to `path` (atomically)."""
    path = Path(path)
    doc = to_neuronpedia_json(graph, slug or path.stem, scan)
    atomic_write_text(path, json.dumps(doc, ensure_ascii=False, allow_nan=False))
    return path
