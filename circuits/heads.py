"""Which attention heads carry an edge: head loadings that split an edge's weight exactly.

An edge s -> t of an attribution graph is a sum over paths in the frozen linear model: from where s
writes (the residual stream after its layer, at its position p) through residual connections,
frozen attention heads and skip terms to where t reads (its layer's MLP input at position q, or
the final norm at the last position). Every path moves between positions only inside attention
heads, and a path that ends at q with p != q moves at least once. The loading of (layer l, head h)
on the edge is the part of its weight carried by the paths whose *last* move between positions is
made by head h of layer l (from some key k != q to the query q): after that hop the path stays at
q. These sets of paths partition all paths, so the loadings, together with the part of paths that
never move (non-zero only when p == q), sum exactly to the edge weight. Why the last move: it is
the hop that delivers the information to the position that reads it, and its QK score is what a
researcher asks about next (`circuits.attention.qk` with that head, query q and key k); earlier
hops are the edges' sources' own business (their inputs are other edges).

Computed per edge from two linear passes: the source's direct contribution `[n, D]` to every
layer's residual stream, forwards (attention, residual and skip paths only: other nodes are
frozen, as in the edge), and the target's "stay" gradient at its position, backwards (the residual,
skip and same-position attention paths only). The loading is then the stay gradient after head h
of layer l dotted with head h's output at q from the source's contribution at keys k != q. Sources
go in chunks, so memory is bounded by the chunk, not by the circuit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gemma_lm.errors import UserError

from .attention import PromptSources, prompt_sources, resolve_graph_transcoders
from .graph import ERROR, FEATURE, LOGIT, TOKEN, AttributionGraph, display_label
from .replacement import attention_apply


@dataclass
class HeadLoadings:
    """Head loadings of E edges of a graph (module docstring). L layers, H heads, n positions."""

    sources: np.ndarray  # [E] node index of each edge's source
    targets: np.ndarray  # [E] node index of each edge's target
    weights: np.ndarray  # [E] the edges' weights in the graph
    loadings: np.ndarray  # [E, L, H] the part of each edge carried last by (layer, head)
    by_key: np.ndarray  # [E, L, H, n] the same, split by the key position the hop left from
    stay: np.ndarray  # [E] the part of paths that never move (zero unless same position)

    @property
    def residual(self) -> np.ndarray:
        """`[E]` edge weight minus loadings and stay part: zero up to rounding."""
        total = self.loadings.astype(np.float64).sum((1, 2)) + self.stay
        return self.weights - total

    def top_heads(self, e: int, n: int = 3) -> list[tuple[int, int, float, int]]:
        """The n heads with the largest |loading| on edge e: (layer, head, loading, the key
        position that carries most of it)."""
        flat = np.argsort(-np.abs(self.loadings[e]).ravel(), kind="stable")[:n]
        H = self.loadings.shape[2]
        out = []
        for f in flat:
            l, h = divmod(int(f), H)
            key = int(np.argmax(np.abs(self.by_key[e, l, h])))
            out.append((l, h, float(self.loadings[e, l, h]), key))
        return out

    def to_dict(self, graph: AttributionGraph, n: int = 3) -> list[dict]:
        """Per edge: its nodes, weight and top n heads, JSON-ready."""
        return [
            {
                "source": graph.node_id(int(s)),
                "target": graph.node_id(int(t)),
                "weight": float(w),
                "stay": float(self.stay[e]),
                "heads": [
                    {"layer": l, "head": h, "loading": v, "key_pos": k}
                    for l, h, v, k in self.top_heads(e, n)
                ],
            }
            for e, (s, t, w) in enumerate(zip(self.sources, self.targets, self.weights))
        ]


def strongest_cross_position_edges(graph: AttributionGraph, n: int) -> np.ndarray:
    """The n edges `[n, 2]` (source, target) of `graph` with the largest |weight| whose ends are at
    different positions."""
    a = graph.adjacency.tocoo()
    cross = graph.pos[a.row] != graph.pos[a.col]
    rows, cols, vals = a.row[cross], a.col[cross], a.data[cross]
    order = np.argsort(-np.abs(vals), kind="stable")[:n]
    return np.stack([cols[order], rows[order]], axis=1).astype(np.int64)


def _source_writes(
    ps: PromptSources, graph: AttributionGraph, node: int
) -> dict[int, torch.Tensor]:
    """{residual index l: the vector `[D]` node writes into x_l at its position}."""
    kind, layer, pos = graph.kind[node], int(graph.layer[node]), int(graph.pos[node])
    tc, dev = ps.frozen.transcoders, ps.engine.fw.device
    if kind == TOKEN:
        return {0: ps.frozen.state.embeddings[pos]}
    if kind == ERROR:
        return {layer + 1: ps.errors[layer, pos]}
    if kind != FEATURE:
        raise UserError(f"node {graph.node_id(node)} is not a source of edges")
    f = int(graph.feature[node])
    rows = tc.decoder_rows(layer, torch.tensor([f]))[0].float().to(dev)  # [n_out, D]
    act = float(graph.activation[node])
    return {o + 1: act * rows[i] for i, o in enumerate(tc.output_layers(layer))}


def _target_read(ps: PromptSources, graph: AttributionGraph, node: int) -> tuple[int, torch.Tensor]:
    """(the residual index whose gradient starts the stay pass, the gradient `[D]` there): a
    feature reads its layer's MLP input, so its gradient starts at m_layer (after the attention);
    a logit reads the final norm, so its gradient starts at x_L (index L: "after" layer L-1)."""
    fr, tc = ps.frozen, ps.frozen.transcoders
    pos = int(graph.pos[node])
    if graph.kind[node] == LOGIT:
        j = int(np.flatnonzero(graph.logit_nodes == node)[0])
        ids = [int(t) for t in graph.logit_tokens]
        contrast = graph.metadata.get("contrast_token")
        direction = fr.weights.logit_directions(ids, contrast)[j]
        return fr.n_layers, direction * fr.state.s_final[pos] * fr.weights.g_final
    if graph.kind[node] != FEATURE:
        raise UserError(f"node {graph.node_id(node)} is not a target of edges")
    l = int(graph.layer[node])
    enc = tc.encoder_rows(l, torch.tensor([int(graph.feature[node])]))[0].float()
    return l, enc.to(fr.weights.device) * fr.state.s_ff[l, pos] * fr.weights.g_ff[l]


class _StayPass:
    """Targets' gradients at their own positions through the paths that never leave them: the
    residual stream, skip terms and each head's attention of q to itself. T targets at once, at
    positions q `[T]`."""

    def __init__(self, ps: PromptSources, q: torch.Tensor):
        self.q, self.fw, self.st, self.engine = q, ps.engine.fw, ps.frozen.state, ps.engine

    def _mlp_back(self, l: int, g_x: torch.Tensor) -> torch.Tensor:
        """Gradients `[T, D]` at m_l from those at x_{l+1} (residual plus skip term)."""
        if self.engine.W_skip is None:
            return g_x
        u = g_x @ self.engine.W_skip[l]
        return g_x + u * self.st.s_ff[l, self.q, None] * self.fw.g_ff[l]

    def _self_attention_back(self, l: int, g_m: torch.Tensor) -> torch.Tensor:
        """Gradients `[T, D]` at x_l[q] through layer l's attention of q to itself, from those at
        m_l[q]."""
        fw, q, T = self.fw, self.q, len(self.q)
        H, KV, hd = fw.n_heads, fw.n_kv, fw.head_dim
        go = ((g_m * self.st.s_pa[l, q, None] * fw.g_pa[l]) @ fw.W_o[l]).view(T, H, hd)
        diag = self.st.patterns[l, :, q, q].float().T  # [T, H]
        gv = (go * diag[..., None]).view(T, KV, H // KV, hd).sum(2)  # heads sharing a value head
        return (gv.flatten(1) @ fw.W_v[l]) * self.st.s_in[l, q, None] * fw.g_in[l]

    def run(self, start: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stay gradients at m_l `[T, L, D]`, at x_l `[T, L+1, D]`) of targets whose gradients
        `vec` `[T, D]` start at m_start (a feature of layer start) or, where start == L, at x_L
        (a logit). Zero above where a target starts."""
        L, (T, D) = self.fw.n_layers, vec.shape
        at_m = torch.zeros(T, L, D, device=vec.device)
        at_x = torch.zeros(T, L + 1, D, device=vec.device)
        logit = start == L
        at_x[logit, L] = vec[logit]
        for l in range(L - 1, -1, -1):
            g_m = self._mlp_back(l, at_x[:, l + 1])
            g_m[start == l] = vec[start == l]  # features of layer l start here
            at_m[:, l] = g_m
            at_x[:, l] = g_m + self._self_attention_back(l, g_m)
        return at_m, at_x


