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
import warnings
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
SKIP = "affine_skip_connection"
RELEASED_TENSORS = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")
OUR_NAMES = {
    "w_enc": "W_enc",
    "b_enc": "b_enc",
    "threshold": "threshold",
    "w_dec": "W_dec",
    "b_dec": "b_dec",
    SKIP: "W_skip",
}
TORCH_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}
FLOAT_DTYPES = tuple(TORCH_DTYPES)
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


def _contiguous(
    found: dict[int, Path], where: Path, hint: str, file_of: Callable[[int], Path]
) -> list[Path]:
    """The files of layers 0.. in order; a gap is a UserError naming the missing files (`file_of`:
    where layer l's file would be)."""
    layers = sorted(found)
    if layers != list(range(len(layers))):
        missing = [l for l in range(layers[-1]) if l not in found]
        named = ", ".join(str(file_of(l)) for l in missing[:3]) + (
            ", ..." if len(missing) > 3 else ""
        )
        raise UserError(
            f"{where} has layers {layers}, but a transcoder set needs every layer from 0 to the "
            f"last: {named} missing{hint}"
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
    found = _find(Path(path))
    if found is None:
        raise NotGemmaScope(
            f"{path} is not a Gemma Scope 2 transcoder folder" + sets_inside_hint(Path(path))
        )
    return found


def _find(p: Path) -> GemmaScopeSet | None:
    """The set at `p` (see `locate`); None where `p` is no Gemma Scope 2 layout at all."""
    if p.is_dir():
        clt = _clt_files(p)
        if clt:
            config = p / "config.json"
            files = _contiguous(clt, p, "", lambda l: p / f"params_layer_{l}.safetensors")
            return GemmaScopeSet("clt", files, [config if config.is_file() else None], p)
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
            return _find(sets[0])
        if sets:
            raise UserError(
                f"{p} holds several Gemma Scope 2 transcoder sets; pass one of: "
                + ", ".join(str(s) for s in sets)
            )
    elif not p.exists():
        groups = _layer_variants(p.parent)
        if p.name in groups:
            return _plt_set(p, groups[p.name])
    return None


def sets_inside_hint(p: Path) -> str:
    """'; it holds <what>: pass <folder>' when the folders inside `p` (not `p` itself) hold Gemma
    Scope 2 sets, e.g. `p` is the parent of one CLT folder; '' otherwise. Only a hint: `p` itself
    is not a set (so no writer may take it for one and replace it)."""
    inside = []
    children = sorted(c for c in p.iterdir() if c.is_dir()) if p.is_dir() else []
    for child in children[:1000]:
        try:
            found = _find(child)
        except UserError:  # a broken set inside: still the folder to pass
            found = GemmaScopeSet("?", [], [], child)
        if found is not None:
            inside.append(found)
    if not inside:
        return ""
    what = {"clt": "the CLT folder", "plt": "the per-layer transcoders", "?": "the set"}
    if len(inside) == 1:
        (s,) = inside
        return f"; it holds {what[s.kind]} {s.where.name}: pass {s.where}"
    return "; it holds several sets: pass one of: " + ", ".join(str(s.where) for s in inside)


def _plt_set(variant_path: Path, layers: dict[int, Path]) -> GemmaScopeSet:
    hint = (
        "; the `transcoder` folders hold a few layers only: use `transcoder_all`"
        if variant_path.parent.name == "transcoder"
        else ""
    )
    folders = _contiguous(
        layers, variant_path, hint, lambda l: variant_path.parent / f"layer_{l}_{variant_path.name}"
    )
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
) -> tuple[dict[str, torch.Tensor], dict, str]:
    """The tensors of one params file under our names (memory-mapped views of it), its metadata and
    its dtype ('F32'). A CLT decoder is the view from layer `layer` on, so the entries for earlier
    layers are never read; decoders stay views (strided for CLTs) so that only the rows attribution
    reads become resident."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing = [k for k in RELEASED_TENSORS if k not in keys]
            if missing:
                raise UserError(
                    f"{path} lacks {', '.join(missing)}; it is not a Gemma Scope 2 transcoder "
                    "params file"
                )
            names = [*RELEASED_TENSORS, *([SKIP] if SKIP in keys else [])]
            dtype = _file_dtype(path, {k: f.get_slice(k).get_dtype() for k in names})
            _check_shapes(path, {k: list(f.get_slice(k).get_shape()) for k in names}, n_layers, clt)
            state = {
                ours: f.get_tensor(theirs) for theirs, ours in OUR_NAMES.items() if theirs in keys
            }
            if clt:
                state["W_dec"] = state["W_dec"][:, layer:, :]
            meta = dict(f.metadata() or {})
    except UserError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
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
    return state, meta, dtype


def _file_dtype(path: Path, dtypes: dict[str, str]) -> str:
    """The one floating dtype of a params file's tensors (`dtypes`: tensor -> 'F32', ...)."""
    for name, dt in dtypes.items():
        if dt not in FLOAT_DTYPES:
            raise UserError(
                f"{path}: {name} has dtype {dt}; expected floating point "
                f"({', '.join(FLOAT_DTYPES)}): the file is not a transcoder's or is corrupt"
            )
    first = next(iter(dtypes))
    for name, dt in dtypes.items():
        if dt != dtypes[first]:
            raise UserError(
                f"{path}: {name} is {dt} but {first} is {dtypes[first]}; expected one dtype "
                "per file: the file was assembled from different sources"
            )
    return dtypes[first]


