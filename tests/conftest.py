"""Shared fixtures. Tiny random Gemma 3 models for speed; the real gemma-3-270m (session-scoped,
loaded once) for the few end-to-end checks marked `slow`."""

from __future__ import annotations

import os

import pytest
import torch

# 2 cores: keep torch from oversubscribing when pytest-xdist or several suites share the machine
torch.set_num_threads(
    max(1, int(os.environ.get("GEMMA_CIRCUITS_TEST_THREADS", torch.get_num_threads())))
)


@pytest.fixture
def tiny():
    """A tiny random Gemma 3 (3 layers, d_model 64, sliding + global layers, no soft-capping)."""
    from gemma_lm.testing import tiny_model

    return tiny_model(seed=0)


@pytest.fixture
def tiny_softcap():
    from gemma_lm.testing import tiny_model

    return tiny_model(seed=1, softcap=5.0)


@pytest.fixture(scope="session")
def real_model():
    """The embedded default google/gemma-3-270m, float32 on the CPU (assembled on first use)."""
    from circuits import load_model

    return load_model()


@pytest.fixture(scope="session")
def default_transcoders(real_model):
    """The embedded default transcoder set (trained on first use, then cached)."""
    from transcoders.default import load_default_transcoders

    return load_default_transcoders(real_model, progress=False)


def serve_model(monkeypatch, lm_or_loader):
    """Make every `load_model` of the library return a tiny model standing in for a real one (for
    the command lines): the loader itself and every module that imported it by name. `lm_or_loader`:
    the LoadedModel, or a function with `load_model`'s signature."""
    import sys

    import circuits.cli  # noqa: F401  (the command modules, each binding the loader it calls)
    import transcoders.cli  # noqa: F401
    from gemma_lm import models

    real = models.load_model
    load = lm_or_loader if callable(lm_or_loader) else (lambda *a, **kw: lm_or_loader)
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if name.split(".")[0] in ("gemma_lm", "transcoders", "circuits"):
            if getattr(module, "load_model", None) is real:
                monkeypatch.setattr(module, "load_model", load)
