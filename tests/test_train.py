"""Transcoder training: planted dictionaries are recovered by every kind, Matryoshka prefixes
reconstruct on their own, BatchTopK's inference threshold gives ~k features, normalisation folds
exactly into the saved weights, and a run killed with SIGKILL resumes where its last checkpoint left
it."""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gemma_lm.errors import UserError
from transcoders.testing import PlantedBuffer, PlantedData
from transcoders.train import TrainableTranscoders, TrainConfig, train_transcoders

ROOT = Path(__file__).resolve().parents[1]


def _planted_cfg(**kw) -> TrainConfig:
    base = dict(
        d_sae=128,
        k=4,
        tokens=256 * 250,
        batch_size=256,
        lr=1e-2,
        compute_dtype="float32",
        progress=False,
        init_tokens=1024,
        dead_tokens=2000,
        aux_k=16,
        sparsity_coeff=1e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def _fvu(tc, data: PlantedData) -> torch.Tensor:
    x, y = data.batch(10**6, 2048)  # a step never used in training
    x, y = x.transpose(0, 1), y.transpose(0, 1)
    with torch.no_grad():
        rec = tc.reconstruct(x)
    return (rec - y).pow(2).sum((1, 2)) / (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2))


def _decoder_matches(tc, data: PlantedData, layer: int) -> float:
    """Fraction of planted output directions (all their output layers at once) matched by some
    decoder."""
    planted = F.normalize(data.B[layer].flatten(1), dim=-1)
    learned = F.normalize(tc.decoder_weight(layer).detach().flatten(1), dim=-1)
    return float(((planted @ learned.T).max(1).values > 0.9).float().mean())


def _code_matches(tc, data: PlantedData, layer: int) -> float:
    """Fraction of planted features whose code some learned feature's activation tracks (correlation
    > 0.9)."""
    s = data.codes(4096, torch.Generator().manual_seed(123))[layer]
    with torch.no_grad():
        acts = tc.encode(layer, s @ data.A[layer])
    a = (acts - acts.mean(0)) / (acts.std(0) + 1e-9)
    c = (s - s.mean(0)) / (s.std(0) + 1e-9)
    return float((((c.T @ a) / len(a)).max(1).values > 0.9).float().mean())


@pytest.mark.parametrize(
    "kind,activation",
    [("plt", "topk"), ("plt", "jumprelu"), ("clt", "batchtopk"), ("skip", "batchtopk")],
)
def test_planted_dictionary_is_recovered(kind, activation):
    data = PlantedData(
        n_layers=2, d_model=64, n_features=96, l0=2, mode="clt" if kind == "clt" else "plt", seed=0
    )
    # JumpReLU learns its thresholds on top of the dictionary: it gets more steps
    steps = 400 if activation == "jumprelu" else 250
    tc = train_transcoders(
        _planted_cfg(
            kind=kind,
            activation=activation,
            k=4 if activation != "jumprelu" else 3,
            tokens=256 * steps,
        ),
        buffer=PlantedBuffer(data, 256),
    )
    fvu = _fvu(tc, data)
    assert fvu.max() < 0.06, f"FVU per layer {fvu.tolist()}"
    for layer in range(2):
        # a skip transcoder's W_skip carries the linear part of the planted map, so its decoders
        # hold only the nonlinear rest; what it must recover is which planted feature is active (its
        # codes)
        matched = (
            _code_matches(tc, data, layer) if kind == "skip" else _decoder_matches(tc, data, layer)
        )
        assert matched > 0.8, f"layer {layer}: only {matched:.0%} of planted features recovered"


def test_skip_transcoder_beats_plain_on_the_same_budget():
    data = PlantedData(n_layers=1, d_model=64, n_features=96, l0=2, seed=1)
    fvus = {
        kind: float(
            _fvu(
                train_transcoders(
                    _planted_cfg(kind=kind, activation="topk", tokens=256 * 120),
                    buffer=PlantedBuffer(data, 256),
                ),
                data,
            ).mean()
        )
        for kind in ("plt", "skip")
    }
    assert fvus["skip"] < fvus["plt"], fvus


