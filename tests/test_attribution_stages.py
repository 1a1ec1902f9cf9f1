"""The stages of `circuits.attribute` on their own: the config hand-off, the row schedule and the
order in which feature rows are computed (no model needed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from circuits.attribution import (
    INFLUENCE_BATCHES,
    AttributionConfig,
    FeatureRowQueue,
    RowSchedule,
    _config,
)


def test_config_copies_the_targets_and_refuses_unknown_options():
    mine = AttributionConfig(targets=["a"], progress=False)
    cfg = _config(mine, {"batch_size": 3})
    cfg.targets.append("b")
    assert mine.targets == ["a"] and mine.batch_size == 256 and cfg.batch_size == 3
    with pytest.raises(TypeError, match="unknown option"):
        _config(None, {"max_nodes": 3})


def _frozen(n_pos=5, d_model=8, n_heads=2, head_dim=4):
    weights = SimpleNamespace(n_heads=n_heads, head_dim=head_dim)
    return SimpleNamespace(weights=weights, n_pos=n_pos, d_model=d_model)


def test_row_schedule_fits_the_memory_bound_and_the_budget():
    cfg = AttributionConfig(batch_size=64, max_feature_nodes=10, memory_gb=1e-6)
    schedule = RowSchedule.plan(cfg, _frozen(), n_src=100, n_features=30)
    per_row = 4 * (100 + 6 * 5 * 8)
    assert schedule.batch_size == max(1, int(1e-6 * 2**30 // per_row)) < 64
    assert schedule.budget == 10 and not schedule.by_position
    every = RowSchedule.plan(AttributionConfig(), _frozen(), n_src=100, n_features=30)
    assert every.batch_size == 256 and every.budget == 30 and every.by_position
    assert [(s.start, s.stop) for s in RowSchedule(4, 0, 0).logit_batches(10)] == [
        (0, 4),
        (4, 8),
        (8, 10),
    ]


def test_every_feature_once_by_position_when_the_budget_covers_them_all():
    f_pos = np.array([0, 3, 1, 1, 2, 3, 3, 0, 2])
    queue = FeatureRowQueue(RowSchedule(3, len(f_pos), len(f_pos)), f_pos, np.ones(9), None)
    batches = list(queue)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(f_pos)))
    assert all(len(b) <= 3 for b in batches) and queue.n_batches == len(batches)
    assert all(np.all(np.diff(f_pos[b]) >= 0) for b in batches)  # positions ascend


def test_influence_order_reranks_every_few_batches_within_the_budget():
    rng = np.random.default_rng(0)
    n, size, budget = 40, 2, 21
    f_pos, f_act = rng.integers(0, 6, n), rng.random(n)
    calls = []

    def influence():
        calls.append(1)
        return np.concatenate([np.arange(n, dtype=float)[::-1], np.zeros(3)])  # 0 ranks first

    queue = FeatureRowQueue(RowSchedule(size, n, budget), f_pos, f_act, influence)
    batches = list(queue)
    picked = np.concatenate(batches)
    assert len(picked) == len(set(picked.tolist())) == budget == int(queue.done.sum())
    assert sorted(picked.tolist()) == list(range(budget))  # the most influential ones
    assert len(calls) == -(-budget // (INFLUENCE_BATCHES * size))
