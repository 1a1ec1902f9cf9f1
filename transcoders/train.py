"""Training transcoders (PLT, skip, CLT) for every layer of a model at once.

`transcoders train --out DIR ...` and `train_transcoders(TrainConfig(...))` run the same recipe:

- Data: MLP inputs/outputs harvested from the model over a text source (`transcoders.data`), served
  by an `ActivationBuffer` whose batch at step s is a pure function of s; tests pass any object with
  `.batch(step) -> (mlp_in, mlp_out)` `[B, L, D]` instead (e.g. `PlantedBuffer`).
- Normalisation: per layer, inputs are scaled to norm sqrt(D) and outputs to unit variance per
  dimension, so the loss reads as a fraction of variance unexplained (FVU) and one learning rate
  suits every layer. The scales are folded into the saved weights (pre-activations are unchanged, so
  thresholds carry over), and the saved set works on raw activations.
- Skip term (kind "skip", or a CLT with skip=True): W_skip starts at the closed-form least-squares
  map from MLP input to output (ridge-regularised, on `init_tokens` tokens); features then learn
  what is left.
- Objective: mean squared error of the normalised outputs, averaged over the Matryoshka prefixes
  (each prefix of the dictionary reconstructs on its own; no prefixes = one full dictionary) + for
  JumpReLU an L0 penalty (straight-through threshold gradients, warmed up) + an AuxK loss that makes
  dead features (silent for `dead_tokens` tokens) reconstruct the residual error (Gao et al. 2024).
  BatchTopK tracks the smallest kept activation (EMA) as its inference threshold.
- AdamW with linear warm-up and a linear decay to zero over the last `decay_frac` of the steps;
  matmuls in bfloat16 autocast (float32 master weights) unless `compute_dtype="float32"`.
- Checkpoints every `checkpoint_every` steps in `<out>.train/`: the tensors (weights, optimiser
  moments) in a safetensors file, and `checkpoint.json` (step, config, optimiser hyperparameters,
  metrics) naming it with its sha256, written last so that it commits the pair (see "checkpoints"
  below). Nothing is unpickled: a `checkpoint.pt` of earlier versions is refused. A rerun with the
  same config resumes there and reproduces the uninterrupted run exactly. The finished set is
  written atomically with `transcoders.formats.save_native`; its config.json carries the training
  config and final metrics.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gemma_lm.errors import UserError, one_line
from gemma_lm.files import atomic_write_text
from gemma_lm.jobs import Command, field_default
from gemma_lm.memory import own_process, reuse_freed_memory
from gemma_lm.models import DEFAULT_MODEL

from .activations import batchtopk_per_layer, jumprelu, topk
from .activations import step as heaviside
from .data import ActivationBuffer, ActivationSource, load_harvest_model, text_source
from .model import ACTIVATIONS, KINDS, Activation, Kind, TranscoderConfig, TranscoderSet
from .native import save_native
from .recipes import recipe_settings

# Fields that do not change what is trained: a checkpoint made under other values still resumes.
_RUN_ONLY = (
    "recipe",  # what it set is in the other fields
    "out",
    "checkpoint_every",
    "threads",
    "progress",
    "keep_checkpoint",
    "activation_cache",
)


@dataclass
class TrainConfig:
    """Train transcoders for every layer of a Gemma 3 model on harvested MLP activations. Resumes
    from <out>.train/ when rerun with the same settings. Sizes: L layers, D = d_model, F = d_sae
    features per layer."""

    recipe: str = ""
    """a named recipe (default, clt, large; see transcoders/recipes.py) whose settings replace those
    of the flags left at their defaults"""
    out: str = ""
    """directory of the trained set (native layout); checkpoints go to <out>.train/"""
    model: str = DEFAULT_MODEL
    """model to harvest from (name or path, as `gemma_lm.load_model`)"""
    kind: Kind = "skip"
    """per-layer (plt), per-layer with an affine skip term (skip), or cross-layer (clt)"""
    activation: Activation = "batchtopk"
    """the features' activation function"""
    d_sae: int = 1024
    """features per layer"""
    k: int = 16
    """active features per position (topk / batchtopk; JumpReLU starts its thresholds at this L0)"""
    skip: bool = False
    """affine skip term for a CLT (always on for kind skip)"""
    matryoshka: list[int] = field(default_factory=list)
    """Matryoshka prefix sizes < d_sae, ascending (empty: none)"""
    text: str = "builtin"
    """text source spec (see transcoders.data.text_source)"""
    context: int = 128
    """tokens per harvested sequence (BOS first, not trained on)"""
    tokens: int = 200_000
    """training tokens; steps = tokens // batch_size"""
    batch_size: int = 1024
    """tokens per step"""
    buffer_tokens: int = 16_384
    """tokens in the shuffled in-memory activation buffer (each holds every layer's MLP input and
    output)"""
    buffer_passes: int = 1
    """passes over each buffer fill (more: less harvesting, less fresh data)"""
    harvest_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """model dtype while harvesting (bfloat16 is much faster on CPUs;
    benchmarks/transcoders_default.py)"""
    activation_cache: str = ""
    """folder to keep harvested shards in for later runs (empty: memory only)"""
    lr: float = 2e-3
    """peak learning rate (AdamW)"""
    warmup_frac: float = 0.05
    """fraction of the steps warming the learning rate up"""
    decay_frac: float = 0.3
    """fraction of the steps decaying it to zero at the end"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0 disables clipping)"""
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """autocast dtype of the matmuls; float32 for exact arithmetic"""
    skip_init: Literal["lstsq", "zeros"] = "lstsq"
    """how W_skip starts: the least-squares map from MLP input to output, or zeros"""
    feature_init: Literal["exemplar", "random"] = "exemplar"
    """how features start: as sample tokens (exemplar), or random"""
    init_tokens: int = 8192
    """tokens for the normalisation scales and the least-squares skip"""
    sparsity_coeff: float = 2e-3
    """JumpReLU: L0 penalty; ReLU: L1 penalty on act * |decoder row| (FVU units)"""
    bandwidth: float = 0.05
    """JumpReLU straight-through kernel width (normalised units)"""
    sparsity_warmup_frac: float = 0.2
    """fraction of the steps over which the sparsity penalty warms up"""
    dead_tokens: int = 20_000
    """a feature silent this many tokens counts as dead"""
    aux_coeff: float = 1 / 32
    """AuxK loss weight (0 disables)"""
    aux_k: int = 64
    """dead features each position may use in the AuxK loss"""
    checkpoint_every: int = 25
    """steps between checkpoints"""
    keep_checkpoint: bool = False
    """keep <out>.train/ after a finished run"""
    seed: int = 0
    """random seed (initialisation, data order)"""
    threads: int = 0
    """torch threads (0: leave as is)"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self):
        if self.recipe:
            self._apply_recipe()
        if self.kind not in KINDS:
            raise UserError(f"unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise UserError(
                f"unknown activation {self.activation!r}; use one of {', '.join(ACTIVATIONS)}"
            )
        if not 0 < self.k <= self.d_sae:
            raise UserError(f"k = {self.k} must be between 1 and d_sae = {self.d_sae}")
        prefixes = list(self.matryoshka or [])
        if prefixes != sorted(set(prefixes)) or any(not 0 < p < self.d_sae for p in prefixes):
            raise UserError(
                f"matryoshka prefixes {prefixes} must be ascending, distinct and between 1 and "
                f"d_sae - 1 = {self.d_sae - 1}"
            )
        self.matryoshka = prefixes
        if self.tokens < self.batch_size or self.batch_size < 1:
            raise UserError(
                f"--tokens {self.tokens} is less than one training step of --batch-size "
                f"{self.batch_size} tokens; raise --tokens to at least {self.batch_size}"
            )
        if self.feature_init not in ("exemplar", "random"):
            raise UserError(f"unknown feature_init {self.feature_init!r}; use exemplar or random")
        if self.skip_init not in ("lstsq", "zeros"):
            raise UserError(f"unknown skip_init {self.skip_init!r}; use lstsq or zeros")
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise UserError(
                f"unknown compute_dtype {self.compute_dtype!r}; use bfloat16 or float32"
            )
        if self.checkpoint_every < 1:
            raise UserError("checkpoint_every must be at least 1 step")

    def _apply_recipe(self) -> None:
        """Recipe settings in place of the fields left at their defaults (so a config applied once
        more stays the same)."""
        settings = recipe_settings(self.recipe)
        for f in fields(self):
            if f.name in settings and getattr(self, f.name) == field_default(f):
                setattr(self, f.name, settings[f.name])

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def has_skip(self) -> bool:
        return self.kind == "skip" or self.skip

    def checkpoint_dir(self) -> Path:
        """<out>.train/, the folder of the run's checkpoint."""
        return Path(str(Path(self.out).expanduser()) + ".train")

    def checkpoint_path(self) -> Path:
        """The file that commits a checkpoint (it names the tensors file beside it)."""
        return self.checkpoint_dir() / CHECKPOINT_FILE

    def training_fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in _RUN_ONLY}


