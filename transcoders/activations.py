"""Training-mode activation functions for transcoders.

Inference rules live in `TranscoderSet.activate`; these are the differentiable training versions:

  relu       relu(pre)
  jumprelu   pre * H(pre - theta); the threshold gets a straight-through gradient through a
             rectangle kernel of width `bandwidth` (Rajamanoharan et al. 2024, "Jumping ahead"):
               d/dtheta JumpReLU = -(theta / eps) * K((pre - theta) / eps),  K = 1 on (-1/2, 1/2)
             and `step(pre, theta)` = H(pre - theta) (the L0 penalty) has
             d/dtheta = -(1/eps) K(...).
  topk       the k largest relu(pre) per position
  batchtopk  the k * batch largest relu(pre) across the whole batch (Bussmann et al. 2024);
             during training the smallest kept activation is tracked (EMA) and becomes the
             inference threshold, so inference is `pre * (pre > threshold)` with no dependence on
             the batch.
"""

from __future__ import annotations

import torch


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = grad * (pre > theta).to(pre.dtype)
        g_theta = -(theta / eps) * _rect((pre - theta) / eps) * grad
        return g_pre, g_theta.sum_to_size(theta.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_theta = -(1.0 / eps) * _rect((pre - theta) / eps) * grad
        return None, g_theta.sum_to_size(theta.shape), None


def jumprelu(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float = 0.001) -> torch.Tensor:
    """JumpReLU with a straight-through threshold gradient (theta broadcastable to pre, e.g. `[F]`
    or `[L, 1, F]` for pre `[L, n, F]`)."""
    return _JumpReLU.apply(pre, theta, bandwidth)


def step(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float = 0.001) -> torch.Tensor:
    """Heaviside H(pre - theta) with the straight-through threshold gradient (for an L0 penalty)."""
    return _Step.apply(pre, theta, bandwidth)


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest relu(pre) of each position."""
    k = min(k, pre.shape[-1])
    vals, idx = torch.relu(pre).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def batchtopk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k * n_positions largest relu(pre) over the whole batch `[n, F]`.
    Returns (activations, smallest kept positive value) — the latter feeds the inference
    threshold."""
    flat = torch.relu(pre).reshape(-1)
    n_keep = min(k * pre.reshape(-1, pre.shape[-1]).shape[0], flat.numel())
    vals, idx = flat.topk(n_keep)
    out = torch.zeros_like(flat).scatter(0, idx, vals).reshape(pre.shape)
    pos = vals[vals > 0]
    floor = pos.min().detach() if pos.numel() else torch.zeros((), dtype=pre.dtype)
    return out, floor


def batchtopk_per_layer(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK for every layer at once: pre `[L, n, F]` keeps the k * n largest relu(pre) of each
    layer. Returns (activations `[L, n, F]`, smallest kept positive value per layer `[L]`)."""
    L, n, F = pre.shape
    flat = torch.relu(pre).reshape(L, n * F)
    vals, idx = flat.topk(min(k * n, n * F), dim=-1)
    out = torch.zeros_like(flat).scatter(1, idx, vals).reshape(L, n, F)
    kept = vals.detach()
    floor = torch.where(kept > 0, kept, torch.full_like(kept, float("inf"))).amin(-1)
    return out, torch.where(torch.isinf(floor), torch.zeros_like(floor), floor)
