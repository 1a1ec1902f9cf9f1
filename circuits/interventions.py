"""Interventions: set, scale or zero features (or error terms) and see how the logits move.

Constrained patching: the transcoders are spliced in at every layer and the error term of every
(layer, position) is held at its clean value, so an intervention changes only what flows through
features.

mode "frozen": the attribution graph's own world. Attention patterns and norm scales stay as in the
    clean run (`replacement.frozen_forward`); a change reaches later features through their
    pre-activations and activation functions. With `propagate=False` every other feature keeps its
    clean activation, which is exactly the world the graph's direct-effect edges describe.
mode "full": the real model re-run with hooks at every layer's MLP output (the `ModelSites`): the
    output becomes the transcoder output of the live MLP input (intervention applied) plus the clean
    error term; attention and norms are recomputed.

Targets are node ids as `AttributionGraph.node_id` writes them: `f:LAYER:POS:FEATURE` and
`e:LAYER:POS`; POS may be `*` (every position, generated ones included). A supernode is a name
mapped to a list of node ids (the HTML viewer saves `{"supernodes": {name: [ids]}}`); an operation
on it applies to every member.

Generation is greedy and always runs the full model (frozen patterns exist only for the prompt),
with the intervention held at its positions. Generated positions have no clean run, so their error
term is the live one: the real MLP output there plus the change of the transcoder output that the
intervention causes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from gemma_lm.errors import UserError
from gemma_lm.jobs import option, with_overrides
from gemma_lm.models import DEFAULT_MODEL, LoadedModel, load_model
from transcoders.default import resolve_transcoders

from .graph import AttributionGraph
from .replacement import (
    FrozenWeights,
    PromptState,
    check_prompt,
    frozen_forward,
    run_and_freeze,
    softcap,
)

OPS = ("set", "scale", "zero")
Mode = Literal["frozen", "full"]
MODES = get_args(Mode)


@dataclass
class InterventionConfig:
    """Intervention: which model and transcoders, and how the patched run goes (`circuits.intervene`
    takes these as keywords)."""

    model: str | None = None
    """model name or path (default: the graph's model, else gemma-3-270m)"""
    transcoders: str | None = None
    """'default' or a transcoder directory (default: the graph's transcoders, else 'default')"""
    mode: Mode = "frozen"
    """frozen: attention and norms of the clean run (the graph's world); full: re-run the model"""
    propagate: bool = option(default=True, off_flag="--hold")
    """let every other feature respond to the intervention (--hold keeps them at their clean
    activations: direct effects only)"""
    generate: int = option(default=0, metavar="N")
    """greedy continuation tokens (clean and intervened)"""
    top_k: int = option(default=10, flag="--top", metavar="K")
    """rows of the before/after table"""
    chat: bool = False
    """wrap a text prompt in the model's chat template"""
    device: str = "cpu"
    """cpu, cuda or cuda:N"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """the model's dtype"""
    progress: bool = True
    """show progress bars"""

    def check(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; use 'frozen' or 'full'")
        if self.generate < 0 or self.top_k < 1:
            raise UserError("--generate must be >= 0 and --top >= 1")


@dataclass
class Intervention:
    """One operation: op "set" (activation := value), "scale" (activation *= value) or "zero", on a
    node id, a supernode name, or a list of node ids."""

    op: str
    target: str | tuple[str, ...]
    value: float = 0.0


@dataclass(frozen=True)
class Site:
    """A resolved target: a feature (kind "f") or an error term (kind "e"); pos None means every
    position."""

    kind: str
    layer: int
    pos: int | None
    feature: int = -1


@dataclass
class InterventionResult:
    """Logits at the last prompt position before and after, and optional continuations.

    Logits are `[vocab]` as the model outputs them (after soft-capping); `raw_*` are before
    soft-capping (frozen mode only). `clean_acts` / `acts`: per layer `[n_pos, F]` feature
    activations at the prompt positions (the first forward pass of full mode)."""

    prompt: str
    tokens: torch.Tensor = field(repr=False)  # [n_pos]
    token_strings: list[str] = field(repr=False)
    mode: str
    propagate: bool
    applied: list[str]
    logits_clean: torch.Tensor = field(repr=False)
    logits: torch.Tensor = field(repr=False)
    # the before/after table: union of the top-k tokens before and after
    top: list[dict] = field(repr=False)
    clean_acts: list[torch.Tensor] = field(repr=False, default_factory=list)
    acts: list[torch.Tensor] = field(repr=False, default_factory=list)
    raw_logits_clean: torch.Tensor | None = field(repr=False, default=None)
    raw_logits: torch.Tensor | None = field(repr=False, default=None)
    continuation_clean: str | None = None
    continuation: str | None = None
    continuation_tokens_clean: list[int] = field(default_factory=list)
    continuation_tokens: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. operations that cannot change anything

    @property
    def logit_change(self) -> torch.Tensor:
        return self.logits - self.logits_clean

    @property
    def prob_change(self) -> torch.Tensor:
        return torch.softmax(self.logits, -1) - torch.softmax(self.logits_clean, -1)

    @property
    def n_changed_features(self) -> int:
        """How many (layer, position, feature) activations differ from the clean run (intervened
        ones too)."""
        return int(
            sum(
                ((a - c).abs() > 1e-6 * (1 + c.abs())).sum()
                for a, c in zip(self.acts, self.clean_acts)
            )
        )

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "token_strings": self.token_strings,
            "mode": self.mode,
            "propagate": self.propagate,
            "interventions": self.applied,
            "top": self.top,
            "n_changed_features": self.n_changed_features,
            "notes": self.notes,
            "continuation_clean": self.continuation_clean,
            "continuation": self.continuation,
        }

    def table(self) -> str:
        """The before/after table as text (what `circuits intervene` prints)."""
        world = "frozen attention and norms" if self.mode == "frozen" else "full re-run"
        lines = [
            f"interventions ({world}{'' if self.propagate else ', other features held'}): "
            + ("; ".join(self.applied) or "none"),
            *[f"note: {n}" for n in self.notes],
            f"features whose activation changed: {self.n_changed_features}",
            f"{'token':<18}{'logit':>9}{'after':>9}{'change':>9}{'prob':>9}{'after':>9}{'change':>9}",
        ]
        for r in self.top:
            lines.append(
                f"{r['token']!r:<18.18}{r['logit_before']:>9.3f}{r['logit_after']:>9.3f}"
                f"{r['logit_change']:>+9.3f}{r['prob_before']:>9.4f}{r['prob_after']:>9.4f}"
                f"{r['prob_change']:>+9.4f}"
            )
        if self.continuation is not None:
            note = " (generated by the full model)" if self.mode == "frozen" else ""
            lines += [
                f"continuation, clean:       {self.continuation_clean!r}",
                f"continuation, intervened:  {self.continuation!r}{note}",
            ]
        return "\n".join(lines)


# -- targets ---------------------------------------------------------------------------------------


def normalize(interventions) -> list[Intervention]:
    """Interventions from a dict {target: value} (set), a list of `Intervention`, or tuples
    (op, target[, value])."""
    if interventions is None:
        return []
    if isinstance(interventions, dict):
        interventions = [Intervention("set", k, float(v)) for k, v in interventions.items()]
    out = []
    for item in interventions:
        if isinstance(item, Intervention):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3) and item[0] in OPS:
            out.append(Intervention(item[0], item[1], float(item[2]) if len(item) == 3 else 0.0))
        else:
            raise UserError(
                f"cannot read intervention {item!r}; use (op, target[, value]) with op in {OPS}"
            )
    for iv in out:
        if iv.op not in OPS:
            raise UserError(f"unknown operation {iv.op!r}; use one of {', '.join(OPS)}")
        if not math.isfinite(iv.value):  # NaN or inf would only fill the table with NaN
            raise UserError(
                f"{iv.op} {iv.target}: the value {iv.value} is not a finite number; give a number"
            )
    return out


