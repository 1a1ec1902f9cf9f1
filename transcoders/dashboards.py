"""Feature dashboards: what each transcoder feature responds to, and what it promotes.

One streaming pass over a text source (`transcoders.data.text_source`, e.g. `builtin` offline or
`file:PATH`): the text is packed into contexts of `context` tokens (BOS first, never counted), and
for every feature we keep the k contexts in which it fires most (its maximum within the context),
each as a window of tokens around that maximum with the feature's activation on every token of the
window. The store is a set of fixed-size tensors `[L, F, k, ...]` merged batch by batch with a
top-k, so memory does not grow with the number of tokens seen. Also counted: activation density
(fraction of tokens where the feature fires) and the maximum activation.

Then each feature's direct effect on the vocabulary: its decoder vectors (summed over the layers a
CLT feature writes to) times the final norm's gain, dotted with the unembedding, demeaned over the
vocabulary; the top promoted and suppressed tokens, and an automatic label (the token it fires on
most -> its top outputs).

Files in DIR (default: `dashboards/` beside the transcoders, see `dashboards_dir`):
  dashboards.safetensors  top_acts [L, F, k] float32 (context maxima, descending; 0 = empty slot),
                          top_context [L, F, k] int64 (context number in the stream, -1 = empty),
                          window_tokens [L, F, k, W] int32 (-1 = padding),
                          window_acts [L, F, k, W] float16, n_active [L, F] int64,
                          max_act [L, F] float32, promoted_ids / suppressed_ids [L, F, n] int32
                          and promoted_values / suppressed_values [L, F, n] float32
  dashboards.json         the settings, tokens seen, the transcoders' identity, and the string of
                          every token id the tensors mention (so reading a dashboard needs no
                          tokenizer)
While the pass runs, checkpoint.safetensors / checkpoint.json hold the state after the last finished
chunk of batches; a killed run started again with the same settings resumes there.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write, atomic_write_text
from gemma_lm.jobs import Command, with_overrides
from gemma_lm.models import DEFAULT_MODEL, load_model

from .data import harvest, text_source, token_sequences
from .default import default_transcoders_dir, resolve_transcoders

FORMAT = "gemma-circuits-dashboards"
VERSION = 1
STATE_KEYS = ("top_acts", "top_context", "window_tokens", "window_acts", "n_active", "max_act")


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
    batch: int = 8
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
    """the model's dtype"""
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
            )
        }


# -- the bounded store -----------------------------------------------------------------------------


class TopContexts:
    """For every feature of every layer, the k contexts with the largest maximum activation, held in
    fixed-size tensors (see the module docstring for names and shapes). Ties keep the earlier
    context."""

    def __init__(self, n_layers: int, d_sae: int, k: int, before: int, after: int):
        L, Fe, W = n_layers, d_sae, before + 1 + after
        self.k, self.before, self.after = k, before, after
        self.top_acts = torch.zeros(L, Fe, k)
        self.top_context = torch.full((L, Fe, k), -1, dtype=torch.int64)
        self.window_tokens = torch.full((L, Fe, k, W), -1, dtype=torch.int32)
        self.window_acts = torch.zeros(L, Fe, k, W, dtype=torch.float16)
        self.n_active = torch.zeros(L, Fe, dtype=torch.int64)
        self.max_act = torch.zeros(L, Fe)

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

    def update(
        self, layer: int, acts: torch.Tensor, tokens: torch.Tensor, context_ids: torch.Tensor
    ) -> None:
        """Merge one batch of `layer`'s activations `[B, T, F]` over tokens `[B, T]` (BOS already
        dropped) of contexts numbered `context_ids` `[B]` (increasing)."""
        B, T, Fe = acts.shape
        k, W = self.k, self.before + 1 + self.after
        acts = acts.float()
        self.n_active[layer] += (acts > 0).sum((0, 1))
        peak, where = acts.max(dim=1)  # [B, F]
        self.max_act[layer] = torch.maximum(self.max_act[layer], peak.max(0).values)
        candidates = torch.cat([self.top_acts[layer], peak.T], dim=1)  # [F, k + B]: stored first
        order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :k]  # [F, k]
        new = order >= k
        b = (order - k).clamp(min=0)  # batch row of each new entry
        kept = order.clamp(max=k - 1)  # stored slot of each kept entry
        pos = where.T.gather(1, b)  # [F, k] position of the maximum
        span = pos[..., None] + torch.arange(W)  # [F, k, W] in padded coordinates
        feat = torch.arange(Fe)[:, None, None].expand(Fe, k, W)
        # [B, T + W - 1]
        tok_pad = F.pad(tokens.to(torch.int32), (self.before, self.after), value=-1)
        act_pad = F.pad(acts, (0, 0, self.before, self.after))  # [B, T + W - 1, F]
        win_tok = tok_pad[b[..., None].expand(Fe, k, W), span]
        win_act = act_pad[b[..., None].expand(Fe, k, W), span, feat].half()
        n3, kept3 = new[..., None], kept[..., None].expand(Fe, k, W)
        self.window_tokens[layer] = torch.where(
            n3, win_tok, self.window_tokens[layer].gather(1, kept3)
        )
        self.window_acts[layer] = torch.where(n3, win_act, self.window_acts[layer].gather(1, kept3))
        self.top_context[layer] = torch.where(
            new, context_ids[b], self.top_context[layer].gather(1, kept)
        )
        self.top_acts[layer] = candidates.gather(1, order)


