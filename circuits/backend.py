"""Edge kernels: the contraction of target gradients with the decoder vectors of active features.

`feature_edges(grad, pos, feat, act, decoder)` computes, for one source layer,
    out[b, i] = act[i] * sum_o  decoder[feat[i], o, :] . grad[b, o, pos[i], :]
with grad `[B, n_out, n_pos, D]` (gradients at the MLP-output sites the layer writes to), decoder
`[F, n_out, D]` in its stored layout (PLT/skip: a `[F, 1, D]` view; CLT: `[F, L - l, D]`).
Backends, in order of preference: cuda (compiled, for CUDA tensors), cpp (compiled, OpenMP), torch.
"""
from __future__ import annotations

import os

import torch

_ext = None
_ext_error = None
try:
    from . import _edges as _ext  # type: ignore[attr-defined]
except Exception as e:  # not built: no compiler at install time, or a source checkout
    _ext_error = f"{e.__class__.__name__}: {e}"


def feature_edges_torch(grad: torch.Tensor, pos: torch.Tensor, feat: torch.Tensor, act: torch.Tensor,
                        decoder: torch.Tensor) -> torch.Tensor:
    """Reference implementation. Gathers only the rows of the active features, in chunks, so that
    peak memory stays near `chunk x n_out x D`."""
    B, n_out = grad.shape[0], grad.shape[1]
    out = torch.empty(B, len(feat), dtype=torch.float32, device=grad.device)
    chunk = max(1, (1 << 22) // max(1, n_out * decoder.shape[-1]))
    for s in range(0, len(feat), chunk):
        f, p = feat[s:s + chunk], pos[s:s + chunk]
        rows = decoder.index_select(0, f).float()  # [c, n_out, D]
        g = grad.index_select(2, p).float()  # [B, n_out, c, D]
        out[:, s:s + chunk] = torch.einsum("cod,bocd->bc", rows, g) * act[s:s + chunk].float()
    return out


def active_backend(device: torch.device | str = "cpu") -> str:
    """The backend `feature_edges` uses for tensors on `device`."""
    forced = os.environ.get("GEMMA_CIRCUITS_BACKEND")
    if forced:
        return forced
    dev = torch.device(device)
    if _ext is not None:
        if dev.type == "cuda" and getattr(_ext, "has_cuda", lambda: False)():
            return "cuda"
        if dev.type == "cpu":
            return "cpp"
    return "torch"


def backend_reason(device: torch.device | str = "cpu") -> str:
    name = active_backend(device)
    if os.environ.get("GEMMA_CIRCUITS_BACKEND"):
        return f"forced by GEMMA_CIRCUITS_BACKEND={name}"
    if name == "cuda":
        return "compiled extension built with CUDA, tensors on a CUDA device"
    if name == "cpp":
        threads = torch.get_num_threads()
        return f"compiled C++/OpenMP extension ({threads} threads)"
    if _ext is None:
        return f"compiled extension not available ({_ext_error}); reinstall with a C++ compiler"
    return f"compiled extension has no kernel for device {torch.device(device).type}"


def feature_edges(grad: torch.Tensor, pos: torch.Tensor, feat: torch.Tensor, act: torch.Tensor,
                  decoder: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Edge rows `[B, n]` from the features of one source layer. See the module docstring."""
    backend = backend or active_backend(grad.device)
    if len(feat) == 0:
        return torch.zeros(grad.shape[0], 0, dtype=torch.float32, device=grad.device)
    if backend in ("cpp", "cuda") and _ext is not None:
        return _ext.feature_edges(grad, pos, feat, act, decoder)
    return feature_edges_torch(grad, pos, feat, act, decoder)
