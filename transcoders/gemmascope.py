"""Gemma Scope 2 transcoders (Hugging Face repos google/gemma-scope-2-<size>-<pt|it>): read and
write the released layout. Sources and the reasoning behind each choice: docs/gemma_scope_2.md.

Layout inside a repo (D = d_model, F = features of one layer, L = layers):
  transcoder_all/layer_<l>_width_<W>_l0_<S>[_affine]/   one folder per layer
                                                         (`transcoder/` holds a few layers)
      config.json         {"hf_hook_point_in": "model.layers.<l>.pre_feedforward_layernorm.output",
                           "hf_hook_point_out":
                               "model.layers.<l>.post_feedforward_layernorm.output",
                           "width": F, "model_name", "architecture": "jump_relu", "l0",
                           "affine_connection", "type": "transcoder"}
      params.safetensors  w_enc [D, F], b_enc [F], threshold [F], w_dec [F, D], b_dec [D],
                          affine_skip_connection [D, D] (only in `_affine` folders)
  clt/width_<W>_l0_<S>[_affine]/                         one folder per cross-layer transcoder
      config.json         as above with "model.layers.{all}..." hooks, "width": L * F, "type": "clt"
      params_layer_<l>.safetensors   as above, but w_dec [F, L, D]: source layer l's decoder into
                                     every layer's MLP output, indexed by absolute layer (entries
                                     before l unused)

Forward pass (the release's reference code): pre = x @ w_enc + b_enc;
f = relu(pre) * (pre > threshold); y = f @ w_dec + b_dec + x @ affine_skip_connection. Our
TranscoderSet stores the same orientation (W_enc [D, F], W_dec [F, D], W_skip [D, D] applied as
x @ W_skip), so nothing is transposed. Its JumpReLU is pre * (pre > threshold), which equals
relu(pre) * (pre > max(threshold, 0)) exactly, so negative thresholds are read as 0.

Writing adds our TranscoderConfig to each params file's safetensors metadata (key
`gemma_circuits_config`), so activation (ReLU, BatchTopK), k, Matryoshka prefixes, metrics and model
name survive a round trip while config.json and the tensor names stay exactly the released ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from gemma_lm.errors import UserError
from gemma_lm.weights import nonfinite_tensors_in_file

from .model import TranscoderConfig, TranscoderSet
from .native import atomic_directory, build_transcoder_set, config_from_dict, config_json, read_json

PLT_SITES = ("transcoder_all", "transcoder")
CLT_SITE = "clt"
LAYER_FOLDER = re.compile(r"^layer_(\d+)_(width_\w+)$")
CLT_FOLDER = re.compile(r"^width_\w+$")
CLT_FILE = re.compile(r"^params_layer_(\d+)\.safetensors$")
PARAMS_FILE = "params.safetensors"
HOOK_IN = "model.layers.{}.pre_feedforward_layernorm.output"
HOOK_OUT = "model.layers.{}.post_feedforward_layernorm.output"
META_KEY = "gemma_circuits_config"
HUB_SPEC = re.compile(r"^[\w.-]+/gemma-scope-2[\w.-]*/.+$")  # owner/gemma-scope-2-.../subfolder


class NotGemmaScope(UserError):
    """The path is not a Gemma Scope 2 transcoder layout at all (as opposed to a broken one)."""


@dataclass
class GemmaScopeSet:
    """A located set: one params file per layer (PLT) or per source layer (CLT), in layer order."""

    kind: str  # "plt" (per-layer folders) or "clt"
    files: list[Path]
    configs: list[Path | None]  # config.json of each layer's folder (PLT) or [the CLT folder's]
    where: Path


# -- locating --------------------------------------------------------------------------------------
def _layer_variants(folder: Path) -> dict[str, dict[int, Path]]:
    """{variant ('width_16k_l0_small_affine'): {layer: folder}} of the per-layer folders in
    `folder`."""
    groups: dict[str, dict[int, Path]] = {}
    if not folder.is_dir():
        return groups
    for child in folder.iterdir():
        m = LAYER_FOLDER.match(child.name)
        if m and (child / PARAMS_FILE).is_file():
            groups.setdefault(m.group(2), {})[int(m.group(1))] = child
    return groups


def _clt_files(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): c for c in folder.iterdir() if (m := CLT_FILE.match(c.name))}


def _contiguous(found: dict[int, Path], where: Path, hint: str) -> list[Path]:
    layers = sorted(found)
    if layers != list(range(len(layers))):
        raise UserError(
            f"{where} has layers {layers}, but a transcoder set needs every layer from 0 to the "
            f"last{hint}"
        )
    return [found[l] for l in layers]


def _candidates(root: Path) -> list[Path]:
    """The sets inside a repo root: <site>/<variant> (virtual paths for per-layer folders) and
    clt/<variant>."""
    found = []
    for site in PLT_SITES:
        found += [root / site / v for v in sorted(_layer_variants(root / site))]
    clt = root / CLT_SITE
    if clt.is_dir():
        found += [c for c in sorted(clt.iterdir()) if CLT_FOLDER.match(c.name) and _clt_files(c)]
    return found


def locate(path) -> GemmaScopeSet:
    """Find the Gemma Scope 2 set at `path`: a CLT folder, a folder of per-layer folders holding one
    variant, `<folder>/<variant>` (per-layer folders `<folder>/layer_<l>_<variant>`), or a repo root
    holding one set."""
    p = Path(path)
    if p.is_dir():
        clt = _clt_files(p)
        if clt:
            config = p / "config.json"
            return GemmaScopeSet(
                "clt", _contiguous(clt, p, ""), [config if config.is_file() else None], p
            )
        if (p / PARAMS_FILE).is_file() and LAYER_FOLDER.match(p.name):
            m = LAYER_FOLDER.match(p.name)
            raise UserError(
                f"{p} is one layer of a Gemma Scope 2 transcoder set; pass {p.parent / m.group(2)} "
                "to load every layer"
            )
        groups = _layer_variants(p)
        if len(groups) > 1:
            raise UserError(
                f"{p} holds several Gemma Scope 2 variants; pass one of: "
                + ", ".join(str(p / v) for v in sorted(groups))
            )
        if groups:
            ((variant, layers),) = groups.items()
            return _plt_set(p / variant, layers)
        sets = _candidates(p)
        if len(sets) == 1:
            return locate(sets[0])
        if sets:
            raise UserError(
                f"{p} holds several Gemma Scope 2 transcoder sets; pass one of: "
                + ", ".join(str(s) for s in sets)
            )
    elif not p.exists():
        groups = _layer_variants(p.parent)
        if p.name in groups:
            return _plt_set(p, groups[p.name])
    raise NotGemmaScope(f"{p} is not a Gemma Scope 2 transcoder folder")


def _plt_set(variant_path: Path, layers: dict[int, Path]) -> GemmaScopeSet:
    hint = (
        "; the `transcoder` folders hold a few layers only: use `transcoder_all`"
        if variant_path.parent.name == "transcoder"
        else ""
    )
    folders = _contiguous(layers, variant_path, hint)
    return GemmaScopeSet(
        "plt",
        [f / PARAMS_FILE for f in folders],
        [f / "config.json" if (f / "config.json").is_file() else None for f in folders],
        variant_path,
    )


def is_gemmascope2_dir(path) -> bool:
    """True if `path` is laid out as a Gemma Scope 2 transcoder set (even a broken one the loader
    will report)."""
    try:
        locate(path)
    except NotGemmaScope:
        return False
    except UserError:
        return True
    return True


def is_hub_spec(spec: str) -> bool:
    """`hf://<owner>/<repo>/<subfolder>`, or `<owner>/gemma-scope-2-.../<subfolder>` naming a Hub
    repo."""
    return spec.startswith("hf://") or bool(HUB_SPEC.match(spec))


# -- reading ---------------------------------------------------------------------------------------
def _check_config(path: Path | None, layer: int | None, folder: Path) -> dict:
    """Validate the config.json of `folder` against what a transcoder of `layer` (None: a CLT) must
    read and write. Without one, only the release's transcoder folders say what the files are."""
    if path is None:
        if folder.parent.name not in PLT_SITES + (CLT_SITE,):
            raise UserError(
                f"{folder / 'config.json'} is missing; Gemma Scope 2 ships one in every folder, "
                "and without it the files cannot be told apart from an SAE's"
            )
        return {}
    cfg = read_json(path)
    kind = cfg.get("type")
    if kind is not None and kind not in ("transcoder", "clt"):
        raise UserError(
            f"{path} describes a Gemma Scope 2 {kind}, not a transcoder (it reads "
            f"{cfg.get('hf_hook_point_in')}); pass a transcoder_all/ or clt/ folder"
        )
    hook_in, hook_out = str(cfg.get("hf_hook_point_in", "")), str(cfg.get("hf_hook_point_out", ""))
    if layer is None:
        ok = hook_in.endswith(".pre_feedforward_layernorm.output") and hook_out.endswith(
            ".post_feedforward_layernorm.output"
        )
    else:
        ok = _hook_layer(hook_in, "pre") == layer and _hook_layer(hook_out, "post") == layer
    if (hook_in or hook_out) and not ok:
        raise UserError(
            f"{path}: reads {hook_in!r} and writes {hook_out!r}; gemma-circuits transcoders read "
            f"{HOOK_IN.format(layer if layer is not None else '<l>')} and write the "
            "post_feedforward_layernorm output of the same layer"
        )
    return cfg


