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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from gemma_lm.errors import UserError, one_line
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
        adj = sp.csr_array(self.adjacency)  # the file holds CSR arrays, whatever format it is in
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
            "adj_data": adj.data,
            "adj_indices": adj.indices,
            "adj_indptr": adj.indptr,
        }
        if self.influence is not None:
            arrays["influence"] = self.influence
        header = {
            "format": "gemma-circuits-graph",
            "version": FORMAT_VERSION,
            "prompt": self.prompt,
            "token_strings": self.token_strings,
            "n_layers": self.n_layers,
            "shape": list(adj.shape),
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
        """Read a file written by `save`. A file that is not a complete graph (empty, truncated,
        another archive, arrays missing or extra, wrong dtypes, lengths that disagree, indices out
        of range, non-finite values) is a one-line UserError naming the file and what is wrong.
        The checks are O(n_nodes + n_edges); nothing is unpickled."""
        path = Path(path)
        try:
            header, a = _read_graph_file(path)
            _check_graph_arrays(a, header)
        except _ForeignFile as e:
            raise UserError(f"{path} is not a gemma-circuits graph file ({e})") from None
        except _DamagedFile as e:
            raise UserError(
                f"{path} is not a complete gemma-circuits graph ({e}); trace it again"
            ) from None
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


# -- reading a graph file --------------------------------------------------------------------------
# Every array `save` writes and the dtype `load` accepts: "i" a signed integer, "f" float32 or
# float64, "b" bool; all one-dimensional and in native byte order. The node arrays have one entry
# per node.
_NODE_ARRAYS = {
    "kind": "i",
    "layer": "i",
    "pos": "i",
    "feature": "i",
    "activation": "f",
    "node_input": "f",
    "row_constant": "f",
    "has_row": "b",
}
_GRAPH_ARRAYS = {
    **_NODE_ARRAYS,
    "tokens": "i",
    "logit_probabilities": "f",
    "adj_data": "f",
    "adj_indices": "i",
    "adj_indptr": "i",
}
_OPTIONAL_NODE_ARRAYS = {"influence": "f"}  # written once pruning has set it
_DTYPE_NAMES = {"i": "signed-integer", "f": "float32/float64", "b": "bool"}
_ZIP_STARTS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry; an empty zip
_HEADER_FIELDS = {
    "prompt": str,
    "token_strings": list,
    "n_layers": int,
    "shape": list,
    "metadata": dict,
    "labels": dict,
}


class _ForeignFile(Exception):
    """Not a file of ours at all (the message says what it is instead)."""


class _DamagedFile(Exception):
    """Our file, but incomplete or inconsistent (the message says what is wrong)."""


def _read_graph_file(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays other than the header) of the graph file at `path`, read without
    unpickling; which arrays are there and their dtypes are checked, their contents are not."""
    if not path.exists():
        raise UserError(f"graph file {path} does not exist")
    if path.is_dir():
        raise UserError(f"graph file {path} is a directory; pass the .npz file")
    try:
        with open(path, "rb") as f:
            start = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read graph file {path} ({e.strerror})") from None
    if not start:
        raise _DamagedFile("the file is empty")
    if start not in _ZIP_STARTS:
        raise _ForeignFile("not an .npz archive")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile raises several kinds for a cut or damaged directory
        raise _DamagedFile(f"the archive is truncated or damaged: {one_line(e, 160)}") from None
    with archive:
        if "header" not in archive.files:
            raise _ForeignFile("an .npz archive without a gemma-circuits header")
        header = _graph_header(_read_member(archive, "header"), path)
        names = set(archive.files) - {"header"}
        missing = sorted(set(_GRAPH_ARRAYS) - names)
        extra = sorted(names - set(_GRAPH_ARRAYS) - set(_OPTIONAL_NODE_ARRAYS))
        if missing or extra:
            found = [f"{', '.join(missing)} missing"] if missing else []
            found += [f"unexpected {', '.join(map(repr, extra))}"] if extra else []
            raise _DamagedFile("; ".join(found))
        arrays = {name: _read_member(archive, name) for name in sorted(names)}
    for name, a in arrays.items():
        _check_dtype(name, a, {**_GRAPH_ARRAYS, **_OPTIONAL_NODE_ARRAYS}[name])
    return header, arrays


def _read_member(archive, name: str) -> np.ndarray:
    """One array of an open .npz archive."""
    try:
        a = archive[name]
    except ValueError as e:
        if "allow_pickle" in str(e):  # numpy's hint to unpickle is not advice we give
            raise _DamagedFile(f"{name} holds Python objects, which are never unpickled") from None
        raise _DamagedFile(f"{name} is damaged: {one_line(e, 160)}") from None
    except Exception as e:  # zipfile, zlib and numpy raise many kinds for damaged bytes
        raise _DamagedFile(f"{name} is damaged: {one_line(e, 160)}") from None
    if not isinstance(a, np.ndarray):  # a member that is no .npy file comes back as bytes
        raise _DamagedFile(f"{name} is not an array")
    return a


def _check_dtype(name: str, a: np.ndarray, want: str) -> None:
    ok = a.ndim == 1 and a.dtype.isnative
    if want == "i":
        ok = ok and a.dtype.kind == "i"
    elif want == "f":
        ok = ok and a.dtype in (np.float32, np.float64)
    else:
        ok = ok and a.dtype == np.bool_
    if not ok:
        raise _DamagedFile(
            f"{name} is a {a.dtype.str} array of shape {a.shape}, expected a 1-D "
            f"{_DTYPE_NAMES[want]} array"
        )


def _graph_header(raw: np.ndarray, path: Path) -> dict:
    """The JSON header of the graph file `path` (`save`'s `header` array, UTF-8 bytes), its fields
    checked."""
    if raw.ndim != 1 or raw.dtype != np.uint8:
        raise _DamagedFile(f"the header is a {raw.dtype.str} array, expected uint8 bytes")
    try:
        header = json.loads(raw.tobytes().decode())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise _DamagedFile(f"the header is not JSON: {one_line(e, 160)}") from None
    if not isinstance(header, dict) or header.get("format") != "gemma-circuits-graph":
        raise _ForeignFile("its header does not name the gemma-circuits-graph format")
    version = header.get("version")
    if type(version) is not int:
        raise _DamagedFile(f"the header's version is {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path} has graph format version {version}, newer than this gemma-circuits reads "
            f"({FORMAT_VERSION}); upgrade gemma-circuits"
        )
    for key, kind in _HEADER_FIELDS.items():
        value = header.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            found = "missing" if value is None else type(value).__name__
            raise _DamagedFile(f"the header's {key} is {found}, expected {kind.__name__}")
    shape = header["shape"]
    if len(shape) != 2 or not all(type(s) is int for s in shape):
        raise _DamagedFile(f"the header's shape is {shape!r}, expected [n_nodes, n_nodes]")
    if not all(isinstance(t, str) for t in header["token_strings"]):
        raise _DamagedFile("the header's token_strings are not all strings")
    return header


def _check_graph_arrays(a: dict[str, np.ndarray], header: dict) -> None:
    """The lengths, the CSR structure, the index ranges and the values of a graph file's arrays
    agree with each other and with its header (each check O(n_nodes + n_edges))."""
    n = len(a["kind"])
    for name in [*_NODE_ARRAYS, *(k for k in _OPTIONAL_NODE_ARRAYS if k in a)]:
        if len(a[name]) != n:
            raise _DamagedFile(f"{name} has {len(a[name])} entries for {n} nodes")
    n_pos = len(header["token_strings"])
    if len(a["tokens"]) != n_pos:
        raise _DamagedFile(f"tokens has {len(a['tokens'])} entries for {n_pos} token strings")
    n_logits = int((a["kind"] == LOGIT).sum())
    if len(a["logit_probabilities"]) != n_logits:
        raise _DamagedFile(
            f"logit_probabilities has {len(a['logit_probabilities'])} entries for "
            f"{n_logits} logit nodes"
        )
    if header["shape"] != [n, n]:
        raise _DamagedFile(f"the header's shape is {header['shape']} for {n} nodes")
    _check_csr(a["adj_data"], a["adj_indices"], a["adj_indptr"], n)
    _check_node_values(a, header)


def _check_csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n: int) -> None:
    """A CSR matrix `[n, n]`: indptr `[n + 1]` from 0, never decreasing, up to nnz; indices
    `[nnz]` in [0, n); data `[nnz]`."""
    if len(indptr) != n + 1:
        raise _DamagedFile(f"adj_indptr has {len(indptr)} entries for {n} nodes (expected {n + 1})")
    if indptr[0] != 0 or (np.diff(indptr) < 0).any():
        raise _DamagedFile("adj_indptr does not rise from 0")
    if indptr[-1] != len(indices) or len(indices) != len(data):
        raise _DamagedFile(
            f"adj_indptr ends at {indptr[-1]} for {len(indices)} adj_indices and "
            f"{len(data)} adj_data entries"
        )
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise _DamagedFile(f"adj_indices has a node index outside [0, {n})")
    if not np.isfinite(data).all():
        raise _DamagedFile("adj_data holds NaN or infinite edge weights")


def _check_node_values(a: dict[str, np.ndarray], header: dict) -> None:
    """Node kinds in order, positions and layers in range, finite values (node_input may be NaN
    where no row was computed: token and error nodes are sources only), labels of real nodes."""
    kind, n = a["kind"], len(a["kind"])
    if n and (kind.min() < FEATURE or kind.max() > LOGIT or (np.diff(kind) < 0).any()):
        raise _DamagedFile("kind is not features, errors, tokens, logits in that order")
    n_pos, n_layers = len(a["tokens"]), header["n_layers"]
    if n and (a["pos"].min() < 0 or a["pos"].max() >= n_pos):
        raise _DamagedFile(f"pos has a position outside the prompt's {n_pos} tokens")
    inner = a["layer"][(kind == FEATURE) | (kind == ERROR)]
    if len(inner) and (inner.min() < 0 or inner.max() >= n_layers):
        raise _DamagedFile(f"layer has a feature or error layer outside [0, {n_layers})")
    finite = ["activation", "row_constant", "logit_probabilities"]
    for name in finite + [k for k in _OPTIONAL_NODE_ARRAYS if k in a]:
        if not np.isfinite(a[name]).all():
            raise _DamagedFile(f"{name} holds NaN or infinite values")
    if not np.isfinite(a["node_input"][a["has_row"]]).all():
        raise _DamagedFile("node_input is NaN or infinite for a node with computed edges")
    for key, label in header["labels"].items():
        if not (key.isdigit() and int(key) < n and isinstance(label, str)):
            raise _DamagedFile(f"the header's labels name node {key!r}, not one of {n} nodes")


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
