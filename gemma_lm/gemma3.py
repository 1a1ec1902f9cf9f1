"""Gemma 3 text models in plain PyTorch: the forward pass tracing needs, read from a Hugging Face
directory.

transformers' own Gemma 3 modelling code is exact but heavy to import: it brings
torch.distributed.tensor and sympy, torch._dynamo, accelerate with boto3 and scipy.optimize, memory
held for the process's life and time at every start (benchmarks/vs_circuit_tracer.py compares the
loaders). This module is the same model with the same module tree, names and parameters as
`transformers.Gemma3ForCausalLM` (so `ModelSites`, the hooks of `circuits.replacement` and the
checkpoint's tensor names apply unchanged), eager attention that returns its weights, and weights
memory-mapped from the safetensors files. It runs the forward pass only; `generate` (used to sample
training text) hands over to transformers with the same weights. `tests/test_gemma3.py` holds it to
transformers' implementation: the same logits, the same recorded activations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .weights import read_safetensors


@dataclass
class Gemma3Config:
    """What the forward pass reads from a Gemma 3 text config.json (transformers 4 and 5
    layouts)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str]
    sliding_window: int
    rope: dict[str, tuple[float, float]]  # layer type -> (base, linear scaling factor)
    query_pre_attn_scalar: float
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    max_position_embeddings: int = 32768
    model_type: str = "gemma3_text"
    raw: dict = field(default_factory=dict, repr=False)  # the whole config.json, for transformers
    # "sdpa": no weights returned (faster, for harvesting activations)
    _attn_implementation: str = "eager"

    @classmethod
    def from_dict(cls, d: dict) -> Gemma3Config:
        """The config, or a UserError naming what this implementation does not cover (the caller
        then uses transformers)."""
        if d.get("model_type") != "gemma3_text":
            raise UserError(f"model_type {d.get('model_type')!r} is not a Gemma 3 text model")
        if d.get("attention_bias") or d.get("use_bidirectional_attention"):
            raise UserError("attention biases and bidirectional attention are not covered")
        if d.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise UserError(f"hidden_activation {d.get('hidden_activation')!r} is not covered")
        n = d["num_hidden_layers"]
        types = d.get("layer_types") or [
            "full_attention"
            if (i + 1) % d.get("sliding_window_pattern", 6) == 0
            else "sliding_attention"
            for i in range(n)
        ]
        rope = {}
        for kind in ("full_attention", "sliding_attention"):
            if "rope_parameters" in d:  # transformers 5: one entry per layer type
                p = d["rope_parameters"].get(kind, d["rope_parameters"])
            else:  # transformers 4: global theta and scaling, local base
                p = dict(d.get("rope_scaling") or {}) if kind == "full_attention" else {}
                p["rope_theta"] = (
                    d.get("rope_theta", 1e6)
                    if kind == "full_attention"
                    else d.get("rope_local_base_freq", 1e4)
                )
            rtype = p.get("rope_type", p.get("type", "default"))
            if rtype not in ("default", "linear"):
                raise UserError(f"RoPE type {rtype!r} is not covered")
            rope[kind] = (
                float(p["rope_theta"]),
                float(p.get("factor", 1.0)) if rtype == "linear" else 1.0,
            )
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n,
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"],
            head_dim=d.get("head_dim", 256),
            layer_types=types,
            sliding_window=d.get("sliding_window", 4096),
            rope=rope,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            attn_logit_softcapping=d.get("attn_logit_softcapping"),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            raw=d,
        )


