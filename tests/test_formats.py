"""Transcoder file layouts: native, Gemma Scope 2 (read and write), detection, and
`transcoders convert`.

Gemma Scope 2 files are also written here by `write_released_*`, which follow the release's layout
and reference forward pass (docs/gemma_scope_2.md) with plain safetensors/json and share no code
with the writer under test, so the reader is checked against the release's conventions, not only
against itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gemma_lm import weights
from gemma_lm.errors import UserError
from gemma_lm.weights import StoredWeight, resident_fraction
from transcoders import gemmascope, native
from transcoders.formats import convert, detect_layout, load_any, load_native, save_native
from transcoders.gemmascope import save_gemmascope2
from transcoders.testing import random_transcoders

L, D, F = 3, 16, 40
RELEASED_CONFIG_KEYS = {
    "hf_hook_point_in",
    "hf_hook_point_out",
    "width",
    "model_name",
    "architecture",
    "l0",
    "affine_connection",
    "type",
}
RELEASED_TENSORS = {"w_enc", "b_enc", "threshold", "w_dec", "b_dec"}

try:
    from transcoders import circuit_tracer_format as ct
except ModuleNotFoundError:
    ct = None
needs_ct = pytest.mark.skipif(
    ct is None, reason="transcoders/circuit_tracer_format.py is not in this tree yet"
)

KINDS = [
    ("plt", "jumprelu", None),
    ("plt", "relu", None),
    ("plt", "topk", None),
    ("plt", "batchtopk", None),
    ("skip", "jumprelu", None),
    ("clt", "jumprelu", False),
    ("clt", "jumprelu", True),
    ("clt", "relu", True),
    ("clt", "topk", False),
]


def make_set(kind="plt", activation="jumprelu", skip=None, seed=0):
    tc = random_transcoders(
        L,
        D,
        F,
        kind=kind,
        activation=activation,
        skip=skip,
        seed=seed,
        l0=6,
        model_name="tiny-gemma3-3l-16d",
    )
    tc.cfg.matryoshka_prefixes = [10, 20, F]
    tc.cfg.metrics = {"fvu": 0.12, "l0": 6.4, "dead_fraction": 0.01}
    return tc


def inputs(seed=0, n_pos=7):
    return torch.randn(L, n_pos, D, generator=torch.Generator().manual_seed(seed)) * 1.3


def assert_same_function(a, b, x):
    """The same weights bit for bit, the same active features, and activations and reconstructions
    equal to float rounding (a set loaded from circuit-tracer's layout multiplies by the transposed
    view of its stored `[F, D]` encoders, which rounds differently from a `[D, F]` one)."""
    for name in ("W_enc", "b_enc", "W_dec", "b_dec") + (
        ("W_skip",) if a.W_skip is not None else ()
    ):
        for l, (wa, wb) in enumerate(zip(getattr(a, name), getattr(b, name))):
            assert torch.equal(wa, wb), f"{name}[{l}]"
    ea, eb = a.sparse_encode(x), b.sparse_encode(x)
    assert len(ea[0]) > 0, "no feature fired: the check would be vacuous"
    for ta, tb in zip(ea[:3], eb[:3]):
        assert torch.equal(ta, tb)
    torch.testing.assert_close(ea[3], eb[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.reconstruct(x), b.reconstruct(x), rtol=1e-5, atol=1e-6)


# -- native ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,activation,skip", KINDS)
def test_native_round_trip_is_exact(tmp_path, kind, activation, skip):
    tc = make_set(kind, activation, skip)
    save_native(tc, tmp_path / "set")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "config.json",
        "weights.safetensors",
    ]
    back = load_native(tmp_path / "set")
    assert back.cfg == tc.cfg
    assert_same_function(tc, back, inputs())
    assert detect_layout(tmp_path / "set") == "native"


def test_native_config_is_readable_json_with_format_and_version(tmp_path):
    save_native(make_set("clt", skip=True), tmp_path / "set")
    raw = json.loads((tmp_path / "set" / "config.json").read_text())
    assert raw["format"] == native.NATIVE_FORMAT and raw["format_version"] == native.NATIVE_VERSION
    assert (raw["kind"], raw["n_layers"], raw["d_model"], raw["d_sae"], raw["skip"]) == (
        "clt",
        L,
        D,
        F,
        True,
    )
    assert raw["matryoshka_prefixes"] == [10, 20, F] and raw["metrics"]["fvu"] == 0.12
    assert (raw["input_site"], raw["output_site"]) == ("mlp_in", "mlp_out")


def test_native_dtype_on_load(tmp_path):
    save_native(make_set(), tmp_path / "set")
    back = load_native(tmp_path / "set", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in back.parameters())
    with pytest.raises(UserError, match="unknown dtype"):
        load_native(tmp_path / "set", dtype="float8")


def test_native_keeps_fields_it_does_not_know(tmp_path):
    save_native(make_set(), tmp_path / "set")
    path = tmp_path / "set" / "config.json"
    raw = json.loads(path.read_text())
    raw["normalisation"] = {"scale": 2.0}  # a field a newer writer might add
    path.write_text(json.dumps(raw))
    assert load_native(tmp_path / "set").cfg.extra["unread_config"] == {
        "normalisation": {"scale": 2.0}
    }


def test_save_is_atomic_and_a_failed_write_leaves_the_old_set(tmp_path, monkeypatch):
    old = make_set(seed=1)
    save_native(old, tmp_path / "set")
    calls = []

    def broken_save_file(tensors, path, metadata=None):
        calls.append(path)
        Path(path).write_bytes(b"half")  # a partial file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr("transcoders.native.save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_native(make_set(seed=2), tmp_path / "set")
    with pytest.raises(OSError, match="disk full"):
        save_native(make_set(seed=2), tmp_path / "new")
    monkeypatch.undo()
    assert calls and not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["set"]  # no staging directories left behind
    assert_same_function(old, load_native(tmp_path / "set"), inputs())


def test_save_refuses_to_replace_a_directory_without_transcoders(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="does not hold transcoders"):
        save_native(make_set(), tmp_path / "home")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        save_native(make_set(), tmp_path / "file")


def _corrupt(path: Path, how: str):
    cfg, weights = path / "config.json", path / "weights.safetensors"
    if how == "no config":
        cfg.unlink()
    elif how == "no weights":
        weights.unlink()
    elif how == "bad json":
        cfg.write_text("{not json")
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "wrong shape":
        raw = json.loads(cfg.read_text())
        raw["d_sae"] = F + 1
        cfg.write_text(json.dumps(raw))
    elif how == "missing tensor":
        with safe_open(str(weights), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys() if k != "W_dec.2"}
        save_file(t, str(weights))
    elif how == "nan":
        with safe_open(str(weights), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        t["b_enc.1"][3] = float("nan")
        save_file(t, str(weights))
    elif how == "newer version":
        raw = json.loads(cfg.read_text())
        raw["format_version"] = native.NATIVE_VERSION + 1
        cfg.write_text(json.dumps(raw))
    elif how == "bad kind":
        raw = json.loads(cfg.read_text())
        raw["kind"] = "sae"
        cfg.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "how,message",
    [
        ("no config", r"config\.json is missing"),
        ("no weights", r"weights\.safetensors is missing"),
        ("bad json", r"config\.json is not valid JSON"),
        ("truncated weights", r"weights\.safetensors is not a readable"),
        ("wrong shape", r"W_enc\.0 has shape \[16, 40\] but the config needs \[16, 41\]"),
        (
            "missing tensor",
            r"weights\.safetensors does not hold a plt set of 3 layers: missing W_dec\.2",
        ),
        ("nan", r"b_enc\.1 holds NaN"),
        ("newer version", "upgrade gemma-circuits"),
        ("bad kind", "unknown transcoder kind"),
    ],
)
def test_native_bad_files_name_the_file_and_the_problem(tmp_path, how, message):
    save_native(make_set(), tmp_path / "set")
    _corrupt(tmp_path / "set", how)
    with pytest.raises(UserError, match=message):
        load_any(tmp_path / "set")


def test_native_checks_the_model(tmp_path, tiny):
    other = random_transcoders(5, 64, 32, seed=0, model_name="gemma-3-1b")
    save_native(other, tmp_path / "other")
    with pytest.raises(UserError) as e:
        load_native(tmp_path / "other", model=tiny)
    assert "gemma-3-1b" in str(e.value) and tiny.name in str(e.value) and "5 layers" in str(e.value)
    fits = random_transcoders(
        tiny.sites.n_layers, tiny.sites.d_model, 32, seed=0, model_name=tiny.name
    )
    save_native(fits, tmp_path / "fits")
    assert load_native(tmp_path / "fits", model=tiny).cfg.model_name == tiny.name


# -- Gemma Scope 2: files written the way the release lays them out --------------------------------
def released_params(
    rng: torch.Generator, n_layers=L, clt=False, affine=False, negative_thresholds=True, d=D
):
    """Random params per layer under the release's names and shapes; a few thresholds below zero
    (the reference relu(pre) * (pre > threshold) zeroes negative pre-activations whatever the
    threshold)."""
    out = []
    for l in range(n_layers):
        thr = torch.rand(F, generator=rng) * 1.5 + 0.3
        if negative_thresholds:
            thr[:5] = -torch.rand(5, generator=rng)
        p = {
            "w_enc": torch.randn(d, F, generator=rng) / d**0.5,
            "b_enc": torch.randn(F, generator=rng) * 0.2,
            "threshold": thr,
            "b_dec": torch.randn(d, generator=rng) * 0.1,
            "w_dec": torch.randn(F, n_layers, d, generator=rng) * 0.2
            if clt
            else torch.randn(F, d, generator=rng) * 0.2,
        }
        if clt:
            p["w_dec"][:, :l] = 0
        if affine:
            p["affine_skip_connection"] = torch.randn(d, d, generator=rng) / d
        out.append(p)
    return out


def write_released_plt(
    root: Path,
    params,
    site="transcoder_all",
    variant="width_16k_l0_small",
    layers=None,
    model="google/gemma-3-270m-pt",
    kind="transcoder",
):
    affine = "affine_skip_connection" in params[0]
    variant += "_affine" if affine else ""
    for l, p in zip(layers if layers is not None else range(len(params)), params):
        folder = root / site / f"layer_{l}_{variant}"
        folder.mkdir(parents=True)
        save_file(p, str(folder / "params.safetensors"))
        (folder / "config.json").write_text(
            json.dumps(
                {
                    "hf_hook_point_in": f"model.layers.{l}.pre_feedforward_layernorm.output",
                    "hf_hook_point_out": f"model.layers.{l}.post_feedforward_layernorm.output",
                    "width": F,
                    "model_name": model,
                    "architecture": "jump_relu",
                    "l0": 20,
                    "affine_connection": affine,
                    "type": kind,
                }
            )
        )
    return root / site / variant


def write_released_clt(
    root: Path, params, variant="width_262k_l0_medium", model="google/gemma-3-270m-pt"
):
    affine = "affine_skip_connection" in params[0]
    folder = root / "clt" / (variant + ("_affine" if affine else ""))
    folder.mkdir(parents=True)
    for l, p in enumerate(params):
        save_file(p, str(folder / f"params_layer_{l}.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "hf_hook_point_in": "model.layers.{all}.pre_feedforward_layernorm.output",
                "hf_hook_point_out": "model.layers.{all}.post_feedforward_layernorm.output",
                "width": F * len(params),
                "model_name": model,
                "architecture": "jump_relu",
                "l0": 150,
                "affine_connection": affine,
                "type": "clt",
            }
        )
    )
    return folder


def reference_forward(params, x, clt):
    """The release's forward pass: acts[l] [n_pos, F], out[l] [n_pos, D]."""
    acts = []
    for l, p in enumerate(params):
        pre = x[l] @ p["w_enc"] + p["b_enc"]
        acts.append(torch.relu(pre) * (pre > p["threshold"]))
    out = []
    for l, p in enumerate(params):
        y = p["b_dec"].expand(x.shape[1], D).clone()
        for s in range(l + 1) if clt else [l]:
            y = y + acts[s] @ (params[s]["w_dec"][:, l] if clt else params[s]["w_dec"])
        if "affine_skip_connection" in p:
            y = y + x[l] @ p["affine_skip_connection"]
        out.append(y)
    return acts, torch.stack(out)


