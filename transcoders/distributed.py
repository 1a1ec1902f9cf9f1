"""Transcoder training across the ranks of a torchrun job: data parallel, or feature-sharded for
CLTs.

    torchrun --nproc-per-node 8 -m transcoders train-distributed --out DIR --kind clt \
        --device cuda ...

The recipe is `transcoders.train`'s, step for step: the same `TrainConfig`, parameters
(`TrainableTranscoders`), initialisation, objective, learning-rate schedule and checkpoint file, so
a distributed run gives the single-process result up to float rounding, and either can resume the
other's checkpoint. Two ways to split the work (`shard`):

- "data" (default for PLT / skip sets): every rank holds the whole set and trains on batch_size / W
  rows of each batch; gradients are averaged across ranks, which equals the gradient of the whole
  batch's loss.
- "features" (default for CLTs, whose decoders outgrow one device): rank r holds features [r F/W,
  (r+1) F/W) of every layer (their encoder columns, thresholds and decoder rows) and sees the whole
  batch; the reconstruction is the all-reduced sum of the ranks' partial decodes (its gradient
  passes back unchanged to every rank), TopK / BatchTopK / AuxK keep the global top k found from
  each rank's local top k, and the shared terms (b_dec, W_skip) are replicated.

Each batch is produced once per step: rank 0 draws it (harvesting the model when the buffer needs
refilling) and broadcasts it (`data="broadcast"`), or, for deterministic sources every rank can read
cheaply (PlantedData, a shared activation cache), each rank draws the same batch itself
(`"replicate"`). Checkpoints hold the whole set: rank 0 gathers the shards and writes them to
`<out>.train/` in `transcoders.train`'s format (a safetensors file and the checkpoint.json that
commits it); a run at any world size (1 included, and `transcoders train`) slices it anew. The
finished set is written by rank 0 with `transcoders.train.save_transcoders`.
"""

from __future__ import annotations

import glob
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

from gemma_lm.errors import UserError
from gemma_lm.jobs import Command
from gemma_lm.memory import own_process, reuse_freed_memory
from gemma_lm.ranks import BACKENDS, DistBackend, Ranks

from .activations import jumprelu
from .activations import step as heaviside
from .data import load_harvest_model
from .model import TranscoderSet
from .train import (
    TrainableTranscoders,
    TrainConfig,
    _activation_buffer,
    _autocast,
    _final_metrics,
    _load_checkpoint,
    _new_optimizer,
    _param_names,
    _progress_bar,
    _remove_partials,
    _Run,
    _save_checkpoint,
    _show_step,
    calibrate_batchtopk,
    initialise_from_buffer,
    lr_factor,
    save_transcoders,
)

Sharding = Literal["auto", "data", "features"]
DataMode = Literal["broadcast", "replicate"]
SHARDINGS, DATA_MODES = get_args(Sharding), get_args(DataMode)


@dataclass
class DistributedTrainConfig:
    """`transcoders train` across the processes of a torchrun job: launch with
    `torchrun --nproc-per-node N -m transcoders train-distributed --out DIR ...`. PLT/skip sets
    train data parallel; CLTs are feature-sharded (each rank holds d_sae / N features of every
    layer). Checkpoints are whole sets: rerun with any number of ranks (or `transcoders train`) to
    resume."""

    train: TrainConfig = field(default_factory=TrainConfig)
    shard: Sharding = "auto"
    """data: split each batch; features: split every layer's features (auto: features for CLTs,
    data otherwise)"""
    data: DataMode = "broadcast"
    """broadcast: rank 0 harvests each batch and sends it; replicate: every rank reads the same
    batch itself (a shared --activation-cache)"""
    device: str = "cpu"
    """cpu, or cuda (rank r uses cuda:LOCAL_RANK)"""
    dist_backend: DistBackend = "auto"
    """torch.distributed backend (auto: nccl on CUDA, gloo on the CPU)"""
    timeout_min: float = 120.0
    """how long a rank waits for the others (rank 0 harvesting, checkpoints), in minutes"""

    def check(self) -> None:
        if self.shard not in SHARDINGS:
            raise UserError(f"unknown --shard {self.shard!r}; use one of {', '.join(SHARDINGS)}")
        if self.data not in DATA_MODES:
            raise UserError(f"unknown --data {self.data!r}; use one of {', '.join(DATA_MODES)}")
        if self.dist_backend not in BACKENDS:
            raise UserError(
                f"unknown --dist-backend {self.dist_backend!r}; use one of {', '.join(BACKENDS)}"
            )


