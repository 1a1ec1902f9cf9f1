"""Tiny random Gemma 3 models for tests and benchmarks: they build in milliseconds and run on the
same code paths as the real models. Not part of the public API (`gemma_lm` does not export them)."""

from __future__ import annotations

import json

import torch

from .models import LoadedModel, finish_loading


class TinyTokenizer:
    """A character-level tokenizer: id 2 is BOS, printable ASCII maps to 3..97. Enough for tests."""

    bos_token_id, eos_token_id, pad_token_id = 2, 1, 0
    chat_template = None

    def __init__(self, vocab_size: int = 128, chat: bool = False):
        self.vocab_size = vocab_size
        if chat:
            self.chat_template = (
                "<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
            )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + (ord(c) - 32) % (self.vocab_size - 3) for c in text]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def __call__(self, text, return_tensors=None, add_special_tokens: bool = True):
        ids = self.encode(text, add_special_tokens)

        class _Out:  # mimics BatchEncoding
            pass

        out = _Out()
        out.input_ids = torch.tensor([ids]) if return_tensors == "pt" else [ids]
        return out

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self.chat_template.format(content=messages[-1]["content"])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if skip_special_tokens:
            ids = [i for i in ids if i > 2]
        return "".join(
            "<bos>"
            if i == 2
            else "<eos>"
            if i == 1
            else "<pad>"
            if i == 0
            else chr(32 + (i - 3))
            if i < 98
            else f"<{i}>"
            for i in ids
        )


def tiny_config(
    n_layers: int = 3,
    d_model: int = 64,
    softcap: float | None = None,
    sliding_window: int = 4,
    vocab_size: int = 128,
    n_heads: int = 2,
    n_kv_heads: int = 1,
    head_dim: int = 16,
    d_mlp: int = 128,
    global_every: int = 3,
    max_positions: int = 256,
):
    """A small Gemma 3 text config with both sliding and global layers (every `global_every`-th
    layer global; the released models: 6). Any size: benchmarks build 1B- and 4B-shaped configs with
    it."""
    from transformers import Gemma3TextConfig

    layer_types = [
        "full_attention" if (i + 1) % global_every == 0 else "sliding_attention"
        for i in range(n_layers)
    ]
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        sliding_window=sliding_window,
        layer_types=layer_types,
        final_logit_softcapping=softcap,
        query_pre_attn_scalar=head_dim,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        attn_implementation="eager",
    )
    cfg.architectures = ["Gemma3ForCausalLM"]
    return cfg


def tiny_model(
    seed: int = 0, chat: bool = False, dtype: torch.dtype = torch.float32, **config
) -> LoadedModel:
    """A randomly initialised tiny Gemma 3 with non-trivial norm weights, and its tokenizer."""
    from transformers import Gemma3ForCausalLM

    cfg = tiny_config(**config)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma norms start at zero weight (scale 1); make them matter
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.3 if p.dim() == 2 and "embed" not in name else 1.0)
    model.to(dtype)
    tok = TinyTokenizer(cfg.vocab_size, chat=chat)
    name = f"tiny-gemma3-{cfg.num_hidden_layers}l-{cfg.hidden_size}d" + ("-it" if chat else "")
    loaded = finish_loading(model, tok, name, "random", "cpu")
    loaded.is_instruction_tuned = chat
    loaded.meta["config"] = json.loads(cfg.to_json_string())
    return loaded
