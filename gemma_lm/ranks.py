"""The ranks of one torch.distributed job, as used by batch tracing and distributed training.

`torchrun --nproc-per-node N ...` starts N processes and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `Ranks.start()` joins that group (gloo on the CPU, nccl when the job
runs on CUDA). Started as one plain process, or under torchrun with one rank, it is a group of one
and every collective is a no-op, so the same code path serves both. A group that the caller set up
already (e.g. with `torch.multiprocessing.spawn`) is used as it is and left open.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist

from .errors import UserError

DistBackend = Literal["auto", "gloo", "nccl"]  # auto: nccl on CUDA, gloo on the CPU
BACKENDS = get_args(DistBackend)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass
class Ranks:
    """This process's place in the job. `owns_group`: we created the process group and must destroy
    it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, backend: str = "auto", device: str = "cpu", timeout_min: float = 120.0) -> Ranks:
        """Join the job's process group (or describe the one already joined)."""
        if backend not in BACKENDS:
            raise UserError(
                f"unknown distributed backend {backend!r}; use one of {', '.join(BACKENDS)}"
            )
        if dist.is_available() and dist.is_initialized():
            return cls(
                dist.get_rank(),
                dist.get_world_size(),
                int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                dist.get_backend(),
                owns_group=False,
            )
        if not launched_by_torchrun():
            return cls()
        if not dist.is_available():
            raise UserError(
                "this torch build has no torch.distributed; run as one process (without torchrun)"
            )
        on_cuda = str(device).startswith("cuda")
        if backend == "auto":
            backend = "nccl" if on_cuda else "gloo"
        if backend == "nccl" and not (on_cuda and torch.cuda.is_available()):
            raise UserError(
                "the nccl backend needs CUDA devices (--device cuda); on the CPU use "
                "--dist-backend gloo"
            )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if on_cuda:
            # one GPU per process; nccl's object collectives use the current device
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, backend, owns_group=True)

    def device_for(self, device: str) -> str:
        """`cuda` becomes this rank's GPU (`cuda:LOCAL_RANK`); anything else is kept."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.distributed else device

    # -- collectives (no-ops in a group of one) ----------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """`obj` of rank `src`, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def agree(self, error: str | None) -> None:
        """Raise the same UserError on every rank when any rank hit one, so no rank waits forever in
        a later collective for a rank that has given up."""
        errors = [e for e in self.all_gather_object(error) if e]
        if errors:
            raise UserError(errors[0])

    def finish(self) -> None:
        if self.owns_group and dist.is_initialized():
            end_process_group()
            self.owns_group = False


def end_process_group() -> None:
    """Destroy the default process group and free it now, while the interpreter is whole.

    A reference cycle can keep a gloo group alive past `destroy_process_group` until the collection
    at interpreter exit; its worker threads then free their last Work objects, whose tensors need
    the GIL to drop their Python objects, find the interpreter finalising, and the process aborts
    ("terminate called without an active exception", SIGABRT after all work is done; seen in gdb on
    core dumps of a two-rank training job under load, in a fair share of its runs). Collecting here
    frees the group and joins its threads first."""
    dist.destroy_process_group()
    gc.collect()
