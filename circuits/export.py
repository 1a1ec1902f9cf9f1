"""Attribution graphs for other tools: the graph JSON of circuit-tracer and Neuronpedia's
attribution-graph viewer (`metadata`, `qParams`, `nodes`, `links`; see neuronpedia's
`graph-schema.json`), the per-feature dashboard files both viewers fetch, and the data folder of
circuit-tracer's local viewer (`graph-metadata.json`). (networkx, both ways:
`AttributionGraph.to_networkx`.)
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from pathlib import Path

import numpy as np

from gemma_lm import __version__
from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write_text, exclusive_lock
from gemma_lm.models import DEFAULT_MODEL

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

# What Neuronpedia's upload refuses (hijohnnylin/neuronpedia, apps/webapp): a scan or slug with a
# character outside [a-zA-Z0-9_.-] (app/api/graph/save-to-db/route.ts), files not named .json or
# outside 1024 bytes .. MAX_GRAPH_UPLOAD_SIZE_BYTES (app/api/graph/signed-put/route.ts,
# app/[modelId]/graph/utils.ts). It sets no length limit on uploaded slugs (GRAPH_SLUG_MIN in
# lib/utils/graph.ts is for the graphs it generates itself). Slugs here also start with a letter
# or digit, since they name files and folders (no "..").
NEURONPEDIA_MIN_UPLOAD_BYTES = 1024
NEURONPEDIA_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
_SLUG = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_SCAN = re.compile(r"[a-zA-Z0-9_.-]+")
_OUTSIDE = re.compile(r"[^a-zA-Z0-9_.-]+")
# Gemma 3 checkpoints as Neuronpedia names them: gemma-3-270m, gemma-3-1b-it, ... (no -pt)
_GEMMA3 = re.compile(r"gemma-?3-(\d+(?:\.\d+)?[mb])(-it)?(?![a-z])", re.IGNORECASE)

# circuit-tracer's local viewer lists the graphs of its data folder in this file
VIEWER_INDEX = "graph-metadata.json"


# -- names: slug and scan --------------------------------------------------------------------------


def check_slug(slug: str) -> str:
    """`slug`, or a one-line UserError unless Neuronpedia's upload takes it."""
    if not _SLUG.fullmatch(slug):
        raise UserError(
            f"slug {slug!r}: use only a-z A-Z 0-9 _ . - and start with a letter or digit "
            f"(Neuronpedia's rule for graph names)"
        )
    return slug


def check_scan(scan: str) -> str:
    """`scan`, or a one-line UserError unless Neuronpedia's upload takes it."""
    if not _SCAN.fullmatch(scan):
        raise UserError(
            f"scan {scan!r}: a Neuronpedia model id (e.g. gemma-3-1b) uses only a-z A-Z 0-9 _ . -"
        )
    return scan