@dataclass
class _Targets:
    """T targets' stay gradients, in the order of `nodes`."""

    nodes: np.ndarray  # [T] node indices
    pos: torch.Tensor  # [T]
    at_x: torch.Tensor  # [T, L+1, D] stay gradients at x_l
    head_reads: torch.Tensor  # [T, L, H, hd] what head h of layer l's value output is read along

    def index(self, nodes: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.searchsorted(self.nodes, nodes))


def _targets(ps: PromptSources, graph: AttributionGraph, nodes: np.ndarray) -> _Targets:
    fw = ps.engine.fw
    reads = [_target_read(ps, graph, int(t)) for t in nodes]
    start = torch.tensor([r[0] for r in reads])
    q = torch.as_tensor(graph.pos[nodes].astype(np.int64))
    at_m, at_x = _StayPass(ps, q).run(start, torch.stack([r[1] for r in reads]))
    scaled = at_m * ps.frozen.state.s_pa[:, q].T[..., None] * fw.g_pa  # [T, L, D]
    head_reads = torch.stack([scaled[:, l] @ fw.W_o[l] for l in range(fw.n_layers)], 1)
    return _Targets(nodes, q, at_x, head_reads.view(len(nodes), fw.n_layers, fw.n_heads, -1))


class _SourcePass:
    """Sources' direct contributions `[S, n, D]` to each layer's residual stream, forwards through
    the frozen attention, residual and skip paths, one layer at a time."""

    def __init__(self, ps: PromptSources, graph: AttributionGraph, nodes: np.ndarray):
        self.ps, self.fw, self.st = ps, ps.engine.fw, ps.frozen.state
        self.pos = [int(graph.pos[s]) for s in nodes]
        self.writes = [_source_writes(ps, graph, int(s)) for s in nodes]
        n, D = ps.frozen.n_pos, self.fw.d_model
        self.F = torch.zeros(len(nodes), n, D, device=self.fw.device)

    def write(self, l: int) -> torch.Tensor:
        """Add what each source writes into x_l; returns those vectors `[S, D]` (zero: nothing)."""
        out = torch.zeros(len(self.writes), self.fw.d_model, device=self.fw.device)
        for si, w in enumerate(self.writes):
            if l in w:
                out[si] = w[l]
                self.F[si, self.pos[si]] += w[l]
        return out

    def values(self, l: int) -> torch.Tensor:
        """Value vectors `[S, n, KV, hd]` of layer l from the contributions."""
        h = self.F * (self.st.s_in[l, :, None] * self.fw.g_in[l])
        return (h @ self.fw.W_v[l].T).unflatten(-1, (self.fw.n_kv, self.fw.head_dim))

    def step(self, l: int) -> None:
        """x_l -> x_{l+1}: attention with the frozen pattern, then the skip term."""
        fw, st, tc = self.fw, self.st, self.ps.frozen.transcoders
        a = attention_apply(fw, l, st.patterns[l], self.F * (st.s_in[l, :, None] * fw.g_in[l]))
        m = self.F + a * (st.s_pa[l, :, None] * fw.g_pa[l])
        skip = tc.skip_term(l, m * (st.s_ff[l, :, None] * fw.g_ff[l]))
        self.F = m if skip is None else m + skip.float()


