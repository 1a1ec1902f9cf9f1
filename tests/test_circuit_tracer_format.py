"""circuit-tracer's transcoder layout: exact round trips, the files circuit-tracer expects, clear
refusals, and (opt-in, when benchmarks/setup_circuit_tracer.sh has made .venv-ct) circuit-tracer
itself reading our export."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from gemma_lm.errors import UserError
from transcoders.circuit_tracer_format import (
    is_circuit_tracer_dir,
    load_circuit_tracer,
    save_circuit_tracer,
)
from transcoders.testing import random_transcoders

L, D, F = 3, 32, 64
REPO = Path(__file__).resolve().parents[1]
CT_PYTHON = REPO / ".venv-ct" / "bin" / "python"


def inputs(seed=0, n=6):
    return torch.randn(L, n, D, generator=torch.Generator().manual_seed(seed)) * 1.5


def same_set(a, b, x):
    """As tests/test_formats.py's `assert_same_function`: weights bit for bit, the same active
    features, values to float rounding (a loaded encoder is the transposed view of the stored
    `[F, D]`)."""
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        for l, (wa, wb) in enumerate(zip(getattr(a, name), getattr(b, name))):
            assert torch.equal(wa, wb), f"{name}[{l}]"
    ea, eb = a.sparse_encode(x), b.sparse_encode(x)
    for s, t in zip(ea[:3], eb[:3]):
        assert torch.equal(s, t)
    torch.testing.assert_close(ea[3], eb[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.reconstruct(x), b.reconstruct(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kind,activation",
    [
        ("plt", "jumprelu"),
        ("skip", "jumprelu"),
        ("clt", "jumprelu"),
        ("plt", "relu"),
        ("clt", "relu"),
        ("skip", "batchtopk"),
    ],
)
def test_round_trip_is_exact(tmp_path, kind, activation):
    tc = random_transcoders(
        L, D, F, kind=kind, activation=activation, l0=5, seed=3, model_name="gemma-3-270m"
    )
    d = save_circuit_tracer(tc, tmp_path / "ct")
    assert is_circuit_tracer_dir(d)
    back = load_circuit_tracer(d)
    assert back.cfg.to_dict() == tc.cfg.to_dict()
    x = inputs()
    assert len(tc.sparse_encode(x)[0]) > 0
    same_set(tc, back, x)
    if tc.W_skip is not None:
        assert all(torch.equal(a, b) for a, b in zip(tc.W_skip, back.W_skip))


def test_training_metrics_survive_the_round_trip(tmp_path):
    import numpy as np

    tc = random_transcoders(L, D, F, kind="skip", seed=11)
    tc.cfg.metrics = {
        "fvu": np.float32(0.25),
        "l0_per_layer": torch.tensor([3.5, 4.0, 5.0]),
        "steps": 100,
    }
    back = load_circuit_tracer(save_circuit_tracer(tc, tmp_path / "ct"))
    assert back.cfg.metrics == {"fvu": 0.25, "l0_per_layer": [3.5, 4.0, 5.0], "steps": 100}


def test_files_are_circuit_tracers_layout(tmp_path):
    skip = random_transcoders(L, D, F, kind="skip", seed=1, model_name="gemma-3-270m")
    d = save_circuit_tracer(skip, tmp_path / "skip")
    config = yaml.safe_load((d / "config.yaml").read_text())
    assert (config["model_kind"], config["feature_input_hook"], config["feature_output_hook"]) == (
        "transcoder_set",
        "mlp.hook_in",
        "hook_mlp_out",
    )
    assert config["model_name"] == "google/gemma-3-270m"
    assert sorted(p.name for p in d.glob("*.safetensors")) == [
        f"layer_{l}.safetensors" for l in range(L)
    ]
    t = load_file(str(d / "layer_1.safetensors"))
    assert set(t) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip"}
    x = torch.randn(5, D)
    # circuit-tracer: pre = x @ W_enc.T + b_enc; skip = x @ W_skip.T
    assert torch.allclose(x @ t["W_enc"].T + t["b_enc"], skip.pre_activation(1, x), atol=1e-5)
    assert torch.allclose(x @ t["W_skip"].T, skip.skip_term(1, x), atol=1e-6)
    assert t["W_dec"].shape == (F, D)

    clt = random_transcoders(L, D, F, kind="clt", seed=2)
    d = save_circuit_tracer(clt, tmp_path / "clt")
    assert yaml.safe_load((d / "config.yaml").read_text())["model_kind"] == "cross_layer_transcoder"
    enc, dec = load_file(str(d / "W_enc_1.safetensors")), load_file(str(d / "W_dec_1.safetensors"))
    assert set(enc) == {"W_enc_1", "b_enc_1", "b_dec_1", "threshold_1"} and set(dec) == {"W_dec_1"}
    assert enc["W_enc_1"].shape == (F, D) and dec["W_dec_1"].shape == (F, L - 1, D)


def test_loads_directories_circuit_tracer_wrote(tmp_path):
    """Without our `gemma_circuits` key (a set circuit-tracer cached itself) the config is read from
    the files."""
    tc = random_transcoders(L, D, F, kind="skip", seed=4, model_name="gemma-3-270m")
    d = save_circuit_tracer(tc, tmp_path / "ct")
    config = yaml.safe_load((d / "config.yaml").read_text())
    del config["gemma_circuits"]
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    back = load_circuit_tracer(d)
    assert (back.cfg.kind, back.cfg.activation, back.cfg.d_sae, back.cfg.model_name) == (
        "skip",
        "jumprelu",
        F,
        "gemma-3-270m",
    )
    same_set(tc, back, inputs(1))

    clt = random_transcoders(L, D, F, kind="clt", activation="relu", seed=5)
    d = save_circuit_tracer(clt, tmp_path / "clt")
    config = yaml.safe_load((d / "config.yaml").read_text())
    del config["gemma_circuits"]
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    back = load_circuit_tracer(d)
    assert (back.cfg.kind, back.cfg.activation) == ("clt", "relu")
    same_set(clt, back, inputs(2))


def test_config_listing_local_layer_files(tmp_path):
    tc = random_transcoders(L, D, F, kind="plt", seed=6)
    d = save_circuit_tracer(tc, tmp_path / "ct")
    files = tmp_path / "elsewhere"
    files.mkdir()
    for l in range(L):
        (d / f"layer_{l}.safetensors").rename(files / f"tc_{l}.safetensors")
    config = yaml.safe_load((d / "config.yaml").read_text())
    config["transcoders"] = [str(files / f"tc_{l}.safetensors") for l in range(L)]
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    assert is_circuit_tracer_dir(d)
    same_set(tc, load_circuit_tracer(d), inputs(3))
    config["transcoders"] = [f"hf://google/gemma-scope-2/layer_{l}.safetensors" for l in range(L)]
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="Hub"):
        load_circuit_tracer(d)


def test_export_replaces_an_earlier_export(tmp_path):
    d = tmp_path / "ct"
    save_circuit_tracer(random_transcoders(4, D, F, kind="clt", seed=7), d)
    small = random_transcoders(2, D, F, kind="plt", seed=8)
    save_circuit_tracer(small, d)
    assert sorted(p.name for p in d.iterdir()) == [
        "config.yaml",
        "layer_0.safetensors",
        "layer_1.safetensors",
    ]
    same_set(small, load_circuit_tracer(d), torch.randn(2, 4, D))


def test_refusals(tmp_path):
    with pytest.raises(UserError, match="TopK"):
        save_circuit_tracer(random_transcoders(L, D, F, activation="topk", k=4), tmp_path / "a")
    with pytest.raises(UserError, match="skip"):
        save_circuit_tracer(random_transcoders(L, D, F, kind="clt", skip=True), tmp_path / "b")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        save_circuit_tracer(random_transcoders(L, D, F), other)
    assert (other / "notes.txt").read_text() == "mine"
    for bad in (other, tmp_path / "missing", other / "notes.txt"):
        assert not is_circuit_tracer_dir(bad)
        with pytest.raises(UserError, match="not a circuit-tracer"):
            load_circuit_tracer(bad)
    d = save_circuit_tracer(random_transcoders(L, D, F), tmp_path / "ct")
    (d / "layer_2.safetensors").unlink()
    save_file({"W_enc": torch.zeros(F + 1, D)}, str(d / "layer_2.safetensors"))
    with pytest.raises(UserError, match="layer 2"):
        load_circuit_tracer(d)


def test_load_any_dispatches_here(tmp_path):
    from transcoders.formats import load_any

    tc = random_transcoders(L, D, F, kind="clt", seed=9)
    d = save_circuit_tracer(tc, tmp_path / "ct")
    same_set(tc, load_any(d), inputs(4))


@pytest.mark.slow
@pytest.mark.skipif(
    not CT_PYTHON.exists(), reason="no .venv-ct: run bash benchmarks/setup_circuit_tracer.sh"
)
@pytest.mark.parametrize(
    "kind,activation",
    [("skip", "jumprelu"), ("clt", "jumprelu"), ("plt", "relu"), ("plt", "batchtopk")],
)
def test_circuit_tracer_reads_our_export(tmp_path, kind, activation):
    """circuit-tracer's own loaders and encoders, in its venv, on our files: same activations and
    outputs."""
    tc = random_transcoders(L, D, F, kind=kind, activation=activation, l0=6, seed=10)
    d = save_circuit_tracer(tc, tmp_path / "ct")
    x = inputs(5)
    save_file({"mlp_in": x}, str(tmp_path / "in.safetensors"))
    subprocess.run(
        [
            str(CT_PYTHON),
            str(REPO / "benchmarks" / "ct_runner.py"),
            "encode",
            "--transcoders",
            str(d),
            "--inputs",
            str(tmp_path / "in.safetensors"),
            "--out",
            str(tmp_path / "out.safetensors"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    theirs = load_file(str(tmp_path / "out.safetensors"))
    ours = torch.stack([tc.encode(l, x[l]) for l in range(L)])
    # every position has active features (circuit-tracer's CLT decode needs it)
    assert (ours > 0).any(-1).all()
    assert torch.allclose(theirs["acts"], ours, atol=1e-5, rtol=0)
    assert torch.equal(theirs["acts"] != 0, ours != 0)
    assert torch.allclose(theirs["reconstruction"], tc.reconstruct(x), atol=1e-5, rtol=0)