def test_matryoshka_prefix_reconstructs_on_its_own():
    data = PlantedData(n_layers=1, d_model=64, n_features=96, l0=2, seed=2)
    x, y = data.batch(10**6, 2048)
    x, y = x[:, 0], y[:, 0]

    def prefix_fvu(tc, m):
        with torch.no_grad():
            acts = tc.encode(0, x)
            acts[:, m:] = 0
            rec = tc.decode([acts])[0]
        return float((rec - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())

    plain = train_transcoders(
        _planted_cfg(kind="plt", activation="topk", d_sae=128, tokens=256 * 150),
        buffer=PlantedBuffer(data, 256),
    )
    nested = train_transcoders(
        _planted_cfg(kind="plt", activation="topk", d_sae=128, tokens=256 * 150, matryoshka=[32]),
        buffer=PlantedBuffer(data, 256),
    )
    assert nested.cfg.matryoshka_prefixes == [32]
    # the best any 32 planted features can do: least squares of the output on their true codes
    s = data.codes(4096, torch.Generator().manual_seed(123))[0]
    target = s @ data.B[0][:, 0]
    codes = torch.cat([s[:, :32], torch.ones(len(s), 1)], 1)
    fit = codes @ torch.linalg.lstsq(codes, target).solution
    best = float((fit - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum())
    # the first 32 of 128 features: a nested dictionary's are about that good on their own; a plain
    # one's are not
    assert prefix_fvu(nested, 32) < best + 0.05
    assert prefix_fvu(plain, 32) > prefix_fvu(nested, 32) + 0.05
    assert prefix_fvu(nested, 128) < 0.1  # and the full dictionary still works


def test_batchtopk_threshold_gives_about_k_per_position():
    data = PlantedData(n_layers=2, d_model=64, n_features=96, l0=4, seed=3)
    tc = train_transcoders(
        _planted_cfg(activation="batchtopk", k=6, tokens=256 * 150), buffer=PlantedBuffer(data, 256)
    )
    x, _ = data.batch(10**6, 4096)
    for layer in range(2):
        assert float(tc.threshold[layer].min()) > 0
        with torch.no_grad():
            l0 = float((tc.encode(layer, x[:, layer]) > 0).sum(-1).float().mean())
        assert 0.7 * 6 < l0 < 1.3 * 6, f"layer {layer}: L0 {l0} at inference for k = 6"


@pytest.mark.parametrize(
    "kind,activation",
    [("plt", "jumprelu"), ("skip", "batchtopk"), ("clt", "topk"), ("clt", "relu")],
)
def test_normalisation_folds_into_saved_weights(kind, activation):
    """The saved set on raw activations equals the trained net on normalised ones, scaled back."""
    torch.manual_seed(0)
    L, D = 3, 16
    cfg = TrainConfig(
        kind=kind,
        activation=activation,
        d_sae=24,
        k=5,
        skip=kind == "clt",
        tokens=64,
        batch_size=64,
        compute_dtype="float32",
        progress=False,
    )
    net = TrainableTranscoders(cfg, L, D)
    x = torch.randn(512, L, D) * torch.tensor([3.0, 0.2, 40.0])[None, :, None] + 1.0
    y = torch.randn(512, L, D) * torch.tensor([100.0, 0.5, 7.0])[None, :, None] - 2.0
    net.initialise(x, y, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        net.bt_threshold.fill_(0.3)
    xn, _ = net.normalise(x, y)
    with torch.no_grad():
        _, acts, recons, _ = net(xn)
    tc = net.to_transcoder_set()
    xt = x.transpose(0, 1)
    with torch.no_grad():
        for l in range(L):  # same pre-activations on raw inputs, so thresholds carry over unchanged
            torch.testing.assert_close(
                tc.pre_activation(l, xt[l]),
                xn[l] @ net.W_enc[l] + net.b_enc[l],
                rtol=1e-4,
                atol=1e-4,
            )
            if (
                activation != "batchtopk"
            ):  # (BatchTopK trains batch-wise and infers by its threshold)
                torch.testing.assert_close(tc.encode(l, xt[l]), acts[l], rtol=1e-4, atol=1e-4)
        raw = tc.decode(list(acts), xt)
    expected = recons[-1] / net.out_scale[:, None, None]
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_least_squares_skip_init_explains_a_linear_map():
    torch.manual_seed(0)
    L, D = 2, 12
    m = torch.randn(L, D, D)
    x = torch.randn(2048, L, D) * 5 + 3
    y = torch.einsum("nld,lde->nle", x, m) + 7
    cfg = TrainConfig(
        kind="skip",
        activation="topk",
        d_sae=16,
        k=2,
        tokens=64,
        batch_size=64,
        compute_dtype="float32",
        progress=False,
    )
    net = TrainableTranscoders(cfg, L, D)
    net.initialise(x, y, torch.Generator().manual_seed(0))
    tc = net.to_transcoder_set()
    with torch.no_grad():
        base = torch.stack([tc.b_dec[l] + tc.skip_term(l, x[:, l]) for l in range(L)])
    yt = y.transpose(0, 1)
    fvu = (base - yt).pow(2).sum((1, 2)) / (yt - yt.mean(1, keepdim=True)).pow(2).sum((1, 2))
    assert fvu.max() < 1e-3


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="kind"):
        TrainConfig(kind="sae")
    with pytest.raises(UserError, match="matryoshka"):
        TrainConfig(d_sae=64, matryoshka=[32, 16])
    with pytest.raises(UserError, match="k = 0"):
        TrainConfig(k=0)


def test_train_on_a_tiny_model_end_to_end(tiny, tmp_path):
    """Harvest from a tiny Gemma 3 over a text file, train, save natively, reload, resume is a
    no-op."""
    from transcoders.formats import load_native

    text = tmp_path / "corpus.txt"
    text.write_text(
        "\n\n".join(
            f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i * 7} times."
            for i in range(60)
        )
    )
    out = tmp_path / "tc"
    cfg = TrainConfig(
        out=str(out),
        kind="clt",
        activation="topk",
        skip=True,
        d_sae=32,
        k=4,
        text=f"file:{text}",
        context=32,
        tokens=8 * 128,
        batch_size=128,
        buffer_tokens=512,
        harvest_dtype="float32",
        compute_dtype="float32",
        init_tokens=256,
        checkpoint_every=3,
        progress=False,
    )
    tc = train_transcoders(cfg, loaded=tiny)
    assert (out / "config.json").exists() and not cfg.checkpoint_path().parent.exists()
    loaded = load_native(out, model=tiny)
    assert loaded.cfg.kind == "clt" and loaded.cfg.skip and loaded.cfg.model_name == tiny.name
    assert (
        loaded.cfg.metrics["steps"] == 8
        and len(loaded.cfg.metrics["train_fvu"]) == tiny.sites.n_layers
    )
    x = torch.randn(tiny.sites.n_layers, 5, tiny.sites.d_model)
    torch.testing.assert_close(loaded.reconstruct(x), tc.reconstruct(x))


def test_training_inside_no_grad_is_the_same_run():
    """The first trace trains the default set from inside attribution's no_grad: that must not
    matter."""
    data = PlantedData(n_layers=2, d_model=32, n_features=48, l0=2, seed=0)
    cfg = _planted_cfg(d_sae=64, k=3, tokens=64 * 8, batch_size=64, init_tokens=64)
    plain = train_transcoders(cfg, buffer=PlantedBuffer(data, 64))
    losses = []
    with torch.no_grad():
        inside = train_transcoders(
            cfg, buffer=PlantedBuffer(data, 64), on_step=lambda s, m: losses.append(m["loss"])
        )
    assert len(losses) == 8
    for (name, a), (_, b) in zip(plain.named_parameters(), inside.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


_KILLABLE = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from transcoders import train
    from transcoders.testing import PlantedBuffer, PlantedData

    out, kill = sys.argv[1], sys.argv[2]  # kill: where this process SIGKILLs itself ("": nowhere)
    last = [-1]  # the last finished step

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def on_step(step, metrics):
        print("step", step, flush=True)
        last[0] = step
        if kill == "after-step-22" and step == 22:
            die()

    write_tensors, save_file = train._write_checkpoint_tensors, train.save_file

    def tensors_then_die(folder, tensors, step):  # step 25's tensors file written, its JSON not
        info = write_tensors(folder, tensors, step)
        if kill == "between-files" and step == 25:
            die()
        return info

    def half_then_die(tensors, filename, metadata=None):  # halfway through step 25's tensors file
        save_file(tensors, filename, metadata=metadata)
        if kill == "inside-tensors" and last[0] + 1 == 25:
            os.truncate(filename, os.path.getsize(filename) // 2)
            die()

    train._write_checkpoint_tensors, train.save_file = tensors_then_die, half_then_die
    data = PlantedData(n_layers=2, d_model=32, n_features=48, l0=2, seed=0)
    cfg = train.TrainConfig(out=out, kind="plt", activation="topk", d_sae=64, k=3,
                            tokens=64 * 60, batch_size=64, compute_dtype="float32",
                            init_tokens=64, checkpoint_every=5, progress=False, lr=5e-3)
    train.train_transcoders(cfg, buffer=PlantedBuffer(data, 64), on_step=on_step)
    print("done", flush=True)
""")


def _run_killable(script: Path, out: Path, kill: str = "") -> tuple[int, list[int]]:
    """Run the training script, which SIGKILLs itself at `kill`. Returns its exit status and the
    steps it finished."""
    # the package importable from the script's folder, wherever it is installed
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, str(script), str(out), kill],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    steps = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("step")]
    return proc.returncode, steps


@pytest.fixture(scope="module")
def killable(tmp_path_factory):
    """(the training script, the set its uninterrupted run trains)."""
    from transcoders.formats import load_native

    root = tmp_path_factory.mktemp("killable")
    script = root / "run.py"
    script.write_text(_KILLABLE)
    rc, steps = _run_killable(script, root / "fresh")
    assert rc == 0 and steps == list(range(60))
    return script, load_native(root / "fresh")


# where the run is killed -> what its checkpoint folder holds then, beside checkpoint.json
_KILLS = {
    "after-step-22": ["checkpoint-00000020-*.safetensors"],
    "between-files": ["checkpoint-00000020-*.safetensors", "checkpoint-00000025-*.safetensors"],
    "inside-tensors": [".checkpoint-00000025-*.partial", "checkpoint-00000020-*.safetensors"],
}


@pytest.mark.parametrize("kill", list(_KILLS))
def test_sigkill_mid_run_resumes_from_last_checkpoint(tmp_path, killable, kill):
    """SIGKILL after a step, between a checkpoint's two files and inside its tensors file: the
    rerun resumes from the last complete checkpoint (step 20) and ends with the uninterrupted run's
    weights, bit for bit (the data order is a function of the step)."""
    from transcoders.formats import load_native

    script, fresh = killable
    out = tmp_path / "tc"
    rc, steps = _run_killable(script, out, kill)
    assert rc == -signal.SIGKILL and steps == list(range(23 if kill == "after-step-22" else 25))
    folder = Path(str(out) + ".train")
    assert json.loads((folder / "checkpoint.json").read_text())["step"] == 20 and not out.exists()
    left = sorted(p.name for p in folder.iterdir() if p.name != "checkpoint.json")
    assert len(left) == len(_KILLS[kill]), left
    assert all(fnmatch.fnmatch(name, pattern) for name, pattern in zip(left, _KILLS[kill])), left

    rc, resumed = _run_killable(script, out)
    assert rc == 0 and resumed == list(range(20, 60))
    assert not folder.exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    a, b = load_native(out), fresh
    for name, t in a.state_dict().items():
        torch.testing.assert_close(t, b.state_dict()[name], rtol=0, atol=0, msg=name)


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path):
    data = PlantedData(n_layers=1, d_model=16, n_features=24, l0=2)
    out = tmp_path / "tc"
    cfg = _planted_cfg(
        out=str(out),
        d_sae=32,
        tokens=64 * 10,
        batch_size=64,
        checkpoint_every=2,
        keep_checkpoint=True,
    )
    train_transcoders(cfg, buffer=PlantedBuffer(data, 64))
    assert cfg.checkpoint_path().exists()
    with pytest.raises(UserError, match="d_sae"):
        train_transcoders(
            _planted_cfg(out=str(out), d_sae=48, tokens=64 * 10, batch_size=64),
            buffer=PlantedBuffer(data, 64),
        )


def _tiny_run(out: Path, **kw) -> tuple[TrainConfig, PlantedBuffer]:
    data = PlantedData(n_layers=2, d_model=16, n_features=24, l0=2)
    cfg = _planted_cfg(
        out=str(out), d_sae=32, tokens=64 * 10, batch_size=64, checkpoint_every=4, **kw
    )
    return cfg, PlantedBuffer(data, 64)


@pytest.fixture(scope="module")
def kept_checkpoint(tmp_path_factory) -> Path:
    """The folder of a finished run's last checkpoint (step 8 of 10), kept."""
    out = tmp_path_factory.mktemp("kept") / "tc"
    cfg, buffer = _tiny_run(out, keep_checkpoint=True)
    train_transcoders(cfg, buffer=buffer)
    assert json.loads(cfg.checkpoint_path().read_text())["step"] == 8
    return cfg.checkpoint_dir()


def _tensors_file(folder: Path) -> Path:
    (file,) = folder.glob("checkpoint-*.safetensors")
    return file


def _edit_record(folder: Path, edit) -> None:
    path = folder / "checkpoint.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def _rewrite_tensors(folder: Path, edit) -> None:
    """Replace the tensors file by an edited one and point checkpoint.json at it (size and sha256
    agree: what only the contents check can catch)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    file = _tensors_file(folder)
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))
    data = file.read_bytes()

    def point(record):
        record["tensors"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    _edit_record(folder, point)


def _corrupt_bytes(file: Path, data: bytes) -> None:
    file.write_bytes(data)


# damage -> what the error says
_DAMAGES = {
    "truncated tensors": (
        lambda f: _corrupt_bytes(_tensors_file(f), _tensors_file(f).read_bytes()[:-100]),
        "does not match checkpoint.json",
    ),
    "flipped byte": (
        lambda f: _corrupt_bytes(
            _tensors_file(f), _tensors_file(f).read_bytes()[:-1] + bytes([0x5A])
        ),
        "does not match checkpoint.json",
    ),
    "missing tensors": (lambda f: _tensors_file(f).unlink(), "which is missing"),
    "truncated json": (
        lambda f: _corrupt_bytes(f / "checkpoint.json", (f / "checkpoint.json").read_bytes()[:-9]),
        "not readable JSON",
    ),
    "json of something else": (
        lambda f: _corrupt_bytes(f / "checkpoint.json", b'{"format": "other"}'),
        "not a gemma-circuits training checkpoint",
    ),
    "a path for a name": (
        lambda f: _edit_record(f, lambda r: r["tensors"].update(file="../elsewhere.safetensors")),
        "mangles tensors",
    ),
    "history of another length": (
        lambda f: _edit_record(f, lambda r: r["history"].pop()),
        "holds step 8 of 10",
    ),
    "moments of another shape": (
        lambda f: _rewrite_tensors(
            f, lambda t: t.update({"optimizer.W_enc.exp_avg": torch.zeros(2, 16, 31)})
        ),
        "holds optimizer.W_enc.exp_avg of shape [2, 16, 31]",
    ),
    "a missing parameter": (
        lambda f: _rewrite_tensors(f, lambda t: t.pop("net.b_dec")),
        "does not hold the set's tensors (b_dec)",
    ),
    "an unknown tensor": (
        lambda f: _rewrite_tensors(
            f, lambda t: t.update({"optimizer.W_x.exp_avg": t["net.b_dec"].clone()})
        ),
        "holds optimizer.W_x.exp_avg",
    ),
}


@pytest.mark.parametrize("damage", list(_DAMAGES))
def test_a_damaged_checkpoint_is_a_one_line_user_error(tmp_path, kept_checkpoint, damage):
    import shutil

    cfg, buffer = _tiny_run(tmp_path / "tc")
    shutil.copytree(kept_checkpoint, cfg.checkpoint_dir())
    harm, says = _DAMAGES[damage]
    harm(cfg.checkpoint_dir())
    with pytest.raises(UserError) as e:
        train_transcoders(cfg, buffer=buffer)
    message = str(e.value)
    assert says in message and "\n" not in message, message
    assert f"delete {cfg.checkpoint_dir()} to start the run over" in message, message


def test_an_undamaged_copy_of_the_checkpoint_resumes(tmp_path, kept_checkpoint):
    """(The damages above break a checkpoint that otherwise resumes.)"""
    import shutil

    cfg, buffer = _tiny_run(tmp_path / "tc")
    shutil.copytree(kept_checkpoint, cfg.checkpoint_dir())
    steps = []
    train_transcoders(cfg, buffer=buffer, on_step=lambda s, m: steps.append(s))
    assert steps == [8, 9]


def test_a_pickled_checkpoint_of_earlier_versions_is_refused(tmp_path):
    cfg, buffer = _tiny_run(tmp_path / "tc")
    cfg.checkpoint_dir().mkdir()
    (cfg.checkpoint_dir() / "checkpoint.pt").write_bytes(b"\x80\x04K\x01.")  # pickle of 1
    with pytest.raises(UserError, match="pickle format, which is never loaded") as e:
        train_transcoders(cfg, buffer=buffer)
    assert "\n" not in str(e.value) and f"delete {cfg.checkpoint_dir()}" in str(e.value)


def test_training_leaves_the_global_random_state_alone(tmp_path):
    """No random state goes into a checkpoint, for training draws from no global generator (only
    from ones seeded by the seed and the step): a resumed run needs none to be exact."""
    import random

    import numpy as np

    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    cfg, buffer = _tiny_run(tmp_path / "tc", activation="jumprelu")
    train_transcoders(cfg, buffer=buffer)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]


@pytest.mark.slow
def test_default_set_is_sparse_and_replaces_the_mlps(real_model, default_transcoders):
    """The embedded default (trained once per machine): a useful graph size and a faithful
    replacement."""
    from transcoders.default import default_transcoders_dir
    from transcoders.evaluate import EvalConfig, evaluate_transcoders

    tc = default_transcoders
    assert (default_transcoders_dir() / "config.json").exists()
    assert tc.cfg.kind == "skip" and tc.cfg.model_name == real_model.name
    res = evaluate_transcoders(tc, real_model, EvalConfig(tokens=254, progress=False, json=""))
    for row in res["layers"]:
        assert 1 <= row["l0"] <= 64, row  # tens of features per position per layer at most
        assert row["fvu"] < 0.9, row
        # features that fire on everything would clutter every graph
        assert row["dense_frac"] < 0.05, row
    # splicing every MLP hurts far less than removing them
    assert res["ce_spliced"] < res["ce_zero_ablated"] and res["ce_recovered"] > 0.5, res


_ALLOCATOR_PROBE = textwrap.dedent("""
    import ctypes, sys
    import torch
    from gemma_lm import memory
    libc = memory._libc()
    mallinfo = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo is None:
        sys.exit(3)  # not glibc, or one without mallinfo2

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]
    mallinfo.restype = Info

    def mmapped(n_bytes=64 << 20):
        \"\"\"Whether a block of n_bytes, while held, is a mapping of its own.\"\"\"
        before = mallinfo().hblkhd
        t = torch.empty(n_bytes // 4)
        held = mallinfo().hblkhd - before
        del t
        return held >= n_bytes

    if sys.argv[1] == "owned":
        memory.own_process()
    found = mmapped()
    with memory.reuse_freed_memory():
        inside = mmapped()
    print(found, inside, mmapped())
""")


@pytest.mark.parametrize(
    "case,env,expected",
    [
        # glibc's dynamic mode, which no call can bring back: the context leaves it alone
        ("dynamic", {}, "True True True"),
        # a process that ends with its work: tuned inside, glibc's defaults after
        ("owned", {}, "True False True"),
        # settings from the environment: tuned inside, the environment's settings after
        ("environment", {"MALLOC_MMAP_THRESHOLD_": str(256 << 20)}, "False False False"),
        ("environment", {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, "False False False"),
    ],
)
def test_reuse_freed_memory_restores_the_allocator_it_found(case, env, expected):
    """Inside the context large blocks come from the heap (no mmap per tensor) where the context may
    tune the allocator; on exit the settings it found come back. Each case in a fresh process: after
    other tests the heap may hold a free block large enough for the probe."""
    r = subprocess.run(
        [sys.executable, "-c", _ALLOCATOR_PROBE, case],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, **env},
    )
    if r.returncode == 3:
        pytest.skip("not glibc, or glibc without mallinfo2")
    assert r.returncode == 0 and r.stdout.split("\n")[0] == expected, r.stdout + r.stderr[-2000:]


def test_startup_settings_read_from_the_environment():
    from gemma_lm.memory import M_MMAP_MAX, M_MMAP_THRESHOLD, M_TOP_PAD, startup_settings

    assert startup_settings({}) is None and startup_settings({"MALLOC_ARENA_MAX": "2"}) is None
    found = startup_settings(
        {"MALLOC_MMAP_THRESHOLD_": "1048576", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=7"}
    )
    assert (found[M_MMAP_THRESHOLD], found[M_MMAP_MAX], found[M_TOP_PAD]) == (1 << 20, 7, 128 << 10)