def _hook_layer(hook: str, which: str) -> int | None:
    m = re.search(rf"(?:^|\.)layers\.(\d+)\.{which}_feedforward_layernorm\.output$", hook)
    return int(m.group(1)) if m else None


def _read_layer(
    path: Path, layer: int, n_layers: int, clt: bool
) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of one params file under our names (memory-mapped views of it), and its metadata.
    A CLT decoder is the view from layer `layer` on, so the entries for earlier layers are never
    read; decoders stay views (strided for CLTs) so that only the rows attribution reads become
    resident."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing = [
                k for k in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec") if k not in keys
            ]
            if missing:
                raise UserError(
                    f"{path} lacks {', '.join(missing)}; it is not a Gemma Scope 2 transcoder "
                    "params file"
                )
            w_enc = f.get_tensor("w_enc")
            if w_enc.dim() != 2:
                raise UserError(
                    f"{path}: w_enc has shape {list(w_enc.shape)}; expected [d_model, width]"
                )
            D, F = w_enc.shape
            dec_shape = f.get_slice("w_dec").get_shape()
            want = [F, n_layers, D] if clt else [F, D]
            if list(dec_shape) != want:
                what = f"a CLT of {n_layers} layers" if clt else "a per-layer transcoder"
                raise UserError(
                    f"{path}: w_dec has shape {list(dec_shape)}; expected {want} ({what})"
                )
            state = {
                "W_enc": w_enc,
                "b_enc": f.get_tensor("b_enc"),
                "b_dec": f.get_tensor("b_dec"),
                "threshold": f.get_tensor("threshold"),
                "W_dec": f.get_tensor("w_dec")[:, layer:, :] if clt else f.get_tensor("w_dec"),
            }
            if "affine_skip_connection" in keys:
                state["W_skip"] = f.get_tensor("affine_skip_connection")
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
            "download it again"
        ) from None
    for name in nonfinite_tensors_in_file(path):  # read apart from the views, which stay unread
        raise UserError(
            f"{path}: {name} holds NaN or infinite values; the file is corrupt: download it again"
        )
    for t in state.values():
        t.finite_checked = True
    return state, meta