@pytest.mark.parametrize("clt,affine", [(False, False), (False, True), (True, False), (True, True)])
def test_gemmascope_reader_matches_the_released_forward_pass(tmp_path, clt, affine):
    params = released_params(torch.Generator().manual_seed(3), clt=clt, affine=affine)
    where = (write_released_clt if clt else write_released_plt)(tmp_path / "repo", params)
    tc = load_any(where)
    assert (tc.cfg.kind, tc.cfg.skip, tc.cfg.activation) == (
        "clt" if clt else "skip" if affine else "plt",
        affine,
        "jumprelu",
    )
    assert tc.cfg.model_name == "google/gemma-3-270m-pt" and tc.cfg.d_sae == F
    x = inputs(5)
    ref_acts, ref_out = reference_forward(params, x, clt)
    layer, pos, feat, val = tc.sparse_encode(x)
    dense = torch.zeros(L, x.shape[1], F)
    dense[layer, pos, feat] = val
    assert len(val) > 10 and torch.equal(dense, torch.stack(ref_acts))
    torch.testing.assert_close(tc.reconstruct(x), ref_out, rtol=1e-5, atol=1e-6)


def test_gemmascope_paths_a_researcher_would_pass(tmp_path):
    params = released_params(torch.Generator().manual_seed(0))
    variant_path = write_released_plt(tmp_path / "repo", params)
    site = tmp_path / "repo" / "transcoder_all"
    x = inputs()
    ref = load_any(variant_path)
    for path in (
        tmp_path / "repo",
        site,
        str(variant_path),
    ):  # repo root, site folder, <site>/<variant>
        assert detect_layout(path) == "gemmascope2"
        assert_same_function(ref, load_any(path), x)
    with pytest.raises(
        UserError, match=r"one layer of a Gemma Scope 2 transcoder set; pass .*width_16k_l0_small"
    ):
        load_any(site / "layer_1_width_16k_l0_small")
    write_released_plt(
        tmp_path / "repo",
        released_params(torch.Generator().manual_seed(1)),
        variant="width_65k_l0_big",
    )
    write_released_clt(
        tmp_path / "repo", released_params(torch.Generator().manual_seed(2), clt=True)
    )
    with pytest.raises(
        UserError, match="several Gemma Scope 2 variants; pass one of: .*width_16k.*width_65k"
    ):
        load_any(site)
    with pytest.raises(
        UserError, match="several Gemma Scope 2 transcoder sets; pass one of: .*clt/width_262k"
    ):
        load_any(tmp_path / "repo")
    assert load_any(tmp_path / "repo" / "clt" / "width_262k_l0_medium").cfg.kind == "clt"