def _check_shapes(path: Path, shapes: dict[str, list[int]], n_layers: int, clt: bool) -> None:
    """Every tensor's shape against the sizes its vectors give (d_model D from b_dec, width F from
    b_enc): a UserError naming each tensor, its shape, and the shape expected."""
    for name in ("b_enc", "b_dec"):
        if len(shapes[name]) != 1:
            raise UserError(f"{path}: {name} has shape {shapes[name]}; expected one dimension")
    (F,), (D,) = shapes["b_enc"], shapes["b_dec"]
    expect = {"w_enc": [D, F], "threshold": [F], "w_dec": [F, n_layers, D] if clt else [F, D]}
    if SKIP in shapes:
        expect[SKIP] = [D, D]
    problems = []
    for name, want in expect.items():
        got = shapes[name]
        if got == want:
            continue
        turned = len(got) == 2 and got == want[::-1] and got != want
        problems.append(
            f"{name} has shape {got}; expected {want}{' (transposed)' if turned else ''}"
        )
    if not problems:
        return
    dec = shapes["w_dec"]
    if clt and len(dec) == 3 and dec[0] == F and dec[2] == D and dec[1] > n_layers:
        missing = ", ".join(f"params_layer_{l}.safetensors" for l in range(n_layers, dec[1]))
        raise UserError(
            f"{path}: w_dec has shape {dec}, a CLT of {dec[1]} layers, but {path.parent} holds "
            f"params_layer_0 to {n_layers - 1} only: {missing} missing"
        )
    raise UserError(
        f"{path}: {', and '.join(problems)} (d_model {D} from b_dec, width {F} from b_enc"
        f"{f', {n_layers} layers' if clt else ''})"
    )


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
    path, dtype: torch.dtype | None = None, progress: bool = False, n_layers: int | None = None
) -> TranscoderSet:
    """A TranscoderSet from a Gemma Scope 2 folder (see `locate`), or from the Hub
    (`hf://<repo>/<subfolder>` or `google/gemma-scope-2-<size>-<pt|it>/<subfolder>`) when online.
    `n_layers`: the layers the set must have (a model's); fewer on disk names the missing files."""
    if not Path(path).exists() and is_hub_spec(str(path)):
        path = download(str(path))
    found = locate(path)
    clt = found.kind == "clt"
    configs = (
        [_check_config(found.configs[0], None, found.where)]
        if clt
        else [
            _check_config(c, l, f.parent)
            for l, (c, f) in enumerate(zip(found.configs, found.files))
        ]
    )
    _check_layer_count(found, configs, n_layers)
    state, stored, first = {}, {}, None
    for l, file in enumerate(
        tqdm(found.files, desc="reading Gemma Scope 2", unit="layer", disable=not progress)
    ):
        tensors, meta, file_dtype = _read_layer(file, l, len(found.files), clt)
        stored = stored or _our_config(meta, file)
        layout = (tuple(tensors["W_enc"].shape), "W_skip" in tensors, file_dtype)
        first = first or (layout, file)
        _same_set(file, layout, *first, cast=dtype is not None)
        for name, t in tensors.items():
            state[f"{name}.{l}"] = t if name == "W_dec" else t.contiguous()
    if clt:
        check_clt_decoder_layout(found.files)
    (D, F), skip, _ = first[0]
    cfg = _set_config(found, configs, stored, len(found.files), D, F, skip)
    for l in range(len(found.files)):  # relu(pre) * (pre > t) == pre * (pre > max(t, 0))
        state[f"threshold.{l}"] = state[f"threshold.{l}"].clamp(min=0)
    return build_transcoder_set(cfg, state, found.where, dtype)


def _same_set(file: Path, layout: tuple, first: tuple, first_file: Path, cast: bool) -> None:
    """Refuse a layer whose sizes, skip term or (unless the set is `cast` on loading) dtype differ
    from the first layer's. Mixed dtypes are refused rather than cast, since casting would read
    every decoder into memory and pick a precision the user did not choose."""
    (shape, skip, dt), (shape0, skip0, dt0) = layout, first
    if (shape, skip) != (shape0, skip0):
        raise UserError(
            f"{file} holds w_enc {list(shape)}{' with' if skip else ' without'} a skip connection, "
            f"but {first_file} holds {list(shape0)}{' with' if skip0 else ' without'}: the layers "
            "are from different sets"
        )
    if dt != dt0 and not cast:
        raise UserError(
            f"{file} holds {dt} tensors but {first_file} holds {dt0}: a set computes in one dtype; "
            "pass dtype= (--dtype) to cast every layer, or replace the odd layer's files"
        )