# -- output tokens ---------------------------------------------------------------------------------


@torch.no_grad()
def output_tokens(
    tc,
    lm,
    layer: int,
    features: torch.Tensor,
    n: int,
    chunk: int = 128,
    u_mean: torch.Tensor | None = None,
):
    """Top promoted and suppressed tokens of `features` `[m]` of source layer `layer`: the summed
    decoder vector times the final norm's gain, dotted with the unembedding, minus its mean over the
    vocabulary. `u_mean`: the mean unembedding row `[D]`, if already known. Returns (promoted ids,
    values, suppressed ids, values), each `[m, n]`."""
    W_U = lm.sites.lm_head.weight  # [V, D]
    gain = 1 + lm.sites.final_norm.weight.detach().float()
    u_mean = W_U.float().mean(0) if u_mean is None else u_mean
    outs = []
    for part in torch.split(features, chunk):
        d = tc.decoder_rows(layer, part).float().sum(1) * gain  # [m, D]
        v = (d.to(W_U.device, W_U.dtype) @ W_U.T).float() - (d @ u_mean)[:, None]  # [m, V]
        top, bottom = v.topk(n, dim=1), v.topk(n, dim=1, largest=False)
        outs.append((top.indices, top.values, bottom.indices, bottom.values))
    if not outs:
        empty = torch.zeros(0, n)
        return empty.long(), empty, empty.long(), empty
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