def test_gemmascope_refusals_name_the_problem(tmp_path):
    g = torch.Generator().manual_seed(0)
    partial = write_released_plt(
        tmp_path / "a", released_params(g, n_layers=2), site="transcoder", layers=[9, 17]
    )
    with pytest.raises(UserError, match=r"layers \[9, 17\].*use `transcoder_all`"):
        load_any(partial)
    sae = write_released_plt(tmp_path / "b", released_params(g), site="resid_post_all", kind="sae")
    with pytest.raises(UserError, match="describes a Gemma Scope 2 sae, not a transcoder"):
        load_any(sae)
    wrong_hook = write_released_plt(tmp_path / "c", released_params(g))
    cfg = wrong_hook.parent / "layer_2_width_16k_l0_small" / "config.json"
    cfg.write_text(cfg.read_text().replace("layers.2.pre_feedforward", "layers.1.pre_feedforward"))
    with pytest.raises(UserError, match="reads 'model.layers.1.pre_feedforward_layernorm.output'"):
        load_any(wrong_hook)
    mixed = released_params(g, affine=True)
    del mixed[1]["affine_skip_connection"]
    with pytest.raises(
        UserError,
        match="without a skip connection, but .*layer_0.* with: the layers are from different sets",
    ):
        load_any(write_released_plt(tmp_path / "d", mixed))
    broken = write_released_clt(tmp_path / "e", released_params(g, clt=True))
    (broken / "params_layer_1.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(
        UserError, match="params_layer_1.safetensors is not a readable safetensors file"
    ):
        load_any(broken)
    lying = write_released_clt(tmp_path / "f", released_params(g, clt=True))
    cfg = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps({**cfg, "affine_connection": True}))
    with pytest.raises(
        UserError, match="affine_connection=True, but the params file has no affine_skip_connection"
    ):
        load_any(lying)
    not_clt = write_released_clt(
        tmp_path / "g",
        [{**p, "w_dec": p["w_dec"][:, 0].contiguous()} for p in released_params(g, clt=True)],
    )
    with pytest.raises(UserError, match=r"w_dec has shape \[40, 16\]; expected \[40, 3, 16\]"):
        load_any(not_clt)