# -- the trainable parameters ----------------------------------------------------------------------


class TrainableTranscoders(nn.Module):
    """All layers' transcoders in stacked tensors (one batched matmul per step), on normalised
    activations.

    W_enc [L, D, F], b_enc [L, F], W_dec PLT/skip [L, F, D] or CLT list of [F, L - s, D], b_dec
    [L, D], W_skip [L, D, D], log_threshold [L, F] (JumpReLU). Buffers: in_scale / out_scale [L]
    (normalisation), bt_threshold [L] (BatchTopK inference threshold), silent_tokens [L, F] (tokens
    since each feature fired)."""

    def __init__(self, cfg: TrainConfig, n_layers: int, d_model: int):
        super().__init__()
        self.cfg = cfg
        L, D, F = n_layers, d_model, cfg.d_sae
        self.L, self.D, self.F = L, D, F
        self.is_clt = cfg.kind == "clt"
        self.W_enc = nn.Parameter(torch.zeros(L, D, F))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        if self.is_clt:
            self.W_dec = nn.ParameterList(
                [nn.Parameter(torch.zeros(F, L - s, D)) for s in range(L)]
            )
        else:
            self.W_dec = nn.Parameter(torch.zeros(L, F, D))
        self.b_dec = nn.Parameter(torch.zeros(L, D))
        self.W_skip = nn.Parameter(torch.zeros(L, D, D)) if cfg.has_skip else None
        self.log_threshold = (
            nn.Parameter(torch.zeros(L, F)) if cfg.activation == "jumprelu" else None
        )
        self.register_buffer("in_scale", torch.ones(L))
        self.register_buffer("out_scale", torch.ones(L))
        self.register_buffer("bt_threshold", torch.full((L,), float("nan")))
        self.register_buffer("silent_tokens", torch.zeros(L, F))
        self.chunks = list(zip([0] + cfg.matryoshka, cfg.matryoshka + [F]))

    # -- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def initialise(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """Scales, skip, biases and dictionaries from a sample of raw activations x, y
        `[n, L, D]`, one layer at a time: the float32 temporaries are then `[n, D]`, not
        `[L, n, D]` (first use has a memory budget)."""
        n = x.shape[0]
        pick = None
        if self.cfg.feature_init == "exemplar":
            pick = self._exemplar_pick(n, generator)
        else:
            enc = torch.randn(self.L, self.D, self.F, generator=generator)
            self.W_enc.copy_(enc / enc.norm(dim=1, keepdim=True))
            for w in self._decoders():
                d = torch.randn(w.shape, generator=generator)
                w.copy_(0.1 * d / d.norm(dim=-1, keepdim=True))
        for l in range(self.L):
            self._initialise_layer(l, x[:, l].float(), y[:, l].float(), pick)

    def _initialise_layer(
        self, l: int, x: torch.Tensor, y: torch.Tensor, pick: torch.Tensor | None
    ) -> None:
        """Layer l's part of `initialise`, from its raw activations x, y `[n, D]`; `pick`: the
        exemplar tokens (None: the dictionaries are already random)."""
        D = self.D
        self.in_scale[l] = math.sqrt(D) / x.norm(dim=-1).mean().clamp_min(1e-12)
        y_centred = y - y.mean(0)
        self.out_scale[l] = 1.0 / (y_centred.pow(2).sum(-1).mean() / D).sqrt().clamp_min(1e-12)
        xn, yn = x * self.in_scale[l], y * self.out_scale[l]
        mx, my = xn.mean(0), yn.mean(0)  # [D]
        if self.W_skip is not None and self.cfg.skip_init == "lstsq":
            self._least_squares_skip(l, xn - mx, yn - my, mx, my)
        else:
            self.b_dec[l] = my
        if pick is not None:
            resid = yn - my if self.W_skip is None else yn - xn @ self.W_skip[l] - self.b_dec[l]
            self._exemplar_init(l, (xn - mx)[pick], resid[pick])
        # centre the encoder on the data so features split the inputs instead of all firing on their
        # mean
        self.b_enc[l] = -(mx @ self.W_enc[l])
        if self.log_threshold is not None:
            # start every feature at firing rate k / F, so training begins at the target L0 instead
            # of spending its (short) budget walking thresholds there; the L0 penalty takes over
            # from here
            pre = torch.addmm(self.b_enc[l], xn[:4096], self.W_enc[l])  # [n, F]
            q = torch.quantile(pre, 1 - self.cfg.k / self.F, dim=0)
            self.log_threshold[l] = q.clamp_min(1e-3).log()

    def _least_squares_skip(self, l, xc, yc, mx, my) -> None:
        """W_skip[l] and b_dec[l]: the ridge-regularised least-squares map from the centred,
        normalised inputs xc to outputs yc `[n, D]` (means mx, my `[D]`)."""
        # products in float32 (centred, normalised data: well conditioned), the solve in float64
        gram = (xc.T @ xc).double()  # [D, D]
        ridge = 1e-3 * gram.diagonal().mean() * torch.eye(self.D, dtype=gram.dtype)
        rhs = (xc.T @ yc).double()
        # by Cholesky (the system is symmetric positive definite); LU in float64 trips an MKL
        # pivoting bug at these sizes
        w = torch.cholesky_solve(rhs, torch.linalg.cholesky(gram + ridge)).float()
        self.W_skip[l] = w
        self.b_dec[l] = my - mx @ w

    def _exemplar_pick(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The F sample tokens (of n) the features start from, the same for every layer: distinct
        where there are enough, since a repeated exemplar is a duplicate feature, dead weight that
        also ties with its twin in every top-k (so sharded and single-process runs could part
        ways)."""
        if n >= self.F:
            return torch.randperm(n, generator=generator)[: self.F]
        return torch.randint(0, n, (self.F,), generator=generator)

    def _exemplar_init(self, l: int, ex_in: torch.Tensor, ex_out: torch.Tensor) -> None:
        """Each feature of layer l starts as one sample token: it reads that token's centred input
        direction `ex_in` and writes its residual target `ex_out` (what the skip and bias leave)
        `[F, D]`, scaled so that the k features a token selects add up to about the average of
        their residuals. The dictionary starts as a k-nearest-neighbour regressor instead of noise,
        every feature fires from step 0, and a short run spends its steps refining."""
        norm = ex_in.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        self.W_enc[l] = (ex_in / norm).T
        k = min(self.cfg.k, self.F)
        dec = ex_out / (k * 0.5 * norm)  # a selected exemplar fires at about half its own norm
        if self.is_clt:  # the exemplar's own layer gets its residual; later layers start at zero
            self.W_dec[l].zero_()
            self.W_dec[l][:, 0] = dec
        else:
            self.W_dec[l] = dec

    def _decoders(self):
        return list(self.W_dec) if self.is_clt else [self.W_dec]

    # -- forward ----------------------------------------------------------------------------------
    def normalise(self, x: torch.Tensor, y: torch.Tensor):
        """Raw `[B, L, D]` batches to normalised `[L, B, D]`."""
        return (
            x.transpose(0, 1) * self.in_scale[:, None, None],
            y.transpose(0, 1) * self.out_scale[:, None, None],
        )

    def forward(self, xn: torch.Tensor):
        """Normalised inputs `[L, B, D]` -> (pre-activations `[L, B, F]`, activations `[L, B, F]`,
        reconstructions `[P, L, B, D]` of each Matryoshka prefix (the last is the full dictionary),
        BatchTopK floor `[L]` or None)."""
        cfg = self.cfg
        with _autocast(cfg.compute_dtype):
            # pre-activations stay in the compute dtype: the [L, B, F] tensors dominate memory
            # traffic
            pre = torch.baddbmm(self.b_enc[:, None, :], xn, self.W_enc)
        floor = None
        if cfg.activation == "relu":
            acts = torch.relu(pre)
        elif cfg.activation == "jumprelu":
            acts = jumprelu(pre, self.log_threshold.exp()[:, None, :].to(pre.dtype), cfg.bandwidth)
        elif cfg.activation == "topk":
            acts = topk(pre, cfg.k)
        else:
            acts, floor = batchtopk_per_layer(pre, cfg.k)
            floor = floor.float()
        with _autocast(cfg.compute_dtype):
            base = self.b_dec[:, None, :].expand_as(xn)
            if self.W_skip is not None:
                base = base + torch.bmm(xn, self.W_skip)
            recons, partial = [], base.float()
            # split (not slice): its backward concatenates the pieces' gradients in one allocation
            pieces = acts.split([b - a for a, b in self.chunks], dim=-1)
            for (a, b), piece in zip(self.chunks, pieces):
                partial = partial + self._decode(piece, a, b).float()
                recons.append(partial)
        return pre, acts, torch.stack(recons), floor

    def _decode(self, acts: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Output contribution `[L, B, D]` of features a:b given their activations
        `[L, B, b - a]`."""
        if not self.is_clt:
            return torch.bmm(acts, self.W_dec[:, a:b])
        L, B, D = acts.shape[0], acts.shape[1], self.D
        into: list[list[torch.Tensor]] = [[] for _ in range(L)]
        for s in range(L):
            w = self.W_dec[s][a:b].reshape(b - a, (L - s) * D)
            out = (acts[s] @ w).view(B, L - s, D)
            for j in range(L - s):
                into[s + j].append(out[:, j])
        return torch.stack([torch.stack(parts).sum(0) for parts in into])

    def own_norms(self) -> list[torch.Tensor]:
        """Per source layer, the decoder `[F, n_out, D]` (norms over D summed over outputs give a
        feature's total write size, the scale an L1 penalty must see so that shrinking acts cannot
        cheat it)."""
        return list(self.W_dec) if self.is_clt else [w[:, None] for w in self.W_dec]

    def own_decoder(self) -> torch.Tensor:
        """Each feature's decoder into its own layer `[L, F, D]` (for the AuxK loss)."""
        return torch.stack([w[:, 0] for w in self.W_dec]) if self.is_clt else self.W_dec

    # -- export -----------------------------------------------------------------------------------
    @torch.no_grad()
    def to_transcoder_set(
        self, model_name: str = "", metrics: dict | None = None, extra: dict | None = None
    ) -> TranscoderSet:
        """A `TranscoderSet` on raw activations: the normalisation scales folded into the
        weights."""
        cfg = self.cfg
        tcfg = TranscoderConfig(
            kind=cfg.kind,
            n_layers=self.L,
            d_model=self.D,
            d_sae=self.F,
            activation=cfg.activation,
            k=cfg.k if cfg.activation in ("topk", "batchtopk") else None,
            skip=cfg.has_skip,
            model_name=model_name,
            matryoshka_prefixes=list(cfg.matryoshka) or None,
            metrics=dict(metrics or {}),
            extra=dict(extra or {}),
        )
        tc = TranscoderSet(tcfg)
        a, c = self.in_scale, self.out_scale
        for l in range(self.L):
            tc.W_enc[l].copy_(self.W_enc[l] * a[l])
            tc.b_enc[l].copy_(self.b_enc[l])
            if self.is_clt:
                tc.W_dec[l].copy_(self.W_dec[l] / c[l:, None])
            else:
                tc.W_dec[l].copy_(self.W_dec[l] / c[l])
            tc.b_dec[l].copy_(self.b_dec[l] / c[l])
            if self.W_skip is not None:
                tc.W_skip[l].copy_(self.W_skip[l] * (a[l] / c[l]))
            if cfg.activation == "jumprelu":
                tc.threshold[l].copy_(self.log_threshold[l].exp())
            elif cfg.activation == "batchtopk":
                t = self.bt_threshold[l]
                tc.threshold[l].fill_(0.0 if torch.isnan(t) else float(t))
        return tc


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


# -- one step --------------------------------------------------------------------------------------


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `decay_frac` of the
    steps."""
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    decay_start = cfg.steps - int(cfg.decay_frac * cfg.steps)
    if step < warm:
        return (step + 1) / warm
    if step >= decay_start:
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))
    return 1.0


@torch.enable_grad()  # callers may be inside no_grad (the first trace trains the default set)
def train_step(
    net: TrainableTranscoders,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
) -> dict:
    """One optimiser step on a raw batch x, y `[B, L, D]`. Returns the step's metrics (per-layer
    lists)."""
    cfg = net.cfg
    xn, yn = net.normalise(x, y)
    pre, acts, recons, floor = net(xn)
    mse = (recons - yn).pow(2).mean((1, 2, 3))  # [P]
    loss = mse.mean()
    full = recons[-1]
    active = acts > 0
    if cfg.activation in ("jumprelu", "relu") and cfg.sparsity_coeff:
        warm = min(1.0, (step + 1) / max(1, cfg.sparsity_warmup_frac * cfg.steps))
        if cfg.activation == "jumprelu":
            penalty = (
                heaviside(pre, net.log_threshold.exp()[:, None, :], cfg.bandwidth).sum(-1).mean()
            )
        else:
            dec_norm = torch.stack(
                [w.norm(dim=-1).reshape(net.F, -1).sum(-1) for w in net.own_norms()]
            )
            penalty = (acts * dec_norm[:, None, :]).sum(-1).mean()
        loss = loss + warm * cfg.sparsity_coeff * penalty
    dead = net.silent_tokens >= cfg.dead_tokens  # [L, F]
    aux = torch.zeros(())
    if cfg.aux_coeff and bool(dead.any()):
        err = (yn - full).detach()
        k_aux = min(cfg.aux_k, net.F)
        vals, idx = pre.masked_fill(~dead[:, None, :], float("-inf")).topk(k_aux, dim=-1)
        aux_acts = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        with _autocast(cfg.compute_dtype):
            err_hat = torch.bmm(aux_acts, net.own_decoder()).float()
        has_dead = dead.any(-1)
        per_layer = (err_hat - err).pow(2).sum((1, 2)) / err.pow(2).sum((1, 2)).clamp_min(1e-12)
        aux = per_layer[has_dead].mean()
        loss = loss + cfg.aux_coeff * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
    for group in opt.param_groups:
        group["lr"] = cfg.lr * lr_factor(step, cfg)
    opt.step()
    with torch.no_grad():
        fired = active.any(1)
        net.silent_tokens.copy_(
            torch.where(fired, torch.zeros_like(net.silent_tokens), net.silent_tokens + x.shape[0])
        )
        if floor is not None:
            t = net.bt_threshold
            net.bt_threshold.copy_(torch.where(torch.isnan(t), floor, 0.9 * t + 0.1 * floor))
        var = (yn - yn.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
        fvu = (full - yn).pow(2).sum((1, 2)) / var
    return {
        "loss": float(loss.detach()),
        "aux": float(aux.detach()),
        "fvu": fvu.tolist(),
        "l0": active.sum(-1).float().mean(1).tolist(),
        "dead": dead.float().mean(1).tolist(),
    }


@torch.no_grad()
def calibrate_batchtopk(net: TrainableTranscoders, buffer, steps) -> None:
    """Set the BatchTopK inference threshold from the final weights: the mean over the batches of
    `steps` of the smallest activation BatchTopK keeps (the running estimate lags behind the
    weights)."""
    floors = []
    for step in steps:
        x, y = buffer.batch(step)
        floors.append(net(net.normalise(x, y)[0])[3])
    if floors:
        net.bt_threshold.copy_(torch.stack(floors).mean(0))


# -- checkpoints -----------------------------------------------------------------------------------
#
# A checkpoint is a pair of files in <out>.train/: the tensors (the net's state, the optimiser's
# moments and step counts) in a safetensors file named anew at every save, and checkpoint.json
# (step, settings, the optimiser's hyperparameters, the metrics so far) naming that file with its
# size and sha256. checkpoint.json is renamed into place last, so it commits the pair: a run killed
# before that resumes from the previous pair, whose tensors file is still there. Nothing in the
# folder is ever unpickled. No global random state is saved: training draws only from generators
# seeded by (seed, step).

CHECKPOINT_FORMAT = "gemma-circuits-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.json"
_PICKLED_CHECKPOINT = "checkpoint.pt"  # the format of earlier versions, never read
_TENSORS_FILE = re.compile(r"checkpoint-\d+-[0-9a-f]{8}\.safetensors")


def _save_checkpoint(
    folder: Path,
    cfg: TrainConfig,
    step: int,
    history: list[dict],
    net_state: dict,
    opt_state: dict,
    param_names: list[str],
) -> None:
    """Write the checkpoint of `step` to `folder`: the tensors file, then checkpoint.json naming it,
    then remove the tensors files no checkpoint names. net_state / opt_state: `state_dict()`s of
    the whole set and its optimiser, whose i-th parameter is `param_names[i]`."""
    tensors = {f"net.{k}": v for k, v in net_state.items()}
    scalars: dict[str, dict] = {}
    for i, per_param in opt_state["state"].items():
        for key, v in per_param.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{param_names[int(i)]}.{key}"] = v
            else:
                scalars.setdefault(param_names[int(i)], {})[key] = v
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    record = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "step": step,
        "tensors": _write_checkpoint_tensors(folder, tensors, step),
        "config": cfg.training_fields(),
        "parameters": list(param_names),
        "optimizer": {"param_groups": opt_state["param_groups"], "state": scalars},
        "history": history,
    }
    atomic_write_text(folder / CHECKPOINT_FILE, json.dumps(record))
    for p in folder.glob("checkpoint-*.safetensors"):
        if p.name != record["tensors"]["file"]:
            p.unlink(missing_ok=True)


def _write_checkpoint_tensors(folder: Path, tensors: dict[str, torch.Tensor], step: int) -> dict:
    """Write `tensors` to a new safetensors file in `folder` (under a temporary name, then renamed);
    returns its name, size and sha256 for checkpoint.json."""
    name = f"checkpoint-{step:08d}-{secrets.token_hex(4)}.safetensors"
    final, partial = folder / name, folder / f".{name}.partial"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        save_file(tensors, str(partial), metadata={"format": CHECKPOINT_FORMAT})
        _fsync(partial)
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync(folder)  # the file's name is on disk before a checkpoint.json can name it
    return {"file": name, "bytes": final.stat().st_size, "sha256": _sha256(final)}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_partials(folder: Path, pattern: str) -> None:
    """Temporary files of atomic writes (`.{pattern}.*.partial`, a glob) that a killed run left
    behind (never complete files)."""
    if folder.is_dir():
        for p in folder.glob(f".{pattern}.*.partial"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _damaged(path: Path, folder: Path, why: str) -> UserError:
    why = one_line(why, 300)  # whatever the library's message was
    return UserError(
        f"{path} {why}: the checkpoint is damaged; delete {folder} to start the run over"
    )


def _load_checkpoint(folder: Path, cfg: TrainConfig) -> dict | None:
    """The checkpoint in `folder` as {"step", "net", "opt", "history", "path"} (`net`, `opt`: torch
    `state_dict()`s), None where there is none. A damaged one, one that does not fit `cfg`, one of
    other settings and one in the pickled format of earlier versions are UserErrors."""
    old = folder / _PICKLED_CHECKPOINT
    if old.exists():
        raise UserError(
            f"{old} is a checkpoint of an earlier gemma-circuits in the pickle format, which is "
            f"never loaded (unpickling can run code); delete {folder} to start the run over"
        )
    path = folder / CHECKPOINT_FILE
    if not path.exists():
        return None
    record = _read_record(path, folder)
    _check_settings(record["config"], cfg, path)
    if not 0 <= record["step"] < cfg.steps or len(record["history"]) != record["step"]:
        raise _damaged(path, folder, f"holds step {record['step']} of {cfg.steps}")
    tensors = _read_tensors(folder, record["tensors"], path)
    net = {k[len("net.") :]: v for k, v in tensors.items() if k.startswith("net.")}
    _check_fits(net, record["parameters"], cfg, folder / record["tensors"]["file"], folder)
    opt = _optimizer_state(record, tensors, net, folder)
    return {
        "step": record["step"],
        "net": net,
        "opt": opt,
        "history": record["history"],
        "path": path,
    }


def _read_record(path: Path, folder: Path) -> dict:
    """checkpoint.json, checked for the fields and types `_load_checkpoint` relies on."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, folder, f"is not readable JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise _damaged(path, folder, "is not a gemma-circuits training checkpoint")
    if record.get("format_version") != CHECKPOINT_VERSION:
        raise UserError(
            f"{path} has checkpoint format version {record.get('format_version')!r}; this "
            f"gemma-circuits resumes version {CHECKPOINT_VERSION}: delete {folder} to start over"
        )
    kinds = {
        "step": int,
        "tensors": dict,
        "config": dict,
        "parameters": list,
        "optimizer": dict,
        "history": list,
    }
    wrong = [k for k, kind in kinds.items() if not isinstance(record.get(k), kind)]
    tensors, opt = record.get("tensors") or {}, record.get("optimizer") or {}
    if wrong or not (
        isinstance(tensors.get("file"), str)
        and _TENSORS_FILE.fullmatch(tensors["file"])  # a plain name: never a path elsewhere
        and isinstance(tensors.get("bytes"), int)
        and isinstance(tensors.get("sha256"), str)
        and isinstance(opt.get("param_groups"), list)
        and isinstance(opt.get("state"), dict)
        and all(isinstance(v, dict) for v in opt["state"].values())
    ):
        raise _damaged(path, folder, f"lacks or mangles {', '.join(wrong) or 'tensors/optimizer'}")
    return record


