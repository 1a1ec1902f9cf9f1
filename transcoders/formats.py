"""Every transcoder layout behind one call: `load_any` tells them apart, `transcoders convert` turns
one into another.

Layouts: native (`transcoders.native`), Gemma Scope 2 (`transcoders.gemmascope`) and circuit-tracer
(`transcoders.circuit_tracer_format`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gemma_lm.errors import UserError
from gemma_lm.jobs import Command, option
from gemma_lm.models import load_model

from . import circuit_tracer_format as ct
from . import gemmascope
from .model import TranscoderSet
from .native import atomic_directory, is_native_dir, load_native, resolve_dtype, save_native

Layout = Literal["native", "gemmascope2", "circuit-tracer"]
FORMATS = typing.get_args(Layout)
ACCEPTED = (
    "a native directory (config.json + weights.safetensors), a Gemma Scope 2 folder "
    "(transcoder_all/layer_<l>_width_<w>_l0_<s>[_affine] folders, or "
    "clt/width_<w>_l0_<s>[_affine]), a circuit-tracer directory, or hf://<repo>/<subfolder> for a "
    "Gemma Scope 2 set on the Hub"
)


def detect_layout(path) -> str | None:
    """'native', 'gemmascope2', 'circuit-tracer', or None when `path` holds none of them."""
    p = Path(path)
    if is_native_dir(p):
        return "native"
    if gemmascope.is_gemmascope2_dir(p):
        return "gemmascope2"
    if p.exists() and ct.is_circuit_tracer_dir(p):
        return "circuit-tracer"
    if not p.exists() and gemmascope.is_hub_spec(str(path)):
        return "gemmascope2"
    return None


def holds_transcoders(path) -> bool:
    """Whether `path` holds a transcoder set in any layout (a writer may replace it)."""
    return detect_layout(path) is not None


# -- any layout ------------------------------------------------------------------------------------
def load_any(path, model=None, dtype=None, progress: bool = False) -> TranscoderSet:
    """Load a transcoder set from any supported layout (native, Gemma Scope 2, circuit-tracer); with
    a LoadedModel `model`, refuse a set that does not fit it (layers, d_model, sites)."""
    layout = detect_layout(path)
    dtype = resolve_dtype(dtype)
    if layout == "native":
        tc = load_native(path, dtype=dtype)
    elif layout == "gemmascope2":
        n_layers = model.sites.n_layers if model is not None else None
        tc = gemmascope.load_gemmascope2(path, dtype=dtype, progress=progress, n_layers=n_layers)
    elif layout == "circuit-tracer":
        tc = ct.load_circuit_tracer(path)
        if dtype is not None:
            tc = tc.to(dtype)
    elif not Path(path).exists():
        raise UserError(f"{path} does not exist; pass {ACCEPTED}")
    else:
        inside = gemmascope.sets_inside_hint(Path(path))  # e.g. the parent of a CLT folder
        what = inside or f"; pass {ACCEPTED}"
        raise UserError(f"{path} holds no transcoder layout gemma-circuits knows{what}")
    if model is not None:
        tc.check_compatible(model.sites, model.name)
    return tc


# -- convert ---------------------------------------------------------------------------------------
@dataclass
class ConvertConfig:
    """Read a transcoder set in any supported layout and write it in another. The result is
    written atomically and reproduces encodings and reconstructions exactly."""

    src: str = option(positional=True)
    """native dir, Gemma Scope 2 folder, circuit-tracer dir, or hf://REPO/SUBFOLDER"""
    dst: str = option(positional=True)
    """directory to write (replaced atomically if it already holds transcoders)"""
    to: Layout
    """layout to write"""
    dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = None
    """cast the weights (default: keep them)"""
    model: str | None = None
    """check the set fits this model first (e.g. gemma-3-270m)"""
    l0_label: str | None = None
    """Gemma Scope 2 output: the l0_<label> part of folder names (default: the measured L0, or
    'unknown')"""
    progress: bool = True
    """show a progress bar"""


def save_as(
    tc: TranscoderSet, dst, to: str, l0_label: str | None = None, progress: bool = False
) -> Path:
    """Write `tc` at `dst` in layout `to`; returns the path that `load_any` reads it back from."""
    if to == "native":
        return save_native(tc, dst, holds_transcoders)
    if to == "gemmascope2":
        return gemmascope.save_gemmascope2(
            tc, dst, l0_label=l0_label, progress=progress, replaceable=holds_transcoders
        )
    if to == "circuit-tracer":
        with atomic_directory(dst, holds_transcoders) as build:
            ct.save_circuit_tracer(tc, build)
        return Path(dst)
    raise UserError(f"unknown layout {to!r}; use one of {', '.join(FORMATS)}")


def run_convert(cfg: ConvertConfig) -> tuple[Path, TranscoderSet]:
    """Convert as `cfg` says; the path to load the result from, and the set that was written."""
    if cfg.to not in FORMATS:
        raise UserError(f"unknown layout {cfg.to!r}; use one of {', '.join(FORMATS)}")
    if Path(cfg.dst).resolve() == Path(cfg.src).resolve() and detect_layout(cfg.src) == cfg.to:
        raise UserError(f"{cfg.src} is already in the {cfg.to} layout; give a different DST")
    model = load_model(cfg.model) if cfg.model else None
    tc = load_any(cfg.src, model=model, dtype=cfg.dtype, progress=cfg.progress)
    return save_as(tc, cfg.dst, cfg.to, l0_label=cfg.l0_label, progress=cfg.progress), tc


def convert(src, dst, to: str, **options) -> Path:
    """Convert the transcoder set at `src` to layout `to` ('native', 'gemmascope2',
    'circuit-tracer') at `dst`, atomically. Options are the fields of `ConvertConfig`. Returns the
    path to load the result from."""
    return run_convert(ConvertConfig(src=str(src), dst=str(dst), to=to, **options))[0]


def describe(tc: TranscoderSet) -> str:
    c = tc.cfg
    act = c.activation + (f" k={c.k}" if c.k else "")
    return (
        f"{c.kind}{' +skip' if c.skip and c.kind != 'skip' else ''}, {c.n_layers} layers, d_model "
        f"{c.d_model}, {c.d_sae} features/layer, {act}, model {c.model_name or '?'}"
    )


def run_convert_command(cfg: ConvertConfig) -> int:
    out, tc = run_convert(cfg)
    print(f"wrote {cfg.to} transcoders ({describe(tc)}) to {out}")
    print(f"load with: transcoders.formats.load_any({str(out)!r})")
    return 0


COMMANDS = [
    Command(
        "convert",
        ConvertConfig,
        run_convert_command,
        "convert transcoders between layouts (native, Gemma Scope 2, circuit-tracer)",
    )
]
