"""Model loading from every source, the transcoder sites, tiny fixtures, bad input, and the real
default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import circuits
from gemma_lm.models import load_model, model_sites
from gemma_lm.testing import tiny_config, tiny_model


def _word_tokenizer(vocab_size: int):
    """A small Hugging Face fast tokenizer (word level), savable with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_tiny_model_has_sliding_and_global_layers(softcap):
    lm = tiny_model(seed=3, softcap=softcap)
    s = lm.sites
    assert s.n_layers == 3 and 32 <= s.d_model <= 128
    kinds = [layer.is_sliding for layer in s.layers]
    assert any(kinds) and not all(kinds)
    assert s.final_logit_softcapping == softcap
    assert abs(s.embed_scale - s.d_model**0.5) < 1e-3
    ids = lm.tokenize("hi there")
    assert int(ids[0]) == lm.tokenizer.bos_token_id
    with torch.no_grad():
        logits = lm.model(ids[None]).logits[0, -1]
    assert logits.shape == (s.vocab_size,) and torch.isfinite(logits).all()
    if softcap:
        assert logits.abs().max() <= softcap


def test_sites_name_the_modules_transcoders_use():
    lm = tiny_model()
    d = lm.sites.describe()
    assert "pre_feedforward_layernorm" in d["transcoder_input"]
    assert "post_feedforward_layernorm" in d["transcoder_output"]
    block = lm.model.model.layers[1]
    assert lm.sites.layers[1].pre_feedforward_layernorm is block.pre_feedforward_layernorm
    assert lm.sites.layers[1].post_feedforward_layernorm is block.post_feedforward_layernorm
    assert lm.sites.lm_head is lm.model.lm_head


def test_chat_template_for_instruction_tuned():
    lm = tiny_model(chat=True)
    assert lm.is_instruction_tuned
    plain, chat = lm.tokenize("hello"), lm.tokenize("hello", chat=True)
    assert len(chat) > len(plain)
    with pytest.raises(circuits.UserError, match="chat template"):
        tiny_model().tokenize("hello", chat=True)


def test_local_hf_directory(tmp_path):
    from transformers import Gemma3ForCausalLM

    cfg = tiny_config(vocab_size=64)
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).save_pretrained(tmp_path)
    _word_tokenizer(64).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.sites.n_layers == 3 and lm.sites.vocab_size == 64
    assert lm.source == str(tmp_path)
    ids = lm.tokenize("w5 w6 w7")
    assert ids.tolist() == [2, 5, 6, 7]