def test_gemmascope_config_json_may_be_missing_only_in_transcoder_folders(tmp_path):
    params = released_params(torch.Generator().manual_seed(0))
    for where in (
        write_released_plt(tmp_path / "repo", params),
        write_released_plt(tmp_path / "copy", params, site="my_download"),
    ):
        for l in range(L):
            (where.parent / f"layer_{l}_{where.name}" / "config.json").unlink()
    tc = load_any(tmp_path / "repo" / "transcoder_all")
    assert (tc.cfg.kind, tc.cfg.model_name) == ("plt", "")
    with pytest.raises(
        UserError, match=r"my_download/layer_0_width_16k_l0_small/config\.json is missing"
    ):
        load_any(tmp_path / "copy" / "my_download")


def test_gemmascope_hooks_are_the_modules_our_sites_use(tiny):
    """The release's hook names resolve, in a Hugging Face Gemma 3, to the very modules our
    replacement model reads (mlp_in) and writes (mlp_out)."""
    for l, layer in enumerate(tiny.sites.layers):
        assert (
            tiny.model.get_submodule(gemmascope.HOOK_IN.format(l).removesuffix(".output"))
            is layer.pre_feedforward_layernorm
        )
        assert (
            tiny.model.get_submodule(gemmascope.HOOK_OUT.format(l).removesuffix(".output"))
            is layer.post_feedforward_layernorm
        )


@pytest.mark.slow
def test_gemmascope_layout_fits_the_real_270m(tmp_path, real_model):
    """A set shaped like google/gemma-scope-2-270m-pt's, written in its layout, loads against the
    real model; its hook names are the real model's MLP input and output modules."""
    s = real_model.sites
    tc = random_transcoders(
        s.n_layers, s.d_model, 64, kind="skip", seed=0, model_name="google/gemma-3-270m-pt"
    )
    where = save_gemmascope2(tc, tmp_path / "gs2")
    back = load_any(where, model=real_model)
    assert (back.cfg.n_layers, back.cfg.d_model) == (18, 640)
    for l in (0, 17):
        assert (
            real_model.model.get_submodule(gemmascope.HOOK_IN.format(l).removesuffix(".output"))
            is s.layers[l].pre_feedforward_layernorm
        )


def test_gemmascope_set_loads_against_a_model(tmp_path, tiny):
    params = released_params(torch.Generator().manual_seed(0), d=tiny.sites.d_model)
    where = write_released_plt(tmp_path / "repo", params, model=tiny.name)
    assert load_any(where, model=tiny).cfg.n_layers == tiny.sites.n_layers
    with pytest.raises(UserError, match="2 layers vs the model's 3"):
        load_any(write_released_plt(tmp_path / "short", params[:2]), model=tiny)


# -- Gemma Scope 2: our writer ---------------------------------------------------------------------
@pytest.mark.parametrize("kind,activation,skip", [k for k in KINDS if k[1] != "topk"])
def test_gemmascope_round_trip_is_exact(tmp_path, kind, activation, skip):
    tc = make_set(kind, activation, skip)
    where = save_gemmascope2(tc, tmp_path / "out")
    back = load_any(where)
    assert back.cfg == tc.cfg
    assert_same_function(tc, back, inputs())
    # the repo root finds its one set
    assert_same_function(tc, load_any(tmp_path / "out"), inputs(1))