def _check_settings(old: dict, cfg: TrainConfig, path: Path) -> None:
    new = cfg.training_fields()
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserError(
            f"{path} was made by a run with other settings ({', '.join(diff)}); rerun with the "
            f"same settings to resume, or delete {path.parent} to start over"
        )


def _read_tensors(folder: Path, info: dict, path: Path) -> dict[str, torch.Tensor]:
    """The tensors file checkpoint.json names, after checking its size and sha256."""
    file = folder / info["file"]
    if not file.is_file():
        raise _damaged(path, folder, f"names {info['file']}, which is missing")
    if file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
        raise _damaged(file, folder, f"does not match {path.name} (truncated, corrupt or replaced)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(file, folder, f"is not a readable safetensors file ({e})") from None


def _optimizer_state(record: dict, tensors: dict, net: dict, folder: Path) -> dict:
    """The optimiser's `state_dict()` from its tensors (`optimizer.<parameter>.<key>`, beside the
    net's `net.<name>`) and checkpoint.json's optimiser part."""
    file = folder / record["tensors"]["file"]
    names = record["parameters"]
    index = {name: i for i, name in enumerate(names)}
    scalars = record["optimizer"]["state"]
    state = {i: dict(scalars.get(name) or {}) for i, name in enumerate(names)}
    for key, v in tensors.items():
        if key.startswith("net."):
            continue
        prefix, _, rest = key.partition(".")
        name, _, what = rest.rpartition(".")
        if prefix != "optimizer" or name not in index:
            raise _damaged(file, folder, f"holds {key}, which no parameter of the set owns")
        if v.dim() and (v.shape != net[name].shape or v.dtype != net[name].dtype):
            raise _damaged(file, folder, f"holds {key} of shape {list(v.shape)} for {name}")
        state[index[name]][what] = v
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}
        for group in record["optimizer"]["param_groups"]
        if isinstance(group, dict)
    ]
    indices = [i for g in groups for i in (g.get("params") or [])]
    if sorted(indices, key=str) != sorted(range(len(names)), key=str):
        raise _damaged(file.parent / CHECKPOINT_FILE, folder, "has optimiser groups of other sizes")
    return {"state": {i: s for i, s in state.items() if s}, "param_groups": groups}


