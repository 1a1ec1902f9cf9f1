"""`AttributionGraph`: the one graph type that every stage reads and writes, its file, its labels
and its networkx view.

Nodes come in a fixed order: active features (sorted by layer, position, feature id), error nodes
(layer, position), token-embedding nodes (position), logit nodes. `adjacency[t, s]` is the direct
linear effect of source node s on target node t's input, a sparse CSR matrix `[n_nodes, n_nodes]`
(targets x sources). Rows exist for feature and logit nodes; error and token nodes are sources only.
For every computed row: `adjacency[t].sum() + row_constant[t] == node_input[t]`.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write

FEATURE, ERROR, TOKEN, LOGIT = 0, 1, 2, 3
KIND_NAMES = ("feature", "error", "token", "logit")
FORMAT_VERSION = 1


@dataclass
class AttributionGraph:
    prompt: str
    tokens: np.ndarray  # [n_pos] token ids
    token_strings: list[str]  # [n_pos]
    kind: np.ndarray  # [n_nodes] int8: FEATURE, ERROR, TOKEN, LOGIT
    layer: np.ndarray  # [n_nodes] int32: source layer; -1 for tokens; n_layers for logits
    pos: np.ndarray  # [n_nodes] int32
    feature: np.ndarray  # [n_nodes] int64: feature id; vocabulary id for logits; -1 otherwise
    # [n_nodes] float32: feature activation; |error|; |embedding|; logit value
    activation: np.ndarray
    # [n_nodes] float32: encoder pre-activation / logit input; NaN for sources only
    node_input: np.ndarray
    # [n_nodes] float32: input not explained by edges (biases, frozen terms)
    row_constant: np.ndarray
    has_row: np.ndarray  # [n_nodes] bool: whether the node's incoming edges were computed
    adjacency: sp.csr_array  # [n_nodes, n_nodes] targets x sources
    logit_probabilities: np.ndarray  # [n_logits]
    n_layers: int
    # model, transcoders, settings, versions, scores, ...: the keys other stages rely on are read
    # and written through the accessors below (`settings`, `scores`, `pruning`, `supernodes`,
    # `feature_dashboards`)
    metadata: dict = field(default_factory=dict)
    influence: np.ndarray | None = None  # [n_nodes] set by pruning
    labels: dict[int, str] = field(default_factory=dict)  # node index -> human label

    # -- node views --------------------------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        return len(self.kind)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    def nodes_of(self, kind: int) -> np.ndarray:
        return np.flatnonzero(self.kind == kind)

    @property
    def logit_nodes(self) -> np.ndarray:
        return self.nodes_of(LOGIT)

    @property
    def logit_tokens(self) -> np.ndarray:
        return self.feature[self.logit_nodes]

    @property
    def logit_strings(self) -> list[str]:
        return list(self.metadata.get("logit_strings", []))

    def node_id(self, i: int) -> str:
        """A stable text id: f:L:P:F, e:L:P, t:P, l:TOKEN."""
        k = self.kind[i]
        if k == FEATURE:
            return f"f:{self.layer[i]}:{self.pos[i]}:{self.feature[i]}"
        if k == ERROR:
            return f"e:{self.layer[i]}:{self.pos[i]}"
        if k == TOKEN:
            return f"t:{self.pos[i]}"
        return f"l:{self.feature[i]}"

    def node_ids(self) -> list[str]:
        return [self.node_id(i) for i in range(self.n_nodes)]

    def index_of(self, node_id: str) -> int:
        ids = self.node_ids()
        try:
            return ids.index(node_id)
        except ValueError:
            raise UserError(f"node {node_id!r} is not in this graph") from None

    def node_label(self, i: int) -> str:
        """A short human-readable label."""
        if i in self.labels:
            return self.labels[i]
        k = self.kind[i]
        if k == FEATURE:
            return f"L{self.layer[i]}/{self.feature[i]}"
        if k == ERROR:
            return f"err L{self.layer[i]}"
        if k == TOKEN:
            return repr(self.token_strings[self.pos[i]])
        j = int(np.flatnonzero(self.logit_nodes == i)[0])
        s = self.logit_strings[j] if j < len(self.logit_strings) else str(self.feature[i])
        return f"{s!r} p={self.logit_probabilities[j]:.2f}"

    def incoming(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(source indices, weights) of node i's incoming edges."""
        row = self.adjacency[[i]]
        return row.indices.copy(), row.data.copy()

    # -- what the stages record in `metadata` ------------------------------------------------------
    # (kept there, so that the file layout stays one JSON header)
    @property
    def settings(self) -> dict:
        """The options the graph was traced with (`AttributionConfig` as a dict, written by
        `circuits.attribute`); {} for a graph made elsewhere."""
        return dict(self.metadata.get("settings") or {})

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """Replacement / completeness scores by the graph they describe: "full" and "pruned" (set by
        `circuits.prune`; `trace-batch` stores "full" only), each {"replacement", "completeness",
        "unexplained_fraction"}; {} when not computed."""
        return self.metadata.get("scores") or {}

    @scores.setter
    def scores(self, value: dict[str, dict[str, float]]) -> None:
        self.metadata["scores"] = value

    @property
    def pruning(self) -> dict | None:
        """What pruning recorded: its thresholds, the node and edge counts before and after, and the
        full graph's total feature + error influence; None for a graph that was not pruned."""
        return self.metadata.get("pruning")

    @pruning.setter
    def pruning(self, value: dict) -> None:
        self.metadata["pruning"] = value

    @property
    def is_pruned(self) -> bool:
        return self.pruning is not None

    @property
    def supernodes(self) -> dict[str, list[str]]:
        """Named groups of node ids ({name: [node ids]}, the viewer's grouping); {} when none."""
        return supernode_groups(self.metadata.get("supernodes") or {})

    @supernodes.setter
    def supernodes(self, value) -> None:
        self.metadata["supernodes"] = supernode_groups(value)

    @property
    def feature_dashboards(self) -> dict[str, dict]:
        """Feature dashboards by feature key `L/F` (one per distinct feature, whatever its
        positions; written by `attach_dashboards`, schema in docs/graphs.md); {} when none."""
        found = self.metadata.get("feature_dashboards")
        return found if isinstance(found, dict) else {}

    @feature_dashboards.setter
    def feature_dashboards(self, value: dict[str, dict]) -> None:
        self.metadata["feature_dashboards"] = value

    def feature_dashboard(self, i: int) -> dict | None:
        """The dashboard of feature node i (top contexts, promoted tokens, auto label), or None:
        not a feature, or no dashboards attached. Older graphs keyed them by node id
        (`metadata["dashboards"]`); those are read too."""
        if self.kind[i] != FEATURE:
            return None
        found = self.feature_dashboards.get(f"{self.layer[i]}/{self.feature[i]}")
        if found is None:
            legacy = self.metadata.get("dashboards")
            found = legacy.get(self.node_id(i)) if isinstance(legacy, dict) else None
        return found

    @property
    def dashboards(self) -> dict[str, dict]:
        """The dashboards of this graph's feature nodes by node id (`f:L:P:F`); {} when none."""
        out = {}
        for i in self.nodes_of(FEATURE):
            found = self.feature_dashboard(int(i))
            if found is not None:
                out[self.node_id(int(i))] = found
        return out

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the graph as one .npz file (atomically: a temporary file, then a rename)."""
        path = Path(path)
        arrays = {
            "tokens": self.tokens,
            "kind": self.kind,
            "layer": self.layer,
            "pos": self.pos,
            "feature": self.feature,
            "activation": self.activation,
            "node_input": self.node_input,
            "row_constant": self.row_constant,
            "has_row": self.has_row,
            "logit_probabilities": self.logit_probabilities,
            "adj_data": self.adjacency.data,
            "adj_indices": self.adjacency.indices,
            "adj_indptr": self.adjacency.indptr,
        }
        if self.influence is not None:
            arrays["influence"] = self.influence
        header = {
            "format": "gemma-circuits-graph",
            "version": FORMAT_VERSION,
            "prompt": self.prompt,
            "token_strings": self.token_strings,
            "n_layers": self.n_layers,
            "shape": list(self.adjacency.shape),
            "metadata": self.metadata,
            "labels": {str(k): v for k, v in self.labels.items()},
        }
        arrays["header"] = np.frombuffer(
            json.dumps(header, default=_json_default).encode(), dtype=np.uint8
        )
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        path = Path(path)
        if not path.exists():
            raise UserError(f"graph file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
            header = json.loads(a.pop("header").tobytes().decode())
        except (zipfile.BadZipFile, ValueError, KeyError, OSError) as e:
            raise UserError(
                f"{path} is not a gemma-circuits graph file or is corrupt ({e})"
            ) from None
        if header.get("format") != "gemma-circuits-graph":
            raise UserError(f"{path} is not a gemma-circuits graph file")
        adj = sp.csr_array(
            (a.pop("adj_data"), a.pop("adj_indices"), a.pop("adj_indptr")),
            shape=tuple(header["shape"]),
        )
        return cls(
            prompt=header["prompt"],
            token_strings=header["token_strings"],
            n_layers=header["n_layers"],
            metadata=header["metadata"],
            labels={int(k): v for k, v in header["labels"].items()},
            adjacency=adj,
            influence=a.pop("influence", None),
            **a,
        )

    # -- views for other tools ---------------------------------------------------------------------
    def to_networkx(self):
        """This graph as a `networkx.DiGraph` (see `graph_to_networkx`)."""
        return graph_to_networkx(self)

    @classmethod
    def from_networkx(cls, g) -> AttributionGraph:
        return graph_from_networkx(g)

    def subgraph(self, keep: np.ndarray) -> AttributionGraph:
        """The graph restricted to the nodes in `keep` (indices or boolean mask), in their original
        order."""
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else np.sort(keep)
        adj = self.adjacency[idx][:, idx]
        remap = {int(o): n for n, o in enumerate(idx)}
        return AttributionGraph(
            prompt=self.prompt,
            tokens=self.tokens,
            token_strings=self.token_strings,
            kind=self.kind[idx],
            layer=self.layer[idx],
            pos=self.pos[idx],
            feature=self.feature[idx],
            activation=self.activation[idx],
            node_input=self.node_input[idx],
            row_constant=self.row_constant[idx],
            has_row=self.has_row[idx],
            adjacency=sp.csr_array(adj),
            logit_probabilities=self.logit_probabilities[np.isin(self.logit_nodes, idx)],
            n_layers=self.n_layers,
            metadata=_metadata_of_subgraph(self, idx),
            influence=None if self.influence is None else self.influence[idx],
            labels={remap[k]: v for k, v in self.labels.items() if k in remap},
        )

    def summary(self) -> str:
        n = {name: int((self.kind == k).sum()) for k, name in enumerate(KIND_NAMES)}
        top = ", ".join(
            f"{s!r} {p:.3f}" for s, p in zip(self.logit_strings, self.logit_probabilities)
        )
        return (
            f"{n['feature']} features, {n['error']} error nodes, {n['token']} tokens, "
            f"{n['logit']} logits ({top}); {self.adjacency.nnz} edges"
        )


def _metadata_of_subgraph(graph: AttributionGraph, idx: np.ndarray) -> dict:
    """A copy of graph's metadata for the subgraph of nodes `idx`: the dashboards of features it
    no longer has are dropped, so a circuit's file carries only its own."""
    meta = json.loads(json.dumps(graph.metadata, default=_json_default))
    if "feature_dashboards" in meta:
        kept = {f"{graph.layer[i]}/{graph.feature[i]}" for i in idx if graph.kind[i] == FEATURE}
        meta["feature_dashboards"] = {
            k: v for k, v in meta["feature_dashboards"].items() if k in kept
        }
    return meta