@pytest.mark.parametrize("clt", [False, True])
def test_gemmascope_writer_produces_the_released_layout(tmp_path, clt):
    tc = make_set("clt" if clt else "skip", skip=True if clt else None)
    where = save_gemmascope2(tc, tmp_path / "out", l0_label="small")
    if clt:
        assert where == tmp_path / "out" / "clt" / f"width_{L * F}_l0_small_affine"
        files = sorted(p.name for p in where.iterdir())
        assert files == ["config.json"] + [f"params_layer_{l}.safetensors" for l in range(L)]
        cfgs = [json.loads((where / "config.json").read_text())]
        params = [where / f"params_layer_{l}.safetensors" for l in range(L)]
    else:
        assert where == tmp_path / "out" / "transcoder_all" / f"width_{F}_l0_small_affine"
        folders = [
            tmp_path / "out" / "transcoder_all" / f"layer_{l}_width_{F}_l0_small_affine"
            for l in range(L)
        ]
        assert sorted(os.listdir(where.parent)) == sorted(f.name for f in folders)
        cfgs = [json.loads((f / "config.json").read_text()) for f in folders]
        params = [f / "params.safetensors" for f in folders]
    for l, cfg in enumerate(cfgs):
        assert set(cfg) == RELEASED_CONFIG_KEYS
        at = "{all}" if clt else l
        assert cfg["hf_hook_point_in"] == f"model.layers.{at}.pre_feedforward_layernorm.output"
        assert cfg["hf_hook_point_out"] == f"model.layers.{at}.post_feedforward_layernorm.output"
        assert (cfg["type"], cfg["architecture"], cfg["affine_connection"], cfg["l0"]) == (
            "clt" if clt else "transcoder",
            "jump_relu",
            True,
            6,
        )
        assert cfg["width"] == (L * F if clt else F)
    for l, path in enumerate(params):
        with safe_open(str(path), "pt") as f:
            assert set(f.keys()) == RELEASED_TENSORS | {"affine_skip_connection"}
            w_dec = f.get_tensor("w_dec")
            assert torch.equal(f.get_tensor("w_enc"), tc.W_enc[l].detach())
            assert torch.equal(f.get_tensor("affine_skip_connection"), tc.W_skip[l].detach())
        if clt:
            assert w_dec.shape == (F, L, D) and not w_dec[:, :l].any()
            assert torch.equal(w_dec[:, l:], tc.W_dec[l].detach())
        else:
            assert torch.equal(w_dec, tc.W_dec[l].detach())


