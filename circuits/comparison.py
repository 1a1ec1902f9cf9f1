"""Comparing the circuits of two prompts (e.g. a refusal prompt and its jailbreak).

Prompts are aligned token by token (difflib on the token strings; the last positions, where both
predict, always align). The aligned positions form a shared frame of columns; a node's merged id is
its id with the position replaced by its column (`f:L:C:F`, `e:L:C`, `t:C`, `l:TOKEN`). Features
match when layer, feature id and column agree, error nodes when layer and column agree, tokens when
the column and the token agree, logits by vocabulary id. Graphs that were not pruned yet are pruned
first.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np

from gemma_lm.errors import UserError
from gemma_lm.jobs import with_overrides

from .graph import ERROR, FEATURE, TOKEN, AttributionGraph, display_label
from .pruning import PruneConfig, compute_influence, prune


@dataclass
class CompareConfig:
    """One comparison job: drives both `circuits compare` and `circuits.compare`."""

    node_threshold: float = PruneConfig.node_threshold
    """prune graphs that are not pruned yet with this node threshold"""
    edge_threshold: float = PruneConfig.edge_threshold
    """and this edge threshold"""
    top_k: int = 10
    """largest changes to list"""

    def check(self) -> None:
        PruneConfig(self.node_threshold, self.edge_threshold).check()
        if self.top_k < 0:
            raise UserError("--top-k must be >= 0")


@dataclass
class Comparison:
    a: AttributionGraph  # the pruned graphs compared
    b: AttributionGraph
    # shared frame: (position in A, position in B) per column
    columns: list[tuple[int | None, int | None]]
    a_to_merged: dict[str, str]  # A's node id -> merged id
    b_to_merged: dict[str, str]
    node_status: dict[str, str]  # merged id -> "a" (only in A), "b" (only in B), "both"
    jaccard: float  # |shared| / |union| of feature and error nodes (merged ids)
    feature_jaccard_any_position: float  # the same over (layer, feature id), positions ignored
    # largest |influence B - influence A|
    influence_changes: list[dict] = field(default_factory=list)
    edge_changes: list[dict] = field(default_factory=list)  # largest |weight B - weight A|

    def ids_with(self, status: str, kinds: tuple[str, ...] = ("f", "e")) -> list[str]:
        return sorted(
            m for m, s in self.node_status.items() if s == status and m.split(":")[0] in kinds
        )

    @property
    def shared(self) -> list[str]:
        return self.ids_with("both")

    @property
    def only_a(self) -> list[str]:
        return self.ids_with("a")

    @property
    def only_b(self) -> list[str]:
        return self.ids_with("b")

    def column_tokens(self) -> list[str]:
        """A token label per column: the shared token, or "A-token|B-token" where they differ."""
        out = []
        for pa, pb in self.columns:
            ta = self.a.token_strings[pa] if pa is not None else None
            tb = self.b.token_strings[pb] if pb is not None else None
            out.append(
                ta
                if ta == tb
                else f"{ta if ta is not None else '∅'}|{tb if tb is not None else '∅'}"
            )
        return out

    def summary(self) -> str:
        counts = {s: {k: 0 for k in "fetl"} for s in ("a", "b", "both")}
        for m, s in self.node_status.items():
            counts[s][m[0]] += 1
        aligned = sum(pa is not None and pb is not None for pa, pb in self.columns)
        lines = [
            f"A: {self.a.prompt!r} ({self.a.n_pos} tokens)",
            f"B: {self.b.prompt!r} ({self.b.n_pos} tokens)",
            f"aligned positions: {aligned}",
            f"features: {counts['both']['f']} shared, {counts['a']['f']} only in A, "
            f"{counts['b']['f']} only in B",
            f"error nodes: {counts['both']['e']} shared, {counts['a']['e']} only in A, "
            f"{counts['b']['e']} only in B",
            f"logits: {counts['both']['l']} shared, {counts['a']['l']} only in A, "
            f"{counts['b']['l']} only in B",
            f"Jaccard of pruned feature+error nodes: {self.jaccard:.3f}; "
            f"of (layer, feature) at any position: {self.feature_jaccard_any_position:.3f}",
        ]
        if self.influence_changes:
            lines.append("largest influence changes (B - A):")
            lines += [
                f"  {c['id']:<22} {c['a']:.4f} -> {c['b']:.4f} ({c['delta']:+.4f})  {c['label']}"
                for c in self.influence_changes
            ]
        if self.edge_changes:
            lines.append("largest edge weight changes (B - A):")
            lines += [
                f"  {c['source']} -> {c['target']}: "
                f"{c['a']:+.4g} -> {c['b']:+.4g} ({c['delta']:+.4g})"
                for c in self.edge_changes
            ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "prompt_a": self.a.prompt,
            "prompt_b": self.b.prompt,
            "columns": self.columns,
            "column_tokens": self.column_tokens(),
            "node_status": self.node_status,
            "shared": self.shared,
            "only_a": self.only_a,
            "only_b": self.only_b,
            "jaccard": self.jaccard,
            "feature_jaccard_any_position": self.feature_jaccard_any_position,
            "influence_changes": self.influence_changes,
            "edge_changes": self.edge_changes,
        }


def align_tokens(tokens_a: list[str], tokens_b: list[str]) -> list[tuple[int | None, int | None]]:
    """Columns of a shared frame, in order: (i, j) for aligned positions, (i, None) / (None, j) for
    the rest. Equal runs found by difflib align; the final positions always align."""
    sm = difflib.SequenceMatcher(a=tokens_a, b=tokens_b, autojunk=False)
    pairs = [(blk.a + k, blk.b + k) for blk in sm.get_matching_blocks() for k in range(blk.size)]
    la, lb = len(tokens_a), len(tokens_b)
    if la and lb and (la - 1, lb - 1) not in pairs:
        pairs = [(i, j) for i, j in pairs if i < la - 1 and j < lb - 1] + [(la - 1, lb - 1)]
    cols, i, j = [], 0, 0
    for pi, pj in pairs + [(la, lb)]:
        cols += [(k, None) for k in range(i, pi)] + [(None, k) for k in range(j, pj)]
        if pi < la:
            cols.append((pi, pj))
        i, j = pi + 1, pj + 1
    return cols


def _merged_ids(
    g: AttributionGraph, col_of: dict[int, int], side: str, other_tokens: dict[int, int]
) -> list[str]:
    out = []
    for i in range(g.n_nodes):
        k, L, p, f = int(g.kind[i]), int(g.layer[i]), int(g.pos[i]), int(g.feature[i])
        c = col_of[p]
        if k == FEATURE:
            out.append(f"f:{L}:{c}:{f}")
        elif k == ERROR:
            out.append(f"e:{L}:{c}")
        elif k == TOKEN:
            same = other_tokens.get(c) == int(g.tokens[p])
            out.append(f"t:{c}" if same else f"t:{c}:{side}")
        else:
            out.append(f"l:{f}")
    return out


def _influence(g: AttributionGraph) -> np.ndarray:
    if g.influence is not None:
        return np.asarray(g.influence, dtype=np.float64)
    return compute_influence(g)


def compare(
    a: AttributionGraph, b: AttributionGraph, config: CompareConfig | None = None, **overrides
) -> Comparison:
    """Compare two circuits. Unpruned graphs (no `graph.pruning`) are pruned with the config's
    thresholds first; options as in `CompareConfig`."""
    cfg = with_overrides(config, CompareConfig, overrides)
    thresholds = {"node_threshold": cfg.node_threshold, "edge_threshold": cfg.edge_threshold}
    a = a if a.is_pruned else prune(a, **thresholds)
    b = b if b.is_pruned else prune(b, **thresholds)
    columns = align_tokens(list(a.token_strings), list(b.token_strings))
    col_a = {pa: c for c, (pa, _) in enumerate(columns) if pa is not None}
    col_b = {pb: c for c, (_, pb) in enumerate(columns) if pb is not None}
    tok_a = {col_a[p]: int(t) for p, t in enumerate(a.tokens)}
    tok_b = {col_b[p]: int(t) for p, t in enumerate(b.tokens)}
    ma = _merged_ids(a, col_a, "a", tok_b)
    mb = _merged_ids(b, col_b, "b", tok_a)
    sa, sb = set(ma), set(mb)
    status = {m: "both" if m in sb else "a" for m in ma}
    status.update({m: "b" for m in mb if m not in sa})

    def inner(ids):
        return {m for m in ids if m[0] in "fe"}

    ia, ib = inner(sa), inner(sb)
    jaccard = len(ia & ib) / len(ia | ib) if ia | ib else 1.0
    fa = {(int(a.layer[i]), int(a.feature[i])) for i in a.nodes_of(FEATURE)}
    fb = {(int(b.layer[i]), int(b.feature[i])) for i in b.nodes_of(FEATURE)}
    fj = len(fa & fb) / len(fa | fb) if fa | fb else 1.0

    inf_a = dict(zip(ma, _influence(a)))
    inf_b = dict(zip(mb, _influence(b)))
    label_of = {m: display_label(a, i)[0] for i, m in enumerate(ma)}
    label_of.update({m: display_label(b, i)[0] for i, m in enumerate(mb) if m not in label_of})
    changes = [
        {
            "id": m,
            "a": float(inf_a.get(m, 0.0)),
            "b": float(inf_b.get(m, 0.0)),
            "delta": float(inf_b.get(m, 0.0) - inf_a.get(m, 0.0)),
            "status": status[m],
            "label": label_of[m],
        }
        for m in ia | ib
    ]
    changes.sort(key=lambda c: (-abs(c["delta"]), c["id"]))

    def edges(g, ids):
        coo = g.adjacency.tocoo()
        return {(ids[s], ids[t]): float(w) for t, s, w in zip(coo.row, coo.col, coo.data)}

    ea, eb = edges(a, ma), edges(b, mb)
    edge_changes = [
        {
            "source": s,
            "target": t,
            "a": ea.get((s, t), 0.0),
            "b": eb.get((s, t), 0.0),
            "delta": eb.get((s, t), 0.0) - ea.get((s, t), 0.0),
        }
        for s, t in set(ea) | set(eb)
    ]
    edge_changes.sort(key=lambda c: (-abs(c["delta"]), c["source"], c["target"]))
    return Comparison(
        a=a,
        b=b,
        columns=columns,
        a_to_merged=dict(zip(a.node_ids(), ma)),
        b_to_merged=dict(zip(b.node_ids(), mb)),
        node_status=status,
        jaccard=jaccard,
        feature_jaccard_any_position=fj,
        influence_changes=changes[: cfg.top_k],
        edge_changes=edge_changes[: cfg.top_k],
    )