def parse_node(node_id: str, n_layers: int, n_pos: int, d_sae: int) -> Site:
    """A `Site` from `f:LAYER:POS:FEATURE` or `e:LAYER:POS` (POS may be `*`), checked against the
    sizes."""
    parts = node_id.strip().split(":")
    kind = parts[0]
    if kind in ("t", "l"):
        raise UserError(
            f"{node_id!r} is a {'token' if kind == 't' else 'logit'} node; interventions act on "
            f"features (f:LAYER:POS:FEATURE) and error nodes (e:LAYER:POS)"
        )
    if (kind, len(parts)) not in (("f", 4), ("e", 3)):
        raise UserError(
            f"cannot read node {node_id!r}: features are f:LAYER:POS:FEATURE (e.g. f:3:5:1021), "
            f"error nodes e:LAYER:POS; POS may be *"
        )
    try:
        layer = int(parts[1])
        pos = None if parts[2] == "*" else int(parts[2])
        feature = int(parts[3]) if kind == "f" else -1
    except ValueError:
        raise UserError(
            f"cannot read node {node_id!r}: LAYER, POS and FEATURE must be integers (POS may be *)"
        ) from None
    if not 0 <= layer < n_layers:
        raise UserError(f"node {node_id}: layer {layer} is outside 0..{n_layers - 1}")
    if pos is not None and not 0 <= pos < n_pos:
        raise UserError(
            f"node {node_id}: position {pos} is outside the prompt's positions 0..{n_pos - 1}"
        )
    if kind == "f" and not 0 <= feature < d_sae:
        raise UserError(f"node {node_id}: feature {feature} is outside 0..{d_sae - 1}")
    return Site(kind, layer, pos, feature)


