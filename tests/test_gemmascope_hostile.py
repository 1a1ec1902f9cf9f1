"""Hostile and mistaken transcoder files (issue 23, items 9 and 10): Gemma Scope 2 CLT decoder
layouts, Hub specs naming the config-only mirrors, files written by hand with a mistake, and a
seeded fuzz over native and Gemma Scope 2 directories."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_formats import (
    D,
    F,
    L,
    inputs,
    reference_forward,
    released_params,
    write_released_clt,
    write_released_plt,
)

from gemma_lm.errors import UserError
from transcoders.formats import detect_layout, load_any
from transcoders.native import save_native
from transcoders.testing import random_transcoders


def rewrite(path: Path, change) -> None:
    """Apply `change(tensors)` to the tensors of safetensors file `path`, keeping its metadata."""
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def relative(params):
    """CLT params re-indexed by output layer - source layer (the last l entries zero)."""
    out = []
    for l, p in enumerate(params):
        w = torch.zeros_like(p["w_dec"])
        w[:, : L - l] = p["w_dec"][:, l:]
        out.append({**p, "w_dec": w})
    return out


# -- item 9: the CLT decoder layout, from the weights ----------------------------------------------
def test_clt_decoder_layout_is_checked_from_the_weights(tmp_path):
    params = released_params(torch.Generator().manual_seed(0), clt=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the absolute layout loads without a word
        load_any(write_released_clt(tmp_path / "absolute", params))
    with pytest.raises(UserError, match=r"indexed by output layer - source layer") as e:
        load_any(write_released_clt(tmp_path / "relative", relative(params)))
    assert "absolute output layer" in str(e.value) and "\n" not in str(e.value)
    noisy = [{**p, "w_dec": p["w_dec"].clone()} for p in params]
    for l, p in enumerate(noisy):
        p["w_dec"][:, :l] = torch.randn(F, l, D, generator=torch.Generator().manual_seed(l))
    with pytest.warns(UserWarning, match=r"not zero before their source layer.*layer 1: "):
        tc = load_any(write_released_clt(tmp_path / "noisy", noisy))
    x = inputs(1)  # read as absolute: the entries before each source layer do not enter
    torch.testing.assert_close(tc.reconstruct(x), reference_forward(params, x, True)[1])


def test_a_mwhanna_spec_names_the_google_repo(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: pytest.fail("online"))
    spec = "mwhanna/gemma-scope-2-270m-pt/clt/width_262k_l0_medium_affine"
    for given in (spec, "hf://" + spec):
        with pytest.raises(UserError, match="hf://google/gemma-scope-2-270m-pt/clt/width_262k"):
            load_any(given)


# -- item 10: files written by hand, with a mistake ------------------------------------------------
def test_transposed_matrices_name_the_file_the_tensor_and_the_shapes(tmp_path):
    g = torch.Generator().manual_seed(1)
    one = released_params(g)
    one[1]["w_enc"] = one[1]["w_enc"].T.contiguous()
    where = write_released_plt(tmp_path / "a", one)
    with pytest.raises(UserError) as e:
        load_any(where)
    assert str(e.value).endswith(
        "layer_1_width_16k_l0_small/params.safetensors: w_enc has shape [40, 16]; expected "
        "[16, 40] (transposed) (d_model 16 from b_dec, width 40 from b_enc)"
    )
    both = released_params(g)
    both[0] = {**both[0], "w_enc": both[0]["w_enc"].T, "w_dec": both[0]["w_dec"].T}
    with pytest.raises(UserError) as e:
        load_any(
            write_released_plt(
                tmp_path / "b", [{k: v.contiguous() for k, v in p.items()} for p in both]
            )
        )
    msg = str(e.value)
    assert "layer_0_width_16k_l0_small/params.safetensors: w_enc has shape [40, 16]" in msg
    assert "w_dec has shape [16, 40]; expected [40, 16] (transposed)" in msg
    assert "b_enc.0" not in msg


def test_a_missing_layer_names_the_missing_file(tmp_path, tiny):
    g = torch.Generator().manual_seed(2)
    clt = write_released_clt(tmp_path / "clt", released_params(g, clt=True))
    (clt / "params_layer_2.safetensors").unlink()
    with pytest.raises(
        UserError, match=r"width 120 = 3 x 40 .*params_layer_2\.safetensors missing"
    ):
        load_any(clt)
    cfg = json.loads((clt / "config.json").read_text())
    (clt / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "width"}))
    with pytest.raises(UserError, match=r"a CLT of 3 layers.*params_layer_2\.safetensors missing"):
        load_any(clt)
    gap = write_released_plt(tmp_path / "gap", released_params(g, n_layers=2), layers=[0, 2])
    with pytest.raises(UserError, match=r"transcoder_all/layer_1_width_16k_l0_small missing"):
        load_any(gap)
    d = tiny.sites.d_model
    short = released_params(g, n_layers=tiny.sites.n_layers - 1, d=d)
    where = write_released_plt(tmp_path / "short", short, model=tiny.name)
    last = tiny.sites.n_layers - 1
    with pytest.raises(UserError, match=rf"transcoder_all/layer_{last}_width_16k_l0_small missing"):
        load_any(where, model=tiny)


def test_the_parent_of_a_clt_folder_says_which_folder_to_pass(tmp_path):
    clt = write_released_clt(tmp_path / "repo", released_params(torch.Generator(), clt=True))
    with pytest.raises(UserError) as e:
        load_any(clt.parent)
    assert str(e.value).endswith(f"it holds the CLT folder width_262k_l0_medium: pass {clt}")
    assert detect_layout(clt.parent) is None  # a hint only: no writer may replace it as a set


def test_layers_in_different_dtypes_are_refused_unless_cast(tmp_path):
    params = released_params(torch.Generator().manual_seed(3))
    params[1] = {k: v.to(torch.bfloat16) for k, v in params[1].items()}
    where = write_released_plt(tmp_path / "a", params)
    with pytest.raises(UserError, match=r"layer_1_.*holds BF16 tensors but .*layer_0_.* holds F32"):
        load_any(where)
    assert load_any(where, dtype="float32").W_enc[1].dtype == torch.float32
    (file,) = (where.parent / "layer_2_width_16k_l0_small").glob("*.safetensors")
    rewrite(file, lambda t: t.update(b_enc=t["b_enc"].half()))
    with pytest.raises(
        UserError, match=r"layer_2_.*params\.safetensors: b_enc is F16 but w_enc is F32"
    ):
        load_any(where, dtype="float32")
    save_native(random_transcoders(2, 8, 12, seed=0), tmp_path / "native")
    rewrite(
        tmp_path / "native" / "weights.safetensors",
        lambda t: t.update({"b_dec.1": t["b_dec.1"].half()}),
    )
    with pytest.raises(UserError, match=r"weights\.safetensors: b_dec\.1 is torch\.float16 but"):
        load_any(tmp_path / "native")


# -- fuzz: every load succeeds with a consistent set or stops with one line ------------------------
def base_sets(root: Path) -> list[Path]:
    g = torch.Generator().manual_seed(4)
    save_native(random_transcoders(2, 8, 12, seed=0), root / "native_plt")
    save_native(random_transcoders(2, 8, 12, kind="clt", skip=True, seed=1), root / "native_clt")
    plt = write_released_plt(root / "gs_plt", released_params(g, affine=True))
    clt = write_released_clt(root / "gs_clt", released_params(g, clt=True))
    return [root / "native_plt", root / "native_clt", plt, clt]


def mutate(rng: random.Random, top: Path) -> str:
    """One random damage to the files under `top`; what was done."""
    files = sorted(p for p in top.rglob("*") if p.is_file())
    configs = [p for p in files if p.name == "config.json"]
    weights = [p for p in files if p.suffix == ".safetensors"]
    how = rng.choice(["config", "shape", "dtype", "nonfinite", "missing", "truncate", "flip"])
    path = rng.choice(configs if how == "config" else weights)
    if how == "config":
        cfg = json.loads(path.read_text())
        key = rng.choice(sorted(cfg))
        bad = rng.choice([None, "x", -3, 0, 1.5, [], {}, True, -(10**9)])
        cfg = (
            {k: v for k, v in cfg.items() if k != key} if rng.random() < 0.3 else {**cfg, key: bad}
        )
        path.write_text(json.dumps(cfg))
        return f"{path.name}: {key} -> {cfg.get(key, 'removed')!r}"
    if how == "missing":
        path.unlink()
        return f"{path.name} removed"
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))])
        return f"{path.name} truncated"
    if how == "flip":
        data = bytearray(path.read_bytes())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        return f"{path.name} bytes flipped"
    with safe_open(str(path), "pt") as f:
        name = rng.choice(sorted(f.keys()))

    def change(t):
        v = t[name]
        if how == "shape":
            t[name] = rng.choice([v.transpose(0, -1), v[..., :-1], v.unsqueeze(0)])
        elif how == "dtype":
            t[name] = v.to(rng.choice([torch.int32, torch.bool, torch.float16, torch.bfloat16]))
        else:
            flat = v.clone().reshape(-1)
            flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf")])
            t[name] = flat.reshape(v.shape)

    rewrite(path, change)
    return f"{path.name}: {name} {how}"


def assert_consistent(tc) -> None:
    """Encode and decode run on a small input; outputs are finite wherever the weights are of a
    sane size (a flipped exponent bit can leave a finite 1e38 whose products overflow)."""
    x = torch.randn(tc.n_layers, 3, tc.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tc.reconstruct(x)
        layer, pos, feat, val = tc.sparse_encode(x)
    assert out.shape == (tc.n_layers, 3, tc.d_model)
    assert len(layer) == len(pos) == len(feat) == len(val)
    sane = all(float(p.detach().abs().max()) < 1e6 for p in tc.parameters())
    if sane:
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(val).all())


def test_fuzzed_transcoder_directories_load_or_stop_with_one_line(tmp_path):
    rng = random.Random(23)
    bases = base_sets(tmp_path / "base")
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(120):
        base = rng.choice(bases)
        top = tmp_path / f"case{case}"
        shutil.copytree(base.parent if base.parent.name in ("transcoder_all", "clt") else base, top)
        target = top / base.name if base.parent.name in ("transcoder_all", "clt") else top
        what = mutate(rng, top)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # e.g. a flipped CLT decoder entry
                tc = load_any(target)
        except UserError as e:
            assert str(e) and "\n" not in str(e), (what, str(e))
            outcomes["refused"] += 1
        else:
            assert_consistent(tc)
            outcomes["loaded"] += 1
        shutil.rmtree(top)
    assert outcomes["refused"] > 30 and outcomes["loaded"] > 5, outcomes