class Linear(nn.Linear):
    """nn.Linear without initial values: every weight comes from the checkpoint (`load_gemma3`), and
    uninitialised memory is never touched, so it costs nothing. (Building on the meta device instead
    imports torch's decompositions and sympy: the memory this module exists to save.)"""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: scale (1 + w), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class ScaledEmbedding(nn.Embedding):
    """Token embedding times sqrt(d_model), rounded to the weights' dtype as Gemma does."""

    def __init__(self, vocab: int, dim: int):
        super().__init__(vocab, dim)
        self.register_buffer("embed_scale", torch.tensor(dim**0.5), persistent=False)

    def reset_parameters(self) -> None:  # as `Linear`
        pass

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        D, H, KV, hd = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.config, self.n_heads, self.n_kv, self.head_dim = cfg, H, KV, hd
        self.is_sliding = cfg.layer_types[layer] == "sliding_attention"
        self.sliding_window = cfg.sliding_window if self.is_sliding else None
        self.scaling = cfg.query_pre_attn_scalar**-0.5
        self.q_proj, self.k_proj = Linear(D, H * hd, bias=False), Linear(D, KV * hd, bias=False)
        self.v_proj, self.o_proj = Linear(D, KV * hd, bias=False), Linear(H * hd, D, bias=False)
        self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_norm_eps), RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor):
        """x `[B, n, D]`, cos/sin `[1, n, hd]`, allowed `[B or 1, 1, n, n]` (query, key) -> (output
        `[B, n, D]`, weights `[B, H, n, n]`, or None with sdpa)."""
        B, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, n, -1, self.head_dim).transpose(1, 2))
        k = self.k_norm(self.k_proj(x).view(B, n, -1, self.head_dim).transpose(1, 2))
        v = self.v_proj(x).view(B, n, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if (
            self.config._attn_implementation == "sdpa"
            and self.config.attn_logit_softcapping is None
        ):
            # an additive mask, as eager's: a query whose every key is hidden (left padding) reads
            # them all evenly instead of giving NaN
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~allowed, torch.finfo(q.dtype).min)
            out, weights = (
                F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling),
                None,
            )
        else:
            scores = (q @ k.transpose(2, 3)) * self.scaling
            if self.config.attn_logit_softcapping is not None:
                cap = self.config.attn_logit_softcapping
                scores = torch.tanh(scores / cap) * cap
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = weights @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, n, -1)), weights