def _check_layer_count(found: GemmaScopeSet, configs: list[dict], n_layers: int | None) -> None:
    """Refuse a set with fewer layers on disk than `n_layers` (a model's) or, for a CLT, than its
    config.json's width counts, naming the missing files."""
    have = len(found.files)
    want, theirs = n_layers, "the model's"
    width = configs[0].get("width") if configs else None
    if found.kind == "clt" and isinstance(width, int) and want is None:
        try:
            with safe_open(str(found.files[0]), framework="pt", device="cpu") as f:
                per_layer = f.get_slice("b_enc").get_shape() if "b_enc" in f.keys() else []
        except (SafetensorError, OSError, ValueError):
            per_layer = []  # reading the file reports it
        if len(per_layer) == 1 and per_layer[0] and width % per_layer[0] == 0:
            want = width // per_layer[0]
            theirs = f"config.json's (width {width} = {want} x {per_layer[0]} features)"
    if want is None or want <= have:
        return
    if found.kind == "clt":
        names = [found.where / f"params_layer_{l}.safetensors" for l in range(have, want)]
    else:
        names = [found.where.parent / f"layer_{l}_{found.where.name}" for l in range(have, want)]
    listed = ", ".join(str(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    raise UserError(
        f"{found.where} holds layers 0 to {have - 1}: {have} layers vs {theirs} {want}; {listed} "
        "missing"
    )


# -- the layout of a CLT decoder -------------------------------------------------------------------
SAMPLED_ROWS = 8  # features per sampled block of w_dec
SAMPLED_BLOCKS = 8  # blocks spread over the features
ZERO_RATIO = 1e-3  # "zero" entries: at most this share of the largest entry of the sampled rows


def check_clt_decoder_layout(files: list[Path]) -> None:
    """Check from the weights that CLT decoders `w_dec [F, L, D]` are indexed by absolute output
    layer (source layer l's entries for output layers < l zero). Indexed by output - source
    instead (the last l zero) is refused: read as absolute it would be a different function. A
    decoder matching neither gets a warning naming what was found, and is read as absolute: the
    entries before l never enter the forward pass, so values left in them do not change it.
    Reads a few sampled rows of each file, through ordinary reads (the decoders stay unread)."""
    absolute, relative, seen = [], [], []
    for l, path in enumerate(files[1:], start=1):
        rows = _sampled_decoder_rows(path)  # [n, L, D]
        scale = float(rows.abs().max()) if rows.numel() else 0.0
        if scale == 0.0:
            continue  # dead features only: nothing to tell
        early = float(rows[:, :l].abs().max()) / scale
        late = float(rows[:, rows.shape[1] - l :].abs().max()) / scale
        absolute.append(early <= ZERO_RATIO)
        relative.append(late <= ZERO_RATIO)
        seen.append(f"layer {l}: {early:.2g} before it, {late:.2g} in the last {l}")
    if all(absolute):
        return
    if all(relative):
        raise UserError(
            f"{files[0].parent}: the CLT decoders are indexed by output layer - source layer (in "
            "params_layer_<l>, w_dec's last l output-layer entries are zero and the first l not); "
            "Gemma Scope 2 indexes w_dec [F, n_layers, D] by absolute output layer (entries before "
            "l unused): rewrite the files that way (w_dec[:, l + j] = the decoder into layer l + j)"
        )
    warnings.warn(
        f"{files[0].parent}: the CLT decoders are not zero before their source layer, as Gemma "
        f"Scope 2's absolute output-layer indexing leaves them, nor in their last entries "
        f"(largest entry there relative to the sampled rows: {'; '.join(seen[:4])}); reading them "
        "as absolute, as circuit-tracer does",
        stacklevel=3,
    )


def _sampled_decoder_rows(path: Path) -> torch.Tensor:
    """A few blocks of rows of a params file's w_dec `[n, L, D]`, spread over the features."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_len))["w_dec"]
        start = 8 + header_len + info["data_offsets"][0]
        n_features, *inner = info["shape"]
        itemsize = torch.empty(0, dtype=TORCH_DTYPES[info["dtype"]]).element_size()
        row_bytes = itemsize * inner[0] * inner[1]
        step = max(n_features // SAMPLED_BLOCKS, SAMPLED_ROWS)
        blocks = []
        for first in range(0, n_features, step):
            n = min(SAMPLED_ROWS, n_features - first)
            f.seek(start + first * row_bytes)
            data = bytearray(f.read(n * row_bytes))
            block = torch.frombuffer(data, dtype=TORCH_DTYPES[info["dtype"]]) if data else None
            if block is not None:
                blocks.append(block.float().reshape(n, *inner))
    return torch.cat(blocks) if blocks else torch.zeros(0, *inner)


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
            extra = base.get("extra")
            if isinstance(extra, dict) and "gemma_scope_variant" in extra:  # its folder now
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
    if len(parts) >= 2 and parts[0].lower() == "mwhanna" and parts[1].startswith("gemma-scope-2"):
        google = "/".join(["hf://google", *parts[1:]])
        raise UserError(
            f"{'/'.join(parts[:2])} holds only a config pointing at Google's files, not the "
            f"weights; load them from google/{parts[1]}: pass {google}"
        )
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
