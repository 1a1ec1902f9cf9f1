"""circuit-tracer's on-disk transcoder layout (circuit-tracer 0.5.0, its local cache directory).

A directory holds `config.yaml` plus safetensors files. `config.yaml` says
  model_kind: transcoder_set | cross_layer_transcoder
  feature_input_hook / feature_output_hook: where features read and write, as TransformerLens names
    (for Gemma 3: mlp.hook_in = pre_feedforward_layernorm output,
    hook_mlp_out = post_feedforward_layernorm output)
  scan: an identifier of the set; model_name: the model it belongs to.

Per-layer sets (PLT, skip), one file per layer, `layer_{l}.safetensors`:
  W_enc [F, D]   (ours is [D, F])     b_enc [F]     W_dec [F, D]     b_dec [D]
  activation_function.threshold [F]   (JumpReLU; absent means ReLU)
  W_skip [D, D]  used as x @ W_skip.T (ours is used as x @ W_skip, so it is stored transposed)
Cross-layer sets, two files per source layer:
  W_enc_{l}.safetensors: W_enc_{l} [F, D], b_enc_{l} [F], b_dec_{l} [D],
                         threshold_{l} [F] (JumpReLU only)
  W_dec_{l}.safetensors: W_dec_{l} [F, L - l, D]   (the same layout as ours)

circuit-tracer has no TopK activation and its CLT loader reads no skip term, so such sets are
refused. A BatchTopK set is exported as JumpReLU with its inference threshold (the same function at
inference). We add one key circuit-tracer ignores, `gemma_circuits`, holding our `TranscoderConfig`,
so that a round trip restores the set exactly (kind, activation, training metrics); directories
written by others load without it. `config.yaml` is written last, as circuit-tracer does: a
directory without it is incomplete.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write_text
from gemma_lm.memory import return_freed_memory
from gemma_lm.weights import read_safetensors, read_tensor_copy

from .model import TranscoderConfig, TranscoderSet
from .native import build_transcoder_set

CONFIG = "config.yaml"
PLT_KIND, CLT_KIND = "transcoder_set", "cross_layer_transcoder"
# our site names <-> circuit-tracer's (TransformerLens) hook names
INPUT_HOOKS = {"mlp_in": "mlp.hook_in", "resid_mid": "hook_resid_mid"}
OUTPUT_HOOKS = {"mlp_out": "hook_mlp_out"}


def _hub_model_name(name: str) -> str:
    """circuit-tracer names models by their Hub id (google/gemma-3-270m)."""
    return f"google/{name}" if name.startswith("gemma-") and "/" not in name else name


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically (a temporary file beside it, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plain(value):
    """Config values as plain YAML types (training metrics may hold numpy or torch scalars)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _plain(value.tolist())
    return value


def _weight_files(path: Path) -> list[Path]:
    return sorted(
        [
            *path.glob("layer_*.safetensors"),
            *path.glob("W_enc_*.safetensors"),
            *path.glob("W_dec_*.safetensors"),
        ]
    )


