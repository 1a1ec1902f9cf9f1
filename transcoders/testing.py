"""Test and benchmark fixtures of the transcoder layer: random sets of any shape, and planted data
whose true features are known. Not part of the public API (`transcoders` does not export them)."""

from __future__ import annotations

import torch

from .model import TranscoderConfig, TranscoderSet


def random_transcoders(
    n_layers: int,
    d_model: int,
    d_sae: int,
    kind: str = "plt",
    activation: str = "jumprelu",
    seed: int = 0,
    l0: float = 8.0,
    k: int | None = None,
    skip: bool | None = None,
    model_name: str = "",
) -> TranscoderSet:
    """Random transcoders with unit-norm encoders; thresholds set so that roughly `l0` features fire
    per position on inputs of norm ~sqrt(d_model). For tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    cfg = TranscoderConfig(
        kind=kind,
        n_layers=n_layers,
        d_model=d_model,
        d_sae=d_sae,
        activation=activation,
        k=k if k is not None else (int(l0) if activation in ("topk", "batchtopk") else None),
        skip=bool(skip) if skip is not None else kind == "skip",
        model_name=model_name,
    )
    tc = TranscoderSet(cfg)
    # P(N(0,1) > t) = l0 / d_sae
    frac = min(max(l0 / d_sae, 1e-6), 0.5)
    t = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - frac)))
    with torch.no_grad():
        for l in range(n_layers):
            w = torch.randn(d_model, d_sae, generator=g)
            tc.W_enc[l].copy_(w / w.norm(dim=0, keepdim=True))
            tc.b_enc[l].copy_(0.1 * torch.randn(d_sae, generator=g))
            dec = torch.randn(tc.W_dec[l].shape, generator=g)
            tc.W_dec[l].copy_(dec / dec.norm(dim=-1, keepdim=True) * 0.2)
            tc.b_dec[l].copy_(0.05 * torch.randn(d_model, generator=g))
            tc.threshold[l].fill_(t)
            if tc.W_skip is not None:
                tc.W_skip[l].copy_(torch.randn(d_model, d_model, generator=g) / d_model)
    return tc


class PlantedData:
    """Synthetic activations from a known sparse dictionary, for tests and demos.

    Each layer l has `n_features` planted features with non-negative sparse codes s_l (about `l0`
    active per position, magnitudes in [0.5, 1.5]). MLP input x_l = s_l @ A_l + noise; MLP output
    y_l = sum_{s <= l} s_s @ B[s][:, l - s] (`mode="clt"`: features write to every later layer) or
    y_l = s_l @ B[l][:, 0] (`mode="plt"`). A, B rows are random unit vectors. `batch(step)` is
    deterministic."""

    def __init__(
        self,
        n_layers: int = 2,
        d_model: int = 32,
        n_features: int = 64,
        l0: float = 3.0,
        mode: str = "plt",
        noise: float = 0.0,
        seed: int = 0,
    ):
        g = torch.Generator().manual_seed(seed)
        self.n_layers, self.d_model, self.n_features, self.l0 = n_layers, d_model, n_features, l0
        self.mode, self.noise, self.seed = mode, noise, seed

        def unit(*shape):
            w = torch.randn(*shape, generator=g)
            return w / w.norm(dim=-1, keepdim=True)

        self.A = [unit(n_features, d_model) for _ in range(n_layers)]
        self.B = [
            unit(n_features, (n_layers - l) if mode == "clt" else 1, d_model)
            for l in range(n_layers)
        ]

    def codes(self, n: int, g: torch.Generator) -> list[torch.Tensor]:
        p = self.l0 / self.n_features
        return [
            (torch.rand(n, self.n_features, generator=g) < p).float()
            * (0.5 + torch.rand(n, self.n_features, generator=g))
            for _ in range(self.n_layers)
        ]

    def batch(self, step: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + step + 1)
        s = self.codes(batch_size, g)
        xs, ys = [], []
        for l in range(self.n_layers):
            x = s[l] @ self.A[l]
            if self.noise:
                x = x + self.noise * torch.randn(x.shape, generator=g)
            xs.append(x)
            if self.mode == "clt":
                ys.append(sum(s[src] @ self.B[src][:, l - src] for src in range(l + 1)))
            else:
                ys.append(s[l] @ self.B[l][:, 0])
        return torch.stack(xs, 1), torch.stack(ys, 1)


class PlantedBuffer:
    """`ActivationBuffer`-like view of `PlantedData`."""

    def __init__(self, data: PlantedData, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def batch(self, step: int):
        return self.data.batch(step, self.batch_size)
