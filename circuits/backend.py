"""Edge kernels: the contraction of target gradients with the vectors of source nodes.

`feature_edges(grad, pos, feat, act, decoder)` computes, for the active features of a source layer,
    out[b, i] = act[i] * sum_o  decoder[feat[i], o, :] . grad[b, o, pos[i], :]
with grad `[B, n_out, n_pos, D]` (gradients at the MLP-output sites the layer writes to; any
strides, e.g. a slice of a `[B, L + 1, n_pos, D]` buffer), decoder `[F, n_out, D]` in its stored
layout (PLT/skip: a `[F, 1, D]` view of `[F, D]`; CLT: `[F, L - l, D]`), read in place. Output
`[B, n_active]` float32; float32, bfloat16 and float16 inputs are accumulated in float32.

Backends, in order of preference: cuda (compiled, CUDA tensors), cpp (compiled, C++/OpenMP), torch
(this file; the reference, and the fallback where nothing is compiled).
`GEMMA_CIRCUITS_BACKEND=torch|cpp|cuda` forces one where it is available.
"""

from __future__ import annotations

import os

import torch

from gemma_lm.errors import UserError

BACKENDS = ("cuda", "cpp", "torch")

_ext = None
_ext_error = None
try:
    from . import _edges as _ext  # type: ignore[attr-defined]
except Exception as e:
    # not built: no compiler at install time, a source checkout, or built for another torch
    _ext_error = f"{e.__class__.__name__}: {e}"

# working memory of the pure-PyTorch paths, per step (bytes)
_TORCH_CHUNK_BYTES = 64 << 20


# -- the reference ---------------------------------------------------------------------------------