def _check_fits(
    net_state: dict, param_names: list, cfg: TrainConfig, file: Path, folder: Path
) -> None:
    """The net's tensors are those of a `TrainableTranscoders` of `cfg` (names, shapes, dtypes), and
    `param_names` its parameters in the optimiser's order."""
    w_enc = net_state.get("W_enc")
    if w_enc is None or w_enc.dim() != 3:
        raise _damaged(file, folder, "holds no W_enc [L, D, F]")
    with torch.device("meta"):
        net = TrainableTranscoders(cfg, w_enc.shape[0], w_enc.shape[1])
    expected = net.state_dict()
    if param_names != [n for n, _ in net.named_parameters()]:
        raise _damaged(file.parent / CHECKPOINT_FILE, folder, "lists other parameters than the set")
    if set(expected) != set(net_state):
        odd = sorted(set(expected) ^ set(net_state))
        raise _damaged(file, folder, f"does not hold the set's tensors ({', '.join(odd[:6])})")
    for name, t in expected.items():
        if net_state[name].shape != t.shape or net_state[name].dtype != t.dtype:
            shape = list(net_state[name].shape)
            raise _damaged(file, folder, f"holds {name} of shape {shape}, not {list(t.shape)}")


# -- the loop --------------------------------------------------------------------------------------


