"""`circuits info`: versions, device, edge backend and caches."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib.metadata import version

import numpy
import torch

from gemma_lm import __version__
from gemma_lm.files import cache_dir
from gemma_lm.jobs import Command
from gemma_lm.models import DEFAULT_MODEL
from transcoders.default import default_transcoders_dir

from .backend import active_backend, backend_reason


def info_lines() -> list[str]:
    cuda = torch.cuda.is_available()
    device = (
        f"cuda ({torch.cuda.get_device_name(0)})"
        if cuda
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    dev = "cuda" if cuda else "cpu"
    root = cache_dir()
    model_cache = root / "models" / "gemma-3-270m-hf"
    tc_dir = default_transcoders_dir()
    tc_state = (
        "trained"
        if (tc_dir / "config.json").exists()
        else "not trained yet (the first trace trains it)"
    )
    return [
        f"gemma-circuits {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {version('transformers')}, numpy {numpy.__version__}",
        f"device: {device}",
        f"edge backend: {active_backend(dev)} ({backend_reason(dev)})"
        + (f"; for CPU tensors: {active_backend('cpu')} ({backend_reason('cpu')})" if cuda else ""),
        f"default model: {DEFAULT_MODEL}, cached at {model_cache} "
        f"({'present' if (model_cache / 'DONE').exists() else 'not yet assembled'})",
        f"default transcoders: {tc_dir} ({tc_state})",
        f"cache root: {root} (set GEMMA_CIRCUITS_CACHE to move it)",
    ]


@dataclass
class InfoJob:
    """Print what is installed, which edge backend is active and why, and where the caches are."""


def run_info(job: InfoJob) -> int:
    print("\n".join(info_lines()))
    return 0


COMMANDS = [Command("info", InfoJob, run_info, "versions, device, edge backend and caches")]