class MLP(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        D, M = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj, self.up_proj = Linear(D, M, bias=False), Linear(D, M, bias=False)
        self.down_proj = Linear(M, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn, self.mlp = Attention(cfg, layer), MLP(cfg)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(D, eps), RMSNorm(D, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = (
            RMSNorm(D, eps),
            RMSNorm(D, eps),
        )

    def forward(self, hidden_states: torch.Tensor, rope: dict, masks: dict) -> torch.Tensor:
        kind = "sliding_attention" if self.self_attn.is_sliding else "full_attention"
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), *rope[kind], masks[kind])
        h = hidden_states + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class TextModel(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _rope(self, n: int, dtype: torch.dtype, device) -> dict:
        """Per layer type: (cos, sin) `[1, n, hd]`, made in float32 and rounded to the model's
        dtype."""
        hd, pos = self.config.head_dim, torch.arange(n, device=device, dtype=torch.float32)
        out = {}
        for kind, (base, factor) in self.config.rope.items():
            inv_freq = 1.0 / (
                base ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd)
            )
            freqs = pos[:, None] * (inv_freq / factor)[None]
            emb = torch.cat((freqs, freqs), dim=-1)[None]
            out[kind] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out

    def _masks(self, n: int, attention_mask: torch.Tensor | None, device) -> dict:
        """Per layer type: which keys each query may read, `[B or 1, 1, n, n]` bool (causal; sliding
        layers see the last `sliding_window` positions; keys whose attention_mask is 0 are
        hidden)."""
        q, k = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None]
        causal = k <= q
        masks = {
            "full_attention": causal,
            "sliding_attention": causal & (q - k < self.config.sliding_window),
        }
        for kind, m in masks.items():
            m = m[None, None]
            if attention_mask is not None:
                m = m & attention_mask.bool()[:, None, None, :].to(device)
            masks[kind] = m
        return masks

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_ignored,
    ) -> SimpleNamespace:
        """`.last_hidden_state` `[B, n, D]` (after the final norm). transformers' other arguments
        (use_cache, ...) are accepted and ignored: there is no KV cache; `generate` goes to
        transformers."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        n = h.shape[1]
        rope, masks = self._rope(n, h.dtype, h.device), self._masks(n, attention_mask, h.device)
        for layer in self.layers:
            h = layer(h, rope, masks)
        return SimpleNamespace(last_hidden_state=self.norm(h))


class Gemma3CausalLM(nn.Module):
    """Gemma 3 text model with its (tied) head: `model(input_ids | inputs_embeds).logits`."""

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight
        self.generation_config = SimpleNamespace(eos_token_id=None)
        self.source_dir: str | None = None  # the directory it was loaded from (`load_gemma3`)
        self._transformers = None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **_ignored,
    ) -> SimpleNamespace:
        h = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        ).last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return SimpleNamespace(logits=logits)

    def to_transformers(self):
        """transformers' Gemma3ForCausalLM on these same parameter tensors (no copy of the
        weights)."""
        if self._transformers is None:
            from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

            raw = {
                k: v
                for k, v in self.config.raw.items()
                if k not in ("architectures", "transformers_version")
            }
            cfg = Gemma3TextConfig(**raw)
            cfg._attn_implementation = "eager"
            with torch.device("meta"):
                hf = Gemma3ForCausalLM(cfg)
            hf.load_state_dict(dict(self.state_dict()), assign=True)
            hf.model.embed_tokens.embed_scale = self.model.embed_tokens.embed_scale.clone()
            for name, m in list(
                hf.named_modules()
            ):  # what was made on the meta device and is not a weight
                if any(b.is_meta for b in m.buffers(recurse=False)):
                    if "Rotary" not in type(m).__name__:
                        raise RuntimeError(
                            f"transformers' {type(m).__name__} holds buffers this cannot rebuild"
                        )
                    parent, _, attr = name.rpartition(".")
                    setattr(
                        hf.get_submodule(parent),
                        attr,
                        type(m)(config=cfg, device=self.lm_head.weight.device),
                    )
            if (
                self.source_dir is not None
                and (Path(self.source_dir) / "generation_config.json").exists()
            ):
                hf.generation_config = GenerationConfig.from_pretrained(self.source_dir)
            self._transformers = hf.eval().requires_grad_(False)
        return self._transformers

    def generate(self, *args, **kwargs):
        """Sampling, as transformers does it (used to sample training text), on these weights."""
        return self.to_transformers().generate(*args, **kwargs)


def load_gemma3(
    path: str | Path, dtype: torch.dtype = torch.float32, cfg: Gemma3Config | None = None
) -> Gemma3CausalLM:
    """A Hugging Face directory's Gemma 3 text model (config.json, model.safetensors or its shards).
    Weights stored in `dtype` stay memory-mapped views of their files; others are converted. A
    config this module does not cover raises UserError (`load_model` then uses transformers). `cfg`:
    its config.json, where the caller has read it already."""
    path = Path(path)
    cfg = cfg or Gemma3Config.from_dict(json.loads((path / "config.json").read_text()))
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    state = {}
    for name in files:
        state.update(read_safetensors(path / name)[0])
    state = {k: v if v.dtype == dtype else v.to(dtype) for k, v in state.items()}
    if "model.embed_tokens.weight" in state:  # tied: checkpoints store the embedding only
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model = Gemma3CausalLM(cfg)
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(
            f"{path} lacks {len(missing)} of the weights its config.json implies, e.g. "
            f"{missing[0]}; the files may be incomplete"
        )
    wrong = [k for k, t in expected.items() if tuple(state[k].shape) != tuple(t.shape)]
    if wrong:
        raise UserError(
            f"{path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, config.json implies "
            f"{tuple(expected[wrong[0]].shape)}"
        )
    model.load_state_dict({k: state[k] for k in expected}, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    gen = path / "generation_config.json"
    if gen.exists():
        model.generation_config = SimpleNamespace(**json.loads(gen.read_text()))
    model.source_dir = str(path)
    return model.eval().requires_grad_(False)