def save_circuit_tracer(tc: TranscoderSet, path: str | Path, scan: str | None = None) -> Path:
    """Write `tc` in circuit-tracer's layout into directory `path` (created; an earlier export there
    is replaced).

    circuit-tracer loads it with
    `circuit_tracer.utils.caching.load_transcoders_from_cache(path.name, cache_dir=path.parent)`
    (or through its cache directory, CIRCUIT_TRACER_CACHE_DIR)."""
    c = tc.cfg
    path = Path(path)
    if c.activation == "topk":
        raise UserError(
            "circuit-tracer has no per-position TopK activation; export a JumpReLU, ReLU or "
            "BatchTopK set, or keep this one in the native format"
        )
    if c.kind == "clt" and tc.W_skip is not None:
        raise UserError(
            "circuit-tracer 0.5.0 loads no skip term for cross-layer transcoders; export a CLT "
            "without skip, or keep this one in the native format"
        )
    if c.input_site not in INPUT_HOOKS or c.output_site not in OUTPUT_HOOKS:
        raise UserError(
            f"circuit-tracer has no hook for sites {c.input_site}->{c.output_site}; "
            f"it supports inputs {sorted(INPUT_HOOKS)} and outputs {sorted(OUTPUT_HOOKS)}"
        )
    if path.exists() and not path.is_dir():
        raise UserError(
            f"{path} exists and is not a directory; pick a new directory for the export"
        )
    if path.is_dir() and any(path.iterdir()) and not is_circuit_tracer_dir(path):
        raise UserError(
            f"{path} is not empty and holds no circuit-tracer export; pick an empty directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    # an earlier export here: mark it incomplete first, then drop its files (layer counts come from
    # globs)
    (path / CONFIG).unlink(missing_ok=True)
    for f in _weight_files(path):
        f.unlink()

    jump = c.activation in ("jumprelu", "batchtopk")
    for l in range(c.n_layers):
        if c.kind == "clt":
            enc = {
                f"W_enc_{l}": tc.W_enc[l].T,
                f"b_enc_{l}": tc.b_enc[l],
                f"b_dec_{l}": tc.b_dec[l],
            }
            if jump:
                enc[f"threshold_{l}"] = tc.threshold[l]
            _save_safetensors(path / f"W_enc_{l}.safetensors", enc)
            _save_safetensors(path / f"W_dec_{l}.safetensors", {f"W_dec_{l}": tc.W_dec[l]})
        else:
            t = {
                "W_enc": tc.W_enc[l].T,
                "W_dec": tc.W_dec[l],
                "b_enc": tc.b_enc[l],
                "b_dec": tc.b_dec[l],
            }
            if jump:
                t["activation_function.threshold"] = tc.threshold[l]
            if tc.W_skip is not None:
                t["W_skip"] = tc.W_skip[l].T
            _save_safetensors(path / f"layer_{l}.safetensors", t)

    config = {
        "model_kind": CLT_KIND if c.kind == "clt" else PLT_KIND,
        "feature_input_hook": INPUT_HOOKS[c.input_site],
        "feature_output_hook": OUTPUT_HOOKS[c.output_site],
        "scan": scan or f"gemma-circuits/{c.model_name or 'model'}-{c.kind}-{c.d_sae}",
        "model_name": _hub_model_name(c.model_name),
        "gemma_circuits": _plain(c.to_dict()),
    }
    atomic_write_text(path / CONFIG, yaml.safe_dump(config, sort_keys=False))
    return path


def _read_config(path: Path) -> dict | None:
    try:
        config = yaml.safe_load((path / CONFIG).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) else None


def _plt_paths(path: Path, config: dict) -> list[Path]:
    """Layer files in layer order: an explicit local `transcoders` list, or
    layer_{l}.safetensors."""
    if "transcoders" in config:
        listed = [str(p) for p in config["transcoders"]]
        remote = [p for p in listed if p.startswith("hf://")]
        if remote:
            raise UserError(
                f"{path / CONFIG} lists Hub files ({remote[0]} ...); offline, only local files "
                f"load: download them, or export a local set with `transcoders convert`"
            )
        return [Path(p) if Path(p).is_absolute() else path / p for p in listed]
    n = len(list(path.glob("layer_*.safetensors")))
    return [path / f"layer_{l}.safetensors" for l in range(n)]


def is_circuit_tracer_dir(path: str | Path) -> bool:
    """Whether `path` is a directory in circuit-tracer's layout (a complete one: config.yaml and
    layer 0)."""
    path = Path(path)
    if not (path.is_dir() and (path / CONFIG).is_file()):
        return False
    config = _read_config(path)
    if not config:
        return False
    kind = config.get("model_kind")
    if kind == CLT_KIND:
        return (path / "W_enc_0.safetensors").is_file() and (path / "W_dec_0.safetensors").is_file()
    if kind == PLT_KIND:
        if "transcoders" in config:
            return isinstance(config["transcoders"], list) and len(config["transcoders"]) > 0
        return (path / "layer_0.safetensors").is_file()
    return False


def _site(hooks: dict, hook: str, which: str, path: Path) -> str:
    for site, name in hooks.items():
        if name == hook:
            return site
    raise UserError(
        f"{path / CONFIG}: {which} hook {hook!r} is not a Gemma 3 MLP site we support "
        f"({', '.join(hooks.values())})"
    )


@dataclass
class _StoredSet:
    """An export's tensors, layer by layer, as memory-mapped views of its files."""

    # our short name -> (memory-mapped tensor, its file, its stored name), per source layer
    files: list[dict[str, tuple[torch.Tensor, Path, str]]]
    threshold_key: str  # the threshold's short name, which the two layouts spell differently

    def views(self, l: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.files[l].items()}

    def copy(self, l: int, key: str) -> torch.Tensor:
        """Layer `l`'s tensor `key` read into memory of its own."""
        _, file, stored = self.files[l][key]
        return read_tensor_copy(file, stored)


def _read_layer_file(
    file: Path, path: Path, strip: bool = False
) -> dict[str, tuple[torch.Tensor, Path, str]]:
    """One file of the export at `path` (`strip`: drop the `_{l}` ending of CLT names)."""
    if not file.is_file():
        raise UserError(
            f"{file} is missing; the circuit-tracer export at {path} is incomplete, write it again"
        )
    return {
        (k.rsplit("_", 1)[0] if strip else k): (v, file, k)
        for k, v in read_safetensors(file)[0].items()
    }


def _open_export(path: Path, config: dict, clt: bool) -> _StoredSet:
    if clt:
        n_layers = len(list(path.glob("W_enc_*.safetensors")))
        files = [
            {
                **_read_layer_file(path / f"W_enc_{l}.safetensors", path, True),
                **_read_layer_file(path / f"W_dec_{l}.safetensors", path, True),
            }
            for l in range(n_layers)
        ]
        return _StoredSet(files, "threshold")
    files = [_read_layer_file(p, path) for p in _plt_paths(path, config)]
    return _StoredSet(files, "activation_function.threshold")


def _transcoder_config(
    path: Path, config: dict, stored: _StoredSet, clt: bool, sites: tuple[str, str]
) -> TranscoderConfig:
    """Our config as saved in config.yaml (checked against the files), or one read off the files."""
    first, n_layers = stored.views(0), len(stored.files)
    d_sae, d_model = first["W_enc"].shape
    saved = config.get("gemma_circuits")
    if isinstance(saved, dict):
        cfg = TranscoderConfig(**saved)
        if (cfg.n_layers, cfg.d_model, cfg.d_sae, cfg.kind == "clt") != (
            n_layers,
            d_model,
            d_sae,
            clt,
        ):
            raise UserError(
                f"{path / CONFIG} describes {cfg.n_layers} layers x {cfg.d_sae} features of width "
                f"{cfg.d_model}, but the files hold {n_layers} x {d_sae} x {d_model}; "
                "export it again"
            )
        return cfg
    skip = "W_skip" in first
    return TranscoderConfig(
        kind="clt" if clt else ("skip" if skip else "plt"),
        n_layers=n_layers,
        d_model=d_model,
        d_sae=d_sae,
        activation="jumprelu" if stored.threshold_key in first else "relu",
        skip=skip,
        model_name=str(config.get("model_name", "")).split("/")[-1],
        input_site=sites[0],
        output_site=sites[1],
        extra={"scan": config.get("scan")},
    )


def _layer_state(
    stored: _StoredSet, l: int, cfg: TranscoderConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Layer `l`'s entries of our state dict. Decoders and encoders stay memory-mapped views of the
    files (an encoder is the transposed view of the stored `[F, D]`, so products with it round as
    circuit-tracer's do): attribution reads the active features' rows and passes over the encoders
    from the file, so neither becomes resident. Everything else is read into memory of its own
    (skip matrices are stored transposed to our layout; copied through the mapping, they would
    stay resident twice, and small tensors would keep their file's mapping, touched pages
    included, alive)."""
    t, key = stored.views(l), stored.threshold_key
    encoder = t["W_enc"].T
    encoder.finite_checked = True  # read_safetensors checked the file; a view loses the mark
    state = {
        f"W_enc.{l}": encoder,
        f"b_enc.{l}": stored.copy(l, "b_enc"),
        f"W_dec.{l}": t["W_dec"],
        f"b_dec.{l}": stored.copy(l, "b_dec"),
        f"threshold.{l}": (
            stored.copy(l, key).reshape(-1) if key in t else torch.zeros(cfg.d_sae, dtype=dtype)
        ),
    }
    if cfg.skip:
        state[f"W_skip.{l}"] = stored.copy(l, "W_skip").T.contiguous()
    return state


def _read_weights(
    path: Path, config: dict, clt: bool, sites: tuple[str, str]
) -> tuple[TranscoderConfig, dict[str, torch.Tensor]]:
    """The set's config and state dict, in the dtype of its W_enc. The small tensors' file mappings
    close when this returns."""
    stored = _open_export(path, config, clt)
    first = stored.views(0)
    if "W_enc" not in first:
        raise UserError(
            f"{path}: layer 0 has no W_enc tensor (keys {sorted(first)}); this is not "
            "circuit-tracer's layout (Gemma Scope 2 files load with `transcoders convert` / "
            "load_any)"
        )
    cfg = _transcoder_config(path, config, stored, clt, sites)
    dtype = first["W_enc"].dtype
    state = {}
    for l in range(len(stored.files)):
        try:
            state.update(_layer_state(stored, l, cfg, dtype))
        except KeyError as e:
            raise UserError(f"{path}: layer {l} lacks {e}; export it again") from None
    for k, v in state.items():
        if not v.is_floating_point():
            raise UserError(
                f"{path}: {k} has dtype {v.dtype}; transcoder weights are floating point"
            )
    return cfg, {k: v if v.dtype == dtype else v.to(dtype) for k, v in state.items()}


def load_circuit_tracer(path: str | Path) -> TranscoderSet:
    """Load a directory in circuit-tracer's layout as a `TranscoderSet` (weights keep their stored
    dtype)."""
    path = Path(path)
    if not is_circuit_tracer_dir(path):
        raise UserError(
            f"{path} is not a circuit-tracer transcoder directory (config.yaml with model_kind "
            f"{PLT_KIND} or {CLT_KIND}, and layer_0.safetensors or W_enc_0/W_dec_0.safetensors)"
        )
    config = _read_config(path)
    clt = config["model_kind"] == CLT_KIND
    input_site = _site(INPUT_HOOKS, config.get("feature_input_hook", ""), "feature_input", path)
    output_site = _site(OUTPUT_HOOKS, config.get("feature_output_hook", ""), "feature_output", path)
    cfg, state = _read_weights(path, config, clt, (input_site, output_site))
    return_freed_memory()
    try:
        tc = build_transcoder_set(cfg, state, path)
    except UserError as e:
        raise UserError(f"{e}; layer shapes must match layer 0's: export it again") from None
    tc.source = str(path)
    return tc