def test_multimodal_checkpoint_loads_text_model_only(tmp_path):
    from transformers import (
        Gemma3Config,
        Gemma3ForCausalLM,
        Gemma3ForConditionalGeneration,
        SiglipVisionConfig,
    )

    text = tiny_config(vocab_size=64)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    torch.manual_seed(0)
    full = Gemma3ForConditionalGeneration(
        Gemma3Config(
            text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
        )
    )
    full.save_pretrained(tmp_path)
    _word_tokenizer(64).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert isinstance(lm.model, Gemma3ForCausalLM)
    assert not any("vision" in n for n, _ in lm.model.named_parameters())
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        ours = lm.model(ids).logits
        theirs = full.eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bad_model_inputs(tmp_path):
    with pytest.raises(circuits.UserError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(circuits.UserError, match="is not a model"):
        load_model(str(tmp_path))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(circuits.UserError, match="not a readable GGUF"):
        load_model(str(bad))
    with pytest.raises(circuits.UserError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(circuits.UserError, match="llama"):
        load_model(str(other))
    with pytest.raises(circuits.UserError, match="dtype"):
        load_model(str(other), dtype="float8")


def test_gguf_of_another_architecture(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "llama.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(circuits.UserError, match="architecture 'llama'"):
        load_model(str(path))


def test_cli_prints_one_line_for_user_errors():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "circuits",
            "trace",
            "hello",
            "--model",
            "no-such-model",
            "--out",
            "/tmp/never.npz",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no-such-model" in lines[0]


def test_circuits_info_reports_backend():
    r = subprocess.run(
        [sys.executable, "-m", "circuits", "info"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "edge backend:" in out and "default model: gemma-3-270m" in out and "torch" in out
    from circuits import backend

    if backend._ext is not None:
        assert "edge backend: cpp" in out
    else:
        assert "edge backend: torch" in out and "not available" in out


@pytest.mark.slow
def test_default_model_predicts_basketball(real_model):
    lm = real_model
    assert lm.name == "gemma-3-270m"
    s = lm.sites
    assert (s.n_layers, s.d_model, s.d_mlp, s.n_heads, s.n_kv_heads, s.head_dim, s.vocab_size) == (
        18,
        640,
        2048,
        4,
        1,
        256,
        262144,
    )
    assert sum(not layer.is_sliding for layer in s.layers) == 3
    ids = lm.tokenize("Fact: Michael Jordan plays the sport of")
    with torch.no_grad():
        probs = lm.model(ids[None]).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert lm.tokenizer.decode([top]) == " basketball"
    assert 0.4 < float(probs[top]) < 0.8  # 0.61 measured in float32


@pytest.mark.slow
def test_model_sites_of_real_model(real_model):
    again = model_sites(real_model.model)
    assert again.n_layers == real_model.sites.n_layers
    assert real_model.sites.rms_norm_eps == pytest.approx(1e-6)


def test_embed_unembed_and_last_logits_equal_the_models_own(tiny_softcap):
    """`LoadedModel.embed` / `unembed` / `last_logits` compute what the model's embedding, head and
    soft-cap compute (here on a tiny model held in memory, not mapped)."""
    lm = tiny_softcap
    tokens = lm.tokenize("abcabd")
    with torch.no_grad():
        torch.testing.assert_close(lm.embed(tokens), lm.sites.embed(tokens), rtol=0, atol=0)
        out = lm.model(tokens[None], use_cache=False)
        torch.testing.assert_close(
            lm.last_logits(tokens), out.logits[0, -1].float(), rtol=1e-5, atol=1e-5
        )
        assert float(out.logits.abs().max()) <= 5.0  # the soft-cap was applied on both sides


@pytest.mark.skipif(
    not Path("/proc/self/pagemap").exists(), reason="reads /proc/self/maps and pagemap (Linux)"
)
def test_the_vocabulary_matrix_stays_out_of_memory():
    """Gemma 3 270M's embedding (tied to its unembedding) is 63% of its weights. Freezing a prompt
    and building its logit directions read it from the file: it stays (almost) all off the process's
    pages, and the logits equal the model's own forward pass, which reads it through the mapping."""
    from circuits.replacement import FrozenWeights, run_and_freeze
    from gemma_lm.weights import resident_fraction

    lm = load_model()  # a fresh mapping of the cached weights
    W = lm.sites.embed.weight
    assert W.data_ptr() == lm.sites.lm_head.weight.data_ptr()
    tokens = lm.tokenize("The capital of France is Paris, and the capital of Germany is")
    state = run_and_freeze(lm, tokens)
    directions = FrozenWeights.of(lm).logit_directions([int(state.logits.argmax()), 5, 1000])
    assert resident_fraction(W) < 0.05
    with torch.no_grad():
        ref = lm.model(tokens[None], use_cache=False, logits_to_keep=1).logits[0, -1].float()
        torch.testing.assert_close(state.logits, ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(
            directions,
            W[[int(ref.argmax()), 5, 1000]].float() - W.float().mean(0),
            rtol=1e-5,
            atol=1e-6,
        )
        torch.testing.assert_close(state.resid[0], lm.sites.embed(tokens), rtol=0, atol=0)
    assert resident_fraction(W) > 0.9  # the model's own head read it all: the probe works


def test_the_default_models_tokenizer_gives_autotokenizers_ids(real_model):
    """`load_tokenizer` reads tokenizer.json as a generic fast tokenizer (lighter than transformers
    5's GemmaTokenizer): the same ids, decodings and special tokens."""
    from transformers import AutoTokenizer

    from gemma_lm.files import cache_dir

    auto = AutoTokenizer.from_pretrained(str(cache_dir() / "models" / "gemma-3-270m-hf"))
    ours = real_model.tokenizer
    texts = [
        "Fact: Michael Jordan plays the sport of",
        "  two leading spaces\tand a tab\n\nnewlines",
        "émojis 🤖 and 中文",
        "<start_of_turn>user\nhi<end_of_turn>\n",
        "x" * 60,
        "",
        " Paris",
    ]
    for text in texts:
        assert ours(text).input_ids == auto(text).input_ids, text
        assert (
            ours(text, add_special_tokens=False).input_ids
            == auto(text, add_special_tokens=False).input_ids
        )
        ids = auto(text).input_ids
        assert ours.decode(ids) == auto.decode(ids)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(auto, name), name
    assert len(ours) == len(auto)