def _our_config(meta: dict, path: Path) -> dict:
    """The TranscoderConfig a gemma-circuits writer stored in the metadata; {} for released
    files."""
    if META_KEY not in meta:
        return {}
    try:
        stored = json.loads(meta[META_KEY])
    except json.JSONDecodeError:
        raise UserError(
            f"{path}: the {META_KEY} metadata is not valid JSON; the file is corrupt"
        ) from None
    return stored if isinstance(stored, dict) else {}


def load_gemmascope2(
    path, dtype: torch.dtype | None = None, progress: bool = False
) -> TranscoderSet:
    """A TranscoderSet from a Gemma Scope 2 folder (see `locate`), or from the Hub
    (`hf://<repo>/<subfolder>` or `google/gemma-scope-2-<size>-<pt|it>/<subfolder>`) when online."""
    if not Path(path).exists() and is_hub_spec(str(path)):
        path = download(str(path))
    found = locate(path)
    clt = found.kind == "clt"
    n_layers = len(found.files)
    configs = (
        [_check_config(found.configs[0], None, found.where)]
        if clt
        else [
            _check_config(c, l, f.parent)
            for l, (c, f) in enumerate(zip(found.configs, found.files))
        ]
    )
    state, stored, first = {}, {}, None
    for l, file in enumerate(
        tqdm(found.files, desc="reading Gemma Scope 2", unit="layer", disable=not progress)
    ):
        tensors, meta = _read_layer(file, l, n_layers, clt)
        stored = stored or _our_config(meta, file)
        shapes = (tuple(tensors["W_enc"].shape), "W_skip" in tensors)
        if first is None:
            first = (shapes, file)
        elif shapes != first[0]:
            raise UserError(
                f"{file} holds w_enc {list(shapes[0])}{' with' if shapes[1] else ' without'} a "
                f"skip connection, but {first[1]} holds "
                f"{list(first[0][0])}{' with' if first[0][1] else ' without'}: the layers are from "
                "different sets"
            )
        for name, t in tensors.items():
            state[f"{name}.{l}"] = t if name == "W_dec" else t.contiguous()
    (D, F), skip = first[0]
    cfg = _set_config(found, configs, stored, n_layers, D, F, skip)
    for l in range(
        n_layers
    ):  # relu(pre) * (pre > t) == pre * (pre > max(t, 0)): see the module docstring
        state[f"threshold.{l}"] = state[f"threshold.{l}"].clamp(min=0)
    return build_transcoder_set(cfg, state, found.where, dtype)


