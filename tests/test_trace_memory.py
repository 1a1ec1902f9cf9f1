"""A trace that cannot fit in memory is refused before its forward pass, with the estimate and what
to change (issue: a 23k-token prompt was killed by the kernel at 23 GB without a word)."""

from __future__ import annotations

import pytest

import circuits.attribution as attribution
from circuits.attribution import AttributionConfig, attribute, trace_memory_estimate
from gemma_lm.errors import UserError
from gemma_lm.testing import tiny_model
from transcoders.testing import random_transcoders


@pytest.fixture
def lm_tc():
    lm = tiny_model(seed=0)
    tc = random_transcoders(3, 64, 96, kind="skip", seed=1, l0=6, model_name=lm.name)
    return lm, tc


def test_patterns_grow_with_the_square_of_the_prompt(lm_tc):
    lm, tc = lm_tc
    cfg = AttributionConfig()
    small, big = (trace_memory_estimate(lm, tc, n, cfg) for n in (100, 1000))
    s = lm.sites
    assert small["attention patterns"] == 2 * s.n_layers * s.n_heads * 100 * 100 * 4
    assert big["attention patterns"] == 100 * small["attention patterns"]
    assert big["activations"] == 10 * small["activations"]
    assert small["one batch"] == 2**30 * cfg.memory_gb


def test_a_trace_that_does_not_fit_is_refused_before_the_forward_pass(lm_tc, monkeypatch):
    lm, tc = lm_tc
    monkeypatch.setattr(attribution, "available_memory", lambda: 64 * 2**20)  # 64 MB left

    def never(*a, **k):
        raise AssertionError("the forward pass ran")

    monkeypatch.setattr(attribution, "run_and_freeze", never)
    with pytest.raises(UserError) as e:
        attribute(lm, "the cat sat on the mat", transcoders=tc, progress=False, memory_gb=0.5)
    message = str(e.value)
    assert "\n" not in message and "0.1 GB are available" in message
    assert "attention patterns" in message and "--memory-gb" in message


def test_a_trace_that_fits_runs(lm_tc, monkeypatch):
    lm, tc = lm_tc
    monkeypatch.setattr(attribution, "available_memory", lambda: 8 * 2**30)
    graph = attribute(lm, "the cat sat", transcoders=tc, progress=False, memory_gb=0.25)
    assert graph.n_nodes > 0
    monkeypatch.setattr(attribution, "available_memory", lambda: None)  # unknown: no refusal
    assert attribute(lm, "the cat sat", transcoders=tc, progress=False).n_nodes == graph.n_nodes