def resolve(
    interventions, supernodes: dict | None, n_layers: int, n_pos: int, d_sae: int
) -> tuple[list[tuple[str, float, Site]], list[str]]:
    """Expand supernodes and parse node ids. Returns ([(op, value, site)], descriptions)."""
    supernodes = supernodes or {}
    ops, described = [], []
    for iv in normalize(interventions):
        if isinstance(iv.target, (list, tuple)):
            members, name = list(iv.target), f"{len(iv.target)} nodes"
        elif iv.target in supernodes:
            members, name = (
                list(supernodes[iv.target]),
                f"supernode {iv.target!r} ({len(supernodes[iv.target])} nodes)",
            )
        elif ":" in str(iv.target):
            members, name = [iv.target], str(iv.target)
        else:
            known = ", ".join(map(repr, supernodes)) or "none given"
            raise UserError(
                f"unknown node or supernode {iv.target!r}; node ids look like f:LAYER:POS:FEATURE, "
                f"supernodes come from --groups (known: {known})"
            )
        if not members:
            raise UserError(f"supernode {iv.target!r} is empty")
        for m in members:
            site = parse_node(str(m), n_layers, n_pos, d_sae)
            if site.kind == "e" and iv.op == "set":
                raise UserError(f"{m}: an error node is a vector; scale or zero it, don't set it")
            ops.append((iv.op, float(iv.value), site))
        described.append(
            f"{iv.op} {name}"
            + {"set": f" = {iv.value:g}", "scale": f" x{iv.value:g}"}.get(iv.op, "")
        )
    return ops, described


def comparison_supernodes(comparison, side: str = "a") -> dict[str, list[str]]:
    """Supernodes, in the node ids of graph `side` ("a" or "b") of a `circuits.compare` result:
    "only-here" (features of this circuit that the other lacks) and "shared" (features in both
    circuits)."""
    to_merged = comparison.a_to_merged if side == "a" else comparison.b_to_merged
    groups: dict[str, list[str]] = {"only-here": [], "shared": []}
    for node, merged in to_merged.items():
        status = comparison.node_status.get(merged)
        if node.startswith("f:") and status in (side, "both"):
            groups["only-here" if status == side else "shared"].append(node)
    return groups


def _apply_feature_ops(acts: torch.Tensor, layer: int, ops) -> None:
    """Apply the feature operations of `layer` to activations `[T, F]` in place (in the order
    given)."""
    for op, value, s in ops:
        if s.kind != "f" or s.layer != layer:
            continue
        idx = slice(None) if s.pos is None else s.pos
        if op == "set":
            acts[idx, s.feature] = value
        elif op == "scale":
            acts[idx, s.feature] *= value
        else:
            acts[idx, s.feature] = 0.0


