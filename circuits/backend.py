"""Edge kernels: the contraction of target gradients with the vectors of source nodes.

`feature_edges(grad, pos, feat, act, decoder)` computes, for the active features of one source layer,
    out[b, i] = act[i] * sum_o  decoder[feat[i], o, :] . grad[b, o, pos[i], :]
with grad `[B, n_out, n_pos, D]` (gradients at the MLP-output sites the layer writes to; any strides, e.g.
a slice of a `[B, L + 1, n_pos, D]` buffer), decoder `[F, n_out, D]` in its stored layout (PLT/skip: a
`[F, 1, D]` view of `[F, D]`; CLT: `[F, L - l, D]`), read in place. Output `[B, n_active]` float32;
float32, bfloat16 and float16 inputs are accumulated in float32.

`feature_edges_sparse(...)` returns the same edges in CSR form, keeping only |value| >= threshold and/or
the top-k of each row, computed in row blocks so the dense `[B, n_active]` never exists at once.
`vector_edges(grad, vectors)` is the contraction for sources with one vector each (error nodes, token
embeddings): out[b, r] = grad[b, r, :] . vectors[r, :].

Backends, in order of preference: cuda (compiled, CUDA tensors), cpp (compiled, C++/OpenMP), torch (this
file; the reference, and the fallback where nothing is compiled). `GEMMA_CIRCUITS_BACKEND=torch|cpp|cuda`
forces one where it is available. One exception, measured: `vector_edges` on CUDA tensors uses PyTorch unless
the cuda backend is asked for, since one batched matmul beats the kernel there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gemma_lm.errors import UserError

BACKENDS = ("cuda", "cpp", "torch")

_ext = None
_ext_error = None
try:
    from . import _edges as _ext  # type: ignore[attr-defined]
except (
    Exception
) as e:  # not built: no compiler at install time, a source checkout, or built for another torch
    _ext_error = f"{e.__class__.__name__}: {e}"

# working memory of the pure-PyTorch paths, per step (bytes)
_TORCH_CHUNK_BYTES = 64 << 20


# -- the reference ------------------------------------------------------------------------------------


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
    matrix product `[B, n_out * D] x [n_out * D, k]`. Working memory: one position's gradient rows and at
    most 64 MiB of its decoder rows at a time, never `n_active x n_out x D`."""
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


@torch.no_grad()
def vector_edges_torch(grad: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Reference for `vector_edges`: `[B, R]` float32, in chunks of rows to bound working memory."""
    _check_vector_args(grad, vectors)
    B, R, D = grad.shape
    out = torch.empty(B, R, dtype=torch.float32, device=grad.device)
    chunk = max(1, _TORCH_CHUNK_BYTES // max(1, 4 * B * D))
    for r in range(0, R, chunk):
        g = grad[:, r : r + chunk].float().transpose(0, 1)  # [c, B, D]
        v = vectors[r : r + chunk].to(grad.device, torch.float32)[:, :, None]  # [c, D, 1]
        out[:, r : r + chunk] = torch.bmm(g, v)[..., 0].T
    return out


# -- choosing a backend ------------------------------------------------------------------------------


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
        note = f"; GEMMA_CIRCUITS_BACKEND={forced} asked for a backend not available for {dev.type} tensors"
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
            f"compiled extension not available ({_ext_error}); the pure-PyTorch path is exact but slower: "
            f"reinstall with a C++ compiler (pip install --no-build-isolation -e .)" + note
        )
    if dev.type == "cuda":
        return (
            "compiled extension built without CUDA (the installed torch has no CUDA); PyTorch on the GPU"
            + note
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


# -- the public kernels --------------------------------------------------------------------------------


def feature_edges(
    grad: torch.Tensor,
    pos: torch.Tensor,
    feat: torch.Tensor,
    act: torch.Tensor,
    decoder: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Edge rows `[B, n_active]` float32 from the active features of one source layer. See the module
    docstring; `backend` names one of cuda/cpp/torch (default: `active_backend(grad.device)`)."""
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
    """The active features of one source layer (sorted by position), prepared once for many `feature_edges`
    calls that each take the features before some position: `edges(grad, decoder, P)`.

    On a GPU with the compiled kernels the tiled kernel's plan is made here, on the host, once: a plan made
    per call copies the positions to the host, and each such copy waits for all queued GPU work (attribution
    makes one call per source layer per batch). Elsewhere `edges` is `feature_edges` on the first features."""

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
        """`[B, count(P)]` float32: `feature_edges(grad, pos, feat, act, decoder)` over the features at
        positions < P. grad `[B, n_out, n_pos, D]` must reach those features' positions."""
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
                f"decoder must be [F >= {self.n_features}, n_out, D], got shape {tuple(decoder.shape)}"
            )
        n_tiles = (
            len(self.tiles)
            if P is None
            else int(self.tiles_below[min(max(P, 0), len(self.below) - 1)])
        )
        return _ext.feature_edges_tiled(
            grad, decoder, self.tiles, n_tiles, self.order, self.feat, self.act, m
        )