def _edge_weights(graph: AttributionGraph, edges: np.ndarray) -> np.ndarray:
    """`[E]` the graph's weight of each (source, target) edge; refuses a pair with no edge."""
    out = np.empty(len(edges))
    for e, (s, t) in enumerate(edges):
        w = float(np.asarray(graph.adjacency[[int(t)], [int(s)]]).ravel()[0])
        if w == 0:
            raise UserError(
                f"there is no edge from {graph.node_id(int(s))} to {graph.node_id(int(t))} in this "
                f"graph; list its edges with `circuits show` or leave --edge out"
            )
        out[e] = w
    return out


@torch.no_grad()
def loadings_of_sources(
    ps: PromptSources, graph: AttributionGraph, edges: np.ndarray, chunk: int = 16
) -> HeadLoadings:
    """Head loadings of `edges` `[E, 2]` (source, target node indices of `graph`) on a prompt
    already frozen (`attention.prompt_sources`); `chunk` sources at a time."""
    fw, n = ps.engine.fw, ps.frozen.n_pos
    weights = _edge_weights(graph, edges)
    targets = _targets(ps, graph, np.unique(edges[:, 1]))
    by_key = np.zeros((len(edges), fw.n_layers, fw.n_heads, n), dtype=np.float32)
    stay = np.zeros(len(edges))
    sources = np.unique(edges[:, 0])
    for c in range(0, len(sources), chunk):
        nodes = sources[c : c + chunk]
        mine = np.flatnonzero(np.isin(edges[:, 0], nodes))
        which = torch.as_tensor(np.searchsorted(nodes, edges[mine, 0]))  # source in the chunk
        tgt = targets.index(edges[mine, 1])
        by_key[mine], stay[mine] = _chunk_loadings(ps, graph, nodes, which, targets, tgt)
    loads = by_key.astype(np.float64).sum(-1).astype(np.float32)
    return HeadLoadings(edges[:, 0].copy(), edges[:, 1].copy(), weights, loads, by_key, stay)