def inert_notes(ops, clean_acts: list[torch.Tensor]) -> list[str]:
    """Notes on feature operations that scale or zero a feature that is inactive (0) at every prompt
    position they touch: they change nothing there."""
    notes = []
    for op, _, s in ops:
        if s.kind == "f" and op != "set":
            acts = clean_acts[s.layer][slice(None) if s.pos is None else s.pos, s.feature]
            if not bool(acts.any()):
                pos = "*" if s.pos is None else s.pos
                notes.append(
                    f"f:{s.layer}:{pos}:{s.feature} is inactive in the prompt (activation 0), so "
                    f"{op} leaves it at 0 there; use set to switch it on"
                )
    return notes


def _error_factors(ops, layer: int, n: int, device=None) -> torch.Tensor | None:
    """Per-position factors `[n]` of layer `layer`'s error term, or None when it is untouched."""
    f = None
    for op, value, s in ops:
        if s.kind == "e" and s.layer == layer:
            f = torch.ones(n, device=device) if f is None else f
            f[slice(None) if s.pos is None else s.pos] *= 0.0 if op == "zero" else value
    return f


# -- frozen mode -----------------------------------------------------------------------------------


@dataclass
class _FrozenClean:
    """Frozen mode's clean side, the same for every intervention on one prompt: per layer
    `[n_pos, F]` clean activations, the error terms `[L, n_pos, D]` and the clean frozen pass."""

    fw: FrozenWeights
    acts: list[torch.Tensor]
    errors: torch.Tensor
    ref: dict

    @classmethod
    def of(cls, lm: LoadedModel, state: PromptState, tc) -> _FrozenClean:
        fw = FrozenWeights(lm)
        acts = [tc.encode(l, state.mlp_in[l]).float() for l in range(fw.n_layers)]
        errors = state.mlp_out - tc.reconstruct(state.mlp_in).float()
        return cls(fw, acts, errors, frozen_forward(state, fw, tc, acts, errors))


def _frozen(state: PromptState, clean: _FrozenClean, tc, ops, propagate: bool):
    """(acts, raw logits) of the intervened run in the frozen replacement model."""
    fw, clean_acts, ref = clean.fw, clean.acts, clean.ref
    L = fw.n_layers
    errs = clean.errors.clone()
    for l in range(L):
        f = _error_factors(ops, l, state.n_pos, errs.device)
        if f is not None:
            errs[l] *= f[:, None]
    acts = [a.clone() for a in clean_acts]
    if not ops:
        return acts, ref["logits"].cpu()
    first = min(s.layer for _, _, s in ops)
    for l in range(first, L):
        if propagate and l > first:
            # x_l depends on features of layers < l only, which are final by now. The change is
            # taken against the frozen clean pass, so nothing moves where nothing upstream moved
            # (the frozen and the real forward pass differ by rounding); a feature that switches off
            # is exactly 0.
            new = tc.activate(
                l, frozen_forward(state, fw, tc, acts, errs, logits=False)["preacts"][l]
            ).float()
            old = tc.activate(l, ref["preacts"][l]).float()
            acts[l] = torch.where(
                new == old, clean_acts[l], torch.where(new == 0, 0.0, clean_acts[l] + new - old)
            )
        _apply_feature_ops(acts[l], l, ops)
    out = frozen_forward(state, fw, tc, acts, errs)
    return acts, out["logits"].cpu()


# -- full mode -------------------------------------------------------------------------------------


