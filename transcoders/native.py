"""Our native transcoder layout, and what every layout's reader and writer shares.

Native layout (a directory, written atomically):
  config.json          the `TranscoderConfig` (kind, sites, activation, sizes, k, skip, matryoshka
                       prefixes, model name, training metrics) plus "format" and "format_version"
  weights.safetensors  the `TranscoderSet` state dict: W_enc.{l} [D, F], b_enc.{l} [F],
                       threshold.{l} [F], W_dec.{l} [F, D] (CLT: [F, L - l, D]), b_dec.{l} [D],
                       W_skip.{l} [D, D]

One weights file serves CLTs too: safetensors is memory-mapped and addressed per tensor, so reading
one layer's decoder touches only its bytes; a single file keeps the directory swap atomic and the
checks simple. Gemma Scope 2 (`transcoders.gemmascope`) and circuit-tracer
(`transcoders.circuit_tracer_format`) read and write through the helpers here; `transcoders.formats`
tells the layouts apart.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from gemma_lm.errors import UserError
from gemma_lm.weights import read_safetensors

from .model import TranscoderConfig, TranscoderSet

NATIVE_FORMAT = "gemma-circuits-transcoders"
NATIVE_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# -- helpers every layout uses -------------------------------------------------------------------
def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a missing or unreadable file is a UserError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{path} is not valid JSON ({e}); restore it from the original download"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _jsonable(x):
    """json.dumps fallback for metrics that hold tensors or numpy numbers."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"cannot store {type(x).__name__} in config.json")


def config_json(cfg: TranscoderConfig) -> str:
    return json.dumps(cfg.to_dict(), default=_jsonable)


def config_from_dict(raw: dict, source) -> TranscoderConfig:
    """A `TranscoderConfig` from a stored dict; fields this version does not know are kept in
    `extra`."""
    known = {f.name for f in fields(TranscoderConfig)}
    missing = [k for k in ("kind", "n_layers", "d_model", "d_sae") if k not in raw]
    if missing:
        raise UserError(
            f"{source} lacks {', '.join(missing)}; it is not a complete transcoder config"
        )
    for k in ("n_layers", "d_model", "d_sae"):
        if not isinstance(raw[k], int) or isinstance(raw[k], bool) or raw[k] <= 0:
            raise UserError(f"{source}: {k} must be a positive integer, not {raw[k]!r}")
    _check_field_types(raw, source)
    kwargs = {k: v for k, v in raw.items() if k in known}
    unknown = {
        k: v for k, v in raw.items() if k not in known and k not in ("format", "format_version")
    }
    if unknown:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), "unread_config": unknown}
    try:
        return TranscoderConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}") from None


FIELD_TYPES = {
    "kind": str,
    "activation": str,
    "skip": bool,
    "model_name": str,
    "input_site": str,
    "output_site": str,
    "metrics": dict,
    "extra": dict,
}


def _check_field_types(raw: dict, source) -> None:
    """The optional config fields hold what a transcoder set computes with: a config damaged by
    hand or on disk is refused here, not found later as a failing matrix product."""
    for k, kind in FIELD_TYPES.items():
        if k in raw and not isinstance(raw[k], kind):
            raise UserError(f"{source}: {k} must be a {kind.__name__}, not {raw[k]!r}")
    k = raw.get("k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k <= 0):
        raise UserError(f"{source}: k must be a positive integer or null, not {k!r}")
    prefixes = raw.get("matryoshka_prefixes")
    if prefixes is not None and not (
        isinstance(prefixes, list)
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in prefixes)
    ):
        raise UserError(
            f"{source}: matryoshka_prefixes must be a list of positive integers or null, not "
            f"{prefixes!r}"
        )


def one_dtype(state: dict[str, torch.Tensor], source) -> None:
    """Refuse a state dict whose floating tensors differ in dtype: a set computes in one (pass
    dtype= to cast them all instead)."""
    floating = [(k, t.dtype) for k, t in state.items() if t.is_floating_point()]
    for k, dt in floating[1:]:
        if dt != floating[0][1]:
            raise UserError(
                f"{source}: {k} is {dt} but {floating[0][0]} is {floating[0][1]}; a set computes "
                "in one dtype: pass dtype= (--dtype) to cast every tensor, or write the file again"
            )