def test_gemmascope_written_files_follow_the_released_forward_pass(tmp_path):
    """Read our writer's files with the reference forward pass: it must compute what the set
    computes."""
    tc = make_set("clt", skip=True)
    where = save_gemmascope2(tc, tmp_path / "out")
    params = []
    for l in range(L):
        with safe_open(str(where / f"params_layer_{l}.safetensors"), "pt") as f:
            params.append({k: f.get_tensor(k) for k in f.keys()})
    x = inputs(2)
    _, ref_out = reference_forward(params, x, clt=True)
    torch.testing.assert_close(tc.reconstruct(x), ref_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clt", [False, True])
def test_released_files_survive_native_and_back_unchanged(tmp_path, clt):
    """Released layout -> native -> Gemma Scope 2: same folder names, same config.json, same
    tensors."""
    params = released_params(
        torch.Generator().manual_seed(4), clt=clt, affine=True, negative_thresholds=False
    )
    # width labels as the release names them (<1000 features: the number itself)
    src = (
        write_released_clt(tmp_path / "repo", params, variant=f"width_{L * F}_l0_medium")
        if clt
        else write_released_plt(tmp_path / "repo", params, variant=f"width_{F}_l0_small")
    )
    convert(src, tmp_path / "native", "native", progress=False)
    out = convert(tmp_path / "native", tmp_path / "again", "gemmascope2", progress=False)
    assert out.relative_to(tmp_path / "again") == src.relative_to(tmp_path / "repo")
    pairs = (
        [(src / "config.json", out / "config.json")]
        if clt
        else [
            (
                src.parent / f"layer_{l}_{src.name}" / "config.json",
                out.parent / f"layer_{l}_{out.name}" / "config.json",
            )
            for l in range(L)
        ]
    )
    for a, b in pairs:
        assert json.loads(a.read_text()) == json.loads(b.read_text())
    for l, p in enumerate(params):
        file = (
            out / f"params_layer_{l}.safetensors"
            if clt
            else out.parent / f"layer_{l}_{out.name}" / "params.safetensors"
        )
        with safe_open(str(file), "pt") as f:
            assert set(f.keys()) == set(p) and all(
                torch.equal(f.get_tensor(k), v) for k, v in p.items()
            )


def test_gemmascope_cannot_hold_topk_or_negative_thresholds(tmp_path):
    with pytest.raises(UserError, match="TopK.*convert it to native or circuit-tracer"):
        save_gemmascope2(make_set(activation="topk"), tmp_path / "topk")
    tc = make_set()
    with torch.no_grad():
        tc.threshold[1][:3] = -0.5
    with pytest.raises(UserError, match="layer 1 has 3 negative thresholds"):
        save_gemmascope2(tc, tmp_path / "neg")
    assert not (tmp_path / "topk").exists() and not (tmp_path / "neg").exists()


def test_gemmascope_from_the_hub_offline_says_how_to_get_the_files(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    spec = "hf://google/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_small_affine"
    assert detect_layout(spec) == "gemmascope2"
    with pytest.raises(
        UserError,
        match=r"could not download .*hf download google/gemma-scope-2-270m-pt --include "
        r"'transcoder_all/layer_\*_width_16k_l0_small_affine/\*'",
    ):
        load_any(spec)
    with pytest.raises(UserError, match="name a set inside the repo"):
        load_any("hf://google/gemma-scope-2-270m-pt")
    with pytest.raises(UserError, match="does not exist"):
        load_any("results/my_transcoders")  # a mistyped local path is not sent to the Hub


def test_gemmascope_from_the_hub_downloads_only_the_set(tmp_path, monkeypatch):
    import huggingface_hub

    params = released_params(torch.Generator().manual_seed(0), clt=True)
    write_released_clt(tmp_path / "snapshot", params)
    asked = {}

    def fake_download(repo_id, allow_patterns):
        asked.update(repo=repo_id, patterns=allow_patterns)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    tc = load_any("google/gemma-scope-2-270m-pt/clt/width_262k_l0_medium")
    assert tc.cfg.kind == "clt" and asked["repo"] == "google/gemma-scope-2-270m-pt"
    assert "clt/width_262k_l0_medium/params*.safetensors" in asked["patterns"]
    assert not any("examples" in p for p in asked["patterns"])


# -- any layout, and convert -----------------------------------------------------------------------
def test_load_any_lists_what_it_accepts(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(
        UserError,
        match="holds no transcoder layout.*native directory.*Gemma Scope 2.*circuit-tracer",
    ):
        load_any(tmp_path / "notes")
    with pytest.raises(UserError, match="does not exist"):
        load_any(tmp_path / "missing")


def test_convert_chain_native_gemmascope_native(tmp_path):
    tc = make_set("clt", skip=True)
    save_native(tc, tmp_path / "a")
    gs = convert(tmp_path / "a", tmp_path / "b", "gemmascope2", progress=False)
    assert detect_layout(tmp_path / "b") == "gemmascope2"
    convert(gs, tmp_path / "c", "native", dtype="float64", progress=False)
    back = load_native(tmp_path / "c")
    assert back.W_enc[0].dtype == torch.float64 and back.cfg == tc.cfg
    x = inputs(4).double()
    torch.testing.assert_close(back.reconstruct(x), tc.double().reconstruct(x))
    with pytest.raises(UserError, match="already in the native layout"):
        convert(tmp_path / "c", tmp_path / "c", "native")
    with pytest.raises(UserError, match="unknown layout"):
        convert(tmp_path / "a", tmp_path / "d", "saelens")


def test_convert_cli(tmp_path, capsys):
    from transcoders.cli import run

    save_native(make_set("plt", "topk"), tmp_path / "topk")
    save_native(make_set("skip"), tmp_path / "skip")
    assert (
        run(
            [
                "convert",
                str(tmp_path / "skip"),
                str(tmp_path / "gs"),
                "--to",
                "gemmascope2",
                "--l0-label",
                "big",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "wrote gemmascope2 transcoders" in capsys.readouterr().out
    assert (
        tmp_path
        / "gs"
        / "transcoder_all"
        / f"layer_0_width_{F}_l0_big_affine"
        / "params.safetensors"
    ).is_file()
    assert (
        run(["convert", str(tmp_path / "topk"), str(tmp_path / "gs2"), "--to", "gemmascope2"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Gemma Scope 2 files hold JumpReLU") and "\n" not in err
    assert not (tmp_path / "gs2").exists()


@needs_ct
@pytest.mark.parametrize(
    "kind,activation,skip",
    [
        ("plt", "jumprelu", None),
        ("plt", "relu", None),
        ("skip", "jumprelu", None),
        ("plt", "batchtopk", None),
        ("clt", "jumprelu", False),
        ("clt", "relu", False),
    ],
)
def test_round_trips_through_circuit_tracer(tmp_path, kind, activation, skip):
    tc = make_set(kind, activation, skip)
    save_native(tc, tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "ct", "circuit-tracer", progress=False)
    assert detect_layout(tmp_path / "ct") == "circuit-tracer"
    gs = convert(tmp_path / "ct", tmp_path / "gs", "gemmascope2", progress=False)
    convert(gs, tmp_path / "ct2", "circuit-tracer", progress=False)
    convert(tmp_path / "ct2", tmp_path / "back", "native", progress=False)
    x = inputs(6)
    for path in ("ct", "gs", "ct2", "back"):
        assert_same_function(tc, load_any(tmp_path / path), x)
    assert load_native(tmp_path / "back").cfg.kind == kind


@needs_ct
def test_a_released_gemmascope_clt_converts_to_circuit_tracer(tmp_path):
    params = released_params(torch.Generator().manual_seed(7), clt=True)
    src = write_released_clt(tmp_path / "repo", params)
    convert(src, tmp_path / "ct", "circuit-tracer", progress=False)
    x = inputs(3)
    ref_acts, ref_out = reference_forward(params, x, clt=True)
    tc = load_any(tmp_path / "ct")
    torch.testing.assert_close(tc.reconstruct(x), ref_out, rtol=1e-5, atol=1e-6)


# -- decoders stay on disk: memory-mapped views, not read at load ----------------------------------
def _mapped_ranges(files) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `files` (Linux /proc/self/maps)."""
    names = {str(Path(f).resolve()) for f in files}
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in names:
            out.append(tuple(int(x, 16) for x in parts[0].split("-")))
    return out


@pytest.mark.skipif(
    not Path("/proc/self/pagemap").exists(), reason="reads /proc/self/maps and pagemap (Linux)"
)
@pytest.mark.parametrize(
    "layout,kind",
    [
        ("native", "skip"),
        ("native", "clt"),
        ("circuit-tracer", "skip"),
        ("circuit-tracer", "clt"),
        ("gemmascope2", "skip"),
        ("gemmascope2", "clt"),
    ],
)
def test_decoders_stay_memory_mapped_and_unread(tmp_path, layout, kind):
    """Loading checks every value but leaves the decoders (and the encoders stored as `[D, F]`) as
    views of the files with (almost) none of their pages present: attribution then reads only the
    active features' rows, and passes over the encoders from the file."""
    big = random_transcoders(L, 256, 8192, kind=kind, seed=1)
    if layout == "native":
        save_native(big, tmp_path / "set")
        files = [tmp_path / "set" / native.WEIGHTS_FILE]
    elif layout == "circuit-tracer":
        from transcoders.circuit_tracer_format import save_circuit_tracer

        save_circuit_tracer(big, tmp_path / "set")
        files = sorted((tmp_path / "set").glob("*.safetensors"))
    else:
        save_gemmascope2(big, tmp_path / "set")
        files = sorted((tmp_path / "set").rglob("*.safetensors"))
    tc = load_any(tmp_path / "set")
    ranges = _mapped_ranges(files)
    for w in tc.W_dec:
        assert any(a <= w.data_ptr() < b for a, b in ranges), (
            "a decoder is a copy, not a view of its file"
        )
        assert resident_fraction(w) < 0.05, "loading read a decoder"
    # rows read for attribution come from the file, not through the mapping
    feats = torch.tensor([4000, 3, 8191, 77, 3])
    with torch.no_grad():
        for l in range(L):
            torch.testing.assert_close(
                tc.decoder_rows(l, feats), big.decoder_rows(l, feats), rtol=0, atol=0
            )
            assert resident_fraction(tc.W_dec[l]) < 0.05, "decoder_rows read through the mapping"
        # a decoder changed in memory (a private copy of the page): rows come from memory, not the
        # stale file
        tc.W_dec[1][77] += 1.0
        torch.testing.assert_close(
            tc.decoder_rows(1, feats)[3], big.decoder_rows(1, feats)[3] + 1.0
        )
        tc.W_dec[1][77] -= 1.0
    # encoders: attribution's one pass (sparse_encode) and the active features' vectors come from
    # the file where the layout stores them as we use them ([D, F]: native, Gemma Scope 2);
    # circuit-tracer's [F, D] encoders are read into memory of their own at loading
    x = torch.randn(L, 5, 256)
    with torch.no_grad():
        got, want = tc.sparse_encode(x), big.sparse_encode(x)
        for a, b in zip(got[:3], want[:3]):
            assert torch.equal(a, b)
        torch.testing.assert_close(got[3], want[3], rtol=1e-6, atol=1e-6)
        for l in range(L):
            torch.testing.assert_close(
                tc.encoder_rows(l, feats), big.W_enc[l][:, feats].T, rtol=0, atol=0
            )
    if layout != "circuit-tracer":
        for w in tc.W_enc:
            assert any(a <= w.data_ptr() < b for a, b in ranges), (
                "an encoder is a copy, not a view of its file"
            )
            assert resident_fraction(w) < 0.05, (
                "sparse_encode or encoder_rows read an encoder through the mapping"
            )
    torch.testing.assert_close(tc.reconstruct(x), big.reconstruct(x))
    # the dense decode read them all: the probe works
    assert all(resident_fraction(w) > 0.9 for w in tc.W_dec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_values_check_reads_every_float_dtype(tmp_path, dtype, bad):
    good = torch.randn(1000, dtype=torch.float32).to(dtype)
    broken = good.clone()
    broken[777] = bad
    save_file({"a": good, "b": broken, "c": torch.arange(5)}, str(tmp_path / "w.safetensors"))
    assert list(weights.nonfinite_tensors_in_file(tmp_path / "w.safetensors", piece=512)) == ["b"]
    with pytest.raises(UserError, match="b holds NaN or infinite"):
        weights.read_safetensors(tmp_path / "w.safetensors")


@pytest.mark.skipif(
    not Path("/proc/self/pagemap").exists(), reason="reads /proc/self/maps and pagemap (Linux)"
)
def test_decoder_rows_of_a_replaced_file_are_the_loaded_ones(tmp_path):
    """A set saved over the directory a loaded set maps (an atomic swap) does not leak into the
    loaded one."""
    old, new = random_transcoders(L, 64, 2048, seed=1), random_transcoders(L, 64, 2048, seed=2)
    save_native(old, tmp_path / "set")
    tc = load_any(tmp_path / "set")
    save_native(new, tmp_path / "set")
    feats = torch.tensor([5, 2000, 17])
    with torch.no_grad():
        torch.testing.assert_close(
            tc.decoder_rows(2, feats), old.decoder_rows(2, feats), rtol=0, atol=0
        )


@pytest.mark.skipif(
    not Path("/proc/self/pagemap").exists(), reason="reads /proc/self/maps and pagemap (Linux)"
)
def test_whole_passes_over_a_mapped_matrix_read_the_file(tmp_path):
    """`StoredWeight.row_chunks` / `left_matmul` over a memory-mapped matrix (contiguous, and the
    strided rows of a CLT-like `[n, 3, D]` tensor) give its values with (almost) none of its pages
    made present; a matrix edited in memory is read from memory."""
    torch.manual_seed(0)
    full = torch.randn(20000, 3, 96)
    save_file({"w": full}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        mapped = f.get_tensor("w")
    assert resident_fraction(mapped) < 0.05
    x = torch.randn(96)
    for w, ref in [(mapped.view(20000, 288), full.view(20000, 288)), (mapped[:, 1], full[:, 1])]:
        seen = torch.cat([rows.clone() for _, rows in StoredWeight(w).row_chunks(chunk_rows=3000)])
        torch.testing.assert_close(seen, ref, rtol=0, atol=0)
        xx = x if w.shape[1] == 96 else torch.randn(288)
        torch.testing.assert_close(
            StoredWeight(w.T, chunk_bytes=4096 * w.shape[1] * 4).left_matmul(xx), ref @ xx
        )
        starts = [a for a, _ in StoredWeight(w).row_chunks(chunk_rows=3000)]
        assert starts == list(range(0, 20000, 3000))
    assert resident_fraction(mapped) < 0.05, "a pass read through the mapping"
    mapped[123, 1, 5] += 1.0  # a private copy of that page: the file no longer holds the values
    edited = full[:, 1].clone()
    edited[123, 5] += 1.0
    torch.testing.assert_close(StoredWeight(mapped[:, 1].T).left_matmul(x), edited @ x)
    assert float(mapped.sum()) == pytest.approx(float(full.sum()) + 1.0, rel=1e-5)
    assert resident_fraction(mapped) > 0.9  # read through the mapping: the probe works
    small = torch.randn(7, 5)  # not a mapping: views of it
    assert [a for a, _ in StoredWeight(small).row_chunks(chunk_rows=3)] == [0, 3, 6]
    torch.testing.assert_close(StoredWeight(small.T).left_matmul(torch.ones(5)), small.sum(1))


@pytest.mark.skipif(
    not Path("/proc/self/pagemap").exists(), reason="reads /proc/self/maps and pagemap (Linux)"
)
@pytest.mark.parametrize("stored", ["[D, F]", "[F, D]"])
def test_encoder_products_and_columns_read_the_file(tmp_path, stored):
    """`StoredWeight.left_matmul` and `file_columns` over an encoder mapped from a file, stored
    `[D, F]` or as `[F, D]` (used through its transposed view), give its values with (almost) none
    of its pages made present; blocks hold whole columns; an encoder edited in memory is multiplied
    from memory, and its columns are left to the caller."""
    torch.manual_seed(1)
    ref = torch.randn(96, 7000)  # [D, F]
    save_file(
        {"w": ref if stored == "[D, F]" else ref.T.contiguous()}, str(tmp_path / "w.safetensors")
    )
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        stored_tensor = f.get_tensor("w")
    w = stored_tensor if stored == "[D, F]" else stored_tensor.T
    x = torch.randn(5, 96)
    chunk = 96 * 4 * 1000  # 1000 columns a block
    assert [(a, blk.shape[1]) for a, blk in StoredWeight(w, chunk).column_chunks()][-2:] == [
        (5000, 1000),
        (6000, 1000),
    ]
    torch.testing.assert_close(StoredWeight(w, chunk).left_matmul(x), x @ ref)
    cols = torch.tensor([6999, 0, 1000, 999, 0, 4321])
    torch.testing.assert_close(
        StoredWeight(w, chunk).file_columns(cols), ref[:, cols].T, rtol=0, atol=0
    )
    assert StoredWeight(w).file_columns(torch.tensor([], dtype=torch.long)).shape == (0, 96)
    with pytest.raises(IndexError):
        StoredWeight(w).file_columns(torch.tensor([7000]))
    assert resident_fraction(stored_tensor) < 0.05, "a pass read through the mapping"
    w[3, 4321] += 1.0
    edited = ref.clone()
    edited[3, 4321] += 1.0
    # the file no longer holds the values: the caller reads memory
    assert StoredWeight(w, chunk).file_columns(cols) is None
    # through the views, edit included
    torch.testing.assert_close(StoredWeight(w, chunk).left_matmul(x), x @ edited)
    # not a mapping: the caller indexes memory
    assert StoredWeight(torch.randn(4, 6)).file_columns(torch.tensor([1])) is None