def _identity(tc) -> dict:
    c = tc.cfg
    # a cheap fingerprint: the same shapes with other weights must not resume each other's
    # checkpoint
    fp = float(
        sum(
            tc.W_enc[l][:4].double().sum() + tc.W_dec[l][:4].double().sum()
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


def _start_or_resume(out: Path, meta: dict, tc, cfg: DashboardConfig) -> _Pass:
    run = _Pass(out, meta, TopContexts(tc.n_layers, tc.d_sae, cfg.k, cfg.before, cfg.after))
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


def _add_batch(lm, tc, store: TopContexts, ids: torch.Tensor, first_context: int) -> None:
    """Merge the transcoder activations on contexts `ids` `[B, T]` (numbered from `first_context`)
    into `store`, every layer; the BOS position is left out."""
    B, T = ids.shape
    mlp_in, _ = harvest(lm, ids, drop_bos=False)
    mlp_in = mlp_in.reshape(B, T, tc.n_layers, -1)  # [B, T, n_layers, d_model]
    context_ids = torch.arange(first_context, first_context + B)
    for l in range(tc.n_layers):
        store.update(
            l, tc.encode(l, mlp_in[:, 1:, l].to(tc.b_dec[l].device)).cpu(), ids[:, 1:], context_ids
        )


def _stream(contexts, lm, tc, cfg: DashboardConfig, run: _Pass, bar) -> None:
    """Every batch of `contexts` into `run.store`, with a checkpoint every `checkpoint_every`
    batches and one at the end."""
    batches = iter(lambda: list(itertools.islice(contexts, cfg.batch)), [])
    for i, seqs in enumerate(batches):
        if i < run.done:  # resuming: the stream is deterministic, skip what the checkpoint holds
            continue
        ids = torch.stack(seqs)  # [B, T]
        B, T = ids.shape
        _add_batch(lm, tc, run.store, ids, first_context=i * cfg.batch)
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


def _output_token_tensors(lm, tc, store: TopContexts, cfg: DashboardConfig) -> dict:
    """promoted_ids / suppressed_ids `[L, F, n]` (-1 where none) and their values, for every feature
    that fired: dead ones need no dashboard."""
    n = min(cfg.n_tokens, lm.sites.vocab_size)
    L, Fe = tc.n_layers, tc.d_sae
    lens = {
        name: torch.full((L, Fe, n), -1, dtype=torch.int32)
        if name.endswith("ids")
        else torch.zeros(L, Fe, n)
        for name in ("promoted_ids", "promoted_values", "suppressed_ids", "suppressed_values")
    }
    layers = range(L)
    if cfg.progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="output tokens", unit="layer")
    u_mean = lm.sites.lm_head.weight.float().mean(0)
    for l in layers:
        alive = torch.nonzero(store.n_active[l]).flatten()
        for name, t in zip(lens, output_tokens(tc, lm, l, alive, n, u_mean=u_mean)):
            lens[name][l, alive] = t.to(lens[name].dtype)
    return lens


def _token_strings(lm, store: TopContexts, lens: dict) -> dict[str, str]:
    """The string of every token id the dashboards mention, so that reading them needs no
    tokenizer."""
    used = torch.cat(
        [
            store.window_tokens.flatten(),
            lens["promoted_ids"].flatten(),
            lens["suppressed_ids"].flatten(),
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
        "transcoders": _identity(tc),
    }
    if cfg.restart:
        _remove_old_files(out)
    if _already_built(out, meta, cfg.progress):
        return out
    run = _start_or_resume(out, meta, tc, cfg)

    contexts = _contexts(lm, cfg)  # any model samples are generated here, before the pass's clock
    bar = _progress_bar(cfg, run.tokens_seen)
    t0 = time.perf_counter()
    _stream(contexts, lm, tc, cfg, run, bar)
    lens = _output_token_tensors(lm, tc, run.store, cfg)
    run.meta.update(
        tokens_seen=run.tokens_seen,
        n_contexts=run.tokens_seen // (cfg.context - 1),
        seconds=round(time.perf_counter() - t0, 1),
        token_strings=_token_strings(lm, run.store, lens),
    )
    _write_dashboards(run, lens)
    return out


# -- reading and attaching -------------------------------------------------------------------------


def _token_text(s: str) -> str:
    return s.strip() or repr(s)


def auto_label(top_contexts: list[dict], promoted: list, n: int = 3, width: int = 32) -> str:
    """A short label: the token the feature fires on most often in its top contexts -> its top
    outputs."""
    outputs = "/".join(_token_text(t) for t, _ in promoted[:n])
    peaks = Counter(
        c["tokens"][c["acts"].index(max(c["acts"]))] for c in top_contexts if c["tokens"]
    )
    label = f"{_token_text(peaks.most_common(1)[0][0])} → {outputs}" if peaks else f"→ {outputs}"
    return label if len(label) <= width else label[: width - 1] + "…"


class Dashboards:
    """Dashboards read back from disk. `feature(layer, f)` gives one feature's dashboard as the dict
    that `graph.metadata["dashboards"][node_id]` holds (schema in docs/HELPERS.md)."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, source: Path):
        self.t, self.meta, self.source = tensors, meta, source
        self.strings = meta["token_strings"]
        self.n_layers, self.d_sae = tensors["top_acts"].shape[:2]

    def _s(self, i: int) -> str:
        return self.strings.get(str(int(i)), f"<{int(i)}>")

    def feature(self, layer: int, f: int, n_contexts: int = 5, n_tokens: int = 10) -> dict:
        t = self.t
        contexts = []
        for j in range(min(n_contexts, t["top_acts"].shape[2])):
            peak = float(t["top_acts"][layer, f, j])
            if peak <= 0:
                break
            keep = t["window_tokens"][layer, f, j] >= 0
            contexts.append(
                {
                    "tokens": [self._s(i) for i in t["window_tokens"][layer, f, j][keep]],
                    "acts": [round(float(a), 4) + 0.0 for a in t["window_acts"][layer, f, j][keep]],
                    "max_act": round(peak, 4),
                    "context": int(t["top_context"][layer, f, j]),
                }
            )

        def tokens(kind):
            ids, vals = (
                t[f"{kind}_ids"][layer, f, :n_tokens],
                t[f"{kind}_values"][layer, f, :n_tokens],
            )
            return [[self._s(i), round(float(v), 4)] for i, v in zip(ids, vals) if i >= 0]

        promoted = tokens("promoted")
        return {
            "density": float(t["n_active"][layer, f]) / max(1, self.meta["tokens_seen"]),
            "max_activation": float(t["max_act"][layer, f]),
            "top_contexts": contexts,
            "top_promoted": promoted,
            "top_suppressed": tokens("suppressed"),
            "auto_label": auto_label(contexts, promoted),
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