def build_transcoder_set(
    cfg: TranscoderConfig, state: dict[str, torch.Tensor], source, dtype: torch.dtype | None = None
) -> TranscoderSet:
    """A `TranscoderSet` holding `state` (a TranscoderSet state dict), after checking names, shapes
    and values against `cfg`. Built on the meta device so that large sets are never allocated
    twice."""
    with torch.device("meta"):
        empty = TranscoderSet(cfg)
    expected = {k: tuple(v.shape) for k, v in empty.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        what = "; ".join(
            p
            for p in (
                f"missing {', '.join(missing[:6])}" if missing else "",
                f"unexpected {', '.join(unexpected[:6])}" if unexpected else "",
            )
            if p
        )
        raise UserError(
            f"{source} does not hold a {cfg.kind} set of {cfg.n_layers} layers"
            f"{' with a skip term' if cfg.skip else ''}: {what}"
        )
    for k, shape in expected.items():
        t = state[k]
        if tuple(t.shape) != shape:
            raise UserError(
                f"{source}: {k} has shape {list(t.shape)} but the config needs {list(shape)} "
                f"(d_model {cfg.d_model}, d_sae {cfg.d_sae}, {cfg.n_layers} layers)"
            )
        if not t.is_floating_point():
            raise UserError(
                f"{source}: {k} has dtype {t.dtype}; transcoder weights are floating point"
            )
        if not getattr(t, "finite_checked", False) and not bool(torch.isfinite(t).all()):
            raise UserError(f"{source}: {k} holds NaN or infinite values; the file is corrupt")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    empty.load_state_dict(state, assign=True)
    if any(t.is_meta for t in list(empty.parameters()) + list(empty.buffers())):
        # a tensor the state dict does not carry (a non-persistent buffer): build it for real
        tc = TranscoderSet(cfg)
        tc.load_state_dict(state)
        return tc.to(dtype) if dtype is not None else tc
    return empty


@contextmanager
def atomic_directory(dst, replaceable: Callable[[Path], bool]):
    """Yield a fresh path to build a directory at; on success it replaces `dst` in one rename, so
    readers never see a half-written directory. An existing non-empty `dst` is replaced only if
    `replaceable(dst)` says it holds transcoders (refusing to wipe, say, a home directory given by
    mistake); each writer passes the layouts it may replace (`formats.save_as`: every layout)."""
    dst = Path(dst)
    if dst.exists():
        if not dst.is_dir():
            raise UserError(
                f"{dst} exists and is a file; choose a directory path for the transcoders"
            )
        if any(dst.iterdir()) and not replaceable(dst):
            raise UserError(
                f"{dst} exists and does not hold transcoders; refusing to replace it: choose a new "
                "path or remove it yourself"
            )
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        build = staging / dst.name
        yield build
        if not build.is_dir():
            raise RuntimeError(f"the writer did not create {build}")
        _fsync_tree(build)
        if dst.exists():
            old = staging / ".replaced"
            os.rename(dst, old)
            os.rename(build, dst)
        else:
            os.rename(build, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# -- native layout ---------------------------------------------------------------------------------
def is_native_dir(path) -> bool:
    """Whether `path` is a directory in the native layout (or a damaged one `load_native`
    reports)."""
    p = Path(path)
    config = p / CONFIG_FILE
    return p.is_dir() and (
        (p / WEIGHTS_FILE).is_file() or (config.is_file() and NATIVE_FORMAT in _head(config))
    )


def _head(path: Path, n: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(n).decode("utf-8", "replace")
    except OSError:
        return ""


def save_native(
    tc: TranscoderSet, dst, replaceable: Callable[[Path], bool] = is_native_dir
) -> Path:
    """Write `tc` as a native directory (config.json + weights.safetensors), atomically, replacing a
    `dst` that `replaceable` accepts (by default: a native set)."""

    config = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_VERSION,
        **json.loads(config_json(tc.cfg)),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tc.state_dict().items()}
    dst = Path(dst)
    with atomic_directory(dst, replaceable) as build:
        build.mkdir()
        save_file(
            tensors,
            str(build / WEIGHTS_FILE),
            metadata={"format": "pt", "gemma_circuits_format": f"{NATIVE_FORMAT}/{NATIVE_VERSION}"},
        )
        (build / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return dst


def load_native(path, model=None, dtype=None) -> TranscoderSet:
    """Read a native directory; with a LoadedModel `model`, refuse a set that does not fit it."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(
            f"{p} is not a directory; a native transcoder set is a directory holding "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    raw = read_json(p / CONFIG_FILE)
    if raw.get("format") != NATIVE_FORMAT:
        raise UserError(
            f"{p / CONFIG_FILE} is not a gemma-circuits transcoder config (format "
            f"{raw.get('format')!r}); use load_any for Gemma Scope 2 or circuit-tracer files"
        )
    version = raw.get("format_version")
    if not isinstance(version, int) or version > NATIVE_VERSION:
        raise UserError(
            f"{p / CONFIG_FILE} has format version {version!r}; this gemma-circuits reads "
            f"version {NATIVE_VERSION} and older: upgrade gemma-circuits"
        )
    cfg = config_from_dict(raw, p / CONFIG_FILE)
    state, _ = read_safetensors(p / WEIGHTS_FILE)
    if dtype is None:
        one_dtype(state, p / WEIGHTS_FILE)
    tc = build_transcoder_set(cfg, state, p / WEIGHTS_FILE, resolve_dtype(dtype))
    if model is not None:
        tc.check_compatible(model.sites, model.name)
    return tc