def _set_config(
    found: GemmaScopeSet,
    configs: list[dict],
    stored: dict,
    n_layers: int,
    D: int,
    F: int,
    skip: bool,
) -> TranscoderConfig:
    """Structure from the tensors; descriptive fields from our stored config when a gemma-circuits
    writer made the files, otherwise from config.json."""
    clt = found.kind == "clt"
    cfg = configs[0] if configs else {}
    for c, file in zip(configs, found.configs):
        if c.get("affine_connection") is not None and bool(c["affine_connection"]) != skip:
            raise UserError(
                f"{file} says affine_connection={c['affine_connection']}, but the params file "
                f"{'has' if skip else 'has no'} affine_skip_connection"
            )
    kind = "clt" if clt else ("skip" if skip else "plt")
    base = {
        "kind": kind,
        "n_layers": n_layers,
        "d_model": D,
        "d_sae": F,
        "activation": "jumprelu",
        "skip": skip,
        "model_name": str(cfg.get("model_name", "")),
        "extra": {
            "source": "gemma-scope-2",
            "gemma_scope_variant": found.where.name,
            **({"gemma_scope_config": cfg} if cfg else {}),
        },
    }
    if isinstance(cfg.get("l0"), (int, float)):
        base["metrics"] = {"l0_target": cfg["l0"]}
    if stored:
        same_shape = (stored.get("n_layers"), stored.get("d_model"), stored.get("d_sae")) == (
            n_layers,
            D,
            F,
        )
        same_kind = (stored.get("kind") == "clt") == clt and bool(stored.get("skip")) == skip
        if same_shape and same_kind:
            keep = (
                "kind",
                "activation",
                "k",
                "model_name",
                "input_site",
                "output_site",
                "matryoshka_prefixes",
                "metrics",
                "extra",
            )
            base.update({k: stored[k] for k in keep if k in stored})
            if "gemma_scope_variant" in (base.get("extra") or {}):  # the folder it now sits in
                base["extra"] = {**base["extra"], "gemma_scope_variant": found.where.name}
    return config_from_dict(base, found.where)