def safe_slug(text: str) -> str:
    """`text` in the slug alphabet: accents dropped, every other run of characters outside it a
    '-', punctuation at the ends stripped; "graph" when nothing usable is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = _OUTSIDE.sub("-", ascii_text).strip("-_.")
    return slug if _SLUG.fullmatch(slug) else "graph"


def _prompt_slug(prompt: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in prompt.lower()).split()
    return safe_slug("-".join(words[:8]))


def neuronpedia_model_id(model: str) -> str:
    """Neuronpedia's id of the model a graph was traced with (`metadata["model"]`, the name
    `gemma_lm.load_model` gave it). Gemma 3 names, whether Hub ids (`google/gemma-3-1b-pt`), .gguf
    files (`gemma-3-270m-it-Q4_K_M.gguf`), directories or the default `gemma-3-270m`, become
    `gemma-3-<size>` or `gemma-3-<size>-it`; any other name is only made safe (Neuronpedia takes
    the models it hosts, so pass --scan)."""
    name = Path(model).name
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    found = _GEMMA3.search(name)
    if found:
        return f"gemma-3-{found[1].lower()}{'-it' if found[2] else ''}"
    return _OUTSIDE.sub("-", name).strip("-") or DEFAULT_MODEL


# -- node influence as the viewers read it ---------------------------------------------------------


def _node_influence(graph: AttributionGraph) -> np.ndarray:
    influence = graph.influence if graph.influence is not None else compute_influence(graph)
    return np.clip(np.nan_to_num(np.asarray(influence, dtype=np.float64)), 0.0, None)


def _ranked_shares(influence: np.ndarray, ranked: np.ndarray, total: float) -> np.ndarray:
    """`[n_nodes]`: at the `ranked` nodes, the share of `total` held by the node and every ranked
    node ranked before it (most influential first); NaN elsewhere, and everywhere if total is 0."""
    out = np.full(len(influence), np.nan)
    idx = np.flatnonzero(ranked)
    order = idx[np.argsort(-influence[idx], kind="stable")]
    if total > 0:
        out[order] = np.minimum(np.cumsum(influence[order]) / total, 1.0)
    return out


def viewer_influence(graph: AttributionGraph, full: AttributionGraph | None = None) -> np.ndarray:
    """`[n_nodes]`: each node's `influence` as circuit-tracer writes it and both viewers' pruning
    slider reads it (a feature or error node stays while influence <= the slider): the share of
    the influence of all nodes, token embeddings included, held by the node and every node more
    influential than it. NaN for logits, which have none and always stay.

    Exact for an unpruned graph, or given `full`, the graph that `graph` was pruned from. A
    pruned graph alone ranks its own nodes against the full graph's total (`pruning`'s
    feature and error total plus its tokens, which pruning keeps): nodes more influential than a
    kept node that the edge pruning dropped are missing from its share, which comes out smaller."""
    source = graph if full is None else full
    influence = _node_influence(source)
    ranked = source.kind != LOGIT
    total = float(influence[ranked].sum())
    if full is None and graph.is_pruned and graph.pruning.get("total_influence") is not None:
        total = float(graph.pruning["total_influence"]) + float(
            influence[graph.kind == TOKEN].sum()
        )
    shares = _ranked_shares(influence, ranked, total)
    if full is None:
        return shares
    where = {nid: i for i, nid in enumerate(full.node_ids())}
    missing = [nid for nid in graph.node_ids() if nid not in where]
    if missing:
        raise UserError(
            f"node {missing[0]} is not in the full graph given; pass the unpruned graph"
        )
    return shares[[where[nid] for nid in graph.node_ids()]]


def _slider_max(graph: AttributionGraph, shares: np.ndarray) -> float:
    """The smallest slider setting that shows every feature and error node of `graph`: the
    slider moves in steps of 0.01 up to `metadata.node_threshold`."""
    inner = shares[((graph.kind == FEATURE) | (graph.kind == ERROR)) & np.isfinite(shares)]
    top = float(inner.max()) if len(inner) else 0.0
    return min(1.0, math.ceil(top * 100 - 1e-9) / 100)


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
        label, source = display_label(graph, i)  # human, else the dashboard's auto label
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


def _document_metadata(graph: AttributionGraph, slug: str, scan: str, shares: np.ndarray) -> dict:
    meta, settings, pruning = graph.metadata, graph.settings, graph.pruning or {}
    out = {
        "slug": slug,
        "scan": scan,
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
    if graph.is_pruned:
        # the viewers' default and largest slider value: the one that shows the whole circuit
        out["node_threshold"] = _slider_max(graph, shares)
    transcoders = meta.get("transcoders") or {}
    if transcoders.get("source"):
        out["info"]["source_urls"] = [str(transcoders["source"])]
    return out


def to_neuronpedia_json(
    graph: AttributionGraph,
    slug: str | None = None,
    scan: str | None = None,
    full: AttributionGraph | None = None,
    features_url: str | None = None,
) -> dict:
    """The graph as the viewer's JSON document (every node and edge of `graph`: prune it first).

    `slug`: its name (default: from the prompt); `scan`: Neuronpedia's model id (default: from
    the graph's model, `neuronpedia_model_id`); both are checked against Neuronpedia's rules.
    Node `influence` is `viewer_influence(graph, full)`. `features_url`: where the folder of
    `write_feature_details` will be served (`metadata.feature_details.feature_json_base_url`)."""
    slug = check_slug(slug) if slug else _prompt_slug(graph.prompt)
    model = str(graph.metadata.get("model") or DEFAULT_MODEL)
    scan = check_scan(scan) if scan else neuronpedia_model_id(model)
    shares = viewer_influence(graph, full)
    ids = neuronpedia_node_ids(graph)
    logit_rank = {int(n): j for j, n in enumerate(graph.logit_nodes)}
    strings = graph.logit_strings
    nodes = [_node(graph, i, ids, shares[i], logit_rank, strings) for i in range(graph.n_nodes)]
    metadata = _document_metadata(graph, slug, scan, shares)
    if features_url:
        metadata["feature_details"] = {"feature_json_base_url": features_url.rstrip("/")}
    return {
        "metadata": metadata,
        "qParams": {
            "pinnedIds": [],
            "supernodes": _supernodes(graph, ids),
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": _links(graph, ids),
    }


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def write_neuronpedia_json(
    graph: AttributionGraph,
    path: str | Path,
    slug: str | None = None,
    scan: str | None = None,
    full: AttributionGraph | None = None,
    features_url: str | None = None,
) -> Path:
    """Write `to_neuronpedia_json` to `path` (atomically); the slug defaults to the file name,
    made safe. Its feature dashboards go beside it with
    `write_feature_details(graph, feature_details_dir(path))`."""
    path = Path(path)
    doc = to_neuronpedia_json(graph, slug or safe_slug(path.stem), scan, full, features_url)
    atomic_write_text(path, _dump(doc))
    return path


def neuronpedia_upload_problem(path: str | Path) -> str | None:
    """Why Neuronpedia's upload would refuse the graph JSON file `path` (its name or size), or
    None. The schema, slug and scan of this module's files meet its rules already."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix != ".json":
        return f"{path}: Neuronpedia uploads only files named *.json"
    if size > NEURONPEDIA_MAX_UPLOAD_BYTES:
        limit = NEURONPEDIA_MAX_UPLOAD_BYTES // 2**20
        return (
            f"{path} is {size / 2**20:.0f} MiB, over Neuronpedia's {limit} MiB upload limit: "
            f"prune harder (`circuits prune` with lower thresholds)"
        )
    if size < NEURONPEDIA_MIN_UPLOAD_BYTES:
        return f"{path} is {size} bytes; Neuronpedia uploads files of at least 1024 bytes"
    return None


