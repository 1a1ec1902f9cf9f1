"""Text sources and MLP activation harvesting for transcoder training.

Text sources (`text_source(spec, ...)`):
  ``builtin`` (the offline default) — no network needed: Python's bundled documentation
      (``pydoc_data.topics``, ~1 MB of English prose and code shipped with every CPython), split into
      paragraphs, interleaved with text sampled from the model itself (batched generation from BOS,
      cached under ``cache_dir()/text``; ``gen_samples`` sets how many, 0 disables).
  ``generated`` — only the model's own samples.
  ``file:PATH`` or an existing path — text files (a file, or every .txt/.md under a folder), split on blank
      lines.
  ``hf:DATASET[:CONFIG[:SPLIT]]`` — a Hugging Face dataset streamed with `datasets` (needs network; a clear
      UserError when offline or when `datasets` is missing).
Paragraphs are split deterministically into train / held-out (eval) by a hash, so evaluation never sees
training text.

Harvesting: `ActivationSource` runs the model body (no LM head) with forward hooks on every layer's
`pre_feedforward_layernorm` (MLP input) and `post_feedforward_layernorm` (MLP output) — the sites named by
`ModelSites` — over packed sequences of `context` tokens, drops the BOS position, and yields shards of
(mlp_in, mlp_out) `[n, L, D]`. With `cache_dir` set, shards are written there as safetensors (atomically)
and read back on later runs. `ActivationBuffer` keeps `buffer_tokens` of them in memory, shuffled, and serves
batch `step` deterministically (so a resumed run sees the same data).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from circuits.errors import UserError


# ---------------------------------------------------------------------------------------------
# text

def _split_paragraphs(text: str, min_chars: int = 40) -> list[str]:
    paras = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    return [p for p in paras if len(p) >= min_chars]


def _is_heldout(text: str, frac: int = 10) -> bool:
    return int(hashlib.md5(text.encode()).hexdigest()[:8], 16) % frac == 0


def pydoc_paragraphs() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Pythons
        return []
    out = []
    for key in sorted(topics):
        out.extend(_split_paragraphs(topics[key]))
    return out


def file_paragraphs(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"text source {path} does not exist; give a text file or a folder of .txt/.md files")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md"))
    if not files:
        raise UserError(f"no .txt or .md files under {path}")
    out = []
    for f in files:
        out.extend(_split_paragraphs(f.read_text(errors="replace")))
    if not out:
        raise UserError(f"{path} holds no paragraphs of text (40+ characters, separated by blank lines)")
    return out


def generated_paragraphs(loaded, n_samples: int = 32, length: int = 64, seed: int = 0, batch: int = 16,
                         cache: bool = True, progress: bool = False) -> list[str]:
    """Text sampled from the model itself (temperature 1 from BOS), cached as JSON under cache_dir()/text."""
    if n_samples <= 0:
        return []
    from circuits.graph import atomic_write_text
    from circuits.models import cache_dir
    path = cache_dir() / "text" / f"{loaded.name.replace('/', '_')}-samples-s{seed}-n{n_samples}-l{length}.json"
    if cache and path.exists():
        return json.loads(path.read_text())
    g = torch.manual_seed(seed)  # noqa: F841 - generate uses the global RNG
    bos = getattr(loaded.tokenizer, "bos_token_id", 2)
    texts = []
    it = range(0, n_samples, batch)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="sampling text from the model", unit="batch")
    with torch.no_grad():
        for i in it:
            nb = min(batch, n_samples - i)
            ids = torch.full((nb, 1), bos, dtype=torch.long, device=loaded.device)
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                        do_sample=True, top_k=0, top_p=1.0, pad_token_id=0)
            for row in out:
                texts.append(loaded.tokenizer.decode(row[1:], skip_special_tokens=True))
    texts = [t for t in texts if t.strip()]
    if cache:
        atomic_write_text(path, json.dumps(texts))
    return texts


def hf_paragraphs(spec: str, limit: int = 20000) -> list[str]:
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError:
        raise UserError("Hugging Face text sources need the `datasets` package (pip install datasets); offline, "
                        "use --text builtin or --text file:PATH")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        out = []
        for row in ds:
            text = row.get("text") or next((v for v in row.values() if isinstance(v, str)), "")
            out.extend(_split_paragraphs(text))
            if len(out) >= limit:
                break
    except Exception as e:
        raise UserError(f"could not stream Hugging Face dataset {spec!r} ({e.__class__.__name__}: {e}); offline, "
                        f"use --text builtin or --text file:PATH")
    return out


def text_source(spec: str, loaded=None, split: str = "train", gen_samples: int = 32, seed: int = 0,
                progress: bool = False) -> list[str]:
    """Paragraphs of text for `split` ("train" or "eval") from a source spec (see the module docstring)."""
    spec = spec or "builtin"
    if spec == "builtin":
        paras = pydoc_paragraphs()
        if loaded is not None and gen_samples:
            gen = generated_paragraphs(loaded, gen_samples, seed=seed, progress=progress)
            # interleave so every buffer sees both kinds
            step = max(1, len(paras) // max(1, len(gen)))
            mixed = []
            for i, p in enumerate(paras):
                mixed.append(p)
                if i % step == 0 and gen:
                    mixed.append(gen.pop())
            paras = mixed + gen
    elif spec == "generated":
        if loaded is None:
            raise UserError("the 'generated' text source needs a model")
        paras = generated_paragraphs(loaded, gen_samples, seed=seed, progress=progress)
    elif spec.startswith("hf:"):
        paras = hf_paragraphs(spec[3:])
    else:
        paras = file_paragraphs(spec[5:] if spec.startswith("file:") else spec)
    held = [p for p in paras if _is_heldout(p)]
    train = [p for p in paras if not _is_heldout(p)]
    out = held if split == "eval" else train
    if not out:
        out = paras  # tiny sources: better to reuse than to fail
    return out


def token_sequences(loaded, paragraphs: list[str], context: int, shuffle_seed: int | None = 0) -> Iterator[torch.Tensor]:
    """Pack paragraphs into sequences `[context]` that start with BOS."""
    tok = loaded.tokenizer
    bos = getattr(tok, "bos_token_id", 2)
    order = list(range(len(paragraphs)))
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        order = torch.randperm(len(paragraphs), generator=g).tolist()
    buf: list[int] = []
    body = context - 1
    for i in order:
        ids = tok(paragraphs[i] + "\n\n", add_special_tokens=False).input_ids
        ids = ids[0] if ids and isinstance(ids[0], list) else ids
        buf.extend(int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids))
        while len(buf) >= body:
            yield torch.tensor([bos] + buf[:body])
            buf = buf[body:]


# ---------------------------------------------------------------------------------------------
# harvesting

class MLPHooks:
    """Capture MLP inputs/outputs of every layer (optionally replacing outputs) with forward hooks."""

    def __init__(self, sites):
        self.sites = sites
        self.mlp_in: list[torch.Tensor | None] = [None] * sites.n_layers
        self.mlp_out: list[torch.Tensor | None] = [None] * sites.n_layers
        self.handles = []

    def __enter__(self):
        for l, ls in enumerate(self.sites.layers):
            self.handles.append(ls.pre_feedforward_layernorm.register_forward_hook(self._save(self.mlp_in, l)))
            self.handles.append(ls.post_feedforward_layernorm.register_forward_hook(self._save(self.mlp_out, l)))
        return self

    @staticmethod
    def _save(store, l):
        def hook(module, inputs, output):
            store[l] = output.detach()
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def run_body(loaded, ids: torch.Tensor):
    """Run the decoder stack without the LM head (the expensive part we do not need for harvesting)."""
    inner = getattr(loaded.model, "model", loaded.model)
    return inner(input_ids=ids.to(loaded.device), attention_mask=torch.ones_like(ids).to(loaded.device))


@torch.no_grad()
def harvest(loaded, ids: torch.Tensor, drop_bos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP inputs and outputs `[n_tokens, L, D]` of token ids `[batch, n_pos]` (BOS positions dropped)."""
    with MLPHooks(loaded.sites) as h:
        run_body(loaded, ids)
    start = 1 if drop_bos else 0
    x = torch.stack([t[:, start:] for t in h.mlp_in], dim=2).reshape(-1, loaded.sites.n_layers, loaded.sites.d_model)
    y = torch.stack([t[:, start:] for t in h.mlp_out], dim=2).reshape(-1, loaded.sites.n_layers, loaded.sites.d_model)
    return x.float(), y.float()


_DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ActivationSource:
    """Fixed-size shards of harvested activations, computed on demand and optionally cached on disk.

    Shard i holds `shard_tokens` tokens, taken in order from the packed text stream; shards past the end of
    the text wrap around. `n_shards` is how many distinct shards the text gives (None: unknown yet)."""

    def __init__(self, loaded, paragraphs: list[str], context: int = 128, shard_tokens: int = 4096,
                 batch_seqs: int = 8, dtype: str = "bfloat16", cache_dir: str | Path | None = None,
                 max_tokens: int | None = None, seed: int = 0):
        self.loaded, self.context, self.shard_tokens = loaded, context, shard_tokens
        self.batch_seqs, self.dtype = batch_seqs, _DT[dtype]
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.paragraphs, self.seed = paragraphs, seed
        n_text_tokens = None
        self.max_shards = None if max_tokens is None else max(1, max_tokens // shard_tokens)
        self._stream = None
        self._next_shard = 0
        self._mem: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.n_shards = n_text_tokens
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def _path(self, i: int) -> Path:
        return self.cache_dir / f"shard_{i:05d}.safetensors"

    def _seqs(self):
        while True:
            got = False
            for s in token_sequences(self.loaded, self.paragraphs, self.context, self.seed):
                got = True
                yield s
            if not got:
                raise UserError("the text source is too short for one sequence; give more text")
            if self.n_shards is None:
                self.n_shards = max(1, self._next_shard)

    def _compute_next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stream is None:
            self._stream = self._seqs()
        xs, ys, n = [], [], 0
        while n < self.shard_tokens:
            batch = torch.stack([next(self._stream) for _ in range(self.batch_seqs)])
            x, y = harvest(self.loaded, batch)
            xs.append(x.to(self.dtype)); ys.append(y.to(self.dtype)); n += x.shape[0]
        x, y = torch.cat(xs)[:self.shard_tokens], torch.cat(ys)[:self.shard_tokens]
        return x, y

    def shard(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_shards:
            i = i % self.max_shards
        if i in self._mem:
            return self._mem[i]
        if self.cache_dir and self._path(i).exists():
            from safetensors.torch import load_file
            d = load_file(str(self._path(i)))
            return d["mlp_in"], d["mlp_out"]
        while self._next_shard <= i:  # shards are produced in order from the stream
            x, y = self._compute_next()
            j = self._next_shard
            self._next_shard += 1
            if self.cache_dir:
                from safetensors.torch import save
                from circuits.graph import atomic_write
                blob = save({"mlp_in": x.contiguous(), "mlp_out": y.contiguous()})
                atomic_write(self._path(j), lambda f: f.write(blob))
            if not self.cache_dir and self.max_shards:
                self._mem[j] = (x, y)
            if j == i:
                return x, y
        raise AssertionError("unreachable")


class ActivationBuffer:
    """A shuffled in-memory buffer of `buffer_tokens` activations, refilled from a source.

    Fill f holds shards [f*m, (f+1)*m) (m = buffer_tokens // shard_tokens), shuffled with seed (seed, f);
    `batch(step)` is a pure function of step, so resumed runs see exactly the batches they would have."""

    def __init__(self, source: ActivationSource, buffer_tokens: int, batch_size: int, seed: int = 0):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.m = max(1, buffer_tokens // source.shard_tokens)
        self.per_fill = (self.m * source.shard_tokens) // batch_size
        if self.per_fill < 1:
            raise UserError(f"batch size {batch_size} is larger than the buffer ({buffer_tokens} tokens)")
        self._fill_id = None
        self._x = self._y = self._perm = None

    def _fill(self, f: int):
        xs, ys = zip(*(self.source.shard(f * self.m + j) for j in range(self.m)))
        self._x, self._y = torch.cat(xs), torch.cat(ys)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + f)
        self._perm = torch.randperm(self._x.shape[0], generator=g)
        self._fill_id = f

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        f, i = divmod(step, self.per_fill)
        if f != self._fill_id:
            self._fill(f)
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        return self._x[idx].float(), self._y[idx].float()


class PlantedData:
    """Synthetic activations from a known sparse dictionary, for tests and demos.

    Each layer l has `n_features` planted features with non-negative sparse codes s_l (about `l0` active per
    position, magnitudes in [0.5, 1.5]). MLP input x_l = s_l @ A_l + noise; MLP output
    y_l = sum_{s <= l} s_s @ B[s][:, l - s] (`mode="clt"`: features write to every later layer) or
    y_l = s_l @ B[l][:, 0] (`mode="plt"`). A, B rows are random unit vectors. `batch(step)` is deterministic."""

    def __init__(self, n_layers: int = 2, d_model: int = 32, n_features: int = 64, l0: float = 3.0,
                 mode: str = "plt", noise: float = 0.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n_layers, self.d_model, self.n_features, self.l0 = n_layers, d_model, n_features, l0
        self.mode, self.noise, self.seed = mode, noise, seed

        def unit(*shape):
            w = torch.randn(*shape, generator=g)
            return w / w.norm(dim=-1, keepdim=True)
        self.A = [unit(n_features, d_model) for _ in range(n_layers)]
        self.B = [unit(n_features, (n_layers - l) if mode == "clt" else 1, d_model) for l in range(n_layers)]

    def codes(self, n: int, g: torch.Generator) -> list[torch.Tensor]:
        p = self.l0 / self.n_features
        return [(torch.rand(n, self.n_features, generator=g) < p).float()
                * (0.5 + torch.rand(n, self.n_features, generator=g)) for _ in range(self.n_layers)]

    def batch(self, step: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + step + 1)
        s = self.codes(batch_size, g)
        xs, ys = [], []
        for l in range(self.n_layers):
            x = s[l] @ self.A[l]
            if self.noise:
                x = x + self.noise * torch.randn(x.shape, generator=g)
            xs.append(x)
            if self.mode == "clt":
                ys.append(sum(s[src] @ self.B[src][:, l - src] for src in range(l + 1)))
            else:
                ys.append(s[l] @ self.B[l][:, 0])
        return torch.stack(xs, 1), torch.stack(ys, 1)


class PlantedBuffer:
    """`ActivationBuffer`-like view of `PlantedData`."""

    def __init__(self, data: PlantedData, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def batch(self, step: int):
        return self.data.batch(step, self.batch_size)
