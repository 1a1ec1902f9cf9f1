"""Feature dashboards: what each transcoder feature responds to, and what it promotes.

One streaming pass over a text source (`transcoders.data.text_source`, e.g. `builtin` offline or
`file:PATH`): the text is packed into contexts of `context` tokens (BOS first, never counted), and
for every feature we keep the k contexts in which it fires most (its maximum within the context),
each as a window of tokens around that maximum with the feature's activation on every token of the
window. The store is a set of fixed-size tensors `[L, F, k, ...]` merged batch by batch with a
top-k, so memory does not grow with the number of tokens seen; only the features whose batch peak
beats their k-th stored maximum take part in a merge. Also counted: activation density (fraction
of tokens where the feature fires), the maximum activation, and how often each token occurs.

The pass costs one forward of the model body over the text (by default a bfloat16 copy with fast
attention, `harvest_dtype`) plus the transcoders' encoders. `stage_seconds` in dashboards.json says
where its time went.

Then each feature's direct effect on the vocabulary: its decoder vectors (summed over the layers a
CLT feature writes to) times the final norm's gain, dotted with the unembedding, demeaned over the
vocabulary; the top promoted and suppressed tokens, over the whole vocabulary and (promoted only)
over the tokens that occur in the text. The candidates are found with one bfloat16 product and
scored again in float32, with a bound on the bfloat16 error that sends any doubtful feature to the
exact product (`UnembeddingScreen`), so the tokens are the float32 ones. Last an automatic label
per feature (`auto_label`: the token or phrase it fires on -> the tokens it promotes).

Files in DIR (default: `dashboards/` beside the transcoders, see `dashboards_dir`):
  dashboards.safetensors  top_acts [L, F, k] float32 (context maxima, descending; 0 = empty slot),
                          top_context [L, F, k] int64 (context number in the stream, -1 = empty),
                          window_tokens [L, F, k, W] int32 (-1 = padding),
                          window_acts [L, F, k, W] float16, n_active [L, F] int64,
                          max_act [L, F] float32, token_counts [V] int64,
                          promoted_ids / suppressed_ids / promoted_in_text_ids [L, F, n] int32
                          (-1 = none) and promoted_values / suppressed_values /
                          promoted_in_text_values [L, F, n] float32
  dashboards.json         the settings, tokens seen, seconds by stage, the transcoders' identity,
                          and the string of every token id the tensors mention (so reading a
                          dashboard needs no tokenizer)
While the pass runs, checkpoint.safetensors / checkpoint.json hold the state after the last finished
chunk of batches; a killed run started again with the same settings resumes there.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write, atomic_write_text, cache_dir, exclusive_lock
from gemma_lm.jobs import Command, with_overrides
from gemma_lm.models import DEFAULT_MODEL, load_model

from .data import MLPHooks, harvest_copy, run_body, text_source, token_sequences
from .default import default_transcoders_dir, resolve_transcoders

FORMAT = "gemma-circuits-dashboards"
VERSION = 1
STATE_KEYS = (
    "top_acts",
    "top_context",
    "window_tokens",
    "window_acts",
    "n_active",
    "max_act",
    "token_counts",
)


@dataclass
class DashboardConfig:
    """Feature dashboards: a streaming pass over text that keeps each feature's top-k contexts in
    bounded memory, then its output tokens; resumable (run the same command again after a kill).
    `build_dashboards` takes these options as keywords."""

    transcoders: str = "default"
    """'default' or a transcoder folder"""
    model: str = DEFAULT_MODEL
    """the model the transcoders belong to (name or path)"""
    text: str = "builtin"
    """builtin | english | python | generated | file:PATH | hf:DATASET (see transcoders.data)"""
    out: str | None = None
    """output folder (default: dashboards/ beside the transcoders)"""
    k: int = 12
    """top contexts kept per feature"""
    context: int = 64
    """tokens per context, BOS included"""
    before: int = 10
    """window tokens kept before a context's maximum"""
    after: int = 3
    """window tokens kept after it"""
    max_tokens: int = 131072
    """stop after this many tokens of text"""
    batch: int = 16
    """contexts per forward pass"""
    n_tokens: int = 10
    """promoted / suppressed tokens kept per feature"""
    checkpoint_every: int = 32
    """batches between checkpoints"""
    restart: bool = False
    """discard a checkpoint or finished dashboards in --out and start again"""
    gen_samples: int = 32
    """model samples mixed into the builtin text (as transcoder training does)"""
    device: str = "cpu"
    """cpu, cuda or cuda:N"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """the model's dtype (when this loads it)"""
    harvest_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """dtype of the model copy that harvests the MLP inputs (with fast attention): bfloat16, as the
    default transcoders were trained on, is much faster on CPUs with bfloat16 units and on GPUs;
    float32 gives the float32 model's activations exactly"""
    progress: bool = True
    """show progress bars"""

    def check(self) -> None:
        if min(self.k, self.batch, self.n_tokens, self.checkpoint_every) < 1:
            raise UserError("--k, --batch, --n-tokens and --checkpoint-every must be >= 1")
        if self.context < 2 or self.before < 0 or self.after < 0:
            raise UserError("--context must be >= 2 and --before/--after >= 0")
        if self.max_tokens < self.context:
            raise UserError(
                f"--max-tokens ({self.max_tokens}) must hold at least one context ({self.context})"
            )

    @property
    def window(self) -> int:
        return self.before + 1 + self.after

    def run_key(self) -> dict:
        """The settings a resumed run must share with the one it continues."""
        return {
            k: getattr(self, k)
            for k in (
                "model",
                "text",
                "k",
                "context",
                "before",
                "after",
                "max_tokens",
                "batch",
                "gen_samples",
                "harvest_dtype",
            )
        }