# -- feature dashboards in the viewers' feature format ---------------------------------------------


def _example(context: dict) -> dict:
    acts = [float(a) for a in context.get("acts", [])]
    return {
        "tokens": [str(t) for t in context.get("tokens", [])],
        "tokens_acts_list": acts,
        "train_token_ind": int(np.argmax(acts)) if acts else 0,
        "is_repeated_datapoint": False,
    }


def feature_detail(graph: AttributionGraph, i: int) -> dict | None:
    """Feature node i's dashboard in the per-feature format both viewers load (`index`,
    `examples_quantiles`, `top_logits`, `bottom_logits`; `act_min`, `act_max` for the colour
    scale, `activation_frequency`), or None when it has none."""
    dashboard = graph.feature_dashboard(i)
    if not dashboard:
        return None
    examples = [_example(c) for c in dashboard.get("top_contexts") or []]
    acts = [a for e in examples for a in e["tokens_acts_list"]]
    act_max = max([float(dashboard.get("max_activation") or 0.0), *acts])
    out = {
        "index": _cantor(int(graph.layer[i]), int(graph.feature[i])),
        "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples}],
        "top_logits": [str(t) for t, _ in dashboard.get("top_promoted") or []],
        "bottom_logits": [str(t) for t, _ in dashboard.get("top_suppressed") or []],
        "act_min": min([0.0, *acts]),
        "act_max": act_max if act_max > 0 else 1.0,
    }
    if dashboard.get("density") is not None:
        out["activation_frequency"] = float(dashboard["density"])
    return out