class Splice:
    """Hooks that splice the transcoders into the real model with the clean error terms held fixed.

    At layer l's MLP input the features are encoded (intervention applied); the MLP output becomes
        base + sum_s (acts_s - ref_s) @ W_dec[s -> l] + skip(x_l) - skip(x_ref)
             + (factor - 1) * error
    where, at prompt positions, base/ref/x_ref are the clean MLP output, clean features and clean
    MLP input (so base + change = transcoder output + clean error), and at generated positions the
    live ones. With no intervention the change is exactly zero and the model's own outputs come back
    bit for bit."""

    def __init__(self, lm: LoadedModel, tc, state: PromptState, clean_acts, ops, propagate: bool):
        self.lm, self.tc, self.clean_acts = lm, tc, clean_acts
        self.ops, self.propagate = ops, propagate
        self.n = state.n_pos
        self.dev = tc.b_dec[0].device  # hooks compute where the transcoders live
        self.clean_in, self.clean_out = state.mlp_in.to(self.dev), state.mlp_out.to(self.dev)
        L = lm.sites.n_layers
        self.acts, self.ref, self.x, self.x_ref = [None] * L, [None] * L, [None] * L, [None] * L
        # acts at prompt positions of the first pass
        self.first_acts: list[torch.Tensor] | None = None
        self.handles = []

    def __enter__(self):
        for l, s in enumerate(self.lm.sites.layers):
            self.handles.append(s.pre_feedforward_layernorm.register_forward_hook(self._mlp_in(l)))
            self.handles.append(
                s.post_feedforward_layernorm.register_forward_hook(self._mlp_out(l))
            )
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _mlp_in(self, l: int):
        def hook(module, args, output):
            x = output[0].float().to(self.dev)  # [T, D]
            live = self.tc.encode(l, x).float()
            ref = live.clone()
            ref[: self.n] = self.clean_acts[l]
            acts = live if self.propagate else live.clone()
            if not self.propagate:
                acts[: self.n] = self.clean_acts[l]
            _apply_feature_ops(acts, l, self.ops)
            x_ref = x.clone()
            x_ref[: self.n] = self.clean_in[l]
            self.acts[l], self.ref[l], self.x[l], self.x_ref[l] = acts, ref, x, x_ref

        return hook

    def _mlp_out(self, l: int):
        tc = self.tc

        def hook(module, args, output):
            base = output[0].float().to(self.dev, copy=True)  # [T, D]
            base[: self.n] = self.clean_out[l]
            change = torch.zeros_like(base)
            for s in tc.output_layers_into(l):
                w = tc.W_dec[s][:, l - s] if tc.is_clt else tc.W_dec[s]
                d = self.acts[s] - self.ref[s]
                if bool(d.any()):
                    change += d.to(w.dtype) @ w
            if tc.W_skip is not None:
                change += (tc.skip_term(l, self.x[l]) - tc.skip_term(l, self.x_ref[l])).float()
            factors = _error_factors(self.ops, l, base.shape[0], self.dev)
            if factors is not None:
                recon_ref = (
                    tc.b_dec[l].float()
                    + sum(
                        self.ref[s].to(tc.W_dec[s].dtype)
                        @ (tc.W_dec[s][:, l - s] if tc.is_clt else tc.W_dec[s])
                        for s in tc.output_layers_into(l)
                    ).float()
                )
                if tc.W_skip is not None:
                    recon_ref = recon_ref + tc.skip_term(l, self.x_ref[l]).float()
                change += (factors - 1)[:, None] * (base - recon_ref)
            if self.first_acts is None and l == len(self.acts) - 1:
                self.first_acts = [a[: self.n].clone() for a in self.acts]
            return (base + change).to(output.device, output.dtype)[None]

        return hook


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids = {getattr(lm.tokenizer, "eos_token_id", None)}
    gen = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    return {int(i) for i in ids if i is not None}


@torch.no_grad()
def _last_logits(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    return lm.last_logits(ids).cpu()


@torch.no_grad()
def greedy(
    lm: LoadedModel, tokens: torch.Tensor, n_new: int, hooks=None, desc: str | None = None
) -> list[int]:
    """Greedy continuation of `tokens` `[n]` (stops at end of sequence), each step a full re-run
    inside the `hooks` context (a `Splice`, or None for the plain model). `desc`: show a progress
    bar with this name."""
    ids, out, eos = tokens.clone(), [], _eos_ids(lm)
    steps = range(n_new)
    if desc:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, unit="tok", leave=False)
    for _ in steps:
        with hooks if hooks is not None else contextlib.nullcontext():
            # the model's own head, not `lm.last_logits`: that reads the vocabulary from the file on
            # every call, a pass that would slow down every step; generation keeps the head resident
            logits = lm.model(ids[None].to(lm.device), use_cache=False, logits_to_keep=1).logits[
                0, -1
            ]
            nxt = int(logits.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt])])
        if nxt in eos:
            break
    return out


# -- the job ---------------------------------------------------------------------------------------