# -- the bounded store -----------------------------------------------------------------------------


class TopContexts:
    """For every feature of every layer, the k contexts with the largest maximum activation, held in
    fixed-size tensors (see the module docstring for names and shapes), and how often each of the
    `vocab_size` tokens occurs in the text (`count_tokens`). Ties keep the earlier context."""

    def __init__(
        self, n_layers: int, d_sae: int, k: int, before: int, after: int, vocab_size: int = 0
    ):
        L, Fe, W = n_layers, d_sae, before + 1 + after
        self.k, self.before, self.after = k, before, after
        self.top_acts = torch.zeros(L, Fe, k)
        self.top_context = torch.full((L, Fe, k), -1, dtype=torch.int64)
        self.window_tokens = torch.full((L, Fe, k, W), -1, dtype=torch.int32)
        self.window_acts = torch.zeros(L, Fe, k, W, dtype=torch.float16)
        self.n_active = torch.zeros(L, Fe, dtype=torch.int64)
        self.max_act = torch.zeros(L, Fe)
        self.token_counts = torch.zeros(vocab_size, dtype=torch.int64)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in STATE_KEYS}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for k in STATE_KEYS:
            if state[k].shape != getattr(self, k).shape:
                raise UserError(
                    f"stored {k} has shape {list(state[k].shape)}, expected "
                    f"{list(getattr(self, k).shape)}; start again with --restart"
                )
            getattr(self, k).copy_(state[k])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def count_tokens(self, tokens: torch.Tensor) -> None:
        """Count the token ids `tokens` (any shape) once per batch, whatever the layers."""
        self.token_counts += torch.bincount(tokens.flatten(), minlength=len(self.token_counts))

    def update(
        self, layer: int, acts: torch.Tensor, tokens: torch.Tensor, context_ids: torch.Tensor
    ) -> None:
        """Merge one batch of `layer`'s activations `[B, T, F]` over tokens `[B, T]` (BOS already
        dropped) of contexts numbered `context_ids` `[B]` (increasing)."""
        acts = acts.float()
        self.n_active[layer] += (acts > 0).sum((0, 1))
        peak, where = acts.max(dim=1)  # [B, F]
        batch_best = peak.max(0).values  # [F]
        self.max_act[layer] = torch.maximum(self.max_act[layer], batch_best)
        # Only a feature whose batch peak beats its k-th stored maximum can change (a tie keeps the
        # earlier context); once the store fills, that is a small and shrinking share.
        feats = torch.nonzero(batch_best > self.top_acts[layer, :, -1]).flatten()  # [S]
        if len(feats):
            self._merge(layer, feats, acts, peak[:, feats], where[:, feats], tokens, context_ids)

    def _merge(self, layer, feats, acts, peak, where, tokens, context_ids) -> None:
        """The top-k merge for features `feats` `[S]` only: their stored maxima and the batch's
        `peak` `[B, S]` (at positions `where` `[B, S]`) sorted together, windows cut for the new
        entries alone."""
        k, W = self.k, self.before + 1 + self.after
        candidates = torch.cat([self.top_acts[layer, feats], peak.T], dim=1)  # [S, k + B]
        order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :k]  # [S, k]
        slot = order.clamp(max=k - 1)  # stored slot of each kept entry (new ones fixed below)
        win_tok = self.window_tokens[layer, feats].gather(1, slot[..., None].expand(-1, -1, W))
        win_act = self.window_acts[layer, feats].gather(1, slot[..., None].expand(-1, -1, W))
        context = self.top_context[layer, feats].gather(1, slot)
        s, j = torch.nonzero(order >= k, as_tuple=True)  # [n] the new entries
        b = order[s, j] - k  # their batch rows
        span = where[b, s][:, None] + torch.arange(-self.before, self.after + 1)  # [n, W]
        inside = (span >= 0) & (span < acts.shape[1])
        span = span.clamp(0, acts.shape[1] - 1)
        win_tok[s, j] = torch.where(inside, tokens[b[:, None], span].to(torch.int32), -1)
        win_act[s, j] = torch.where(inside, acts[b[:, None], span, feats[s, None]], 0.0).half()
        context[s, j] = context_ids[b]
        self.top_acts[layer, feats] = candidates.gather(1, order)
        self.window_tokens[layer, feats] = win_tok
        self.window_acts[layer, feats] = win_act
        self.top_context[layer, feats] = context


# -- output tokens ---------------------------------------------------------------------------------


# candidates found in bfloat16 beyond the n tokens wanted, then scored again in float32
SCREEN_MARGIN = 32


