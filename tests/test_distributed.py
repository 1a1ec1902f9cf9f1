"""Distributed transcoder training (`transcoders train-distributed`) equals single-process training.

Planted synthetic activations (deterministic per step), float32 arithmetic, settings under which
AuxK, the Matryoshka prefixes, the skip term and every activation rule take part. The two-rank cases
run in one torchrun job (gloo, CPU) that starts this file as a script (`_driver` at the bottom);
references are trained by `transcoders.train.train_transcoders` in the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gemma_lm.errors import UserError
from transcoders.distributed import DistributedTrainConfig, Layout, train_distributed
from transcoders.formats import load_native
from transcoders.testing import PlantedBuffer, PlantedData
from transcoders.train import TrainConfig, train_transcoders

STOP_AT = 7  # interrupted runs stop after this step; checkpoints every 5 steps

# name -> (TrainConfig overrides, shard)
CASES = {
    "clt-batchtopk": (dict(), "features"),
    "clt-topk": (dict(activation="topk"), "features"),
    "clt-jumprelu": (dict(activation="jumprelu", matryoshka=[]), "features"),
    "clt-relu-data": (dict(activation="relu", skip=False), "data"),
    "plt-batchtopk": (dict(kind="plt", matryoshka=[]), "auto"),
    "skip-jumprelu": (dict(kind="skip", activation="jumprelu", matryoshka=[]), "auto"),
}


class Stop(Exception):
    pass


def _cfg(out: Path | str = "", **kw) -> TrainConfig:
    base = dict(
        kind="clt",
        activation="batchtopk",
        d_sae=64,
        k=2,
        tokens=64 * 12,
        batch_size=64,
        compute_dtype="float32",
        checkpoint_every=5,
        progress=False,
        dead_tokens=128,
        init_tokens=128,
        matryoshka=[16, 32],
        skip=True,
        aux_k=8,
        out=str(out),
    )
    base.update(kw)
    return TrainConfig(**base)


def _buffer(cfg: TrainConfig) -> PlantedBuffer:
    data = PlantedData(
        n_layers=3,
        d_model=16,
        n_features=24,
        mode="clt" if cfg.kind == "clt" else "plt",
        noise=0.01,
        seed=1,
    )
    return PlantedBuffer(data, cfg.batch_size)


def _stop_at(step, metrics):
    if step == STOP_AT:
        raise Stop


def _assert_same_set(a, b, atol=2e-5):
    assert a.cfg.kind == b.cfg.kind and a.d_sae == b.d_sae
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.detach(), pb.detach(), atol=atol, rtol=1e-4, msg=name)
    torch.testing.assert_close(
        torch.stack(list(a.threshold)), torch.stack(list(b.threshold)), atol=atol, rtol=1e-4
    )


def _reference(**kw):
    cfg = _cfg(**kw)
    return train_transcoders(cfg, buffer=_buffer(cfg))


# -- one process -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["features", "data"])
def test_one_rank_equals_train_transcoders(tmp_path, shard):
    cfg = _cfg(tmp_path / "set")
    tc = train_distributed(DistributedTrainConfig(train=cfg, shard=shard), buffer=_buffer(cfg))
    ref = _reference()
    _assert_same_set(tc, ref, atol=1e-6)
    _assert_same_set(load_native(tmp_path / "set"), ref, atol=1e-6)
    assert tc.cfg.extra["distributed"] == {"world_size": 1, "shard": shard}
    # AuxK took part
    assert max(tc.cfg.metrics["train_dead"]) > 0 and tc.cfg.metrics["train_aux"] > 0
    for key in ("train_fvu", "train_l0", "train_loss"):
        torch.testing.assert_close(
            torch.tensor(tc.cfg.metrics[key]),
            torch.tensor(ref.cfg.metrics[key]),
            rtol=1e-5,
            atol=1e-6,
            msg=key,
        )
    assert not cfg.checkpoint_path().parent.exists()


def test_layout_refuses_uneven_splits():
    from gemma_lm.ranks import Ranks

    two = Ranks(rank=1, world_size=2)
    assert (Layout.make(two, _cfg(), "features").lo, Layout.make(two, _cfg(), "features").hi) == (
        32,
        64,
    )
    assert (
        Layout.make(two, _cfg(), "auto").mode == "features"
        and Layout.make(two, _cfg(kind="plt"), "auto").mode == "data"
    )
    assert Layout.make(two, _cfg(kind="plt"), "data").batch_rows(64) == slice(32, 64)
    with pytest.raises(UserError, match="d_sae 63 does not split"):
        Layout.make(two, _cfg(d_sae=63), "features")
    with pytest.raises(UserError, match="batch_size 63 does not split"):
        Layout.make(two, _cfg(batch_size=63, tokens=630), "data")


def test_other_settings_refuse_to_resume(tmp_path):
    cfg = _cfg(tmp_path / "set", keep_checkpoint=True)
    with pytest.raises(Stop):
        train_distributed(DistributedTrainConfig(train=cfg), buffer=_buffer(cfg), on_step=_stop_at)
    with pytest.raises(UserError, match="other settings"):
        train_distributed(DistributedTrainConfig(train=replace(cfg, lr=1e-3)), buffer=_buffer(cfg))


def test_cli_parses_train_config_and_distributed_options():
    from transcoders.cli import build_parser

    args = build_parser().parse_args(
        [
            "train-distributed",
            "--out",
            "d",
            "--kind",
            "clt",
            "--d-sae",
            "512",
            "--matryoshka",
            "64,128",
            "--shard",
            "features",
            "--data",
            "replicate",
        ]
    )
    assert (args.kind, args.d_sae, args.matryoshka, args.shard, args.data) == (
        "clt",
        512,
        [64, 128],
        "features",
        "replicate",
    )
    assert args._command.job is DistributedTrainConfig


# -- two ranks -------------------------------------------------------------------------------------


def test_two_ranks_equal_single_process_and_resume_at_other_world_sizes(tmp_path):
    # a single-process run killed after step STOP_AT, to be resumed by two ranks
    with pytest.raises(Stop):
        train_transcoders(_cfg(tmp_path / "from-one"), buffer=_buffer(_cfg()), on_step=_stop_at)
    root = str(Path(__file__).resolve().parents[1])  # importable wherever the package is installed
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        __file__,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    for name, (kw, _shard) in CASES.items():
        trained = load_native(tmp_path / name)
        _assert_same_set(trained, _reference(**kw))
        assert trained.cfg.extra["distributed"]["world_size"] == 2
    ref = _reference()
    _assert_same_set(load_native(tmp_path / "from-one"), ref)  # 1 rank -> 2 ranks

    # a two-rank run killed after step STOP_AT left a whole-set checkpoint; resume on one process,
    # both by the distributed trainer and by the single-process one
    ckpt = _cfg(tmp_path / "killed").checkpoint_path()
    assert json.loads(ckpt.read_text())["step"] == 5
    import shutil

    shutil.copytree(ckpt.parent, _cfg(tmp_path / "killed-copy").checkpoint_path().parent)
    cfg = _cfg(tmp_path / "killed")
    _assert_same_set(train_distributed(DistributedTrainConfig(train=cfg), buffer=_buffer(cfg)), ref)
    cfg = _cfg(tmp_path / "killed-copy")
    _assert_same_set(train_transcoders(cfg, buffer=_buffer(cfg)), ref)


def _driver(root: Path) -> None:
    """Both ranks: every case of CASES, then an interrupted run and the resumption of a
    single-process one."""
    import faulthandler

    import torch.distributed as dist

    from gemma_lm.ranks import end_process_group

    faulthandler.enable(all_threads=True)  # an abort in C++ (gloo) prints where Python was
    dist.init_process_group("gloo")  # one group for all runs; train_distributed joins it
    try:
        for name, (kw, shard) in CASES.items():
            cfg = _cfg(root / name, **kw)
            train_distributed(
                DistributedTrainConfig(train=cfg, shard=shard, data="replicate"),
                buffer=_buffer(cfg),
            )
        cfg = _cfg(root / "from-one")
        # rank 0 broadcasts batches
        train_distributed(DistributedTrainConfig(train=cfg), buffer=_buffer(cfg))
        cfg = _cfg(root / "killed", keep_checkpoint=True)
        try:
            train_distributed(
                DistributedTrainConfig(train=cfg), buffer=_buffer(cfg), on_step=_stop_at
            )
        except Stop:
            pass
        # the interrupted run skipped train_distributed's closing barrier: meet before tearing the
        # group down
        dist.barrier()
    finally:
        # as the library's jobs end theirs: see its docstring for the exit abort it prevents
        end_process_group()


if __name__ == "__main__":
    _driver(Path(sys.argv[1]))
