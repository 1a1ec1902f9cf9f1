"""Transcoder files: our native layout, detection of every supported layout, and `transcoders convert`.

Native layout (a directory, written atomically):
  config.json          the `TranscoderConfig` (kind, sites, activation, sizes, k, skip, matryoshka prefixes,
                       model name, training metrics) plus "format" and "format_version"
  weights.safetensors  the `TranscoderSet` state dict: W_enc.{l} [D, F], b_enc.{l} [F], threshold.{l} [F],
                       W_dec.{l} [F, D] (CLT: [F, L - l, D]), b_dec.{l} [D], W_skip.{l} [D, D]

One weights file serves CLTs too: safetensors is memory-mapped and addressed per tensor, so reading one
layer's decoder touches only its bytes; a single file keeps the directory swap atomic and the checks simple.

Other layouts: Gemma Scope 2 (`transcoders.gemmascope`) and circuit-tracer
(`transcoders.circuit_tracer_format`, imported only when used). `load_any` detects which one a path holds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from circuits.errors import UserError

from .model import TranscoderConfig, TranscoderSet

NATIVE_FORMAT = "gemma-circuits-transcoders"
NATIVE_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
FORMATS = ("native", "gemmascope2", "circuit-tracer")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ACCEPTED = (
    "a native directory (config.json + weights.safetensors), a Gemma Scope 2 folder "
    "(transcoder_all/layer_<l>_width_<w>_l0_<s>[_affine] folders, or clt/width_<w>_l0_<s>[_affine]), "
    "a circuit-tracer directory, or hf://<repo>/<subfolder> for a Gemma Scope 2 set on the Hub"
)


# -- shared helpers (also used by transcoders.gemmascope) ------------------------------------------
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
    """A `TranscoderConfig` from a stored dict; fields this version does not know are kept in `extra`."""
    known = {f.name for f in fields(TranscoderConfig)}
    missing = [k for k in ("kind", "n_layers", "d_model", "d_sae") if k not in raw]
    if missing:
        raise UserError(
            f"{source} lacks {', '.join(missing)}; it is not a complete transcoder config"
        )
    for k in ("n_layers", "d_model", "d_sae"):
        if not isinstance(raw[k], int) or isinstance(raw[k], bool) or raw[k] <= 0:
            raise UserError(f"{source}: {k} must be a positive integer, not {raw[k]!r}")
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


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the metadata of a safetensors file; missing or corrupt files, and floating-point
    tensors holding NaN or inf, are UserErrors. The tensors are memory-mapped views of the file (read when
    first touched), and the values check reads the file apart from them: a decoder of which attribution reads
    only the active features' rows never becomes resident as a whole."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
            "write or download it again"
        ) from None
    for name in nonfinite_tensors_in_file(path):  # the first one found
        raise UserError(f"{path}: {name} holds NaN or infinite values; the file is corrupt")
    for t in tensors.values():
        t.finite_checked = (
            True  # build_transcoder_set need not read it again; a copy or view loses the mark
        )
    return tensors, metadata


# bit masks of the exponent of each floating dtype a safetensors file stores: all ones = inf or NaN
_EXPONENT_MASKS = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
_TORCH_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _safetensors_header(f) -> tuple[dict, int]:
    """(header, offset of the data) of an open safetensors file."""
    header_len = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(header_len)), 8 + header_len


def nonfinite_tensors_in_file(path: Path, piece: int = 64 << 20):
    """Names of the floating-point tensors of safetensors file `path` that hold NaN or inf, read in pieces of
    `piece` bytes through ordinary reads (the page cache), not through a mapping of this process."""
    with open(path, "rb") as f:
        header, data_start = _safetensors_header(f)
        for name, info in header.items():
            if name == "__metadata__" or info.get("dtype") not in _EXPONENT_MASKS:
                continue
            bits, mask = _EXPONENT_MASKS[info["dtype"]]
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            left = end - begin
            while left > 0:
                data = f.read(min(left, piece))
                if not data:
                    break
                left -= len(data)
                if bool(((np.frombuffer(data, dtype=bits) & bits(mask)) == mask).any()):
                    yield name
                    break


def read_tensor_copy(path: Path, name: str) -> torch.Tensor:
    """One floating-point tensor of a (checked) safetensors file as a tensor of its own, read through the
    page cache: for weights a loader must copy into another layout, since copying from the memory-mapped
    view would leave the mapped pages resident beside the copy."""
    with open(path, "rb") as f:
        header, data_start = _safetensors_header(f)
        info = header.get(name)
        if info is None or info.get("dtype") not in _TORCH_DTYPES:
            raise UserError(f"{path} has no floating-point tensor {name!r}")
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_TORCH_DTYPES[info["dtype"]])
        if out.numel() * out.element_size() != end - begin:
            raise UserError(
                f"{path}: {name} has {end - begin} bytes for shape {info['shape']}; the file is corrupt"
            )
        f.seek(data_start + begin)
        if f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != end - begin:
            raise UserError(f"{path}: {name} is cut short; the file is truncated")
    out.finite_checked = True
    return out


def build_transcoder_set(
    cfg: TranscoderConfig, state: dict[str, torch.Tensor], source, dtype: torch.dtype | None = None
) -> TranscoderSet:
    """A `TranscoderSet` holding `state` (a TranscoderSet state dict), after checking names, shapes and
    values against `cfg`. Built on the meta device so that large sets are never allocated twice."""
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


def detect_layout(path) -> str | None:
    """'native', 'gemmascope2', 'circuit-tracer', or None when `path` holds none of them."""
    from . import gemmascope

    p = Path(path)
    if p.is_dir():
        config = p / CONFIG_FILE
        if (p / WEIGHTS_FILE).is_file() or (config.is_file() and NATIVE_FORMAT in _head(config)):
            return "native"
    if gemmascope.is_gemmascope2_dir(p):
        return "gemmascope2"
    ct = _circuit_tracer(required=False)
    if ct is not None and p.exists() and ct.is_circuit_tracer_dir(p):
        return "circuit-tracer"
    if not p.exists() and gemmascope.is_hub_spec(str(path)):
        return "gemmascope2"
    return None


def _head(path: Path, n: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(n).decode("utf-8", "replace")
    except OSError:
        return ""


def _circuit_tracer(required: bool = True):
    """transcoders.circuit_tracer_format, written by another part of the project; None if absent."""
    try:
        from . import circuit_tracer_format
    except ModuleNotFoundError as e:
        if e.name != "transcoders.circuit_tracer_format":
            raise
        if required:
            raise UserError(
                "the circuit-tracer layout is not available in this installation "
                "(transcoders/circuit_tracer_format.py is missing); use native or gemmascope2"
            ) from None
        return None
    return circuit_tracer_format


@contextmanager
def atomic_directory(dst):
    """Yield a fresh path to build a directory at; on success it replaces `dst` in one rename, so readers
    never see a half-written directory. An existing `dst` is replaced only if it already holds transcoders
    (refusing to wipe, say, a home directory given by mistake)."""
    dst = Path(dst)
    if dst.exists():
        if not dst.is_dir():
            raise UserError(
                f"{dst} exists and is a file; choose a directory path for the transcoders"
            )
        if any(dst.iterdir()) and detect_layout(dst) is None:
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


# -- native layout ------------------------------------------------------------------------------------
def save_native(tc: TranscoderSet, dst) -> Path:
    """Write `tc` as a native directory (config.json + weights.safetensors), atomically."""
    from safetensors.torch import save_file

    config = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_VERSION,
        **json.loads(config_json(tc.cfg)),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tc.state_dict().items()}
    dst = Path(dst)
    with atomic_directory(dst) as build:
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
    tc = build_transcoder_set(cfg, state, p / WEIGHTS_FILE, resolve_dtype(dtype))
    if model is not None:
        tc.check_compatible(model.sites, model.name)
    return tc


# -- any layout ---------------------------------------------------------------------------------------
def load_any(path, model=None, dtype=None, progress: bool = False) -> TranscoderSet:
    """Load a transcoder set from any supported layout (native, Gemma Scope 2, circuit-tracer); with a
    LoadedModel `model`, refuse a set that does not fit it (layers, d_model, sites)."""
    from . import gemmascope

    layout = detect_layout(path)
    dtype = resolve_dtype(dtype)
    if layout == "native":
        tc = load_native(path, dtype=dtype)
    elif layout == "gemmascope2":
        tc = gemmascope.load_gemmascope2(path, dtype=dtype, progress=progress)
    elif layout == "circuit-tracer":
        tc = _circuit_tracer().load_circuit_tracer(path)
        if dtype is not None:
            tc = tc.to(dtype)
    elif not Path(path).exists():
        raise UserError(f"{path} does not exist; pass {ACCEPTED}")
    else:
        raise UserError(f"{path} holds no transcoder layout gemma-circuits knows; pass {ACCEPTED}")
    if model is not None:
        tc.check_compatible(model.sites, model.name)
    return tc


# -- convert ------------------------------------------------------------------------------------------
@dataclass
class ConvertConfig:
    """`transcoders convert SRC DST --to FORMAT`: read any layout, write one."""

    src: str
    dst: str
    to: str
    dtype: str | None = None  # cast the weights (float32, bfloat16, ...); default: keep them
    model: str | None = None  # check the set fits this model (name or path) before writing
    l0_label: str | None = (
        None  # Gemma Scope 2 folder names: the l0_<label> part (default: the measured L0)
    )
    progress: bool = True


def save_as(
    tc: TranscoderSet, dst, to: str, l0_label: str | None = None, progress: bool = False
) -> Path:
    """Write `tc` at `dst` in layout `to`; returns the path that `load_any` reads it back from."""
    from . import gemmascope

    if to == "native":
        return save_native(tc, dst)
    if to == "gemmascope2":
        return gemmascope.save_gemmascope2(tc, dst, l0_label=l0_label, progress=progress)
    if to == "circuit-tracer":
        ct = _circuit_tracer()
        with atomic_directory(dst) as build:
            ct.save_circuit_tracer(tc, build)
        return Path(dst)
    raise UserError(f"unknown layout {to!r}; use one of {', '.join(FORMATS)}")


def run_convert(cfg: ConvertConfig) -> tuple[Path, TranscoderSet]:
    """Convert as `cfg` says; the path to load the result from, and the set that was written."""
    if cfg.to not in FORMATS:
        raise UserError(f"unknown layout {cfg.to!r}; use one of {', '.join(FORMATS)}")
    if Path(cfg.dst).resolve() == Path(cfg.src).resolve() and detect_layout(cfg.src) == cfg.to:
        raise UserError(f"{cfg.src} is already in the {cfg.to} layout; give a different DST")
    model = None
    if cfg.model:
        from circuits.models import load_model

        model = load_model(cfg.model)
    tc = load_any(cfg.src, model=model, dtype=cfg.dtype, progress=cfg.progress)
    return save_as(tc, cfg.dst, cfg.to, l0_label=cfg.l0_label, progress=cfg.progress), tc


def convert(src, dst, to: str, **options) -> Path:
    """Convert the transcoder set at `src` to layout `to` ('native', 'gemmascope2', 'circuit-tracer') at
    `dst`, atomically. Options are the fields of `ConvertConfig`. Returns the path to load the result from."""
    return run_convert(ConvertConfig(src=str(src), dst=str(dst), to=to, **options))[0]


def describe(tc: TranscoderSet) -> str:
    c = tc.cfg
    act = c.activation + (f" k={c.k}" if c.k else "")
    return (
        f"{c.kind}{' +skip' if c.skip and c.kind != 'skip' else ''}, {c.n_layers} layers, d_model {c.d_model}, "
        f"{c.d_sae} features/layer, {act}, model {c.model_name or '?'}"
    )


def _cmd_convert(args) -> int:
    cfg = ConvertConfig(
        src=args.src,
        dst=args.dst,
        to=args.to,
        dtype=args.dtype,
        model=args.model,
        l0_label=args.l0_label,
        progress=not args.no_progress,
    )
    out, tc = run_convert(cfg)
    print(f"wrote {cfg.to} transcoders ({describe(tc)}) to {out}")
    print(f"load with: transcoders.formats.load_any({str(out)!r})")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert transcoders between layouts (native, Gemma Scope 2, circuit-tracer)",
        description="Read a transcoder set in any supported layout and write it in another. "
        "The result is written atomically and reproduces encodings and "
        "reconstructions exactly.",
    )
    p.add_argument(
        "src", help="native dir, Gemma Scope 2 folder, circuit-tracer dir, or hf://REPO/SUBFOLDER"
    )
    p.add_argument(
        "dst", help="directory to write (replaced atomically if it already holds transcoders)"
    )
    p.add_argument("--to", required=True, choices=FORMATS, help="layout to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep them)")
    p.add_argument("--model", help="check the set fits this model first (e.g. gemma-3-270m)")
    p.add_argument(
        "--l0-label",
        help="Gemma Scope 2 output: the l0_<label> part of folder names "
        "(default: the measured L0, or 'unknown')",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)