@dataclass
class UnembeddingScreen:
    """A low-precision (bfloat16) copy of the unembedding `[V, D]` that finds each feature's
    candidate output tokens in one fast product; the candidates are then scored exactly in float32.
    `row_norm` is the largest row norm of `weight` and `error_norm` the largest row norm of its
    difference from the float32 unembedding: with them the low-precision error is bounded, and a
    feature for which it could hide a better token is scored exactly over the whole vocabulary, so
    the result is the float32 one."""

    weight: torch.Tensor
    row_norm: float
    error_norm: float

    @classmethod
    def of(cls, W_U: torch.Tensor, weight: torch.Tensor | None = None, chunk: int = 16384):
        """The screen of unembedding `W_U` `[V, D]`: `weight` (W_U in bfloat16, e.g. a bfloat16
        model's own) or a bfloat16 copy made here."""
        weight = W_U.detach().to(torch.bfloat16) if weight is None else weight.detach()
        norm = error = 0.0
        for w, exact in zip(torch.split(weight, chunk), torch.split(W_U.detach(), chunk)):
            w = w.float()
            norm = max(norm, float(w.norm(dim=1).max()))
            error = max(error, float((w - exact.float()).norm(dim=1).max()))
        return cls(weight, norm, error)

    def error_bound(self, d: torch.Tensor) -> torch.Tensor:
        """`[m]`: how far the low-precision product of rows `d` `[m, D]` with any row of the
        unembedding can be from the float32 one, before the product's own rounding: the rounding of
        d and of the unembedding (Cauchy-Schwarz) and float32 accumulation over D terms."""
        rounded = d.to(self.weight.dtype).float()
        accumulation = 2 * d.shape[1] * torch.finfo(torch.float32).eps * rounded.norm(dim=1)
        return (
            (rounded - d).norm(dim=1) * self.row_norm
            + d.norm(dim=1) * self.error_norm
            + accumulation * self.row_norm
        )