def _chunk_loadings(ps, graph, nodes, which, targets: _Targets, tgt) -> tuple[np.ndarray, ...]:
    """(by_key `[e, L, H, n]`, stay `[e]`) of the e edges from the chunk's sources `nodes`
    (`which` `[e]`: each edge's source in the chunk; `tgt` `[e]`: its target in `targets`)."""
    fw, st = ps.engine.fw, ps.frozen.state
    L, rep = fw.n_layers, fw.n_heads // fw.n_kv
    sp = _SourcePass(ps, graph, nodes)
    q = targets.pos[tgt]  # [e]
    same = torch.as_tensor(sp.pos)[which] == q  # paths that never move exist only there
    by_key = torch.zeros(len(tgt), L, fw.n_heads, ps.frozen.n_pos)
    stay = torch.zeros(len(tgt), dtype=torch.float64)
    for l in range(L + 1):
        written = sp.write(l)  # [S, D]
        stay += ((targets.at_x[tgt, l] * written[which]).sum(-1) * same).double().cpu()
        if l == L:
            break
        V = sp.values(l).repeat_interleave(rep, dim=2)[which]  # [e, n, H, hd]
        dots = torch.einsum("ekhd,ehd->ehk", V, targets.head_reads[tgt, l])
        moved = st.patterns[l][:, q].float().transpose(0, 1).clone()  # [e, H, n]
        moved[torch.arange(len(q)), :, q] = 0.0  # a head reading q itself does not move
        by_key[:, l] = (moved * dots).cpu()
        sp.step(l)
    return by_key.numpy(), stay.numpy()


@torch.no_grad()
def head_loadings(
    lm, graph: AttributionGraph, edges=None, n_edges: int = 20, transcoders=None
) -> HeadLoadings:
    """Split edges of `graph` into the attention heads that carry them (module docstring).

    edges: (source, target) pairs of node ids or indices (default: the `n_edges` strongest edges
    between different positions). transcoders: the graph's (by default)."""
    if not isinstance(graph, AttributionGraph):
        raise UserError("head loadings need an attribution graph (from `circuits trace`)")
    edges = edge_indices(graph, edges, n_edges)
    tc = resolve_graph_transcoders(lm, graph, transcoders)
    ps = prompt_sources(lm, tc, torch.as_tensor(graph.tokens, dtype=torch.long), graph)
    return loadings_of_sources(ps, graph, edges)


def edge_indices(graph: AttributionGraph, edges, n_edges: int) -> np.ndarray:
    if edges is None:
        found = strongest_cross_position_edges(graph, n_edges)
        if not len(found):
            raise UserError("this graph has no edges between different positions")
        return found
    index = {nid: i for i, nid in enumerate(graph.node_ids())}

    def one(x) -> int:
        if isinstance(x, str):
            if x not in index:
                raise UserError(f"node {x!r} is not in this graph")
            return index[x]
        return int(x)

    return np.array([[one(s), one(t)] for s, t in edges], dtype=np.int64).reshape(-1, 2)


def edge_label(graph: AttributionGraph, s: int, t: int) -> str:
    """'source label (pos) -> target label (pos)'."""
    a, b = display_label(graph, s)[0], display_label(graph, t)[0]
    return f"{a} @{graph.pos[s]} -> {b} @{graph.pos[t]}"


def loadings_text(graph: AttributionGraph, hl: HeadLoadings, n_heads: int = 3) -> str:
    """Each edge, its weight and the heads that carry it, with the `circuits qk` command that asks
    why the top head looked there."""
    lines = []
    for e, (s, t, w) in enumerate(zip(hl.sources, hl.targets, hl.weights)):
        lines.append(f"{edge_label(graph, int(s), int(t))}   weight {w:+.4f}")
        if hl.stay[e]:
            lines.append(f"    {hl.stay[e]:+9.4f}  ({hl.stay[e] / w:6.1%})  paths that stay put")
        heads = hl.top_heads(e, n_heads)
        for l, h, v, k in heads:
            key = graph.token_strings[k]
            lines.append(f"    {v:+9.4f}  ({v / w:6.1%})  L{l}.H{h}, last hop from {key!r} @{k}")
        l, h, _, k = heads[0]
        q = int(graph.pos[t])
        lines.append(f"    why: circuits qk GRAPH --layer {l} --head {h} --query {q} --key {k}")
    return "\n".join(lines)


def attach_head_loadings(graph: AttributionGraph, hl: HeadLoadings, qk_tables: dict) -> None:
    """Store the loadings (top heads per edge) and the QK attributions of their top heads
    (`qk_tables`: {edge index: `attention.qk_view` dict}) in `graph.metadata["head_loadings"]`,
    where the HTML viewer finds them."""
    edges = hl.to_dict(graph, n=5)
    for e, table in qk_tables.items():
        edges[e]["qk"] = table
    graph.metadata["head_loadings"] = {"definition": "last move between positions", "edges": edges}