def feature_details_dir(path: str | Path) -> Path:
    """The folder of feature files that goes with the graph JSON `path`: `<name>-features/`."""
    path = Path(path)
    return path.with_name(f"{path.stem}-features")


def write_feature_details(graph: AttributionGraph, directory: str | Path) -> int:
    """Write `feature_detail` of each feature of `graph` that has a dashboard to
    `directory/<feature>.json`, `<feature>` being its nodes' `feature` in the graph JSON: the
    layout both viewers fetch (`feature_json_base_url`/<feature>.json). Feature files of an
    earlier export there that the graph no longer has are removed. Returns how many it wrote."""
    directory = Path(directory)
    details = {}
    for i in graph.nodes_of(FEATURE):
        index = _cantor(int(graph.layer[i]), int(graph.feature[i]))
        if index not in details and (detail := feature_detail(graph, int(i))) is not None:
            details[index] = detail
    for index, detail in details.items():
        atomic_write_text(directory / f"{index}.json", _dump(detail))
    if directory.is_dir():
        for old in directory.glob("*.json"):
            if old.stem.isdigit() and int(old.stem) not in details:
                old.unlink()
    return len(details)


# -- circuit-tracer's local viewer -----------------------------------------------------------------


def _read_index(path: Path) -> list[dict]:
    """The graphs listed in circuit-tracer's `graph-metadata.json` ({"graphs": [metadata, ...]})."""
    if not path.exists():
        return []
    try:
        graphs = json.loads(path.read_text())["graphs"]
    except (ValueError, KeyError, TypeError):
        graphs = None
    if not isinstance(graphs, list) or not all(isinstance(g, dict) for g in graphs):
        raise UserError(
            f'{path} is not circuit-tracer\'s graph list ({{"graphs": [...]}}); '
            f"move it away or choose another folder"
        )
    return graphs


def _add_index_entry(directory: Path, entry: dict) -> Path:
    """Add `entry` to the folder's graph list, replacing the one of the same slug (under a lock,
    and the file replaced atomically: concurrent exports each keep their entry)."""
    path = directory / VIEWER_INDEX
    with exclusive_lock(directory / f".{VIEWER_INDEX}.lock"):
        graphs = [g for g in _read_index(path) if g.get("slug") != entry["slug"]]
        atomic_write_text(
            path, json.dumps({"graphs": [*graphs, entry]}, ensure_ascii=False, indent=2)
        )
    return path


def add_to_viewer_index(
    graph: AttributionGraph,
    directory: str | Path,
    slug: str | None = None,
    scan: str | None = None,
    full: AttributionGraph | None = None,
) -> Path:
    """Put `graph` into a data folder of circuit-tracer's local viewer
    (`circuit_tracer.frontend.local_server.serve(data_dir=directory)`): the graph JSON as
    `<slug>.json`, its feature dashboards in `features/<slug>/`, and its entry (the graph's
    `metadata`) in `graph-metadata.json`, the list the viewer offers. With dashboards the copy's
    `scan` is `./graph_data/features/<slug>`, the local path that viewer fetches feature files
    from (a Neuronpedia upload wants the model id: use `write_neuronpedia_json`). Returns the
    graph JSON's path."""
    directory = Path(directory)
    slug = check_slug(slug) if slug else _prompt_slug(graph.prompt)
    doc = to_neuronpedia_json(graph, slug, scan, full)
    if write_feature_details(graph, directory / "features" / slug):
        doc["metadata"]["scan"] = f"./graph_data/features/{slug}"
    path = directory / f"{slug}.json"
    atomic_write_text(path, _dump(doc))
    _add_index_entry(directory, doc["metadata"])  # last: the list never names a missing file
    return path