# -- who holds what --------------------------------------------------------------------------------


@dataclass
class Layout:
    """How the work is split. Features mode: this rank's features are [lo, hi) of every layer's
    F."""

    ranks: Ranks
    mode: str  # data | features
    n_features: int  # F of the whole set
    lo: int
    hi: int

    @classmethod
    def make(cls, ranks: Ranks, cfg: TrainConfig, shard: str) -> Layout:
        mode = shard if shard != "auto" else ("features" if cfg.kind == "clt" else "data")
        W, F = ranks.world_size, cfg.d_sae
        if mode == "features" and F % W:
            raise UserError(
                f"d_sae {F} does not split evenly over {W} ranks; pick a d_sae divisible by {W}"
            )
        if mode == "data" and cfg.batch_size % W:
            raise UserError(
                f"batch_size {cfg.batch_size} does not split evenly over {W} ranks; pick a "
                f"multiple of {W}"
            )
        per = F // W if mode == "features" else F
        lo = ranks.rank * per if mode == "features" else 0
        return cls(ranks, mode, F, lo, lo + per)

    @property
    def split_features(self) -> bool:
        return self.mode == "features" and self.ranks.distributed

    @property
    def split_batch(self) -> bool:
        return self.mode == "data" and self.ranks.distributed

    def batch_rows(self, batch_size: int) -> slice:
        if not self.split_batch:
            return slice(0, batch_size)
        per = batch_size // self.ranks.world_size
        return slice(self.ranks.rank * per, (self.ranks.rank + 1) * per)

    def local_chunk(self, a: int, b: int) -> tuple[int, int]:
        """Global feature range [a, b) (a Matryoshka chunk) in this rank's local indices."""
        n = self.hi - self.lo
        return min(max(a - self.lo, 0), n), min(max(b - self.lo, 0), n)


def feature_dim(name: str, is_clt: bool) -> int | None:
    """The feature axis of a `TrainableTranscoders` parameter or buffer (None: not per feature)."""
    if name.startswith("W_dec"):
        return 0 if is_clt else 1  # CLT W_dec.s [F, L - s, D]; PLT W_dec [L, F, D]
    return {"W_enc": 2, "b_enc": 1, "log_threshold": 1, "silent_tokens": 1}.get(name)


# -- collectives -----------------------------------------------------------------------------------


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(t, op=op)
    return t


