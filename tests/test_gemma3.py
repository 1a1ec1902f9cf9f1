"""gemma_lm.gemma3 (our Gemma 3 forward pass) against transformers' implementation on the same
weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import circuits
from circuits.replacement import run_and_freeze
from gemma_lm.gemma3 import Gemma3CausalLM, Gemma3Config
from gemma_lm.models import load_model
from gemma_lm.testing import tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from test_models import _word_tokenizer  # noqa: E402

LINEAR_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}


def _save(tmp_path: Path, rope=None, **config) -> Path:
    """A random tiny Gemma 3 (non-trivial norms, sliding and global layers) saved as a Hugging Face
    directory."""
    hf = tiny_model(seed=1, vocab_size=64, **config).model
    if rope is not None:
        hf.config.rope_parameters = rope
        from transformers import Gemma3ForCausalLM

        state = hf.state_dict()
        hf = Gemma3ForCausalLM(hf.config)
        hf.load_state_dict(state)
    hf.save_pretrained(tmp_path)
    _word_tokenizer(64).save_pretrained(tmp_path)
    return tmp_path


CASES = {
    "mha-softcap": dict(softcap=5.0, sliding_window=4),
    "gqa": dict(n_heads=4, n_kv_heads=2, sliding_window=3, global_every=2),
    "linear-rope": dict(sliding_window=4, rope=LINEAR_ROPE),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_logits_as_transformers(tmp_path, case, dtype):
    path = _save(tmp_path, **CASES[case])
    ours, theirs = (
        load_model(str(path), dtype=dtype),
        load_model(str(path), dtype=dtype, implementation="transformers"),
    )
    assert (
        isinstance(ours.model, Gemma3CausalLM) and ours.meta["implementation"] == "gemma_lm.gemma3"
    )
    assert theirs.meta["implementation"] == "transformers"
    ids = torch.randint(4, 64, (2, 13))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding at the end of the second row
    with torch.no_grad():
        a = ours.model(input_ids=ids, attention_mask=mask).logits
        b = theirs.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        last = ours.model(input_ids=ids, logits_to_keep=1).logits
    assert torch.equal(a, b)  # bit for bit: the same operations in the same order
    assert torch.equal(last, theirs.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits)
    # fast attention (harvesting): the same up to rounding
    ours.model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        fast = ours.model(input_ids=ids, attention_mask=mask).logits
    if dtype == "float32":
        torch.testing.assert_close(fast, a, rtol=1e-4, atol=1e-4)
    else:
        # bfloat16 rounds differently inside another kernel: close on the whole, not entry by entry
        assert float((fast - a).float().abs().mean()) < 0.02 * float(a.float().abs().mean())


def test_recorded_state_and_graph_are_the_same(tmp_path):
    from transcoders.testing import random_transcoders

    path = _save(tmp_path, n_heads=4, n_kv_heads=2, sliding_window=4)
    ours, theirs = load_model(str(path)), load_model(str(path), implementation="transformers")
    tokens = ours.tokenize(" ".join(f"w{i}" for i in range(5, 17)))
    a, b = run_and_freeze(ours, tokens), run_and_freeze(theirs, tokens)
    for name in (
        "resid",
        "patterns",
        "s_in",
        "s_pa",
        "s_ff",
        "s_final",
        "mlp_in",
        "mlp_out",
        "logits",
    ):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    tc = random_transcoders(ours.sites.n_layers, ours.sites.d_model, 48, seed=0)
    g_ours = circuits.attribute(
        ours, " ".join(f"w{i}" for i in range(5, 17)), transcoders=tc, progress=False
    )
    g_theirs = circuits.attribute(
        theirs, " ".join(f"w{i}" for i in range(5, 17)), transcoders=tc, progress=False
    )
    assert g_ours.metadata["model_implementation"] == "gemma_lm.gemma3"
    assert (g_ours.adjacency != g_theirs.adjacency).nnz == 0
    np.testing.assert_array_equal(g_ours.activation, g_theirs.activation)


def test_generation_hands_over_to_transformers(tmp_path):
    path = _save(tmp_path, sliding_window=4)
    ours, theirs = load_model(str(path)), load_model(str(path), implementation="transformers")
    ids = torch.tensor([[2, 5, 6, 7]])
    kw = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    out = ours.model.generate(ids, **kw)
    assert torch.equal(out, theirs.model.generate(ids, **kw))
    # transformers' model runs on our tensors: no second copy of the weights
    hf = ours.model.to_transformers()
    assert (
        hf.model.layers[0].mlp.up_proj.weight.data_ptr()
        == ours.model.model.layers[0].mlp.up_proj.weight.data_ptr()
    )


def test_configs_of_both_transformers_layouts_and_what_is_not_covered(tmp_path):
    v4 = {
        "model_type": "gemma3_text",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "sliding_window": 4,
        "sliding_window_pattern": 6,
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "query_pre_attn_scalar": 16,
    }
    cfg = Gemma3Config.from_dict(v4)
    assert cfg.rope == {"full_attention": (1e6, 8.0), "sliding_attention": (1e4, 1.0)}
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    with pytest.raises(circuits.UserError, match="yarn"):
        Gemma3Config.from_dict({**v4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    # a config outside what gemma_lm.gemma3 covers loads on transformers instead
    path = _save(tmp_path, sliding_window=4)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "attention_bias": True}))
    assert load_model(str(path)).meta["implementation"] == "transformers"
    with pytest.raises(circuits.UserError, match="implementation"):
        load_model(str(path), implementation="mine")


def test_incomplete_weights_are_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _save(tmp_path, sliding_window=4)
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(circuits.UserError, match="lacks 1 of the weights"):
        load_model(str(path))
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "intermediate_size": 100}))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, raw["hidden_size"])
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(circuits.UserError, match="config.json implies"):
        load_model(str(path))


def test_loading_leaves_transformers_modelling_unimported(tmp_path):
    """The point of gemma_lm.gemma3: tracing a local Gemma 3 never imports transformers' modelling
    code."""
    path = _save(tmp_path, sliding_window=4)
    code = (
        "import sys, circuits; lm = circuits.load_model(sys.argv[1]);"
        "lm.model(input_ids=lm.tokenize('w5 w6')[None]);"
        "heavy = [m for m in ('transformers.modeling_utils', 'sympy', 'torch._dynamo', "
        "'accelerate') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