def _top_rows(lm: LoadedModel, before: torch.Tensor, after: torch.Tensor, k: int) -> list[dict]:
    pb, pa = torch.softmax(before, -1), torch.softmax(after, -1)
    ids = dict.fromkeys(pb.topk(k).indices.tolist() + pa.topk(k).indices.tolist())
    rows = [
        {
            "token": lm.tokenizer.decode([i]),
            "id": i,
            "logit_before": float(before[i]),
            "logit_after": float(after[i]),
            "logit_change": float(after[i] - before[i]),
            "prob_before": float(pb[i]),
            "prob_after": float(pa[i]),
            "prob_change": float(pa[i] - pb[i]),
        }
        for i in ids
    ]
    return sorted(rows, key=lambda r: -max(r["prob_before"], r["prob_after"]))


def _graph_transcoders(graph: AttributionGraph | None) -> str:
    spec = graph.settings.get("transcoders") if graph else None
    return spec if isinstance(spec, str) and spec else "default"


def _prompt_tokens(
    lm: LoadedModel, prompt, graph: AttributionGraph | None, supernodes: dict | None, chat: bool
) -> tuple[torch.Tensor, str, dict | None]:
    """The prompt's tokens `[n_pos]` and text, and the supernodes targets may name (a graph's own,
    overridden by `supernodes`)."""
    if graph is not None:
        if graph.metadata.get("model") not in (None, lm.name):
            raise UserError(
                f"the graph was traced on {graph.metadata['model']}, not {lm.name}; load that model"
            )
        tokens = torch.as_tensor(graph.tokens, dtype=torch.long)
        return (
            tokens,
            graph.prompt,
            {**graph.supernodes, **(supernodes or {})},
        )
    if isinstance(prompt, torch.Tensor):
        return prompt.long().flatten(), lm.tokenizer.decode(prompt.tolist()), supernodes
    if isinstance(prompt, str):
        return lm.tokenize(prompt, chat=chat), prompt, supernodes
    raise UserError("the prompt must be text, a token tensor or an AttributionGraph")


@dataclass
class _Runs:
    """The clean and the intervened run: per layer `[n_pos, F]` feature activations at the prompt
    positions, and the logits `[vocab]` at the last one (`raw_*`: before soft-capping, frozen mode
    only)."""

    clean_acts: list[torch.Tensor]
    acts: list[torch.Tensor]
    logits_clean: torch.Tensor
    logits: torch.Tensor
    raw_clean: torch.Tensor | None = None
    raw: torch.Tensor | None = None


def _frozen_runs(lm: LoadedModel, tokens, state: PromptState, tc, ops, propagate, clean) -> _Runs:
    """`clean`: the prompt's `_FrozenClean`."""
    acts, raw = _frozen(state, clean, tc, ops, propagate)
    raw_clean, cap = clean.ref["logits"].cpu(), clean.fw.softcap
    return _Runs(clean.acts, acts, softcap(raw_clean, cap), softcap(raw, cap), raw_clean, raw)


def _full_clean(lm: LoadedModel, tokens, state: PromptState, tc) -> tuple[list, torch.Tensor]:
    """Full mode's clean side: per layer `[n_pos, F]` clean feature activations, and the logits
    `[vocab]` of the same forward call the intervened run makes, without hooks (not state.logits:
    clean and intervened logits then come from one code path, and "no intervention" reproduces
    them bit for bit)."""
    dev = tc.b_dec[0].device
    clean_acts = [tc.encode(l, state.mlp_in[l].to(dev)).float() for l in range(lm.sites.n_layers)]
    return clean_acts, _last_logits(lm, tokens)


def _full_runs(lm: LoadedModel, tokens, state: PromptState, tc, ops, propagate, clean) -> _Runs:
    """`clean`: the prompt's `_full_clean`."""
    clean_acts, logits_clean = clean
    splice = Splice(lm, tc, state, clean_acts, ops, propagate)
    with splice:
        logits = _last_logits(lm, tokens)
    return _Runs(clean_acts, splice.first_acts, logits_clean, logits)


