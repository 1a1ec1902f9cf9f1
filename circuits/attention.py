"""Why a head looks where it does: exact QK attribution of one attention score to its sources.

Attribution graphs freeze attention: they show that information moved from key position j to query
position i, not why head h of layer l looked at j. In the frozen local replacement model (norm
scales frozen: the input norm's 1/rms per position, and the q/k norms' 1/rms per position and head)
the residual stream x_l[p] entering layer l is a linear function of the graph's sources, and so are
a head's query and key:

    q_i = R_i diag(s_q[i] (1 + w_qn)) W_Q[h] diag(s_in[i] (1 + w_in)) x_l[i]
    k_j = R_j diag(s_k[j] (1 + w_kn)) W_K[g] diag(s_in[j] (1 + w_in)) x_l[j]

(R_p: the rotary embedding at p, g: the key head h shares under grouped-query attention). With x_l
the sum of its sources' parts, q_i = sum_s q^(s) and k_j = sum_t k^(t), and the pre-softmax score
is exactly

    score(l, h, i, j) = scaling * q_i . k_j = sum over (s, t) of scaling * q^(s) . k^(t)

(scaling = query_pre_attn_scalar ** -0.5). The sources are the active features of layers < l, the
error nodes of layers < l, the token embeddings at positions <= i, and the transcoders' decoder
biases (one source: they are no node of a graph, whose nodes' inputs keep them as a row constant).
The parts come from the transposed model (`TransposedModel.resid_run`): one pass with head_dim rows
reading x_l[i] along the query map's rows, one reading x_l[j] along the key map's. Query-side
attribution: each s's scaling * q^(s) . k_j; key-side: each t's scaling * q_i . k^(t); both sum to
the score, as the pair table does. A source can be on both sides (a feature at a position <= j
reaches the key at j and, through attention, the query at i); a pair (s, t) is then one term of the
double sum, s read on the query side and t on the key side.

A contrast (`versus`): why key j rather than key j'. The key-side parts become k_j^(t) - k_j'^(t),
and every number above attributes score(i, j) - score(i, j') instead.

Exact in the frozen model: the norm scales are those of this prompt, so a source's part is its
effect with the scales held (what the graph's edges mean too). `check` compares the model's own
attention row with the softmax of the scores rebuilt here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gemma_lm.errors import UserError
from gemma_lm.models import LoadedModel
from transcoders.dashboards import transcoder_identity
from transcoders.default import resolve_transcoders

from .attribution import (
    ActiveFeatures,
    FrozenPrompt,
    active_features,
    errors_and_node_inputs,
)
from .graph import AttributionGraph, display_label
from .replacement import TransposedModel, rms_scale


@dataclass
class HeadMaps:
    """The frozen query and key maps of one layer's attention for a prompt: what makes q and k
    linear in the residual stream. n positions, H query heads, KV key heads, hd = head_dim."""

    layer: int
    s_q: torch.Tensor  # [H, n] 1/rms of each query head's input of q_norm
    s_k: torch.Tensor  # [KV, n] 1/rms of each key head's input of k_norm
    cos: torch.Tensor  # [n, hd] the rotary embedding at each position
    sin: torch.Tensor  # [n, hd]
    scaling: float  # query_pre_attn_scalar ** -0.5
    softcap: float | None  # attention-score soft-capping, where the model applies it
    sliding_window: int | None  # None for a global layer

    def query_map(self, lm: LoadedModel, head: int, pos: int, s_in: torch.Tensor) -> torch.Tensor:
        """`[hd, D]`: q of `head` at `pos` = this @ x_layer[pos] (s_in: `[n]` input-norm scales)."""
        attn = lm.sites.layers[self.layer].self_attn
        hd = self.cos.shape[1]
        w = attn.q_proj.weight[head * hd : (head + 1) * hd].float()
        return self._map(w, attn.q_norm.weight, self.s_q[head, pos], pos, s_in, lm)

    def key_map(self, lm: LoadedModel, kv_head: int, pos: int, s_in: torch.Tensor) -> torch.Tensor:
        """`[hd, D]`: k of `kv_head` at `pos` = this @ x_layer[pos]."""
        attn = lm.sites.layers[self.layer].self_attn
        hd = self.cos.shape[1]
        w = attn.k_proj.weight[kv_head * hd : (kv_head + 1) * hd].float()
        return self._map(w, attn.k_norm.weight, self.s_k[kv_head, pos], pos, s_in, lm)

    def keys(self, lm: LoadedModel, kv_head: int, x: torch.Tensor, s_in: torch.Tensor):
        """The keys `[m, hd]` of `kv_head` at positions 0..m-1 from the residual stream `[m, D]`
        (the same maps as `key_map`, applied forwards)."""
        site = lm.sites.layers[self.layer]
        attn, m, hd = site.self_attn, len(x), self.cos.shape[1]
        h = x * (s_in[:, None] * (1 + site.input_layernorm.weight.detach().float()))
        k = h @ attn.k_proj.weight[kv_head * hd : (kv_head + 1) * hd].detach().float().T
        k = k * (self.s_k[kv_head, :m, None] * (1 + attn.k_norm.weight.detach().float()))
        half = hd // 2
        rotated = torch.cat([-k[:, half:], k[:, :half]], dim=1)
        return k * self.cos[:m] + rotated * self.sin[:m]

    def _map(self, w, norm_weight, s_norm, pos, s_in, lm) -> torch.Tensor:
        g_in = 1 + lm.sites.layers[self.layer].input_layernorm.weight.detach().float()
        m = w.detach() * (s_in[pos] * g_in)[None]  # [hd, D]: the input norm, then W_Q / W_K
        m = m * (s_norm * (1 + norm_weight.detach().float()))[:, None]  # q_norm / k_norm
        half = m.shape[0] // 2
        rotated = torch.cat([-m[half:], m[:half]])  # rotate_half, on the rows
        return m * self.cos[pos][:, None] + rotated * self.sin[pos][:, None]


@torch.no_grad()
def record_head_maps(lm: LoadedModel, tokens: torch.Tensor) -> list[HeadMaps]:
    """One forward pass of the real model, recording what every layer's q/k norms divide by and
    its rotary embedding (`HeadMaps`, one per layer)."""
    eps, rec = lm.sites.rms_norm_eps, {}

    def norm_input(key):
        def hook(module, args):
            rec[key] = rms_scale(args[0][0], eps)  # [heads, n]

        return hook

    def rope(l):
        def hook(module, args, kwargs):
            # transformers passes (cos, sin) as position_embeddings; gemma_lm.gemma3 positionally
            cos, sin = kwargs.get("position_embeddings") or (args[1], args[2])
            rec[("cos", l)], rec[("sin", l)] = cos[0].float(), sin[0].float()

        return hook

    handles = []
    for l, site in enumerate(lm.sites.layers):
        attn = site.self_attn
        handles += [
            attn.q_norm.register_forward_pre_hook(norm_input(("q", l))),
            attn.k_norm.register_forward_pre_hook(norm_input(("k", l))),
            attn.register_forward_pre_hook(rope(l), with_kwargs=True),
        ]
    try:
        lm.last_logits(tokens)
    finally:
        for h in handles:
            h.remove()
    return [_head_maps(lm, l, rec) for l in range(lm.sites.n_layers)]


def _head_maps(lm: LoadedModel, l: int, rec: dict) -> HeadMaps:
    site = lm.sites.layers[l]
    cap = getattr(lm.model.config, "attn_logit_softcapping", None)
    return HeadMaps(
        layer=l,
        s_q=rec[("q", l)],
        s_k=rec[("k", l)],
        cos=rec[("cos", l)],
        sin=rec[("sin", l)],
        scaling=float(site.self_attn.scaling),
        softcap=float(cap) if cap else None,
        sliding_window=site.sliding_window if site.is_sliding else None,
    )


@dataclass
class PromptSources:
    """The prompt rebuilt in the frozen replacement model, with every source a score can have."""

    frozen: FrozenPrompt
    features: ActiveFeatures
    errors: torch.Tensor  # [L, n, D]
    engine: TransposedModel
    head_maps: list[HeadMaps]  # [L] the frozen query and key maps of every layer
    graph: AttributionGraph | None

    @property
    def lm(self) -> LoadedModel:
        return self.frozen.lm

    def sources(self, layer: int, n_pos: int) -> SourceList:
        """The sources of x_layer at positions < n_pos: features and error nodes of earlier
        layers, token embeddings, the decoder biases."""
        f = self.features
        feats = torch.nonzero((f.layer < layer) & (f.pos < n_pos)).flatten()
        ids = [f"f:{int(f.layer[i])}:{int(f.pos[i])}:{int(f.feature[i])}" for i in feats]
        ids += [f"e:{l}:{p}" for l in range(layer) for p in range(n_pos)]
        ids += [f"t:{p}" for p in range(n_pos)] + ["bias"]
        return SourceList(layer, n_pos, feats, ids)


@dataclass
class SourceList:
    """Sources in a fixed order: features (indices into `ActiveFeatures`), error nodes
    (layer-major), tokens, then the decoder biases; `ids` as graphs write node ids ("bias" for the
    biases)."""

    layer: int
    n_pos: int
    features: torch.Tensor  # [n_feat] indices into ActiveFeatures
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def error_start(self) -> int:
        return len(self.features)

    @property
    def token_start(self) -> int:
        return self.error_start + self.layer * self.n_pos


def _check_graph(graph: AttributionGraph, lm: LoadedModel, tc) -> None:
    model = graph.metadata.get("model")
    if model not in (None, lm.name):
        raise UserError(f"the graph was traced on {model}, not {lm.name}; load that model")
    info = graph.metadata.get("transcoders") or {}
    theirs, ours = info.get("identity"), transcoder_identity(tc)
    if (theirs is not None and theirs != ours) or info.get("d_sae") not in (None, tc.d_sae):
        raise UserError(
            f"the graph was traced with other transcoders ({info.get('source') or 'unnamed'}, "
            f"{info.get('d_sae')} features) than the ones given; pass the graph's transcoders"
        )


@torch.no_grad()
def prompt_sources(
    lm: LoadedModel, tc, tokens: torch.Tensor, graph: AttributionGraph | None = None
) -> PromptSources:
    """Run the prompt and freeze it as attribution does (the graph's own settings for <bos>)."""
    if graph is not None:
        _check_graph(graph, lm, tc)
    bos_features = bool((graph.settings if graph else {}).get("bos_features", False))
    frozen = FrozenPrompt.of(lm, tc.to(lm.device), tokens)
    features = active_features(frozen, bos_features)
    errors, _ = errors_and_node_inputs(frozen, features)
    engine = TransposedModel(frozen.state, frozen.weights, frozen.transcoders)
    return PromptSources(frozen, features, errors, engine, record_head_maps(lm, tokens), graph)


class _Parts:
    """Visitor of `TransposedModel.resid_run` collecting every source's part `[n_src, B]` of B
    targets that read x_layer."""

    def __init__(self, ps: PromptSources, sources: SourceList, B: int):
        self.ps, self.src = ps, sources
        self.out = torch.zeros(len(sources), B, device=ps.engine.fw.device)
        f = ps.features
        self.f_layer, self.f_pos = f.layer[sources.features], f.pos[sources.features]
        self.f_act = f.activation[sources.features].float()

    def __call__(self, l: int, g: torch.Tensor, k: int, P: int) -> None:
        src, ps = self.src, self.ps
        if l == -1:
            emb = ps.frozen.state.embeddings[:P]
            self.out[src.token_start : src.token_start + P] = torch.einsum("pd,pbd->pb", emb, g)
            return
        e0 = src.error_start + l * src.n_pos
        self.out[e0 : e0 + P] = torch.einsum("pd,pbd->pb", self.ps.errors[l, :P], g)
        b_dec = ps.frozen.transcoders.b_dec[l].float()
        self.out[-1] += g.sum(0) @ b_dec
        for s in ps.frozen.transcoders.output_layers_into(l):
            self._features(s, l, g, P)

    def _features(self, s: int, l: int, g: torch.Tensor, P: int) -> None:
        """Features of source layer s writing into layer l's MLP output, a position at a time:
        their decoder rows `[m, D]` times the gradient there `[B, D]`."""
        tc = self.ps.frozen.transcoders
        here = torch.nonzero((self.f_layer == s) & (self.f_pos < P)).flatten()
        if not len(here):
            return
        rows, which = self.ps.features.decoders[s]
        out_index = list(tc.output_layers(s)).index(l)
        first_of_layer = int(torch.nonzero(self.ps.features.layer == s)[0])
        dec = rows[which[self.src.features[here] - first_of_layer], out_index].float()
        dec = dec * self.f_act[here, None]
        pos = self.f_pos[here]
        for p in torch.unique(pos).tolist():
            at = pos == p
            self.out[here[at]] += dec[at] @ g[p].T


@torch.no_grad()
def source_parts(
    ps: PromptSources, sources: SourceList, pos: int, maps: torch.Tensor
) -> torch.Tensor:
    """Each source's part `[n_src, B]` of `maps @ x_layer[pos]` (maps `[B, D]`)."""
    parts = _Parts(ps, sources, len(maps))
    ps.engine.resid_run(sources.layer, pos, maps, parts)
    return parts.out


@dataclass
class QKAttribution:
    """The QK attribution of one attention score (see the module docstring). n_src sources."""

    prompt: str
    token_strings: list[str]
    layer: int
    head: int
    kv_head: int
    query_pos: int
    key_pos: int
    versus_pos: int | None
    score: float  # scaling * q.k before soft-capping (minus the versus key's, in contrast mode)
    capped_score: float | None  # after the model's soft-capping of attention scores, if any
    pattern_row: np.ndarray  # [query_pos + 1] the head's attention probabilities at the query
    source_ids: list[str]  # [n_src] node ids (f:L:P:F, e:L:P, t:P) and "bias"
    source_labels: list[str]  # [n_src]
    in_graph: np.ndarray  # [n_src] bool: the source is a node of the graph given
    query_side: np.ndarray  # [n_src] scaling * q^(s) . k
    key_side: np.ndarray  # [n_src] scaling * q . k^(t)
    pairs: list[tuple[int, int, float]]  # the strongest pairs: (query source, key source, part)
    residual: float  # score - sum of the pair parts: zero up to rounding
    pattern_error: float  # max |model's attention row - softmax of the rebuilt scores|
    scaling: float  # query_pre_attn_scalar ** -0.5
    q_parts: torch.Tensor = field(repr=False)  # [n_src, hd] each source's part of q_i
    k_parts: torch.Tensor = field(repr=False)  # [n_src, hd] of k_j (- k_j')

    def top(self, side: str, n: int = 10) -> list[tuple[str, str, float]]:
        """The n sources with the largest |attribution| on `side` ("query" or "key")."""
        values = self.query_side if side == "query" else self.key_side
        order = np.argsort(-np.abs(values), kind="stable")[:n]
        return [(self.source_ids[i], self.source_labels[i], float(values[i])) for i in order]

    def pair_matrix(self, n: int = 12) -> tuple[list[int], list[int], np.ndarray]:
        """(query sources, key sources, parts `[n, n]`): the top n of each side by |attribution|
        and the pair parts between them, for a heatmap."""
        qi = np.argsort(-np.abs(self.query_side), kind="stable")[:n]
        ki = np.argsort(-np.abs(self.key_side), kind="stable")[:n]
        m = (self.q_parts[qi] @ self.k_parts[ki].T) * self.scaling
        return qi.tolist(), ki.tolist(), m.cpu().numpy()

    def to_dict(self, n: int = 20) -> dict:
        """A JSON-ready summary: the scores, the top n sources of each side, the top pairs."""

        def side(name):
            return [{"id": i, "label": lab, "value": v} for i, lab, v in self.top(name, n)]

        return {
            "prompt": self.prompt,
            "layer": self.layer,
            "head": self.head,
            "query_pos": self.query_pos,
            "key_pos": self.key_pos,
            "versus_pos": self.versus_pos,
            "tokens": list(self.token_strings),
            "query_token": self.token_strings[self.query_pos],
            "key_token": self.token_strings[self.key_pos],
            "score": self.score,
            "capped_score": self.capped_score,
            "pattern_row": [float(x) for x in self.pattern_row],
            "query_side": side("query"),
            "key_side": side("key"),
            "pairs": [
                {"query": self.source_ids[a], "key": self.source_ids[b], "value": v}
                for a, b, v in self.pairs[:n]
            ],
            "residual": self.residual,
            "pattern_error": self.pattern_error,
        }


def top_pairs(
    q_parts: torch.Tensor, k_parts: torch.Tensor, n: int, scaling: float
) -> list[tuple[int, int, float]]:
    """The n pairs (s, t) with the largest |scaling * q^(s) . k^(t)|, exactly, without the whole
    `[n_src, n_src]` table: the pairs among the sources with the largest |q^(s)| and |k^(t)|,
    widened until no pair outside can beat the n-th (|q^(s) . k^(t)| <= |q^(s)| |k^(t)|)."""
    qn, kn = q_parts.norm(dim=1), k_parts.norm(dim=1)
    q_order, k_order = torch.argsort(-qn), torch.argsort(-kn)
    width = 256
    while True:
        a, b = q_order[:width], k_order[:width]
        block = (q_parts[a] @ k_parts[b].T) * scaling
        vals, flat = block.abs().flatten().topk(min(n, block.numel()))
        outside = 0.0
        if width < len(q_order):
            outside = max(outside, float(qn[q_order[width]] * kn[k_order[0]]))
        if width < len(k_order):
            outside = max(outside, float(qn[q_order[0]] * kn[k_order[width]]))
        if outside * abs(scaling) <= float(vals[-1]) or width >= max(len(qn), len(kn)):
            break
        width *= 4
    rows, cols = flat // block.shape[1], flat % block.shape[1]
    return [(int(a[r]), int(b[c]), float(block[r, c])) for r, c in zip(rows, cols)]


def _source_labels(graph: AttributionGraph | None, ids: list[str], tokens: list[str]) -> list:
    """(labels, in_graph) of source ids: the graph's labels where it has the node, else the
    dashboard label of a feature the graph has dashboards for, else a plain name."""
    index = {nid: i for i, nid in enumerate(graph.node_ids())} if graph is not None else {}
    boards = graph.feature_dashboards if graph is not None else {}
    labels = []
    for nid in ids:
        kind, *rest = nid.split(":")
        if nid in index:
            labels.append(display_label(graph, index[nid])[0])
        elif kind == "f":
            board = boards.get(f"{rest[0]}/{rest[2]}") or {}
            labels.append(board.get("auto_label") or f"L{rest[0]}/{rest[2]}")
        elif kind == "e":
            labels.append(f"err L{rest[0]} {tokens[int(rest[1])]!r}")
        elif kind == "t":
            labels.append(repr(tokens[int(rest[0])]))
        else:
            labels.append("decoder biases")
    return labels, np.array([nid in index for nid in ids])


def check_head(lm: LoadedModel, layer: int, head: int) -> None:
    s = lm.sites
    if not 0 <= layer < s.n_layers:
        raise UserError(
            f"--layer {layer} is out of range: the model has layers 0..{s.n_layers - 1}"
        )
    if not 0 <= head < s.n_heads:
        raise UserError(f"--head {head} is out of range: the model has heads 0..{s.n_heads - 1}")


def check_key(n_pos: int, window: int | None, query: int, key: int, flag: str = "--key") -> int:
    """The key position (negative counts from the end), refused where the score is masked."""
    key = key + n_pos if key < 0 else key
    if not 0 <= key < n_pos:
        raise UserError(f"{flag} {key} is out of range: the prompt has positions 0..{n_pos - 1}")
    if key > query:
        raise UserError(
            f"{flag} {key} comes after the query {query}: causal attention masks it; pick a key "
            f"<= the query"
        )
    if window is not None and query - key >= window:
        raise UserError(
            f"{flag} {key} is outside this layer's sliding window ({window} positions up to the "
            f"query {query}): the score is masked; pick a key > {query - window} or a global layer"
        )
    return key


def _scores_row(ps: PromptSources, maps: HeadMaps, head: int, query: int) -> torch.Tensor:
    """Pre-softmax scores `[query + 1]` of `head` at `query` over keys 0..query, from the recorded
    residual stream (masked keys -inf)."""
    lm, state, layer = ps.lm, ps.frozen.state, maps.layer
    kv = head // (lm.sites.n_heads // lm.sites.n_kv_heads)
    s_in, x = state.s_in[layer], state.resid[layer]
    q = maps.query_map(lm, head, query, s_in) @ x[query]
    keys = maps.keys(lm, kv, x[: query + 1], s_in[: query + 1])
    scores = (keys @ q) * maps.scaling
    if maps.sliding_window is not None:
        scores[: max(0, query - maps.sliding_window + 1)] = float("-inf")
    return scores


def _softcap_and_error(
    scores: torch.Tensor, pattern: torch.Tensor, cap: float | None
) -> tuple[float | None, float]:
    """(the cap the model applied, or None; max |pattern - softmax|). A configured cap is taken
    as applied when it explains the model's attention better than no cap (implementations differ
    on whether they apply Gemma's attn_logit_softcapping)."""
    plain = float((torch.softmax(scores, -1) - pattern).abs().max())
    if cap is None:
        return None, plain
    capped = float((torch.softmax(cap * torch.tanh(scores / cap), -1) - pattern).abs().max())
    return (cap, capped) if capped < plain else (None, plain)


def _prompt_of(lm: LoadedModel, graph_or_prompt, chat: bool):
    """(tokens `[n]`, prompt text, graph or None)."""
    if isinstance(graph_or_prompt, AttributionGraph):
        g = graph_or_prompt
        return torch.as_tensor(g.tokens, dtype=torch.long), g.prompt, g
    if isinstance(graph_or_prompt, str):
        return lm.tokenize(graph_or_prompt, chat=chat), graph_or_prompt, None
    raise UserError("give an attribution graph or a prompt text")


@torch.no_grad()
def qk(
    lm: LoadedModel,
    graph_or_prompt,
    layer: int,
    head: int,
    query_pos: int = -1,
    key_pos: int | None = None,
    versus: int | None = None,
    transcoders=None,
    top: int = 20,
    chat: bool = False,
) -> QKAttribution:
    """Attribute the pre-softmax score of `head` of `layer`, query `query_pos`, key `key_pos`
    (negative positions count from the end; no key: the one the head attends to most), to pairs
    of sources (module docstring).

    graph_or_prompt: an AttributionGraph (its tokens and settings; its labels name the sources)
    or a prompt text. transcoders: a TranscoderSet or a path or "default" (default: the graph's).
    versus: a second key position: attribute score(query, key) - score(query, versus). top: how
    many pairs to keep."""
    tokens, text, graph = _prompt_of(lm, graph_or_prompt, chat)
    check_head(lm, layer, head)
    tc = resolve_graph_transcoders(lm, graph, transcoders)
    ps = prompt_sources(lm, tc, tokens, graph)
    return qk_of_sources(ps, text, layer, head, query_pos, key_pos, versus, top)


def resolve_graph_transcoders(lm: LoadedModel, graph: AttributionGraph | None, transcoders):
    """The transcoders given, else the graph's own (its settings name them), else the default."""
    spec = transcoders
    if spec is None and graph is not None:
        named = graph.settings.get("transcoders")
        spec = named if isinstance(named, str) and named else None
    return resolve_transcoders(spec or "default", lm, progress=False)


@torch.no_grad()
def qk_of_sources(
    ps: PromptSources,
    text: str,
    layer: int,
    head: int,
    query_pos: int = -1,
    key_pos: int | None = None,
    versus: int | None = None,
    top: int = 20,
) -> QKAttribution:
    """`qk` on a prompt already frozen (`prompt_sources`): several heads or keys of one prompt
    share its forward pass."""
    lm, n = ps.lm, ps.frozen.n_pos
    check_head(lm, layer, head)
    maps = ps.head_maps[layer]
    i = check_key(n, None, n - 1, query_pos, "--query")
    pattern = ps.frozen.state.patterns[layer, head, i, : i + 1].float()
    if key_pos is None:  # the key the head attends to most
        key_pos = int(torch.argmax(pattern))
    j = check_key(n, maps.sliding_window, i, key_pos)
    jv = None if versus is None else check_key(n, maps.sliding_window, i, versus, "--versus")
    kv = head // (lm.sites.n_heads // lm.sites.n_kv_heads)
    s_in = ps.frozen.state.s_in[layer]
    sources = ps.sources(layer, i + 1)
    q_parts = source_parts(ps, sources, i, maps.query_map(lm, head, i, s_in))
    k_parts = source_parts(ps, sources, j, maps.key_map(lm, kv, j, s_in))
    if jv is not None:
        k_parts -= source_parts(ps, sources, jv, maps.key_map(lm, kv, jv, s_in))
    row = _scores_row(ps, maps, head, i)
    cap, pattern_error = _softcap_and_error(row, pattern, maps.softcap)
    score = float(row[j] - (row[jv] if jv is not None else 0.0))
    q, k = q_parts.sum(0), k_parts.sum(0)
    query_side = ((q_parts @ k) * maps.scaling).cpu().numpy()
    key_side = ((k_parts @ q) * maps.scaling).cpu().numpy()
    token_strings = [lm.tokenizer.decode([int(t)]) for t in ps.frozen.tokens]
    labels, in_graph = _source_labels(ps.graph, sources.ids, token_strings)
    return QKAttribution(
        prompt=text,
        token_strings=token_strings,
        layer=layer,
        head=head,
        kv_head=kv,
        query_pos=i,
        key_pos=j,
        versus_pos=jv,
        score=score,
        capped_score=None if cap is None or jv is not None else cap * float(np.tanh(score / cap)),
        pattern_row=pattern.cpu().numpy(),
        source_ids=sources.ids,
        source_labels=labels,
        in_graph=in_graph,
        query_side=query_side,
        key_side=key_side,
        pairs=top_pairs(q_parts, k_parts, top, maps.scaling),
        residual=score - float(query_side.astype(np.float64).sum()),
        pattern_error=pattern_error,
        scaling=maps.scaling,
        q_parts=q_parts.cpu(),
        k_parts=k_parts.cpu(),
    )


def qk_text(r: QKAttribution, n: int = 10) -> str:
    """The attribution as text: the head's attention row, the score, both sides, the top pairs."""
    tok = r.token_strings
    versus = ""
    if r.versus_pos is not None:
        versus = f" rather than {tok[r.versus_pos]!r} @{r.versus_pos}"
    lines = [
        f"layer {r.layer} head {r.head} (key head {r.kv_head}): query {tok[r.query_pos]!r} "
        f"@{r.query_pos} -> key {tok[r.key_pos]!r} @{r.key_pos}{versus}",
        f"score {r.score:+.4f}"
        + (f" (after soft-capping {r.capped_score:+.4f})" if r.capped_score is not None else "")
        + f"; attention probability {r.pattern_row[r.key_pos]:.3f}",
        "attention row at the query: "
        + "  ".join(
            f"@{j} {tok[j]!r} {p:.3f}"
            for j, p in sorted(enumerate(r.pattern_row), key=lambda x: -x[1])[:8]
        ),
    ]
    for side, what in (("query", "query side (q^(s) . k)"), ("key", "key side (q . k^(t))")):
        lines.append(f"{what}, top {n}:")
        lines += [f"  {v:+9.4f}  {label}  [{nid}]" for nid, label, v in r.top(side, n)]
    lines.append(f"top pairs (query source x key source), of {len(r.source_ids)} sources a side:")
    for a, b, v in r.pairs[:n]:
        lines.append(f"  {v:+9.4f}  {r.source_labels[a]}  x  {r.source_labels[b]}")
    lines.append(
        f"residual (score - sum of parts): {r.residual:+.2e}; model's attention row vs rebuilt "
        f"scores: max diff {r.pattern_error:.1e}"
    )
    return "\n".join(lines)


def qk_view(r: QKAttribution, n: int = 10) -> dict:
    """What a picture or the HTML viewer needs: `to_dict` plus the pair table of the top n sources
    of each side (ids, labels, `[n, n]` parts)."""
    qi, ki, m = r.pair_matrix(n)
    out = r.to_dict(n)
    out["matrix"] = {
        "query_ids": [r.source_ids[i] for i in qi],
        "query_labels": [r.source_labels[i] for i in qi],
        "key_ids": [r.source_ids[i] for i in ki],
        "key_labels": [r.source_labels[i] for i in ki],
        "values": [[float(x) for x in row] for row in m],
    }
    return out