def _json_default(x):
    """numpy scalars and arrays in metadata become plain JSON numbers and lists."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"metadata value of type {type(x).__name__} cannot be saved as JSON")


# -- labels ----------------------------------------------------------------------------------------


def attach_dashboards(graph: AttributionGraph, dashboards, n_contexts: int = 5) -> int:
    """Copy the dashboard of every distinct feature of `graph`'s feature nodes into
    `graph.feature_dashboards` (`dashboards`: a `transcoders.dashboards.Dashboards`). Refuses the
    dashboards of another transcoder set. Returns how many feature nodes got one."""
    check_dashboards_match(graph, dashboards)
    store = dict(graph.feature_dashboards)
    nodes = graph.nodes_of(FEATURE)
    for key in sorted({(int(graph.layer[i]), int(graph.feature[i])) for i in nodes}):
        store[f"{key[0]}/{key[1]}"] = dashboards.feature(*key, n_contexts=n_contexts)
    graph.feature_dashboards = store
    graph.metadata["dashboards_source"] = str(dashboards.source)
    return len(nodes)


def check_dashboards_match(graph: AttributionGraph, dashboards) -> None:
    """A one-line error unless `dashboards` describe the transcoders `graph` was traced with (same
    shapes, and the same weights where the graph recorded their identity)."""
    info = graph.metadata.get("transcoders") or {}
    theirs = dashboards.identity
    ours = info.get("identity")
    same_shape = info.get("d_sae") in (None, dashboards.d_sae) and (
        graph.n_layers == dashboards.n_layers
    )
    if same_shape and (ours is None or ours == theirs):
        return
    raise UserError(
        f"the dashboards in {dashboards.source} describe {_set_name(theirs, dashboards)}, but "
        f"this graph was traced with {_set_name(ours or info, None, graph.n_layers)}; "
        f"use the dashboards of the graph's transcoders"
    )


def _set_name(identity: dict, dashboards=None, n_layers: int | None = None) -> str:
    layers = dashboards.n_layers if dashboards is not None else identity.get("n_layers", n_layers)
    d_sae = dashboards.d_sae if dashboards is not None else identity.get("d_sae")
    source = identity.get("source") or identity.get("model_name") or "a transcoder set"
    fingerprint = identity.get("fingerprint")
    extra = f", fingerprint {fingerprint}" if fingerprint is not None else ""
    return f"{source} ({layers} layers x {d_sae} features{extra})"


def auto_label(graph: AttributionGraph, i: int) -> str | None:
    """The automatic label of node i's feature dashboard, if it has one."""
    label = (graph.feature_dashboard(i) or {}).get("auto_label")
    return str(label) if label else None