# -- writing ---------------------------------------------------------------------------------------
def width_label(n: int) -> str:
    """The release's width names: 16384 -> '16k', 65536 -> '65k', 262080 -> '262k', 1048576 ->
    '1m'."""
    if n >= 1_000_000:
        return f"{n // 1_000_000}m"
    if n >= 1000:
        return f"{n // 1000}k"
    return str(n)


def _l0_of(tc: TranscoderSet) -> float | None:
    l0 = (
        tc.cfg.metrics.get("l0", tc.cfg.metrics.get("l0_target"))
        if isinstance(tc.cfg.metrics, dict)
        else None
    )
    return float(l0) if isinstance(l0, (int, float)) else None


def _thresholds(tc: TranscoderSet, layer: int) -> torch.Tensor:
    """Thresholds in the release's convention (see the module docstring), or a UserError naming what
    the layout cannot hold."""
    act = tc.cfg.activation
    if act == "topk":
        raise UserError(
            "Gemma Scope 2 files hold JumpReLU transcoders; a TopK set's activation depends on the "
            "other features of each position and cannot be written as a threshold: convert it to "
            "native or circuit-tracer instead"
        )
    if act == "relu":
        return torch.zeros_like(tc.threshold[layer])
    t = tc.threshold[layer]
    if bool((t < 0).any()):
        raise UserError(
            f"layer {layer} has {int((t < 0).sum())} negative thresholds; Gemma Scope 2's JumpReLU "
            "(relu(x) * [x > threshold]) cannot produce the negative activations they allow: "
            "convert to native or circuit-tracer instead"
        )
    return t


def _l0_label(tc: TranscoderSet, l0_label: str | None, l0: float | None) -> str:
    """The `l0_<label>` part of the folder names: `l0_label`, else the released one of a set read
    from Gemma Scope 2 ('l0_small'), else the set's L0."""
    released = re.search(
        r"_l0_([A-Za-z0-9]+)(?:_affine)?$", str((tc.cfg.extra or {}).get("gemma_scope_variant", ""))
    )
    label = l0_label or (
        released.group(1) if released else str(round(l0)) if l0 is not None else "unknown"
    )
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise UserError(
            f"l0 label {label!r} must be letters and digits only (it becomes part of folder names)"
        )
    return label


def _release_config(tc: TranscoderSet, layer: int | None, l0: float | None) -> str:
    """config.json of one layer's folder, or (layer=None) of a CLT's folder."""
    c = tc.cfg
    at = "{all}" if layer is None else layer
    return (
        json.dumps(
            {
                "hf_hook_point_in": HOOK_IN.format(at),
                "hf_hook_point_out": HOOK_OUT.format(at),
                "width": c.n_layers * c.d_sae if tc.is_clt else c.d_sae,
                "model_name": c.model_name,
                "architecture": "jump_relu",
                "l0": round(l0) if l0 is not None else None,
                "affine_connection": tc.W_skip is not None,
                "type": "clt" if tc.is_clt else "transcoder",
            },
            indent=2,
        )
        + "\n"
    )


