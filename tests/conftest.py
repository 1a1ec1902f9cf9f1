"""Shared fixtures. Tiny random Gemma 3 models for speed; the real gemma-3-270m (session-scoped, loaded
once) for the few end-to-end checks marked `slow`."""

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
    from circuits.models import tiny_model

    return tiny_model(seed=0)


@pytest.fixture
def tiny_softcap():
    from circuits.models import tiny_model

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