def display_label(graph: AttributionGraph, i: int) -> tuple[str, str]:
    """(label, source): the human label, else the dashboard's auto label, else the default short
    label."""
    if i in graph.labels:
        return graph.labels[i], "human"
    auto = auto_label(graph, i)
    if auto:
        return auto, "auto"
    return graph.node_label(i), "default"


def supernode_groups(value) -> dict[str, list[str]]:
    """Supernodes as {name: [node ids]}, the form graphs and the viewer's grouping file use
    (`metadata["supernodes"]`, `{"supernodes": {...}}`). Also accepts a list of {"name", "members"}
    and Neuronpedia's [[name, id, ...], ...]."""
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


def load_supernodes(path: str | Path) -> dict[str, list[str]]:
    """The supernodes of a grouping file: the JSON the HTML viewer's 'download grouping' button
    saves, {"supernodes": {name: [node ids]}}, or any form `supernode_groups` reads."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"grouping file {p} does not exist")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read supernodes file {p} ({e}); pass the JSON the viewer's "
            f"'download grouping' button saves"
        ) from None
    try:
        return supernode_groups(doc)
    except (UserError, AttributeError, TypeError, IndexError):
        raise UserError(
            f'{p} holds no supernodes; expected {{"supernodes": {{"name": [node ids]}}}}'
        ) from None


def finite_or_none(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


# -- networkx --------------------------------------------------------------------------------------


def graph_to_networkx(graph: AttributionGraph):
    """A `networkx.DiGraph`: nodes keyed by `AttributionGraph.node_id`, edges source -> target.

    Node attributes: kind ("feature"/"error"/"token"/"logit"), layer, pos, token (the prompt token
    at pos, or the predicted token for logits), feature (feature id; vocabulary id for logits; -1
    otherwise), activation, influence (None before pruning), label and label_source
    ("human"/"auto"/"default"), node_input, row_constant, has_row; logits also probability and rank.
    Edge attribute: weight (the direct effect).
    Graph attributes: prompt, token_ids, token_strings, n_layers, metadata."""
    import networkx as nx  # imported when used: it takes longer to import than the rest of circuits

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
            node_input=finite_or_none(graph.node_input[i]),
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


def _column(nodes: list, key: str, default, dtype) -> np.ndarray:
    """Attribute `key` of every node of a list of networkx `(id, attributes)` pairs, as an array;
    `default` where it is missing or None."""
    return np.array(
        [d.get(key, default) if d.get(key) is not None else default for _, d in nodes], dtype=dtype
    )


def graph_from_networkx(g) -> AttributionGraph:
    """Back from `graph_to_networkx` (or any DiGraph with the same node attributes and edge
    `weight`)."""
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
        influence = _column(nodes, "influence", 0.0, np.float32)
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
        layer=_column(nodes, "layer", -1, np.int32),
        pos=_column(nodes, "pos", 0, np.int32),
        feature=_column(nodes, "feature", -1, np.int64),
        activation=_column(nodes, "activation", 0.0, np.float32),
        node_input=_column(nodes, "node_input", np.nan, np.float32),
        row_constant=_column(nodes, "row_constant", 0.0, np.float32),
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


def load_graph(path: str | Path) -> AttributionGraph:
    """Load a graph written by `AttributionGraph.save` / `circuits trace`."""
    return AttributionGraph.load(path)
