"""Named training recipes (`transcoders train --recipe NAME`): what a recipe sets, what a flag
beside it keeps, the one-line errors of bad recipe options, and that the default recipe trains the
same weights twice on one machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma_lm.errors import UserError
from transcoders import cli
from transcoders.default import default_recipe
from transcoders.recipes import RECIPES, recipe_settings
from transcoders.train import TrainConfig, train_transcoders

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_recipe_sets_its_fields_and_a_flag_beside_it_wins(name):
    settings = recipe_settings(name)
    cfg = TrainConfig(recipe=name)
    for key, value in settings.items():
        assert getattr(cfg, key) == value, key
    assert TrainConfig(recipe=name, tokens=7 * cfg.batch_size).tokens == 7 * cfg.batch_size


def test_applying_a_recipe_again_changes_nothing():
    cfg = TrainConfig(recipe="large", d_sae=2048, k=24)
    again = TrainConfig(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
    assert again == cfg and (again.d_sae, again.k, again.tokens) == (2048, 24, cfg.tokens)


def test_the_default_set_is_trained_by_the_default_recipe():
    cfg = default_recipe(out="", progress=False)
    assert cfg == TrainConfig(recipe="default", progress=False)


def test_recipe_settings_are_copies():
    recipe_settings("default")["matryoshka"].append(999)
    assert 999 not in RECIPES["default"]["matryoshka"]


def _one_line_error(argv: list[str], capsys) -> str:
    assert cli.run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_unknown_recipe_is_a_one_line_error_naming_the_recipes(capsys, tmp_path):
    err = _one_line_error(["train", "--recipe", "huge", "--out", str(tmp_path / "x")], capsys)
    assert "huge" in err and all(name in err for name in RECIPES)


def test_a_budget_below_one_step_is_a_one_line_error(capsys, tmp_path):
    out = str(tmp_path / "x")
    err = _one_line_error(["train", "--recipe", "default", "--tokens", "100", "--out", out], capsys)
    assert "--tokens" in err and "512" in err


def test_a_text_source_that_yields_nothing_is_a_one_line_error(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("too short\n\nshort too\n")
    cfg = TrainConfig(
        recipe="default",
        text=f"file:{empty}",
        d_sae=16,
        k=2,
        matryoshka=[8],  # an empty list is the field's default, which the recipe replaces
        tokens=64,
        batch_size=32,
        harvest_dtype="float32",
        progress=False,
    )
    with pytest.raises(UserError, match="text") as info:
        train_transcoders(cfg, loaded=tiny)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_the_default_recipe_trains_the_same_weights_twice(real_model, tmp_path):
    """Two processes run the default recipe (cut to three steps) on the real model: the same
    weights, bit for bit."""
    from transcoders.formats import load_native

    env = dict(os.environ, OMP_NUM_THREADS="2")
    sets = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = ["train", "--recipe", "default", "--tokens", "1536", "--out", str(out)]
        proc = subprocess.run(
            [sys.executable, "-m", "transcoders", *argv, "--no-progress"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        sets.append(load_native(out, model=real_model))
    a, b = (s.state_dict() for s in sets)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
