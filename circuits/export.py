"""Attribution graphs for other tools: the graph JSON of circuit-tracer and Neuronpedia's
attribution-graph viewer (`metadata`, `qParams`, `nodes`, `links`; see neuronpedia's
`graph-schema.json`), so a graph opens there. (networkx, both ways: `AttributionGraph.to_networkx`.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from gemma_lm import __version__
from gemma_lm.files import atomic_write_text

from .graph import (
    ERROR,
    FEATURE,
    LOGIT,
    TOKEN,
    AttributionGraph,
    display_label,
    finite_or_none,
)
from .pruning import compute_influence

NEURONPEDIA_FEATURE_TYPES = {
    FEATURE: "cross layer transcoder",
    ERROR: "mlp reconstruction error",
    TOKEN: "embedding",
    LOGIT: "logit",
}


# -- circuit-tracer / Neuronpedia graph JSON -------------------------------------------------------


def _cantor(x: int, y: int) -> int:
    """The viewer's single integer per (layer, feature): the Cantor pairing."""
    return (x + y) * (x + y + 1) // 2 + y


def _js_token(s: str) -> str:
    return s.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def neuronpedia_node_ids(graph: AttributionGraph) -> list[str]:
    """The viewer's node ids: `L_F_P` features, `L_-1_P` errors, `E_TOKEN_P` embeddings,
    `(n_layers+1)_V_P` logits."""
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


def _cumulative_influence(graph: AttributionGraph) -> np.ndarray:
    """`[n_nodes]`: for each feature and error node, the share of the total influence held by it
    and every more influential one; NaN for tokens and logits."""
    influence = graph.influence if graph.influence is not None else compute_influence(graph)
    influence = np.nan_to_num(np.asarray(influence, dtype=np.float64))
    inner = (graph.kind == FEATURE) | (graph.kind == ERROR)
    total = (graph.pruning or {}).get("total_influence") or float(
        np.clip(influence[inner], 0, None).sum()
    )
    cumulative = np.full(graph.n_nodes, np.nan)
    idx = np.flatnonzero(inner)
    order = idx[np.argsort(-influence[idx], kind="stable")]
    if total > 0:
        cumulative[order] = np.minimum(np.cumsum(np.clip(influence[order], 0, None)) / total, 1.0)
    return cumulative


def _node(
    graph: AttributionGraph,
    i: int,
    ids: list[str],
    influence: float,
    logit_rank: dict[int, int],
    strings: list[str],
) -> dict:
    """Node `i` as the viewer's node record. `logit_rank`: a logit node's place among the logits;
    `strings`: the logits' token strings, in that order."""
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
        "influence": finite_or_none(influence),
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
    return node


def _links(graph: AttributionGraph, ids: list[str]) -> list[dict]:
    """Every nonzero edge but self-loops, source -> target."""
    coo = graph.adjacency.tocoo()  # rows are targets
    return [
        {"source": ids[s], "target": ids[t], "weight": float(w)}
        for t, s, w in zip(coo.row, coo.col, coo.data)
        if w != 0 and s != t
    ]


def _supernodes(graph: AttributionGraph, ids: list[str]) -> list[list[str]]:
    """`[name, *member node ids]` of each supernode, in the viewer's ids (members not in the graph
    left out)."""
    ours = {nid: ids[i] for i, nid in enumerate(graph.node_ids())}
    return [
        [name, *[ours[m] for m in members if m in ours]]
        for name, members in graph.supernodes.items()
    ]


def _document_metadata(graph: AttributionGraph, slug: str | None, scan: str | None) -> dict:
    meta, settings, pruning = graph.metadata, graph.settings, graph.pruning or {}
    out = {
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
    }
    if "node_threshold" in pruning:
        out["node_threshold"] = float(pruning["node_threshold"])
    transcoders = meta.get("transcoders") or {}
    if transcoders.get("source"):
        out["info"]["source_urls"] = [str(transcoders["source"])]
    return out


def to_neuronpedia_json(
    graph: AttributionGraph, slug: str | None = None, scan: str | None = None
) -> dict:
    """The graph as the viewer's JSON document (every node and edge of `graph`: prune it first).

    `influence` is the viewer's pruning key: the cumulative share of influence of the node and
    every more influential one (nodes with influence <= the viewer's threshold stay), relative to
    the full graph when the graph was pruned by `circuits.prune`."""
    cumulative = _cumulative_influence(graph)
    ids = neuronpedia_node_ids(graph)
    logit_rank = {int(n): j for j, n in enumerate(graph.logit_nodes)}
    strings = graph.logit_strings
    nodes = [_node(graph, i, ids, cumulative[i], logit_rank, strings) for i in range(graph.n_nodes)]
    links = _links(graph, ids)
    return {
        "metadata": _document_metadata(graph, slug, scan),
        "qParams": {
            "pinnedIds": [],
            "supernodes": _supernodes(graph, ids),
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }


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