@torch.no_grad()
def feature_edges_torch(
    grad: torch.Tensor,
    pos: torch.Tensor,
    feat: torch.Tensor,
    act: torch.Tensor,
    decoder: torch.Tensor,
) -> torch.Tensor:
    """Reference implementation (pure PyTorch, any device).

    Features active at the same position share their gradient rows, so each position's edges are one
    matrix product `[B, n_out * D] x [n_out * D, k]`. Working memory: one position's gradient rows
    and at most 64 MiB of its decoder rows at a time, never `n_active x n_out x D`."""
    _check_feature_args(grad, pos, feat, act, decoder)
    B, n_out, _, D = grad.shape
    out = torch.zeros(B, len(feat), dtype=torch.float32, device=grad.device)
    if len(feat) == 0 or B == 0:
        return out
    pos, feat, act = (
        pos.to(grad.device).long(),
        feat.to(grad.device).long(),
        act.to(grad.device).float(),
    )
    order = torch.argsort(pos, stable=True)
    positions, counts = torch.unique_consecutive(pos[order], return_counts=True)
    most = max(1, _TORCH_CHUNK_BYTES // max(1, 4 * n_out * D))  # decoder rows per step
    start = 0
    for p, count in zip(positions.tolist(), counts.tolist()):
        g = grad[:, :, p, :].float().reshape(B, n_out * D)  # a view when n_out == 1
        for s in range(start, start + count, most):
            idx = order[s : min(s + most, start + count)]
            rows = decoder.index_select(0, feat[idx].to(decoder.device)).to(
                grad.device, torch.float32
            )
            out[:, idx] = (g @ rows.reshape(len(idx), n_out * D).T) * act[idx]  # [B, c]
        start += count
    return out


# -- choosing a backend ----------------------------------------------------------------------------


def _available(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if _ext is None:
        return False
    if name == "cuda":
        return device.type == "cuda" and bool(_ext.has_cuda())
    return name == "cpp" and device.type == "cpu"


def _forced() -> str | None:
    name = os.environ.get("GEMMA_CIRCUITS_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise UserError(
            f"GEMMA_CIRCUITS_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)} "
            f"or unset it"
        )
    return name


def active_backend(device: torch.device | str = "cpu") -> str:
    """The backend `feature_edges` uses for tensors on `device`: cuda, then cpp, then torch."""
    dev = torch.device(device)
    forced = _forced()
    if forced and _available(forced, dev):
        return forced
    for name in BACKENDS:
        if _available(name, dev):
            return name
    return "torch"


def backend_reason(device: torch.device | str = "cpu") -> str:
    """One line: why `active_backend(device)` is what it is."""
    dev = torch.device(device)
    name = active_backend(dev)
    forced = _forced()
    note = ""
    if forced and forced != name:
        note = (
            f"; GEMMA_CIRCUITS_BACKEND={forced} asked for a backend not available for "
            f"{dev.type} tensors"
        )
    elif forced:
        return f"forced by GEMMA_CIRCUITS_BACKEND={forced}"
    if name == "cuda":
        return "compiled extension with CUDA kernels, tensors on a CUDA device" + note
    if name == "cpp":
        omp = "OpenMP" if _ext.has_openmp() else "no OpenMP: single-threaded"
        return (
            f"compiled C++ extension ({omp}, {_ext.simd()} micro-kernel, "
            f"{torch.get_num_threads()} threads)" + note
        )
    if _ext is None:
        return (
            f"compiled extension not available ({_ext_error}); the pure-PyTorch path is exact but "
            f"slower: reinstall with a C++ compiler (pip install --no-build-isolation -e .)" + note
        )
    if dev.type == "cuda":
        return (
            "compiled extension built without CUDA (the installed torch has no CUDA); "
            "PyTorch on the GPU" + note
        )
    return f"compiled extension has no kernel for {dev.type} tensors" + note


def _pick(backend: str | None, device: torch.device) -> str:
    """The named backend if it can run on `device`, else the best one that can."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown edge backend {backend!r}; use one of {BACKENDS}")
    if backend is not None and _available(backend, device):
        return backend
    return active_backend(device)


_EXT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# -- the public kernels ----------------------------------------------------------------------------


def feature_edges(
    grad: torch.Tensor,
    pos: torch.Tensor,
    feat: torch.Tensor,
    act: torch.Tensor,
    decoder: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Edge rows `[B, n_active]` float32 from the active features of one source layer. See the
    module docstring; `backend` names one of cuda/cpp/torch (default:
    `active_backend(grad.device)`)."""
    name = _pick(backend, grad.device)
    if (
        name != "torch"
        and grad.dtype in _EXT_DTYPES
        and decoder.dtype in _EXT_DTYPES
        and decoder.device == grad.device
    ):
        _check_feature_args(grad, pos, feat, act, decoder)
        dev = grad.device
        return _ext.feature_edges(grad, pos.to(dev), feat.to(dev), act.to(dev), decoder)
    return feature_edges_torch(grad, pos, feat, act, decoder)


class PositionSortedFeatures:
    """The active features of one source layer (sorted by position), prepared once for many
    `feature_edges` calls that each take the features before some position:
    `edges(grad, decoder, P)`.

    On a GPU with the compiled kernels the tiled kernel's plan is made here, on the host, once: a
    plan made per call copies the positions to the host, and each such copy waits for all queued GPU
    work (attribution makes one call per source layer per batch). Elsewhere `edges` is
    `feature_edges` on the first features."""

    def __init__(
        self,
        pos: torch.Tensor,
        feat: torch.Tensor,
        act: torch.Tensor,
        n_features: int,
        device: torch.device | str,
        backend: str | None = None,
    ):
        pos, feat = pos.detach().cpu().long(), feat.detach().cpu().long()
        if not (pos.dim() == feat.dim() == act.dim() == 1 and len(pos) == len(feat) == len(act)):
            raise ValueError(
                f"pos, feat and act must be 1-d of one length, got {tuple(pos.shape)}, "
                f"{tuple(feat.shape)}, {tuple(act.shape)}"
            )
        if len(pos) and (bool((pos[1:] < pos[:-1]).any()) or int(pos[0]) < 0):
            raise ValueError("pos must be non-negative and sorted (ascending)")
        if len(feat) and (int(feat.min()) < 0 or int(feat.max()) >= n_features):
            raise ValueError(
                f"feat must lie in [0, {n_features}), got [{int(feat.min())}, {int(feat.max())}]"
            )
        self.device, self.n_features = torch.device(device), n_features
        self.backend = _pick(backend, self.device)
        self.host_pos = pos.numpy()
        ends = torch.arange(int(pos[-1]) + 2 if len(pos) else 1)  # P = 0 .. last position + 1
        self.below = torch.searchsorted(pos, ends).numpy()  # below[P] = #(pos < P)
        self.pos, self.feat = pos.to(self.device), feat.to(self.device)
        self.act = act.detach().to(self.device, torch.float32)
        self.tiles = None
        if self.backend == "cuda":
            order, tiles = _ext.feature_tiles(pos)  # order is the identity: pos is sorted
            self.order, self.tiles = order.to(self.device), tiles.to(self.device)
            self.tiles_below = torch.searchsorted(tiles[:, 2].contiguous(), ends).numpy()

    def count(self, P: int | None = None) -> int:
        """How many features lie before position P (all of them for None)."""
        return (
            len(self.host_pos)
            if P is None
            else int(self.below[min(max(P, 0), len(self.below) - 1)])
        )

    def edges(
        self, grad: torch.Tensor, decoder: torch.Tensor, P: int | None = None
    ) -> torch.Tensor:
        """`[B, count(P)]` float32: `feature_edges(grad, pos, feat, act, decoder)` over the features
        at positions < P. grad `[B, n_out, n_pos, D]` must reach those features' positions."""
        m = self.count(P)
        if m and self.host_pos[m - 1] >= grad.shape[2]:
            raise ValueError(
                f"grad covers {grad.shape[2]} positions; the features reach position "
                f"{self.host_pos[m - 1]}"
            )
        if (
            self.tiles is None
            or grad.device != self.device
            or decoder.device != self.device
            or grad.dtype not in _EXT_DTYPES
            or decoder.dtype not in _EXT_DTYPES
        ):
            return feature_edges(
                grad, self.pos[:m], self.feat[:m], self.act[:m], decoder, backend=self.backend
            )
        if decoder.dim() != 3 or decoder.shape[0] < self.n_features:
            raise ValueError(
                f"decoder must be [F >= {self.n_features}, n_out, D], "
                f"got shape {tuple(decoder.shape)}"
            )
        n_tiles = (
            len(self.tiles)
            if P is None
            else int(self.tiles_below[min(max(P, 0), len(self.below) - 1)])
        )
        return _ext.feature_edges_tiled(
            grad, decoder, self.tiles, n_tiles, self.order, self.feat, self.act, m
        )


# -- influence -------------------------------------------------------------------------------------


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t on `device`. A host tensor bound for a GPU goes through pinned memory without blocking: a
    copy from pageable memory makes the host wait until the GPU has run all the work queued before
    it, so a host loop that copies a few indices per batch could never queue ahead of the GPU."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    # the pinned block is reused only after the copy
    return t.pin_memory().to(device, non_blocking=True)


def abs_rmatvec(block, row_weight, out, backend: str | None = None) -> None:
    """out += |block|^T row_weight, in place: block a scipy CSR `[rows, n]` (float32 data),
    row_weight `[rows]` float64, out `[n]` float64 contiguous. The step of attribution's influence
    estimate; the compiled pass reads each edge once, the scipy reference builds an absolute copy
    first."""
    import numpy as np

    if (
        _pick(backend, torch.device("cpu")) == "cpp"
        and block.data.dtype == np.float32
        and block.indptr.dtype == block.indices.dtype
        and out.flags.c_contiguous
        and out.dtype == np.float64
    ):
        w = np.asarray(row_weight, dtype=np.float64)
        parts = [
            torch.from_numpy(np.ascontiguousarray(a))
            for a in (block.indptr, block.indices, block.data, w)
        ]
        _ext.abs_rmatvec(*parts, torch.from_numpy(out))
        return
    import scipy.sparse as sp

    absolute = sp.csr_array((np.abs(block.data), block.indices, block.indptr), shape=block.shape)
    out += absolute.T @ np.asarray(row_weight, dtype=np.float64)


# -- argument checks (the same message whichever backend runs) -------------------------------------


def _check_feature_args(grad, pos, feat, act, decoder) -> None:
    if grad.dim() != 4:
        raise ValueError(f"grad must be [B, n_out, n_pos, D], got shape {tuple(grad.shape)}")
    if decoder.dim() != 3:
        raise ValueError(
            f"decoder must be [F, n_out, D] (a PLT decoder [F, D] as decoder.unsqueeze(1)), "
            f"got shape {tuple(decoder.shape)}"
        )
    if decoder.shape[1] != grad.shape[1] or decoder.shape[2] != grad.shape[3]:
        raise ValueError(
            f"decoder {tuple(decoder.shape)} does not match grad {tuple(grad.shape)}: "
            f"need decoder [F, n_out, D] for grad [B, n_out, n_pos, D]"
        )
    if not (pos.dim() == feat.dim() == act.dim() == 1 and len(pos) == len(feat) == len(act)):
        raise ValueError(
            f"pos, feat and act must be 1-d of one length, got {tuple(pos.shape)}, "
            f"{tuple(feat.shape)}, {tuple(act.shape)}"
        )
    if len(feat):
        if int(pos.min()) < 0 or int(pos.max()) >= grad.shape[2]:
            raise ValueError(
                f"pos must lie in [0, {grad.shape[2]}), got [{int(pos.min())}, {int(pos.max())}]"
            )
        if int(feat.min()) < 0 or int(feat.max()) >= decoder.shape[0]:
            raise ValueError(
                f"feat must lie in [0, {decoder.shape[0]}), "
                f"got [{int(feat.min())}, {int(feat.max())}]"
            )
