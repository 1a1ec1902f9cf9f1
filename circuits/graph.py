"""`AttributionGraph`: the one graph type that every stage reads and writes.

Nodes come in a fixed order: active features (sorted by layer, position, feature id), error nodes
(layer, position), token-embedding nodes (position), logit nodes. `adjacency[t, s]` is the direct
linear effect of source node s on target node t's input, a sparse CSR matrix `[n_nodes, n_nodes]`
(targets x sources). Rows exist for feature and logit nodes; error and token nodes are sources only.
For every computed row: `adjacency[t].sum() + row_constant[t] == node_input[t]`.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import UserError

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
    activation: (
        np.ndarray
    )  # [n_nodes] float32: feature activation; |error|; |embedding|; logit value
    node_input: (
        np.ndarray
    )  # [n_nodes] float32: encoder pre-activation / logit input; NaN for sources only
    row_constant: (
        np.ndarray
    )  # [n_nodes] float32: input not explained by edges (biases, frozen terms)
    has_row: np.ndarray  # [n_nodes] bool: whether the node's incoming edges were computed
    adjacency: sp.csr_array  # [n_nodes, n_nodes] targets x sources
    logit_probabilities: np.ndarray  # [n_logits]
    n_layers: int
    metadata: dict = field(default_factory=dict)  # model, transcoders, settings, versions, scores
    influence: np.ndarray | None = None  # [n_nodes] set by pruning
    labels: dict[int, str] = field(default_factory=dict)  # node index -> human label

    # -- node views -----------------------------------------------------------------------------
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
            raise UserError(f"node {node_id!r} is not in this graph")

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

    # -- persistence ----------------------------------------------------------------------------
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
            raise UserError(f"{path} is not a gemma-circuits graph file or is corrupt ({e})")
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

    # -- views for other tools ------------------------------------------------------------------
    def to_networkx(self):
        from .export import graph_to_networkx

        return graph_to_networkx(self)

    @classmethod
    def from_networkx(cls, g) -> AttributionGraph:
        from .export import graph_from_networkx

        return graph_from_networkx(g)

    def subgraph(self, keep: np.ndarray) -> AttributionGraph:
        """The graph restricted to the nodes in `keep` (indices or boolean mask), in their original order."""
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
            metadata=json.loads(json.dumps(self.metadata, default=_json_default)),
            influence=None if self.influence is None else self.influence[idx],
            labels={remap[k]: v for k, v in self.labels.items() if k in remap},
        )

    def summary(self) -> str:
        n = {name: int((self.kind == k).sum()) for k, name in enumerate(KIND_NAMES)}
        top = ", ".join(
            f"{s!r} {p:.3f}" for s, p in zip(self.logit_strings, self.logit_probabilities)
        )
        return (
            f"{n['feature']} features, {n['error']} error nodes, {n['token']} tokens, {n['logit']} logits "
            f"({top}); {self.adjacency.nnz} edges"
        )


def _json_default(x):
    """numpy scalars and arrays in metadata become plain JSON numbers and lists."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"metadata value of type {type(x).__name__} cannot be saved as JSON")


def load_graph(path: str | Path) -> AttributionGraph:
    """Load a graph written by `AttributionGraph.save` / `circuits trace`."""
    return AttributionGraph.load(path)


def atomic_write(path: str | Path, write) -> None:
    """Call `write(fileobj)` on a temporary file beside `path`, then rename it into place: readers never see
    a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))