def _params(tc: TranscoderSet, layer: int, threshold: torch.Tensor) -> dict[str, torch.Tensor]:
    """One layer's tensors under the release's names, on the CPU; a CLT's w_dec is `[F, L, D]`."""
    c = tc.cfg
    if tc.is_clt:  # absolute output-layer index; the entries before `layer` stay zero
        w_dec = torch.zeros(c.d_sae, c.n_layers, c.d_model, dtype=tc.W_dec[layer].dtype)
        w_dec[:, layer:] = tc.W_dec[layer].detach().cpu()
    else:
        w_dec = tc.W_dec[layer]
    out = {
        "w_enc": tc.W_enc[layer],
        "b_enc": tc.b_enc[layer],
        "threshold": threshold,
        "w_dec": w_dec,
        "b_dec": tc.b_dec[layer],
    }
    if tc.W_skip is not None:
        out["affine_skip_connection"] = tc.W_skip[layer]
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _write_layers(
    site: Path,
    tc: TranscoderSet,
    variant: str,
    thresholds: list[torch.Tensor],
    l0: float | None,
    meta: dict[str, str],
    progress: bool,
) -> None:
    """Every layer's files under `site` (transcoder_all/ or clt/), `meta` in each params file."""
    if tc.is_clt:
        (site / variant).mkdir(parents=True)
        (site / variant / "config.json").write_text(_release_config(tc, None, l0))
    for l in tqdm(
        range(tc.n_layers), desc="writing Gemma Scope 2", unit="layer", disable=not progress
    ):
        params = _params(tc, l, thresholds[l])
        if tc.is_clt:
            save_file(params, str(site / variant / f"params_layer_{l}.safetensors"), metadata=meta)
        else:
            folder = site / f"layer_{l}_{variant}"
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(_release_config(tc, l, l0))
            save_file(params, str(folder / PARAMS_FILE), metadata=meta)


def save_gemmascope2(
    tc: TranscoderSet,
    dst,
    l0_label: str | None = None,
    progress: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """Write `tc` at `dst` as a Gemma Scope 2 repo would hold it (transcoder_all/... per-layer
    folders, or clt/<variant>/), atomically, replacing a `dst` that `replaceable` accepts (by
    default: a Gemma Scope 2 set). Returns the set's path inside `dst`, which `load_any` reads."""
    c = tc.cfg
    thresholds = [_thresholds(tc, l) for l in range(c.n_layers)]  # refuse before writing anything
    l0 = _l0_of(tc)
    label = _l0_label(tc, l0_label, l0)
    width = c.n_layers * c.d_sae if tc.is_clt else c.d_sae
    variant = f"width_{width_label(width)}_l0_{label}{'_affine' if tc.W_skip is not None else ''}"
    meta = {"format": "pt", META_KEY: config_json(c)}
    site = CLT_SITE if tc.is_clt else PLT_SITES[0]
    dst = Path(dst)
    with atomic_directory(dst, replaceable or is_gemmascope2_dir) as build:
        _write_layers(build / site, tc, variant, thresholds, l0, meta, progress)
    return dst / site / variant


# -- the Hub ---------------------------------------------------------------------------------------
def download(spec: str) -> Path:
    """Download the params and config files of one set from the Hugging Face Hub; the local path of
    the set. Offline (or without huggingface_hub) this is a UserError saying how to fetch the files
    by hand."""
    parts = spec.removeprefix("hf://").strip("/").split("/")
    if len(parts) < 3:
        raise UserError(
            f"{spec!r}: name a set inside the repo, e.g. hf://google/gemma-scope-2-270m-pt/"
            "clt/width_262k_l0_medium_affine or .../transcoder_all/width_16k_l0_small_affine"
        )
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    parent, _, name = sub.rpartition("/")
    patterns = [f"{sub}/config.json", f"{sub}/params*.safetensors"]
    if parent:
        patterns += [
            f"{parent}/layer_*_{name}/config.json",
            f"{parent}/layer_*_{name}/{PARAMS_FILE}",
        ]
    include = (
        f"{parent}/layer_*_{name}/*" if parent and not parent.endswith(CLT_SITE) else f"{sub}/*"
    )
    by_hand = (
        f"download it where you have network (hf download {repo} --include '{include}' --exclude "
        f"'*examples.safetensors' --local-dir DIR) and pass DIR/{sub}"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"loading {spec} from the Hub needs huggingface_hub (pip install huggingface_hub); or "
            + by_hand
        ) from None
    try:
        local = Path(snapshot_download(repo_id=repo, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise UserError(
            f"could not download {repo}/{sub} from the Hugging Face Hub "
            f"({e.__class__.__name__}); {by_hand}"
        ) from None
    if not is_gemmascope2_dir(local / sub):
        raise UserError(
            f"{repo} has no Gemma Scope 2 transcoder set at {sub}; check the name on "
            f"https://huggingface.co/{repo}/tree/main"
        )
    return local / sub