def _add_continuations(
    result: InterventionResult, lm: LoadedModel, splice: Splice, cfg: InterventionConfig
) -> None:
    """Greedy continuations of the prompt, clean and under `splice`, into `result`."""
    show = cfg.progress or None
    result.continuation_tokens_clean = greedy(
        lm, result.tokens, cfg.generate, desc=show and "clean continuation"
    )
    result.continuation_tokens = greedy(
        lm, result.tokens, cfg.generate, splice, desc=show and "intervened continuation"
    )
    result.continuation_clean = lm.tokenizer.decode(result.continuation_tokens_clean)
    result.continuation = lm.tokenizer.decode(result.continuation_tokens)


@torch.no_grad()
def intervene(
    lm: LoadedModel | str | None = None,
    prompt="",
    interventions=None,
    transcoders=None,
    config: InterventionConfig | None = None,
    supernodes: dict | None = None,
    **overrides,
) -> InterventionResult:
    """Run `prompt` with `interventions` under constrained patching; see the module docstring.

    lm: a LoadedModel or a model name/path. prompt: text, a token tensor `[n]`, or an
    AttributionGraph (its exact tokens, chat template included, and its supernodes are
    used). interventions: {target: value} to set, or a list of `Intervention` / (op, target[,
    value]) tuples. transcoders: a TranscoderSet, a path or "default". Options as in
    `InterventionConfig` (mode, propagate, generate, top_k, chat, ...) as keyword overrides.
    """
    each = intervene_each(lm, prompt, [interventions], transcoders, config, supernodes, **overrides)
    return each[0]


@torch.no_grad()
def intervene_each(
    lm: LoadedModel | str | None = None,
    prompt="",
    interventions_list=(),
    transcoders=None,
    config: InterventionConfig | None = None,
    supernodes: dict | None = None,
    **overrides,
) -> list[InterventionResult]:
    """`intervene` for each entry of `interventions_list` on its own (an ablation sweep: zero each
    of a circuit's features in turn), with the clean run made once for all of them. Element i
    equals `intervene(lm, prompt, interventions_list[i], ...)`."""
    cfg = with_overrides(config, InterventionConfig, overrides)
    # bad values refused before the model loads
    each = [normalize(interventions) for interventions in interventions_list]
    graph = prompt if isinstance(prompt, AttributionGraph) else None
    if lm is None or isinstance(lm, str):
        lm = load_model(
            lm or cfg.model or (graph.metadata.get("model") if graph else None) or DEFAULT_MODEL,
            device=cfg.device,
            dtype=cfg.dtype,
        )
    tokens, text, supernodes = _prompt_tokens(lm, prompt, graph, supernodes, cfg.chat)
    check_prompt(lm, tokens)
    if transcoders is None:
        transcoders = cfg.transcoders or _graph_transcoders(graph)
    tc = resolve_transcoders(transcoders, lm, cfg.progress)
    n_layers, n_pos = lm.sites.n_layers, len(tokens)
    resolved = [resolve(i, supernodes, n_layers, n_pos, tc.d_sae) for i in each]

    state = run_and_freeze(lm, tokens)
    if cfg.mode == "frozen":
        run, clean = _frozen_runs, _FrozenClean.of(lm, state, tc)
    else:
        run, clean = _full_runs, _full_clean(lm, tokens, state, tc)
    token_strings = [lm.tokenizer.decode([int(t)]) for t in tokens]
    results = []
    for ops, applied in resolved:
        runs = run(lm, tokens, state, tc, ops, cfg.propagate, clean)
        results.append(_result(lm, text, tokens, token_strings, cfg, applied, ops, runs))
        if cfg.generate:
            splice = Splice(lm, tc, state, runs.clean_acts, ops, cfg.propagate)
            _add_continuations(results[-1], lm, splice, cfg)
    return results


def _result(lm, text, tokens, token_strings, cfg, applied, ops, runs: _Runs) -> InterventionResult:
    return InterventionResult(
        prompt=text,
        tokens=tokens,
        token_strings=token_strings,
        mode=cfg.mode,
        propagate=cfg.propagate,
        applied=applied,
        logits_clean=runs.logits_clean,
        logits=runs.logits,
        top=_top_rows(lm, runs.logits_clean, runs.logits, cfg.top_k),
        clean_acts=[a.cpu() for a in runs.clean_acts],
        acts=[a.cpu() for a in runs.acts],
        raw_logits_clean=runs.raw_clean,
        raw_logits=runs.raw,
        notes=inert_notes(ops, runs.clean_acts),
    )