def _summary(history: list[dict], last: int = 10) -> dict:
    """Mean of the last `last` steps' metrics (per layer where they are per layer)."""
    tail = history[-last:]
    out = {}
    for key in ("loss", "aux", "fvu", "l0", "dead"):
        vals = torch.tensor([h[key] for h in tail], dtype=torch.float64)
        out[key] = vals.mean(0).tolist()
    return out


def train_transcoders(
    cfg: TrainConfig, loaded=None, buffer=None, model_name: str | None = None, on_step=None
) -> TranscoderSet:
    """Train (or resume) the run `cfg` and write it to `cfg.out` (native layout) when `cfg.out` is
    set.

    loaded: a LoadedModel (default: `cfg.model` loaded for harvesting, in `cfg.harvest_dtype`);
    buffer: any object with `.batch(step) -> (mlp_in, mlp_out)` `[B, L, D]` raw activations
    (default: harvested from `loaded`). on_step(step, metrics) is called after every step.
    Returns the trained `TranscoderSet`."""
    with reuse_freed_memory():
        return _train_transcoders(cfg, loaded, buffer, model_name, on_step)


@dataclass
class _Run:
    """What training carries from step to step, and what a checkpoint restores."""

    net: TrainableTranscoders
    opt: torch.optim.Optimizer
    start: int  # the first step of this session
    history: list[dict]  # every step's metrics, those of earlier sessions included