def vector_edges(
    grad: torch.Tensor, vectors: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """Edges `[B, R]` float32 from sources with one vector each: out[b, r] = grad[b, r, :] . vectors[r, :].
    grad `[B, R, D]` (any strides), vectors `[R, D]`. Error nodes of layer l: grad = G[:, l] `[B, n_pos, D]`,
    vectors = errors[l]; all layers at once: G[:, 1:].flatten(1, 2) and errors.flatten(0, 1)."""
    name = _pick(backend, grad.device)
    if name == "cuda" and backend is None and not _forced():
        name = "torch"  # on a GPU PyTorch's batched matmul is faster here (BENCHMARKS.md, edge kernels)
    if (
        name != "torch"
        and grad.dtype in _EXT_DTYPES
        and vectors.dtype in _EXT_DTYPES
        and vectors.device == grad.device
    ):
        _check_vector_args(grad, vectors)
        return _ext.vector_edges(grad, vectors)
    return vector_edges_torch(grad, vectors)


@dataclass
class EdgesCSR:
    """Sparse edge rows: row b holds columns indices[indptr[b]:indptr[b + 1]] (ascending) with their
    values. indptr `[B + 1]` int64, indices `[nnz]` int64, values `[nnz]` float32."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def to_dense(self) -> torch.Tensor:
        """`[B, n]` float32 with zeros where edges were dropped."""
        out = torch.zeros(self.shape, dtype=torch.float32, device=self.values.device)
        rows = torch.repeat_interleave(
            torch.arange(self.shape[0], device=self.indptr.device), self.indptr.diff()
        )
        out[rows, self.indices] = self.values
        return out

    def to_scipy(self):
        """A `scipy.sparse.csr_array` (CPU)."""
        import scipy.sparse as sp

        return sp.csr_array(
            (self.values.cpu().numpy(), self.indices.cpu().numpy(), self.indptr.cpu().numpy()),
            shape=self.shape,
        )


def sparsify(
    dense: torch.Tensor,
    threshold: float | None = None,
    top_k: int | None = None,
    backend: str | None = None,
) -> EdgesCSR:
    """Keep the entries of `[B, n]` with |value| >= threshold and/or among the top_k |values| of their row
    (both: the top_k of those passing the threshold; ties broken arbitrarily; NaN never kept)."""
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if threshold is not None and not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    B, n = dense.shape
    if _pick(backend, dense.device) == "cpp":
        indptr, indices, values = _ext.sparsify(
            dense,
            -1.0 if threshold is None else float(threshold),
            -1 if top_k is None else int(top_k),
        )
        return EdgesCSR(indptr, indices, values, (B, n))
    keep = ~dense.isnan() if threshold is None else dense.abs() >= threshold  # NaN is never kept
    if top_k is not None and top_k < n:
        magnitude = torch.where(keep, dense.abs(), torch.full_like(dense, -1.0))
        top = magnitude.topk(top_k, dim=1).indices
        in_top = torch.zeros_like(keep).scatter_(1, top, True)
        keep &= in_top
    rows, cols = keep.nonzero(as_tuple=True)  # row-major, so columns ascend within each row
    indptr = torch.zeros(B + 1, dtype=torch.long, device=dense.device)
    indptr[1:] = torch.cumsum(keep.sum(1), 0)
    return EdgesCSR(indptr, cols, dense[rows, cols].float(), (B, n))


def feature_edges_sparse(
    grad: torch.Tensor,
    pos: torch.Tensor,
    feat: torch.Tensor,
    act: torch.Tensor,
    decoder: torch.Tensor,
    threshold: float | None = None,
    top_k: int | None = None,
    backend: str | None = None,
    block_bytes: int = 64 << 20,
) -> EdgesCSR:
    """`feature_edges` in CSR form, keeping |value| >= threshold and/or the top_k of each row. Rows are
    computed in blocks of at most `block_bytes` of dense values, so memory stays proportional to the
    output plus one block."""
    if threshold is None and top_k is None:
        raise ValueError(
            "feature_edges_sparse needs a threshold, a top_k or both (else use feature_edges)"
        )
    B, n = grad.shape[0], len(feat)
    rows_per_block = max(1, block_bytes // max(1, 4 * n))
    parts = [
        sparsify(
            feature_edges(grad[b : b + rows_per_block], pos, feat, act, decoder, backend),
            threshold,
            top_k,
            backend,
        )
        for b in range(0, B, rows_per_block)
    ]
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=grad.device)
        return EdgesCSR(
            torch.zeros(1, dtype=torch.long, device=grad.device), empty, empty.float(), (0, n)
        )
    offsets = torch.tensor([0] + [p.nnz for p in parts], device=grad.device).cumsum(0)
    indptr = torch.cat(
        [parts[0].indptr[:1]] + [p.indptr[1:] + offsets[i] for i, p in enumerate(parts)]
    )
    return EdgesCSR(
        indptr, torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]), (B, n)
    )


# -- influence ------------------------------------------------------------------------------------------


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t on `device`. A host tensor bound for a GPU goes through pinned memory without blocking: a copy from
    pageable memory makes the host wait until the GPU has run all the work queued before it, so a host loop
    that copies a few indices per batch could never queue ahead of the GPU."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(
        device, non_blocking=True
    )  # the pinned block is reused only after the copy


def abs_rmatvec(block, row_weight, out, backend: str | None = None) -> None:
    """out += |block|^T row_weight, in place: block a scipy CSR `[rows, n]` (float32 data), row_weight
    `[rows]` float64, out `[n]` float64 contiguous. The step of attribution's influence estimate; the compiled
    pass reads each edge once, the scipy reference builds an absolute copy first."""
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


# -- argument checks (the same message whichever backend runs) -----------------------------------------


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
                f"feat must lie in [0, {decoder.shape[0]}), got [{int(feat.min())}, {int(feat.max())}]"
            )


def _check_vector_args(grad, vectors) -> None:
    if grad.dim() != 3 or vectors.dim() != 2 or tuple(grad.shape[1:]) != tuple(vectors.shape):
        raise ValueError(
            f"vector_edges needs grad [B, R, D] and vectors [R, D], got {tuple(grad.shape)} "
            f"and {tuple(vectors.shape)}"
        )