class _SumOverRanks(torch.autograd.Function):
    """Sum of every rank's tensor. Each rank's loss is the same function of the sum, so the gradient
    of a rank's own summand is the gradient of the sum, unchanged."""

    @staticmethod
    def forward(ctx, t):
        return _all_reduce(t.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad


def _sum_features(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    return _SumOverRanks.apply(t) if layout.split_features else t


def _kth_largest(values: torch.Tensor, k: int, split: bool) -> torch.Tensor:
    """The k-th largest entry along the last axis of `values` `[..., n]`, that axis being split
    across the ranks when `split` (the global top k lies within the union of every rank's local top
    k)."""
    local = values.topk(min(k, values.shape[-1]), dim=-1).values
    if split:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        local = torch.cat(parts, dim=-1)
    return local.topk(k, dim=-1).values[..., -1]


# -- the local share of the set --------------------------------------------------------------------


def _set_tensor(net: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    *path, last = name.split(".")
    owner = net
    for part in path:
        owner = getattr(owner, part)
    if isinstance(owner, nn.ParameterList):
        owner[int(last)] = nn.Parameter(value)
    elif is_param:
        setattr(owner, last, nn.Parameter(value))
    else:
        owner.register_buffer(last, value)


def shard_state(full: dict, layout: Layout, is_clt: bool) -> dict:
    """This rank's slice of a whole-set `state_dict`."""
    out = {}
    for name, t in full.items():
        d = feature_dim(name, is_clt)
        out[name] = (
            t.narrow(d, layout.lo, layout.hi - layout.lo).clone()
            if d is not None and layout.mode == "features"
            else t.clone()
        )
    return out


class ShardedTranscoders(TrainableTranscoders):
    """`TrainableTranscoders` holding this rank's share: features [lo, hi) of every layer (features
    mode) or all of them (data mode). `forward` gives what the whole set gives on the whole batch:
    reconstructions summed over the ranks, every top-k global, the BatchTopK floor of the whole
    batch."""

    layout: Layout

    def forward(self, xn: torch.Tensor):
        batch_total = xn.shape[1] * (self.layout.ranks.world_size if self.layout.split_batch else 1)
        return _forward(self, xn, self.layout, batch_total)


def local_net(
    cfg: TrainConfig, n_layers: int, d_model: int, state: dict, layout: Layout, device: str
) -> ShardedTranscoders:
    """This rank's `ShardedTranscoders`, loaded from a whole-set state."""
    with torch.device("meta"):  # no whole-size allocation
        net = ShardedTranscoders(cfg, n_layers, d_model)
    params = {n for n, _ in net.named_parameters()}
    for name, t in shard_state(state, layout, net.is_clt).items():
        _set_tensor(net, name, t.to(device), name in params)
    net.F = layout.hi - layout.lo
    net.layout = layout
    return net


def _gather_features(t: torch.Tensor, d: int, layout: Layout) -> torch.Tensor | None:
    """The whole tensor on rank 0 (None elsewhere) from every rank's slice along axis d."""
    if not layout.split_features:
        return t.detach().cpu().clone() if layout.ranks.is_main else None
    parts = (
        [torch.empty_like(t) for _ in range(layout.ranks.world_size)]
        if layout.ranks.is_main
        else None
    )
    dist.gather(t.detach().contiguous(), parts, dst=0)
    return torch.cat(parts, dim=d).cpu() if parts is not None else None


def gather_state(net: TrainableTranscoders, opt: torch.optim.Optimizer, layout: Layout):
    """(whole-set state_dict, whole-set optimiser state_dict) on rank 0; (None, None) elsewhere."""
    net_state = {}
    for name, t in net.state_dict().items():
        d = feature_dim(name, net.is_clt)
        net_state[name] = (
            _gather_features(t, d, layout) if d is not None else t.detach().cpu().clone()
        )
    # (replicated tensors are copied on every rank; cheap next to the sharded ones)
    opt_state = opt.state_dict()
    names = [n for n, _ in net.named_parameters()]
    whole = {"param_groups": opt_state["param_groups"], "state": {}}
    for i, per_param in opt_state["state"].items():
        d = feature_dim(names[i], net.is_clt)
        whole["state"][i] = {
            k: _gather_features(v, d, layout)
            if d is not None and v.dim() > 0
            else v.detach().cpu().clone()
            for k, v in per_param.items()
        }
    if not layout.ranks.is_main:
        return None, None
    return net_state, whole


def shard_optimizer_state(
    whole: dict, net: TrainableTranscoders, layout: Layout, device: str
) -> dict:
    names = [n for n, _ in net.named_parameters()]
    state = {}
    for i, per_param in whole["state"].items():
        d = feature_dim(names[int(i)], net.is_clt)
        state[int(i)] = {
            k: (
                v.narrow(d, layout.lo, layout.hi - layout.lo)
                if d is not None and v.dim() > 0 and layout.mode == "features"
                else v
            )
            .clone()
            .to(device if v.dim() > 0 else "cpu")
            for k, v in per_param.items()
        }
    return {"param_groups": whole["param_groups"], "state": state}


# -- one step --------------------------------------------------------------------------------------


def _activations(net: TrainableTranscoders, pre: torch.Tensor, layout: Layout, batch_total: int):
    """Training activations `[L, B, F_local]` and the BatchTopK floor `[L]` (or None), with every
    top-k taken over the whole set and the whole batch."""
    cfg = net.cfg
    if cfg.activation == "relu":
        return torch.relu(pre), None
    if cfg.activation == "jumprelu":
        return jumprelu(pre, net.log_threshold.exp()[:, None, :], cfg.bandwidth), None
    r = torch.relu(pre)
    if cfg.activation == "topk":
        t = _kth_largest(r.detach(), min(cfg.k, layout.n_features), layout.split_features)
        return r * (r >= t[..., None]), None
    # batchtopk: the k * n largest of each layer over positions and features, wherever they live
    L = r.shape[0]
    n_keep = min(cfg.k * batch_total, batch_total * layout.n_features)
    t = _kth_largest(r.detach().reshape(L, -1), n_keep, layout.ranks.distributed)
    keep = r >= t[:, None, None]
    floor = torch.where(keep & (r > 0), r.detach(), torch.full_like(r, float("inf"))).amin((1, 2))
    if layout.ranks.distributed:
        _all_reduce(floor, dist.ReduceOp.MIN)
    return r * keep, torch.where(torch.isinf(floor), torch.zeros_like(floor), floor)


def _forward(net: TrainableTranscoders, xn: torch.Tensor, layout: Layout, batch_total: int):
    """`TrainableTranscoders.forward` on this rank's share: (pre `[L, B, F_local]`, acts,
    reconstructions `[P, L, B, D]` of the whole set, BatchTopK floor)."""
    cfg = net.cfg
    with _autocast(cfg.compute_dtype):
        pre = torch.baddbmm(net.b_enc[:, None, :], xn, net.W_enc).float()
    acts, floor = _activations(net, pre, layout, batch_total)
    chunks = list(zip([0] + cfg.matryoshka, cfg.matryoshka + [layout.n_features]))
    with _autocast(cfg.compute_dtype):
        base = net.b_dec[:, None, :].expand_as(xn)
        if net.W_skip is not None:
            base = base + torch.bmm(xn, net.W_skip)
        parts = [
            net._decode(acts[:, :, a:b], a, b).float()
            for a, b in (layout.local_chunk(*c) for c in chunks)
        ]
    parts = _sum_features(torch.stack(parts), layout)  # [P, L, B, D]
    return pre, acts, base.float() + parts.cumsum(0), floor


def _sync_gradients(net: TrainableTranscoders, layout: Layout) -> None:
    """Data mode: average every gradient. Features mode: average the replicated terms' (equal
    already, but averaging keeps the replicas from drifting apart on hardware with non-deterministic
    kernels)."""
    if not layout.ranks.distributed:
        return
    grads = [
        p.grad
        for name, p in net.named_parameters()
        if p.grad is not None and (layout.mode == "data" or feature_dim(name, net.is_clt) is None)
    ]
    if grads:  # one collective for all of them
        flat = _all_reduce(torch.cat([g.reshape(-1) for g in grads])).div_(layout.ranks.world_size)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def _clip_gradients(net: TrainableTranscoders, max_norm: float, layout: Layout) -> None:
    """`torch.nn.utils.clip_grad_norm_` over the whole set's gradients."""
    sharded = torch.zeros((), dtype=torch.float64, device=net.b_dec.device)
    shared = torch.zeros((), dtype=torch.float64, device=net.b_dec.device)
    grads = []
    for name, p in net.named_parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.detach().double().pow(2).sum()
        if layout.split_features and feature_dim(name, net.is_clt) is not None:
            sharded += sq
        else:
            shared += sq
    if layout.split_features:
        _all_reduce(sharded)
    total = (sharded + shared).sqrt().float()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))


@torch.enable_grad()  # callers may be inside no_grad (the first trace trains the default set)
def distributed_train_step(
    net: ShardedTranscoders, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, step: int
) -> dict:
    """`transcoders.train.train_step` on this rank's share of the set (features mode) or of the
    batch (data mode); x, y `[B_local, L, D]`. Returns the step's metrics for the whole set and
    batch."""
    cfg, layout = net.cfg, net.layout
    W = layout.ranks.world_size
    batch_total = x.shape[0] * (W if layout.split_batch else 1)
    xn, yn = net.normalise(x, y)
    pre, acts, recons, floor = net(xn)
    # [P]; data mode: this rank's rows (ranks are averaged)
    mse = (recons - yn).pow(2).mean((1, 2, 3))
    loss = mse.mean()
    full = recons[-1]
    active = acts > 0
    penalty = torch.zeros((), device=x.device)
    warm = min(1.0, (step + 1) / max(1, cfg.sparsity_warmup_frac * cfg.steps))
    if cfg.activation in ("jumprelu", "relu") and cfg.sparsity_coeff:
        # a sum over features: features mode adds this rank's features' terms (the others' do not
        # depend on this rank's parameters)
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
    dead = net.silent_tokens >= cfg.dead_tokens  # [L, F_local]
    has_dead = dead.any(-1)
    if layout.split_features:
        has_dead = _all_reduce(has_dead.to(torch.int32), dist.ReduceOp.MAX).bool()
    aux = torch.zeros((), device=x.device)
    if cfg.aux_coeff and bool(has_dead.any()):
        err = (yn - full).detach()
        masked = pre.masked_fill(~dead[:, None, :], float("-inf"))
        t = _kth_largest(masked.detach(), min(cfg.aux_k, layout.n_features), layout.split_features)
        aux_acts = torch.relu(masked) * (masked >= t[..., None])
        with _autocast(cfg.compute_dtype):
            err_hat = torch.bmm(aux_acts, net.own_decoder()).float()
        err_hat = _sum_features(err_hat, layout)
        num = (err_hat - err).pow(2).sum((1, 2))
        den = err.pow(2).sum((1, 2))
        if layout.split_batch:  # the whole batch's ratio; W x this rank's numerator averages to it
            _all_reduce(den)
            aux = (W * num / den.clamp_min(1e-12))[has_dead].mean()
        else:
            aux = (num / den.clamp_min(1e-12))[has_dead].mean()
        loss = loss + cfg.aux_coeff * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    _sync_gradients(net, layout)
    if cfg.max_grad_norm:
        _clip_gradients(net, cfg.max_grad_norm, layout)
    for group in opt.param_groups:
        group["lr"] = cfg.lr * lr_factor(step, cfg)
    opt.step()
    with torch.no_grad():
        fired = active.any(1)
        if layout.split_batch:
            fired = _all_reduce(fired.to(torch.int32), dist.ReduceOp.MAX).bool()
        net.silent_tokens.copy_(
            torch.where(fired, torch.zeros_like(net.silent_tokens), net.silent_tokens + batch_total)
        )
        if floor is not None:
            t = net.bt_threshold
            net.bt_threshold.copy_(torch.where(torch.isnan(t), floor, 0.9 * t + 0.1 * floor))
        return _metrics(net, layout, yn, full, mse, penalty, aux, active, dead, warm, batch_total)


def _metrics(
    net, layout: Layout, yn, full, mse, penalty, aux, active, dead, warm, batch_total
) -> dict:
    """The step's metrics as `train_step` reports them, for the whole set and the whole batch."""
    cfg = net.cfg
    W = layout.ranks.world_size
    l0 = active.sum(-1).float().sum(1)  # [L] summed over this rank's positions
    n_dead = dead.float().sum(1)  # [L]
    if layout.split_batch:
        y_sum, y_sq = yn.sum(1).double(), yn.double().pow(2).sum((1, 2))  # [L, D], [L]
        err_sq = (full - yn).double().pow(2).sum((1, 2))
        vec = torch.cat(
            [mse.double(), penalty.double().reshape(1), l0.double(), y_sum.flatten(), y_sq, err_sq]
        )
        _all_reduce(vec)
        P, L = len(mse), len(l0)
        mse_all, penalty_all = vec[:P] / W, vec[P] / W
        l0_all = vec[P + 1 : P + 1 + L] / batch_total
        y_sum = vec[P + 1 + L : P + 1 + L + y_sum.numel()].view_as(y_sum)
        y_sq, err_sq = vec[-2 * L : -L], vec[-L:]
        var = (y_sq - y_sum.pow(2).sum(-1) / batch_total).clamp_min(1e-12)
        fvu = err_sq / var
        dead_frac = n_dead / layout.n_features
    else:
        var = (yn - yn.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
        fvu = (full - yn).pow(2).sum((1, 2)) / var
        mse_all, penalty_all = mse, penalty
        if layout.split_features:
            vec = _all_reduce(torch.cat([penalty.reshape(1).float(), l0, n_dead]))
            penalty_all, l0, n_dead = vec[0], vec[1 : 1 + len(l0)], vec[1 + len(l0) :]
        l0_all = l0 / batch_total
        dead_frac = n_dead / layout.n_features
    aux_all = _whole_aux(aux, layout)
    loss = mse_all.mean() + cfg.aux_coeff * aux_all
    if cfg.activation in ("jumprelu", "relu") and cfg.sparsity_coeff:
        loss = loss + warm * cfg.sparsity_coeff * penalty_all
    return {
        "loss": float(loss),
        "aux": float(aux_all),
        "fvu": fvu.float().tolist(),
        "l0": l0_all.float().tolist(),
        "dead": dead_frac.float().tolist(),
    }


def _whole_aux(aux: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Data mode's per-rank AuxK term is W x this rank's share of the whole batch's; their mean is
    the whole."""
    aux = aux.detach().reshape(1).double()
    if layout.split_batch:
        _all_reduce(aux).div_(layout.ranks.world_size)
    return aux[0]


# -- the run ---------------------------------------------------------------------------------------


def _harvest_buffer(cfg: TrainConfig, loaded):
    """(the model, the activation buffer `train_transcoders` builds for `cfg`: the same text, order
    and batches)."""
    loaded = loaded if loaded is not None else load_harvest_model(cfg.model, cfg.harvest_dtype)
    # no harvesting bar: with --data replicate every rank harvests, and rank 0 shows the step bar
    return loaded, _activation_buffer(replace(cfg, progress=False), loaded)


def _initial_checkpoint(cfg: TrainConfig, buffer, folder: Path) -> None:
    """Step 0 exactly as `train_transcoders` starts, written as its checkpoint for every rank to
    slice."""
    x0, _ = buffer.batch(0)
    net = TrainableTranscoders(cfg, x0.shape[1], x0.shape[2])
    opt = _new_optimizer(net, cfg)
    initialise_from_buffer(net, cfg, buffer)
    _save_checkpoint(folder, cfg, 0, [], net.state_dict(), opt.state_dict(), _param_names(net))


class RankBatches:
    """This rank's rows of each batch `[B_local, L, D]`, drawn once per step: by rank 0, then
    broadcast (`data="broadcast"`), or by every rank from its own buffer (`"replicate"`). A buffer
    (`.batch(step)`) that `transcoders.train`'s helpers can read."""

    def __init__(self, buffer, shape: tuple, layout: Layout, data: str, device: str):
        self.buffer, self.shape, self.layout, self.data, self.device = (
            buffer,
            shape,
            layout,
            data,
            device,
        )

    def batch(self, step: int):
        ranks = self.layout.ranks
        if self.data == "replicate" or not ranks.distributed:
            x, y = (t.to(self.device, torch.float32) for t in self.buffer.batch(step))
        else:
            if ranks.is_main:
                x, y = (
                    t.to(self.device, torch.float32).contiguous() for t in self.buffer.batch(step)
                )
            else:
                x, y = (torch.empty(self.shape, device=self.device) for _ in range(2))
            dist.broadcast(x, src=0)
            dist.broadcast(y, src=0)
        rows = self.layout.batch_rows(x.shape[0])
        return x[rows], y[rows]

    def needs_fill(self, step: int) -> bool:
        return bool(getattr(self.buffer, "needs_fill", lambda s: False)(step))


def train_distributed(
    config: DistributedTrainConfig,
    buffer=None,
    loaded=None,
    model_name: str | None = None,
    on_step=None,
) -> TranscoderSet | None:
    """Train (or resume) `config.train` across the ranks of this torchrun job (or on one process)
    and write the set to `config.train.out`. Every rank calls this; rank 0 returns the trained
    `TranscoderSet`, the others None. buffer: as in `train_transcoders` (any
    `.batch(step) -> (mlp_in, mlp_out)` `[B, L, D]`); only rank 0 draws from it unless
    `config.data == "replicate"`."""
    config.check()
    if not config.train.out:
        raise UserError(
            "distributed training needs --out DIR (checkpoints and the trained set go there)"
        )
    ranks = Ranks.start(config.dist_backend, config.device, config.timeout_min)
    try:
        with reuse_freed_memory():
            return _train(config, ranks, buffer, loaded, model_name, on_step)
    finally:
        ranks.finish()


def _prepare_step_zero(cfg: TrainConfig, ranks: Ranks, buffer, loaded, out: Path, folder: Path):
    """Rank 0, while the others wait: clears the temporary files of a killed run, then checks the
    checkpoint in `folder` (before any harvesting) or writes step 0's. A UserError there is raised
    on every rank. Returns (loaded, buffer), harvested on rank 0 if it had to."""
    error = None
    if ranks.is_main:
        try:
            _remove_partials(out.parent, glob.escape(out.name))
            _remove_partials(folder, "checkpoint*")
            if _load_checkpoint(folder, cfg) is None:
                if buffer is None:
                    loaded, buffer = _harvest_buffer(cfg, loaded)
                _initial_checkpoint(cfg, buffer, folder)
        except UserError as e:
            error = str(e)
    ranks.agree(error)
    return loaded, buffer


def _load_share(cfg: TrainConfig, folder: Path, layout: Layout, device: str) -> _Run:
    """This rank's share of the checkpoint in `folder`: its net and optimiser, the step and the
    history."""
    state = _load_checkpoint(folder, cfg)
    if state is None:
        raise UserError(f"{folder} lost its checkpoint while the ranks started; run again")
    n_layers, d_model = state["net"]["W_enc"].shape[:2]
    net = local_net(cfg, n_layers, d_model, state["net"], layout, device)
    # hyperparameters, moments: the checkpoint's
    opt = torch.optim.AdamW(net.parameters(), fused=True)
    opt.load_state_dict(shard_optimizer_state(state["opt"], net, layout, device))
    return _Run(net, opt, state["step"], state["history"])


def _train_loop(
    cfg: TrainConfig, run: _Run, batches: RankBatches, layout: Layout, folder: Path, on_step, bar
) -> None:
    """Steps `run.start` to the end; every `checkpoint_every` steps but after the last, the ranks
    gather the whole set and rank 0 writes it as `transcoders.train`'s checkpoint."""
    for step in range(run.start, cfg.steps):
        if bar is not None and batches.needs_fill(step):
            bar.set_postfix_str("harvesting activations...")
        x, y = batches.batch(step)
        m = distributed_train_step(run.net, run.opt, x, y, step)
        run.history.append(m)
        if on_step is not None:
            on_step(step, m)
        if bar is not None:
            _show_step(bar, m)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            net_state, opt_state = gather_state(run.net, run.opt, layout)
            if layout.ranks.is_main:
                names = _param_names(run.net)
                _save_checkpoint(folder, cfg, step + 1, run.history, net_state, opt_state, names)
    if bar is not None:
        bar.close()


def _whole_set(
    cfg: TrainConfig, run: _Run, layout: Layout, model_name: str, t_start: float
) -> TranscoderSet | None:
    """The trained set gathered from every rank's share: on rank 0, None on the others."""
    net_state, _ = gather_state(run.net, run.opt, layout)
    if not layout.ranks.is_main:
        return None
    whole = TrainableTranscoders(cfg, run.net.L, run.net.D)
    whole.load_state_dict(net_state)
    return whole.to_transcoder_set(
        model_name,
        metrics=_final_metrics(cfg, run.history, t_start),
        extra={
            "train_config": asdict(cfg),
            "distributed": {"world_size": layout.ranks.world_size, "shard": layout.mode},
        },
    )


def _train(config: DistributedTrainConfig, ranks: Ranks, buffer, loaded, model_name, on_step):
    cfg = config.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ranks.device_for(config.device)
    layout = Layout.make(ranks, cfg, config.shard)
    out, folder = Path(cfg.out).expanduser(), cfg.checkpoint_dir()
    draws = ranks.is_main or (config.data == "replicate")
    loaded, buffer = _prepare_step_zero(cfg, ranks, buffer, loaded, out, folder)
    if draws and buffer is None:
        loaded, buffer = _harvest_buffer(cfg, loaded)
    if model_name is None:
        model_name = loaded.name if loaded is not None else ""
    run = _load_share(cfg, folder, layout, device)
    batches = RankBatches(
        buffer if draws else None,
        (cfg.batch_size, run.net.L, run.net.D),
        layout,
        config.data,
        device,
    )

    desc = (
        f"training {cfg.kind} transcoders on "
        f"{ranks.world_size} rank{'s' if ranks.distributed else ''} ({layout.mode})"
    )
    bar = _progress_bar(cfg, run.start, desc) if ranks.is_main else None
    t_start = time.time()
    _train_loop(cfg, run, batches, layout, folder, on_step, bar)
    if cfg.activation == "batchtopk":  # as train_transcoders: the threshold of the final weights
        calibrate_batchtopk(run.net, batches, range(max(0, cfg.steps - 4), cfg.steps))

    tc = _whole_set(cfg, run, layout, model_name, t_start)
    if tc is not None:
        save_transcoders(tc, out)
        if not cfg.keep_checkpoint:
            shutil.rmtree(folder, ignore_errors=True)
    ranks.barrier()  # nobody leaves (and, under torchrun, ends the job) before the set is written
    return tc


# -- command line ----------------------------------------------------------------------------------


def run_train_distributed(config: DistributedTrainConfig) -> int:
    own_process()  # the command ends with the training: the allocator may be tuned for it
    tc = train_distributed(config)
    if tc is not None:
        m, train, distributed = tc.cfg.metrics, config.train, tc.cfg.extra["distributed"]
        fvu, l0, dead = (sum(m[k]) / len(m[k]) for k in ("train_fvu", "train_l0", "train_dead"))
        print(
            f"wrote {train.out}: {train.kind} {train.activation} x{tc.n_layers} layers, "
            f"d_sae {tc.d_sae}, {distributed['world_size']} ranks ({distributed['shard']}); "
            f"last steps: FVU {fvu:.3f}, L0 {l0:.1f}, dead {dead:.1%}"
        )
    return 0


COMMANDS = [
    Command(
        "train-distributed",
        DistributedTrainConfig,
        run_train_distributed,
        "train transcoders across torchrun ranks (data parallel, or feature-sharded CLTs)",
    )
]