def _output_paths(cfg: TrainConfig) -> tuple[Path | None, Path | None]:
    """The trained set's folder and the checkpoint folder (both None without `cfg.out`), cleared of
    the temporary files a killed run left."""
    out = Path(cfg.out).expanduser() if cfg.out else None
    folder = cfg.checkpoint_dir() if out else None
    if out:
        _remove_partials(out.parent, glob.escape(out.name))
        _remove_partials(folder, "checkpoint*")
    return out, folder


def _activation_buffer(cfg: TrainConfig, loaded) -> ActivationBuffer:
    """Batches of MLP activations harvested from `loaded` over `cfg.text`."""
    paragraphs = text_source(cfg.text, loaded, "train", seed=cfg.seed)
    source = ActivationSource(
        loaded,
        paragraphs,
        context=cfg.context,
        seed=cfg.seed,
        harvest_dtype=cfg.harvest_dtype,
        cache_dir=cfg.activation_cache or None,
    )
    return ActivationBuffer(
        source,
        cfg.buffer_tokens,
        cfg.batch_size,
        seed=cfg.seed,
        passes=cfg.buffer_passes,
        progress=cfg.progress,
    )


def _new_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, fused=True
    )


def _start_or_resume(cfg: TrainConfig, buffer, state: dict | None) -> _Run:
    """The net and optimiser from the checkpoint `state` (`_load_checkpoint`), or initialised from
    the first `init_tokens` tokens of `buffer`."""
    x0, _ = buffer.batch(0)  # [B, L, D]
    net = TrainableTranscoders(cfg, x0.shape[1], x0.shape[2])
    opt = _new_optimizer(net, cfg)
    if state:
        held = tuple(state["net"]["W_enc"].shape[:2])
        if held != tuple(x0.shape[1:]):
            raise UserError(
                f"{state['path']} holds transcoders for {held[0]} layers of width {held[1]}, but "
                f"the model has {x0.shape[1]} of width {x0.shape[2]}; delete "
                f"{state['path'].parent} to start over"
            )
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        return _Run(net, opt, state["step"], state["history"])
    initialise_from_buffer(net, cfg, buffer)
    return _Run(net, opt, 0, [])