def _extremes(
    d: torch.Tensor, W_U: torch.Tensor, n: int, allowed: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Ids and values `[m, n]` of the n largest and of the n smallest entries of d @ W_U.T, for rows
    `d` `[m, D]`, over the whole vocabulary; with `allowed` (`[V]` bool) also those of the n largest
    over the allowed tokens (value -inf where fewer are allowed)."""
    v = (d.to(W_U.dtype) @ W_U.T).float()  # [m, V]
    top, bottom = v.topk(n, dim=1), v.topk(n, dim=1, largest=False)
    out = [top.indices, top.values, bottom.indices, bottom.values]
    if allowed is not None:
        top = v.masked_fill_(~allowed, -math.inf).topk(n, dim=1)
        out += [top.indices, top.values]
    return out


def _most_extreme(
    v: torch.Tensor, n: int, largest: bool, block: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and ids `[m, n]` of the n largest (or smallest) entries of each row of `v` `[m, V]`,
    most extreme first. They lie in the n blocks of `block` entries with the most extreme block
    maxima (minima), so one pass of block maxima and a top-k over those n blocks replace the top-k
    over the whole row (the costly part on a CPU)."""
    m, V = v.shape
    if V % block or V // block <= n:
        top = v.topk(n, dim=1, largest=largest)
        return top.values, top.indices
    blocks = v.view(m, V // block, block)
    peaks = blocks.amax(-1) if largest else blocks.amin(-1)  # [m, V / block]
    chosen = peaks.topk(n, dim=1, largest=largest).indices  # [m, n]
    rows = torch.arange(m, device=v.device)[:, None]
    top = blocks[rows, chosen].flatten(1).topk(n, dim=1, largest=largest)  # over [m, n * block]
    ids = chosen.gather(1, top.indices // block) * block + top.indices % block
    return top.values, ids


def _rescored(approx, d, W_U, n: int, largest: bool, slack, allowed=None):
    """The n most extreme tokens of rows `d` `[m, D]` by their float32 product with `W_U`, looked
    for among the `n + SCREEN_MARGIN` most extreme of the screened product `approx` `[m, V]` (where
    tokens not `allowed` are -inf). Returns ids, values `[m, n]` and, per row, whether that is
    certain: its n-th token beats what any token left out could reach (the last candidate's
    screened value, plus that value's rounding and the error bound `slack` `[m]`)."""
    sign = 1.0 if largest else -1.0
    values, ids = _most_extreme(approx, min(n + SCREEN_MARGIN, approx.shape[1]), largest)
    exact = torch.einsum("md,mcd->mc", d, W_U[ids].float())  # [m, n_cand]
    if allowed is not None:
        exact = exact.masked_fill(~allowed[ids], -math.inf)
    best = exact.topk(n, dim=1, largest=largest)
    edge = values[:, -1].float()
    eps = torch.finfo(approx.dtype).eps  # twice the rounding of the screened product's output
    reach = edge + sign * (eps * edge.abs() + slack)
    # an infinite edge: every allowed token is a candidate; so is every token when all are
    certain = (sign * (best.values[:, -1] - reach) > 0) | edge.isinf()
    if ids.shape[1] == approx.shape[1]:
        certain[:] = True
    return ids.gather(1, best.indices), best.values, certain


def _screened_extremes(
    d: torch.Tensor, W_U: torch.Tensor, screen: UnembeddingScreen, n: int, allowed=None
) -> list[torch.Tensor]:
    """What `_extremes` gives, from one product with the screen and a few candidates per row scored
    again in float32 (`_rescored`); rows where that is not certain are done by `_extremes`."""
    approx = d.to(screen.weight.dtype) @ screen.weight.T  # [m, V]
    slack = screen.error_bound(d)  # [m]
    searches = [(approx, True, None), (approx, False, None)]
    if allowed is not None:
        searches.append((approx.masked_fill(~allowed, -math.inf), True, allowed))
    outs, certain = [], torch.ones(len(d), dtype=torch.bool, device=d.device)
    for v, largest, mask in searches:
        ids, values, sure = _rescored(v, d, W_U, n, largest, slack, mask)
        outs += [ids, values]
        certain &= sure
    redo = torch.nonzero(~certain).flatten()
    if len(redo):
        for out, exact in zip(outs, _extremes(d[redo], W_U, n, allowed)):
            out[redo] = exact
    return outs


@torch.no_grad()
def output_tokens(
    tc,
    lm,
    layer: int,
    features: torch.Tensor,
    n: int,
    chunk: int = 128,
    u_mean: torch.Tensor | None = None,
    screen: UnembeddingScreen | None = None,
    allowed: torch.Tensor | None = None,
):
    """Top promoted and suppressed tokens of `features` `[m]` of source layer `layer`: the summed
    decoder vector times the final norm's gain, dotted with the unembedding, minus its mean over the
    vocabulary. `u_mean`: the mean unembedding row `[D]`, if already known. `screen`: find the
    candidates in low precision first (the same result, see `UnembeddingScreen`). Returns (promoted
    ids, values, suppressed ids, values), each `[m, n]`; with `allowed` (`[V]` bool) also the
    promoted ids and values among the allowed tokens only (id -1 and value 0 where fewer are)."""
    W_U = lm.sites.lm_head.weight.detach()  # [V, D]
    gain = 1 + lm.sites.final_norm.weight.detach().float().to(W_U.device)
    u_mean = W_U.float().mean(0) if u_mean is None else u_mean.to(W_U.device)
    allowed = None if allowed is None else allowed.to(W_U.device)
    outs = []
    for part in torch.split(features, chunk):
        d = tc.decoder_rows(layer, part).float().sum(1).to(W_U.device) * gain  # [m, D]
        if screen is None:
            found = _extremes(d, W_U, n, allowed)
        else:
            found = _screened_extremes(d, W_U, screen, n, allowed)
        mean = (d @ u_mean)[:, None]  # [m, 1]
        ids, values = found[0::2], [v - mean for v in found[1::2]]
        if allowed is not None:  # fewer allowed tokens than n: id -1 for the missing ones
            none = values[2].isinf()
            ids[2], values[2] = ids[2].masked_fill(none, -1), values[2].masked_fill(none, 0.0)
        outs.append([t for pair in zip(ids, values) for t in pair])
    if not outs:
        empty = torch.zeros(0, n)
        return (empty.long(), empty) * (2 if allowed is None else 3)
    return tuple(torch.cat(t).cpu() for t in zip(*outs))


# -- the pass --------------------------------------------------------------------------------------


def dashboards_dir(transcoders_spec) -> Path:
    """Where dashboards of a transcoder set live by default: `dashboards/` inside its folder."""
    spec = str(transcoders_spec or "default")
    if spec == "default":
        return default_transcoders_dir() / "dashboards"
    if "://" in spec:
        raise UserError(f"{spec} is not a local folder; pass --out DIR (or --dashboards DIR)")
    p = Path(spec).expanduser()
    return p / "dashboards" if p.is_dir() else p.with_name(p.name + ".dashboards")


def dashboards_location(spec) -> Path:
    """`dashboards_dir(spec)`, unless that folder cannot be written (a read-only download) or is
    not local (a Hub spec): then a folder of the cache named after the spec. Where a trace keeps
    the dashboards it builds, and where `circuits attach-dashboards` looks for them."""
    if "://" not in str(spec):
        where = dashboards_dir(spec)
        if (where / "dashboards.json").exists() or os.access(where.parent, os.W_OK):
            return where
        spec = str(where.resolve())
    key = hashlib.sha256(str(spec).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(spec).rstrip("/"))[-48:]
    return cache_dir() / "dashboards" / f"{name}-{key}"


def dashboards_for(spec, lm, tc, progress: bool = True) -> Dashboards | None:
    """The dashboards of the transcoder set `tc` named `spec` ("default" or a folder), built now if
    it has none (once per set, under a lock: kept at `dashboards_location(spec)`); None for a set
    given as an object, which has no folder to keep them in."""
    if spec is not None and not isinstance(spec, str):
        return None
    where = dashboards_location(spec)
    if not (where / "dashboards.json").exists():
        with exclusive_lock(where.parent / f".{where.name}.lock"):
            if not (where / "dashboards.json").exists():  # another process may have built them
                print(
                    f"gemma-circuits: building the feature dashboards of these transcoders (once; "
                    f"kept in {where}; --no-dashboards skips them)",
                    file=sys.stderr,
                )
                build_dashboards(lm, tc, out=str(where), progress=progress)
    return load_dashboards(where)


def transcoder_identity(tc) -> dict:
    """What identifies a transcoder set: its shapes, kind, activation, model and a fingerprint of
    its weights. Dashboards record it (`Dashboards.identity`) so that a checkpoint is resumed, and
    dashboards attached, only with the set they were built from."""
    c = tc.cfg
    # a cheap fingerprint: the same shapes with other weights must not resume each other's
    # checkpoint
    fp = float(
        sum(
            tc.W_enc[l][:4].detach().double().sum() + tc.W_dec[l][:4].detach().double().sum()
            for l in range(tc.n_layers)
        )
    )
    return {
        "kind": c.kind,
        "n_layers": c.n_layers,
        "d_model": c.d_model,
        "d_sae": c.d_sae,
        "activation": c.activation,
        "model_name": c.model_name,
        "fingerprint": round(fp, 6),
    }


def _write_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    blob = save({k: v.contiguous() for k, v in tensors.items()})
    atomic_write(path.with_suffix(".safetensors"), lambda f: f.write(blob))
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _contexts(lm, cfg: DashboardConfig):
    """The stream of contexts `[context]` (BOS first), at most max_tokens // context of them."""
    paragraphs = text_source(
        cfg.text, lm, "train", gen_samples=cfg.gen_samples, progress=cfg.progress
    )
    return itertools.islice(
        token_sequences(lm, paragraphs, cfg.context), cfg.max_tokens // cfg.context
    )


@dataclass
class _Pass:
    """Where a streaming pass stands: the store, the batches finished and the tokens seen (all three
    read back from a checkpoint when resuming). `meta` is what every checkpoint and the final
    dashboards.json start from."""

    out: Path
    meta: dict
    store: TopContexts
    done: int = 0
    tokens_seen: int = 0
    seconds: dict = field(default_factory=dict)  # by stage, of this run (not of one it resumes)

    def checkpoint(self) -> None:
        _write_state(
            self.out / "checkpoint",
            self.store.state(),
            {**self.meta, "batches_done": self.done, "tokens_seen": self.tokens_seen},
        )


def _output_dir(cfg: DashboardConfig, spec) -> Path:
    if cfg.out is None and not isinstance(spec, str):
        raise UserError("pass out=DIR when giving a TranscoderSet object")
    out = Path(cfg.out) if cfg.out else dashboards_dir(spec)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _remove_old_files(out: Path) -> None:
    # removed before the pass starts, so that a killed restart resumes instead of clashing
    for name in (
        "dashboards.json",
        "dashboards.safetensors",
        "checkpoint.json",
        "checkpoint.safetensors",
    ):
        (out / name).unlink(missing_ok=True)


def _same_run(stored: dict | None, meta: dict) -> bool:
    return stored is not None and all(stored.get(k) == meta[k] for k in ("settings", "transcoders"))


def _already_built(out: Path, meta: dict, progress: bool) -> bool:
    """True if `out` holds finished dashboards of these settings; an error if of others."""
    final = _read_json(out / "dashboards.json")
    if final is None:
        return False
    if _same_run(final, meta):
        if progress:
            print(
                f"dashboards in {out} are complete for these settings; "
                "--restart to build them again"
            )
        return True
    raise UserError(
        f"{out} holds dashboards of other settings or transcoders; use --restart or another --out"
    )


def _start_or_resume(out: Path, meta: dict, tc, cfg: DashboardConfig, vocab_size: int) -> _Pass:
    store = TopContexts(tc.n_layers, tc.d_sae, cfg.k, cfg.before, cfg.after, vocab_size)
    run = _Pass(out, meta, store)
    ckpt = _read_json(out / "checkpoint.json")
    if ckpt is not None:
        if not _same_run(ckpt, meta):
            raise UserError(
                f"{out} holds a checkpoint of other settings or transcoders; "
                f"use --restart or another --out"
            )
        run.store.load_state(load_file(str(out / "checkpoint.safetensors")))
        run.done, run.tokens_seen = ckpt["batches_done"], ckpt["tokens_seen"]
    return run


def _progress_bar(cfg: DashboardConfig, tokens_seen: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.max_tokens // cfg.context * (cfg.context - 1),
        initial=tokens_seen,
        desc="dashboards",
        unit="tok",
    )


def _tick(seconds: dict, stage: str, since: float) -> float:
    """Add the time since `since` to `seconds[stage]`; returns now."""
    now = time.perf_counter()
    seconds[stage] = seconds.get(stage, 0.0) + now - since
    return now


def _sync(device) -> None:
    # CUDA runs asynchronously: wait, so that each stage's time is its own
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _mlp_inputs(harvester, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's MLP input `[B, T, D]` (in the harvester's dtype) of token ids `[B, T]`, BOS
    included."""
    with MLPHooks(harvester.sites) as h:
        run_body(harvester, ids)
    return h.mlp_in


def _add_batch(harvester, tc, run: _Pass, ids: torch.Tensor, first_context: int) -> None:
    """Merge the transcoder activations on contexts `ids` `[B, T]` (numbered from `first_context`)
    into `run.store`, every layer; the BOS position is left out. Each stage's time goes to
    `run.seconds`."""
    t = time.perf_counter()
    mlp_in = _mlp_inputs(harvester, ids)
    _sync(harvester.device)
    t = _tick(run.seconds, "forward", t)
    context_ids = torch.arange(first_context, first_context + len(ids))
    run.store.count_tokens(ids[:, 1:])
    for l in range(tc.n_layers):
        acts = tc.encode(l, mlp_in[l][:, 1:].to(tc.b_dec[l].device)).cpu()  # [B, T - 1, F]
        t = _tick(run.seconds, "encode", t)
        run.store.update(l, acts, ids[:, 1:], context_ids)
        t = _tick(run.seconds, "merge", t)


def _timed(items, seconds: dict, stage: str):
    """`items`, with the time spent waiting for each (tokenising the text) added to
    `seconds[stage]`."""
    items = iter(items)
    while True:
        t = time.perf_counter()
        item = next(items, None)
        _tick(seconds, stage, t)
        if item is None:
            return
        yield item


def _stream(contexts, harvester, tc, cfg: DashboardConfig, run: _Pass, bar) -> None:
    """Every batch of `contexts` into `run.store`, with a checkpoint every `checkpoint_every`
    batches and one at the end."""
    batches = iter(lambda: list(itertools.islice(contexts, cfg.batch)), [])
    for i, seqs in enumerate(_timed(batches, run.seconds, "text")):
        if i < run.done:  # resuming: the stream is deterministic, skip what the checkpoint holds
            continue
        ids = torch.stack(seqs)  # [B, T]
        B, T = ids.shape
        _add_batch(harvester, tc, run, ids, first_context=i * cfg.batch)
        run.tokens_seen += B * (T - 1)
        run.done = i + 1
        if bar:
            bar.update(B * (T - 1))
        if run.done % cfg.checkpoint_every == 0:
            run.checkpoint()
    if bar:
        bar.close()
    if run.tokens_seen == 0:
        raise UserError(
            f"the text source {cfg.text!r} gave no context of {cfg.context} tokens; give more text"
        )
    run.checkpoint()


def _unembedding_screen(lm, harvester) -> UnembeddingScreen:
    """The bfloat16 unembedding that screens output tokens: the model's own or the bfloat16
    harvester's where there is one (no copy), else a copy."""
    W_U = lm.sites.lm_head.weight
    own = [w for w in (W_U, harvester.sites.lm_head.weight) if w.dtype == torch.bfloat16]
    return UnembeddingScreen.of(W_U, own[0] if own else None)


def _output_token_tensors(lm, tc, store: TopContexts, cfg: DashboardConfig, screen=None) -> dict:
    """promoted_ids / suppressed_ids / promoted_in_text_ids `[L, F, n]` (-1 where none) and their
    values, for every feature that fired (dead ones need no dashboard); "in text": among the tokens
    that occur in the text the pass read. `screen`: see `output_tokens`."""
    n = min(cfg.n_tokens, lm.sites.vocab_size)
    L, Fe = tc.n_layers, tc.d_sae
    lens = {
        name: torch.full((L, Fe, n), -1, dtype=torch.int32)
        if name.endswith("ids")
        else torch.zeros(L, Fe, n)
        for kind in ("promoted", "suppressed", "promoted_in_text")
        for name in (f"{kind}_ids", f"{kind}_values")
    }
    layers = range(L)
    if cfg.progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="output tokens", unit="layer")
    u_mean = lm.sites.lm_head.weight.detach().float().mean(0)
    in_text = store.token_counts > 0
    for l in layers:
        alive = torch.nonzero(store.n_active[l]).flatten()
        found = output_tokens(tc, lm, l, alive, n, u_mean=u_mean, screen=screen, allowed=in_text)
        for name, t in zip(lens, found):
            lens[name][l, alive] = t.to(lens[name].dtype)
    return lens


def _token_strings(lm, store: TopContexts, lens: dict) -> dict[str, str]:
    """The string of every token id the dashboards mention, so that reading them needs no
    tokenizer."""
    used = torch.cat(
        [
            store.window_tokens.flatten(),
            *(lens[name].flatten() for name in lens if name.endswith("_ids")),
        ]
    )
    used = torch.unique(used[used >= 0]).tolist()
    return {str(i): lm.tokenizer.decode([i]) for i in used}


def _write_dashboards(run: _Pass, lens: dict) -> None:
    """dashboards.safetensors / .json, then the checkpoint they replace is removed."""
    _write_state(run.out / "dashboards", {**run.store.state(), **lens}, run.meta)
    for name in ("checkpoint.safetensors", "checkpoint.json"):
        (run.out / name).unlink(missing_ok=True)


@torch.no_grad()
def build_dashboards(
    lm=None, transcoders=None, config: DashboardConfig | None = None, **overrides
) -> Path:
    """Run the streaming pass and write the dashboards (see the module docstring). Returns the
    folder.

    lm: a LoadedModel or None (load `config.model`); transcoders: a TranscoderSet, a path or
    "default"."""
    cfg = with_overrides(config, DashboardConfig, overrides)
    if lm is None or isinstance(lm, str):
        lm = load_model(lm or cfg.model, device=cfg.device, dtype=cfg.dtype)
    spec = transcoders if transcoders is not None else cfg.transcoders
    tc = resolve_transcoders(spec, lm, cfg.progress)
    out = _output_dir(cfg, spec)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "settings": cfg.run_key(),
        "transcoders": transcoder_identity(tc),
    }
    if cfg.restart:
        _remove_old_files(out)
    if _already_built(out, meta, cfg.progress):
        return out
    run = _start_or_resume(out, meta, tc, cfg, lm.sites.vocab_size)

    contexts = _contexts(lm, cfg)  # any model samples are generated here, before the pass's clock
    harvester = harvest_copy(lm, cfg.harvest_dtype)
    bar = _progress_bar(cfg, run.tokens_seen)
    t0 = time.perf_counter()
    _stream(contexts, harvester, tc, cfg, run, bar)
    t = time.perf_counter()
    screen = _unembedding_screen(lm, harvester)
    del harvester  # its activations are done; only its bfloat16 unembedding may live on
    lens = _output_token_tensors(lm, tc, run.store, cfg, screen)
    t = _tick(run.seconds, "output_tokens", t)
    strings = _token_strings(lm, run.store, lens)
    _tick(run.seconds, "token_strings", t)
    run.meta.update(
        tokens_seen=run.tokens_seen,
        n_contexts=run.tokens_seen // (cfg.context - 1),
        seconds=round(time.perf_counter() - t0, 1),
        stage_seconds={k: round(v, 2) for k, v in run.seconds.items()},
        token_strings=strings,
    )
    _write_dashboards(run, lens)
    return out


# -- reading and attaching -------------------------------------------------------------------------


def clean_token(s: str) -> str:
    """A token as a label shows it: outer spaces stripped, a newline as ⏎, a tab as ⇥, any other
    unprintable character as ·; a token of spaces alone is ␣, the empty token stays empty."""
    inner = s.strip(" ")
    if not inner:
        return "␣" if s else ""
    marks = {"\n": "⏎", "\t": "⇥"}
    return "".join(marks.get(c, c if c.isprintable() else "·") for c in inner)


def _clip(s: str, width: int) -> str:
    return s if len(s) <= width else s[: max(0, width - 1)] + "…"


def _is_word(s: str) -> bool:
    return any(c.isalnum() for c in s)


def _peaks(top_contexts: list[dict]) -> list[tuple[str, str | None, str]]:
    """(shown peak token, raw token before it or None, raw peak token) of every context that has
    tokens, in the contexts' order."""
    out = []
    for c in top_contexts:
        if not c["tokens"]:
            continue
        i = c["acts"].index(max(c["acts"]))
        shown = clean_token(c["tokens"][i])
        if shown:
            out.append((shown, c["tokens"][i - 1] if i > 0 else None, c["tokens"][i]))
    return out


def _input_text(top_contexts: list[dict], room: int) -> str:
    """What the feature fires on, in at most `room` characters: `"token"` when one token is the peak
    of most of its contexts, `"phrase"` (the token before it too) when that one is shared by at
    least half of those (and two), else the most common peaks as `a/b…`; "" without contexts."""
    peaks = _peaks(top_contexts)
    if not peaks:
        return ""
    counts = Counter(shown for shown, _, _ in peaks)
    best, n_best = counts.most_common(1)[0]
    if 2 * n_best <= len(peaks) and len(peaks) > 1:  # mixed: no token is the peak of most
        shown = [t for t, _ in counts.most_common(2)]
        more = "…" if len(counts) > len(shown) else ""
        return _clip("/".join(shown), room - len(more)) + more
    before = Counter(b for t, b, _ in peaks if t == best and b is not None and clean_token(b))
    if before:
        prev, n_prev = before.most_common(1)[0]
        if n_prev >= 2 and 2 * n_prev >= n_best:
            raw = next(r for t, b, r in peaks if t == best and b == prev)
            best = clean_token(prev + raw)
    return f'"{_clip(best, room - 2)}"'


def _output_words(promoted: list) -> list[str]:
    """The promoted tokens as shown, each once (case aside), empty ones dropped: first those that
    start a word (a space, then a letter or digit), then other word pieces, best first within
    each; punctuation and the like only when there is nothing else."""
    seen, tiers = set(), ([], [], [])
    for token, _ in promoted:
        shown = clean_token(token)
        if shown and shown.lower() not in seen:
            seen.add(shown.lower())
            tier = 2 if not _is_word(shown) else 0 if token[:1].isspace() else 1
            tiers[tier].append(shown)
    return [*tiers[0], *tiers[1]] or tiers[2]


def auto_label(top_contexts: list[dict], promoted: list, n: int = 3, width: int = 32) -> str:
    """A label of at most `width` characters for a graph node: what the feature fires on (see
    `_input_text`) → up to `n` of the tokens it promotes, e.g. `"Jordan" → basketball, NBA`.
    `top_contexts` as in `Dashboards.feature` (tokens, acts), `promoted` [[token, value], ...] best
    first. A feature with neither is "(never fired)". Deterministic: ties go to the earlier
    (stronger) context or output."""
    outputs = _output_words(promoted)[:n]
    arrow = " → "
    first = min(len(outputs[0]), width // 3) if outputs else 0
    source = _input_text(top_contexts, width - (len(arrow) + first if outputs else 0))
    if not outputs:
        return source or ("(never fired)" if not top_contexts else "")
    label = f"{source}{arrow}" if source else arrow.lstrip()
    sep = ", " if _is_word(outputs[0]) else " "  # "., ;" would read as noise
    shown = [_clip(outputs[0], width - len(label))]
    for word in outputs[1:]:
        if len(label) + len(sep.join([*shown, word])) > width:
            break
        shown.append(word)
    return _clip(label + sep.join(shown), width)


class Dashboards:
    """Dashboards read back from disk. `feature(layer, f)` gives one feature's dashboard as the dict
    that a graph keeps in `feature_dashboards["L/F"]` (schema in docs/development.md)."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, source: Path):
        self.t, self.meta, self.source = tensors, meta, source
        self.strings = meta["token_strings"]
        self.n_layers, self.d_sae = tensors["top_acts"].shape[:2]

    @property
    def identity(self) -> dict:
        """The identity of the transcoders these dashboards describe (`transcoder_identity`)."""
        return self.meta["transcoders"]

    def _s(self, i: int) -> str:
        return self.strings.get(str(i), f"<{i}>")

    def _contexts(self, layer: int, f: int) -> list[dict]:
        """Every stored top context of feature f of `layer`, strongest first."""
        # one feature's slices as Python lists at once: indexing tensors element by element made
        # attaching a real graph's dashboards take seconds
        t = self.t
        peaks = t["top_acts"][layer, f].tolist()
        windows = t["window_tokens"][layer, f].tolist()
        acts = t["window_acts"][layer, f].float().tolist()
        context_ids = t["top_context"][layer, f].tolist()
        out = []
        for peak, tokens, values, context in zip(peaks, windows, acts, context_ids):
            if peak <= 0:
                break
            kept = [(i, a) for i, a in zip(tokens, values) if i >= 0]
            out.append(
                {
                    "tokens": [self._s(i) for i, _ in kept],
                    "acts": [round(a, 4) + 0.0 for _, a in kept],
                    "max_act": round(peak, 4),
                    "context": int(context),
                }
            )
        return out

    def _tokens(self, kind: str, layer: int, f: int) -> list[list]:
        """[[token, value], ...] of `kind` "promoted", "suppressed" or "promoted_in_text", most
        extreme first ([] for dashboards written before a kind existed)."""
        if f"{kind}_ids" not in self.t:
            return []
        ids = self.t[f"{kind}_ids"][layer, f].tolist()
        values = self.t[f"{kind}_values"][layer, f].tolist()
        return [[self._s(i), round(v, 4)] for i, v in zip(ids, values) if i >= 0]

    def feature(self, layer: int, f: int, n_contexts: int = 5, n_tokens: int = 10) -> dict:
        """One feature's dashboard: density, max_activation, its `n_contexts` top contexts
        [{tokens, acts, max_act, context}], `n_tokens` top_promoted / top_suppressed [[token,
        value]] over the whole vocabulary, top_promoted_in_text over the tokens of the text the
        dashboards read, and auto_label (from all its stored contexts, and its promoted tokens in
        the text where there are any)."""
        t, contexts = self.t, self._contexts(layer, f)
        promoted, in_text = (
            self._tokens("promoted", layer, f),
            self._tokens("promoted_in_text", layer, f),
        )
        return {
            "density": float(t["n_active"][layer, f]) / max(1, self.meta["tokens_seen"]),
            "max_activation": float(t["max_act"][layer, f]),
            "top_contexts": contexts[:n_contexts],
            "top_promoted": promoted[:n_tokens],
            "top_suppressed": self._tokens("suppressed", layer, f)[:n_tokens],
            "top_promoted_in_text": in_text[:n_tokens],
            "auto_label": auto_label(contexts, in_text or promoted),
        }


def load_dashboards(path) -> Dashboards:
    """Read the dashboards in folder `path` (written by `build_dashboards` /
    `transcoders dashboards`)."""
    p = Path(path)
    meta = _read_json(p / "dashboards.json")
    if meta is None or meta.get("format") != FORMAT:
        hint = (
            " (a run is unfinished: start it again to resume)"
            if (p / "checkpoint.json").exists()
            else ""
        )
        raise UserError(
            f"no dashboards in {p}{hint}; build them with `transcoders dashboards --out {p}`"
        )
    if meta.get("version", 0) > VERSION:
        raise UserError(
            f"{p} holds dashboards of format version {meta['version']}; upgrade gemma-circuits"
        )
    return Dashboards(load_file(str(p / "dashboards.safetensors")), meta, p)


# -- command line ----------------------------------------------------------------------------------


def run_dashboards(cfg: DashboardConfig) -> int:
    out = build_dashboards(config=cfg)
    d = load_dashboards(out)
    alive = int((d.t["n_active"] > 0).sum())
    print(
        f"dashboards of {alive} live features (of {d.n_layers} x {d.d_sae}) from "
        f"{d.meta['tokens_seen']} tokens in {out}"
    )
    return 0


COMMANDS = [
    Command(
        "dashboards",
        DashboardConfig,
        run_dashboards,
        "top activating contexts, density and output tokens of every feature",
    )
]