def initialise_from_buffer(net: TrainableTranscoders, cfg: TrainConfig, buffer) -> None:
    """Initialise `net` from the first `init_tokens` tokens of `buffer`, gathered in the dtype the
    buffer stores (`buffer.dtype`; bfloat16 by default, where the float32 batches convert back
    exactly, in half the memory)."""
    n_init = max(1, -(-cfg.init_tokens // cfg.batch_size))
    dtype = getattr(buffer, "dtype", torch.float32)  # test buffers may have none
    batches = (buffer.batch(i) for i in range(n_init))
    xs, ys = zip(*((x.to(dtype), y.to(dtype)) for x, y in batches))
    net.initialise(torch.cat(xs), torch.cat(ys), torch.Generator().manual_seed(cfg.seed))


def _progress_bar(cfg: TrainConfig, start: int, desc: str):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)


def _show_step(bar, m: dict) -> None:
    """One more step on `bar`, with its loss and its layer means of FVU, L0 and dead fraction."""
    bar.update(1)
    bar.set_postfix(
        loss=f"{m['loss']:.3f}",
        fvu=f"{sum(m['fvu']) / len(m['fvu']):.3f}",
        l0=f"{sum(m['l0']) / len(m['l0']):.1f}",
        dead=f"{sum(m['dead']) / len(m['dead']):.2f}",
    )


def _param_names(net: nn.Module) -> list[str]:
    """The net's parameters in the optimiser's order (a checkpoint names its moments by them)."""
    return [name for name, _ in net.named_parameters()]


def _train_loop(cfg: TrainConfig, run: _Run, buffer, folder: Path | None, on_step, bar) -> None:
    """Steps `run.start` to the end, with a checkpoint every `checkpoint_every` steps but after the
    last (the finished set follows)."""
    for step in range(run.start, cfg.steps):
        x, y = buffer.batch(step)
        m = train_step(run.net, run.opt, x, y, step)
        run.history.append(m)
        if on_step is not None:
            on_step(step, m)
        if bar is not None:
            _show_step(bar, m)
        if folder and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            net_state, opt_state = run.net.state_dict(), run.opt.state_dict()
            names = _param_names(run.net)
            _save_checkpoint(folder, cfg, step + 1, run.history, net_state, opt_state, names)
    if bar is not None:
        bar.close()


def _final_metrics(cfg: TrainConfig, history: list[dict], t_start: float) -> dict:
    """The metrics a trained set carries: the means of the last steps' metrics, the run's length,
    and this session's time."""
    summary = _summary(history) if history else {}
    metrics = {"train_" + k: v for k, v in summary.items()}
    metrics.update(
        steps=cfg.steps,
        tokens=cfg.steps * cfg.batch_size,
        seconds_last_session=round(time.time() - t_start, 1),
    )
    return metrics


def _train_transcoders(
    cfg: TrainConfig, loaded, buffer, model_name: str | None, on_step
) -> TranscoderSet:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, folder = _output_paths(cfg)
    # before any harvesting: a damaged checkpoint, or one of other settings, is reported at once
    state = _load_checkpoint(folder, cfg) if folder else None
    if buffer is None:
        if loaded is None:
            loaded = load_harvest_model(cfg.model, cfg.harvest_dtype)
        buffer = _activation_buffer(cfg, loaded)
    if model_name is None:
        model_name = loaded.name if loaded is not None else ""
    run = _start_or_resume(cfg, buffer, state)
    del state  # the net and optimiser hold copies now

    bar = _progress_bar(cfg, run.start, f"training {cfg.kind} transcoders")
    t_start = time.time()
    _train_loop(cfg, run, buffer, folder, on_step, bar)
    if cfg.activation == "batchtopk":
        calibrate_batchtopk(run.net, buffer, range(max(0, cfg.steps - 4), cfg.steps))

    metrics = _final_metrics(cfg, run.history, t_start)
    tc = run.net.to_transcoder_set(model_name, metrics=metrics, extra={"train_config": asdict(cfg)})
    if out:
        save_transcoders(tc, out)
        if not cfg.keep_checkpoint:
            shutil.rmtree(folder, ignore_errors=True)
    return tc


def save_transcoders(tc: TranscoderSet, out: Path) -> Path:
    """Write a trained set in the native layout (atomically)."""
    return save_native(tc, out)


# -- command line ----------------------------------------------------------------------------------


def run_train(cfg: TrainConfig) -> int:
    if not cfg.out:
        raise UserError("transcoders train needs --out DIR (where the trained set is written)")
    own_process()  # the command ends with the training: the allocator may be tuned for it
    tc = train_transcoders(cfg)
    m = tc.cfg.metrics
    fvu, l0, dead = (sum(m[k]) / len(m[k]) for k in ("train_fvu", "train_l0", "train_dead"))
    print(
        f"wrote {cfg.out}: {cfg.kind} {cfg.activation} x{tc.n_layers} layers, d_sae {tc.d_sae}; "
        f"last steps: FVU {fvu:.3f}, L0 {l0:.1f}, dead {dead:.1%}. "
        f"Evaluate with: transcoders eval {cfg.out}"
    )
    return 0


COMMANDS = [
    Command("train", TrainConfig, run_train, "train transcoders (PLT, skip, CLT) on a model's MLPs")
]
