"""Side by side with circuit-tracer 0.5.0: attribution time, memory and agreement on the same
weights.

    bash benchmarks/setup_circuit_tracer.sh  # once: the peer's venv (.venv-ct)
    python benchmarks/vs_circuit_tracer.py   # everything -> benchmarks/results/vs_circuit_tracer.md
    python benchmarks/vs_circuit_tracer.py --sets skip --lengths 8 --repeats 1  # a quick look

At the settings users meet: circuit-tracer's Python default (max_feature_nodes None: every active
feature, `0` here) and its command line's (7500) beside 2048, both tools at 1 and 2 threads, on a
quiet machine and beside one competing CPU-bound process (`--busy`, the same for both tools):

    python benchmarks/vs_circuit_tracer.py --max-feature-nodes 0,7500,2048 --threads 1,2 \
        --out benchmarks/results/vs_circuit_tracer_settings.md
    python benchmarks/vs_circuit_tracer.py --max-feature-nodes 0,7500,2048 --threads 1,2 --busy \
        --out benchmarks/results/vs_circuit_tracer_busy.md

Both tools get the same model (the embedded gemma-3-270m; circuit-tracer reads its dequantised
Hugging Face copy), the same transcoders (written once in circuit-tracer's layout; we load the same
files), the same token ids and the same settings (max_n_logits, desired_logit_prob,
max_feature_nodes, batch size, float32). Each run is a fresh subprocess, the two tools alternate,
and each reports its attribution wall time, the peak resident memory of its process and within
attribution, and its graph. Agreement is measured on the adjacency restricted to the nodes both
graphs kept. Two differences are by design and measured apart (see `agreement`): circuit-tracer
drops every feature and error at position 0 (BOS), and its token-embedding edges use the unscaled
embedding matrix, while Gemma 3 feeds the residual stream embed * sqrt(d_model); finite differences
in our frozen replacement model (`circuits.replacement.frozen_forward`) decide which token edges are
right.

Transcoders: random sets at a realistic L0 (thresholds calibrated on other text), a 16k-wide skip
PLT and a 4k-per-layer CLT; the default trained set too where it has been trained
(`--sets default`).

Larger models on a GPU: `--model random-1b` or `random-4b` builds a Gemma 3 1B- or 4B-shaped model
with random weights (layers, widths, heads, vocabulary and the 5:1 sliding/global pattern of the
published configs; plain RoPE on every layer, since the two transformers majors the tools run on
read RoPE scaling differently) and a word-level tokenizer over its vocabulary, saved once as a
Hugging Face directory that both tools load:

    python benchmarks/vs_circuit_tracer.py --model random-1b --device cuda --sets skip \
        --lengths 32,128 --threads 16 --batch-tokens 8192 \
        --out benchmarks/results/vs_circuit_tracer_gpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ct_runner import WARMUP_TOKENS  # noqa: E402  (the peer's runner: both tools warm up alike)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "vs_circuit_tracer.md"

# Prompt text for the measured cases (cut to 8, 32, 128 tokens) and, apart, text to calibrate
# thresholds on.
PASSAGE = (
    "Fact: the capital of the state containing Dallas is Austin. The city grew around the "
    "Colorado River, where early settlers built mills and a small wooden bridge. By the end of "
    "the century it had a university, a railway station and a domed capitol made of red granite, "
    "taller than the one in Washington. Visitors today walk along the river trails, listen to "
    "live music on Sixth Street and watch a million bats leave the Congress Avenue bridge at dusk "
    "every summer evening. Local historians like to point out that the city was briefly renamed "
    "during the republic years, and that the archives were once hidden in a wagon to keep them "
    "from being moved to Houston. The story of that night is still told in schools, and a bronze "
    "statue of the woman who fired the cannon stands downtown near the old land office building."
)
CALIBRATION = (
    "The recipe calls for two cups of flour, a pinch of salt and three eggs beaten until pale. "
    "In 1969 the first crewed landing on the Moon was watched by hundreds of millions of people. "
    "def mean(xs): return sum(xs) / len(xs)  # average of a list. Photosynthesis turns light, "
    'water and carbon dioxide into sugar and oxygen. She said: "I will be there at eight, unless '
    'the train is late again."'
)


@dataclass
class BenchConfig:
    """One benchmark run; every field is also a command-line option."""

    # or random-1b | random-4b | random-tiny: random weights at a Gemma 3 shape
    model: str = "gemma-3-270m"
    device: str = "cpu"
    # skip | clt | default
    sets: list[str] = field(default_factory=lambda: ["skip", "clt", "default"])
    lengths: list[int] = field(default_factory=lambda: [8, 32, 128])  # prompt tokens, BOS included
    repeats: int = 2  # measured runs per tool and case, alternating tools
    l0: float = 20.0  # active features per position and layer of the random sets
    d_sae_skip: int = 16384
    d_sae_clt: int = 4096
    seed: int = 0
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    # rows of feature edges each tool computes; 0: every active feature (circuit-tracer's Python
    # default, None); 7500 is its command line's default. Each value is its own case.
    max_feature_nodes: list[int] = field(default_factory=lambda: [2048])
    # batch size = batch_tokens // n_pos (in [16, 256]): circuit-tracer's forward pass runs
    # batch-size copies of the prompt with full logits, so a fixed batch of 256 needs ~35 GB at 128
    # tokens
    batch_tokens: int = 2048
    # CPU threads per run; each value is its own case
    threads: list[int] = field(default_factory=lambda: [2])
    # a busy machine: one competing CPU-bound process (`competitor`) runs beside every measured run,
    # started before it and stopped after it, the same for both tools
    busy: bool = False
    timeout_s: int = 1800  # a run still going after this is stopped and reported as such
    # a run whose resident memory passes this is stopped (the machine is shared)
    max_rss_gb: float = 14.0
    fd_max_tokens: int = 32  # finite-difference check of token edges on prompts up to this length
    # one more run of ours per case under cProfile (our time by stage) and torch.profiler (on a
    # GPU: its kernels' own time, so whether the GPU or the host is the limit)
    profile: bool = False
    # each process traces a short prompt once before the timed call, so that one-time costs (on a
    # GPU: CUDA context, cuBLAS handles, kernels loaded on first use) stay out of the timed call
    warmup: bool = False
    # exported transcoders and raw results (default: <cache>/bench/vs_circuit_tracer)
    workdir: str = ""
    ct_python: str = str(REPO / ".venv-ct" / "bin" / "python")
    out: str = str(RESULTS)
    resume: bool = True  # reuse finished runs found in workdir
    tools: list[str] = field(default_factory=lambda: ["ours", "circuit-tracer"])

    def batch_size(self, n_pos: int) -> int:
        return int(min(256, max(16, self.batch_tokens // n_pos)))


# -- preparing models, transcoders and prompts -----------------------------------------------------

# Text-decoder shapes of the published Gemma 3 configs (1B: google/gemma-3-1b-pt; 4B: the text tower
# of google/gemma-3-4b-pt), and a tiny one for smoke tests.
SHAPES = {  # arguments of gemma_lm.models.tiny_config
    "tiny": dict(
        d_model=64,
        d_mlp=256,
        n_layers=4,
        n_heads=2,
        n_kv_heads=1,
        head_dim=32,
        vocab_size=4096,
        sliding_window=16,
    ),
    "1b": dict(
        d_model=1152,
        d_mlp=6912,
        n_layers=26,
        n_heads=4,
        n_kv_heads=1,
        head_dim=256,
        vocab_size=262144,
        sliding_window=512,
    ),
    "4b": dict(
        d_model=2560,
        d_mlp=10240,
        n_layers=34,
        n_heads=8,
        n_kv_heads=4,
        head_dim=256,
        vocab_size=262208,
        sliding_window=1024,
    ),
}


def random_model_dir(name: str, work: Path, seed: int, device: str) -> Path:
    """A Gemma 3-shaped model with random weights (`name` = random-<shape>) and a word-level
    tokenizer ("w<id>" is token id), saved once as a Hugging Face directory (bfloat16 on disk; both
    tools load it as float32). Weights scaled so that activations keep their size through the
    layers, norm gains random around 1."""
    import shutil

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, PreTrainedTokenizerFast

    from gemma_lm.testing import tiny_config

    shape = SHAPES.get(name.removeprefix("random-"))
    if shape is None:
        raise SystemExit(
            f"unknown model {name!r}; use gemma-3-270m or random-{'|random-'.join(SHAPES)}"
        )
    d = work / "models" / f"{name}-seed{seed}"
    if (d / "DONE").exists():
        return d
    config = tiny_config(**shape, global_every=6, max_positions=32768)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for pname, prm in model.named_parameters():
            if "norm" in pname:  # Gemma norms scale by (1 + weight)
                prm.normal_(0.0, 0.3)
            elif (
                "embed" in pname
            ):  # the residual stream gets embed * sqrt(d_model): unit-size entries
                prm.normal_(0.0, shape["d_model"] ** -0.5)
            else:
                prm.normal_(0.0, prm.shape[1] ** -0.5)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    del model
    vocab = {
        "<pad>": 0,
        "<eos>": 1,
        "<bos>": 2,
        "<unk>": 3,
        **{f"w{i}": i for i in range(4, shape["vocab_size"])},
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(tmp)
    # transformers 5 names its own class; 4.x (circuit-tracer) needs this one
    tc_file = tmp / "tokenizer_config.json"
    tc_json = json.loads(tc_file.read_text())
    tc_file.write_text(
        json.dumps({**tc_json, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2)
    )
    (tmp / "DONE").write_text("ok")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


def random_words(n: int, vocab_size: int, seed: int) -> str:
    """Text of `n` words of a random model's word-level tokenizer (ids 4.. are "w4", "w5", ...)."""
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(4, vocab_size, n))


def calibrate_thresholds(tc, mlp_in, l0: float) -> None:
    """Set every layer's JumpReLU threshold so that about `l0` features fire per position on
    `mlp_in` `[L, n, D]` (BOS left out: its inputs are an outlier)."""
    import torch

    with torch.no_grad():
        for l in range(tc.n_layers):
            pre = tc.pre_activation(l, mlp_in[l, 1:].cpu().float()).flatten()
            k = max(1, int(round(len(pre) * (1 - l0 / tc.d_sae))))
            tc.threshold[l].fill_(float(pre.kthvalue(k).values))


def exact_prompt(lm, n_pos: int, random_vocab: int = 0) -> tuple[str, list[int]]:
    """Text whose tokenization (BOS first) is exactly `n_pos` tokens: a prefix of PASSAGE, or on a
    random model (`random_vocab` > 0) random words of its vocabulary."""
    if random_vocab:
        text = random_words(n_pos - 1, random_vocab, seed=n_pos)
        return text, lm.tokenize(text).tolist()
    ids = lm.tokenize(PASSAGE).tolist()
    if len(ids) < n_pos:
        raise SystemExit(
            f"the benchmark passage has only {len(ids)} tokens; lengths must be <= that"
        )
    for cut in (n_pos, n_pos - 1, n_pos + 1):  # a cut inside a word may re-tokenize differently
        text = lm.tokenizer.decode(ids[1:cut])
        again = lm.tokenize(text).tolist()
        if len(again) == n_pos:
            return text, again
    raise SystemExit(f"could not cut the passage at exactly {n_pos} tokens")


def prepare(cfg: BenchConfig, work: Path) -> tuple[list[dict], list[str]]:
    """Export every transcoder set in circuit-tracer's layout (once) and fix the prompts. Returns
    the cases and notes on sets that were left out."""
    import circuits
    from circuits.replacement import run_and_freeze
    from gemma_lm.files import cache_dir
    from gemma_lm.models import DEFAULT_MODEL
    from transcoders.circuit_tracer_format import is_circuit_tracer_dir, save_circuit_tracer
    from transcoders.testing import random_transcoders

    rand = cfg.model.startswith("random-")
    if rand:
        model_dir = random_model_dir(cfg.model, work, cfg.seed, cfg.device)
        lm = circuits.load_model(str(model_dir), device=cfg.device)
        vocab = lm.sites.vocab_size
        calibration = lm.tokenize(random_words(256, vocab, seed=cfg.seed + 12345))
    elif cfg.model in (DEFAULT_MODEL, "google/gemma-3-270m"):
        model_dir, vocab = cache_dir() / "models" / "gemma-3-270m-hf", 0
        lm = circuits.load_model(device=cfg.device)
        calibration = lm.tokenize(CALIBRATION)
    else:
        raise SystemExit(
            f"unknown model {cfg.model!r}; use {DEFAULT_MODEL} or random-{'|random-'.join(SHAPES)}"
        )
    suffix = f"-{cfg.model}" if rand else ""
    notes, sets = [], {}
    for name in cfg.sets:
        if name not in ("skip", "clt", "default"):
            raise SystemExit(f"unknown set {name!r}; use skip, clt or default")
        if name == "default" and rand:
            notes.append(
                f"set default: trained for {DEFAULT_MODEL} only; left out for {cfg.model}."
            )
            continue
        if name == "default":
            src = _default_dir(notes)
            if src is None:
                continue
            # a retrained set is exported anew
            d = work / "transcoders" / f"default-{int(src.stat().st_mtime)}"
        else:
            d = (
                work
                / "transcoders"
                / f"{name}-{cfg.d_sae_skip if name == 'skip' else cfg.d_sae_clt}-l0{cfg.l0:g}"
                f"-seed{cfg.seed}{suffix}"
            )
        if not is_circuit_tracer_dir(d):
            if name == "default":
                from transcoders.formats import load_any

                tc = load_any(src, model=lm)
            else:
                tc = random_transcoders(
                    lm.sites.n_layers,
                    lm.sites.d_model,
                    cfg.d_sae_skip if name == "skip" else cfg.d_sae_clt,
                    kind=name,
                    seed=cfg.seed,
                    l0=cfg.l0,
                    model_name=lm.name,
                )
                calibrate_thresholds(tc, run_and_freeze(lm, calibration).mlp_in, cfg.l0)
            try:
                save_circuit_tracer(tc, d)
            except circuits.UserError as e:
                notes.append(f"set {name}: circuit-tracer cannot load it ({e}); left out")
                continue
            del tc
        sets[name] = d
    cases = []
    grid = [(f, t) for f in cfg.max_feature_nodes for t in cfg.threads]
    for n in cfg.lengths:
        text, tokens = exact_prompt(lm, n, vocab)
        for (name, d), (max_features, threads) in itertools.product(sets.items(), grid):
            base = f"{cfg.model.removeprefix('random-')}-{name}-{n}" if rand else f"{name}-{n}"
            cases.append(
                {
                    "name": base + _setting_suffix(cfg, max_features, threads),
                    "max_feature_nodes": max_features,
                    "threads": threads,
                    "set": name,
                    "dir": str(d),
                    "n_pos": n,
                    "text": text,
                    "tokens": tokens,
                    "batch_size": cfg.batch_size(n),
                    "model_dir": str(model_dir),
                    "model": str(model_dir) if rand else DEFAULT_MODEL,
                }
            )
    del lm
    import gc

    import torch

    gc.collect()
    if (
        torch.cuda.is_available()
    ):  # the measured runs are other processes: leave them the GPU's memory
        torch.cuda.empty_cache()
    return cases, notes


def _default_dir(notes: list[str]) -> Path | None:
    """Where the default trained set is, if it has been trained already (this benchmark never starts
    training)."""
    try:
        from transcoders.default import default_transcoders_dir
    except ImportError as e:
        notes.append(f"set default: not available in this tree ({e}); left out.")
        return None
    d = Path(default_transcoders_dir())
    if not d.exists():
        notes.append(
            f"set default: not trained yet ({d} is missing; `circuits trace` trains it); left out."
        )
        return None
    return d


# -- one measured run in a fresh process -----------------------------------------------------------


def _setting_suffix(cfg: BenchConfig, max_features: int, threads: int) -> str:
    """The part of a case's name that says its settings, where more than one is measured."""
    suffix = ""
    if len(cfg.max_feature_nodes) > 1:
        suffix += f"-f{max_features or 'all'}"
    if len(cfg.threads) > 1:
        suffix += f"-t{threads}"
    return suffix


# One single-threaded CPU-bound process: a shared machine's other job (a training run, a notebook).
COMPETITOR = (
    "import numpy as np\n"
    "a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)\n"
    "while True:\n"
    "    a = np.tanh(a @ a.T * 0.01)\n"
)


@contextlib.contextmanager
def competitor(busy: bool):
    """With `busy`, a competing CPU-bound process (COMPETITOR, one thread) for the block."""
    if not busy:
        yield
        return
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    proc = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
    try:
        time.sleep(0.5)  # running before the measured process starts
        yield
    finally:
        proc.kill()
        proc.wait()


def _proc_status(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_measured(cmd: list[str], cfg: BenchConfig, log: Path, threads: int) -> dict:
    """Run `cmd` with `threads` threads (beside a competitor where `cfg.busy`); its last stdout line
    is a JSON report. Stops it at the time or memory limit and says where it was (the last progress
    line it printed)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    t0 = time.perf_counter()
    stdout = log.with_suffix(".out")
    with open(log, "w") as err, open(stdout, "w") as out, competitor(cfg.busy):
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        peak, stopped = 0, None
        while proc.poll() is None:
            peak = max(peak, _proc_status(proc.pid, "VmHWM"))
            elapsed = time.perf_counter() - t0
            if elapsed > cfg.timeout_s:
                stopped = f"stopped after {elapsed:.0f} s (time limit)"
            elif peak > cfg.max_rss_gb * 2**30:
                stopped = (
                    f"stopped at {peak / 2**30:.1f} GB resident after {elapsed:.0f} s "
                    "(memory limit)"
                )
            if stopped:
                proc.kill()
                break
            time.sleep(0.2)
        proc.wait()
    out = stdout.read_text(errors="replace")
    if stopped or proc.returncode != 0:
        tail = re.split(r"[\r\n]+", log.read_text(errors="replace").strip())
        progress = [t for t in tail if re.search(r"\d+/\d+ \[", t)]
        return {
            "failed": stopped or f"exit code {proc.returncode}: {tail[-1][:200] if tail else ''}",
            "where": progress[-1].strip()[:160] if progress else (tail[-1][:160] if tail else ""),
            "peak_rss": peak,
            "elapsed_s": time.perf_counter() - t0,
        }
    return json.loads(out.strip().splitlines()[-1])


def code_fingerprint(tool: str) -> str:
    """A hash of the code a tool's run depends on here, so that `resume` never reuses a run of older
    code."""
    import hashlib

    files = (
        [REPO / "benchmarks" / "ct_runner.py"]
        if tool == "circuit-tracer"
        else sorted(
            [
                *(REPO / "circuits").glob("*.py"),
                *(REPO / "transcoders").glob("*.py"),
                *(REPO / "csrc").glob("*"),
            ]
        )
    )
    h = hashlib.sha1()
    for f in files:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def ct_phases(log: str) -> dict:
    """circuit-tracer's own phase timings from its verbose log ("Forward pass completed in
    11.70s")."""
    names = {
        "Precomputation": "precompute",
        "Forward pass": "forward",
        "Logit attributions": "logit rows",
        "Feature attributions": "feature rows",
    }
    return {
        short: float(m.group(1))
        for name, short in names.items()
        for m in [re.search(name + r" completed in ([\d.]+)s", log)]
        if m
    }


def ours_command(
    case: dict, cfg: BenchConfig, out: Path, fd: bool, profile: bool = False
) -> list[str]:
    return [
        sys.executable,
        __file__,
        "_ours",
        "--model",
        case["model"],
        "--device",
        cfg.device,
        "--transcoders",
        case["dir"],
        "--text",
        case["text"],
        "--tokens",
        ",".join(map(str, case["tokens"])),
        "--out",
        str(out),
        "--settings",
        json.dumps(ours_settings(settings(cfg, case))),
        *(["--fd"] if fd else []),
        *(["--profile"] if profile else []),
        *(["--warmup"] if cfg.warmup else []),
    ]


def ct_command(case: dict, cfg: BenchConfig, out: Path) -> list[str]:
    s = settings(cfg, case)
    return [
        cfg.ct_python,
        str(REPO / "benchmarks" / "ct_runner.py"),
        "attribute",
        "--device",
        cfg.device,
        "--model",
        case["model_dir"],
        "--transcoders",
        case["dir"],
        "--tokens",
        ",".join(map(str, case["tokens"])),
        "--out",
        str(out),
        "--threads",
        str(case["threads"]),
        "--max-n-logits",
        str(s["max_n_logits"]),
        "--desired-logit-prob",
        str(s["desired_logit_prob"]),
        "--max-feature-nodes",
        str(s["max_feature_nodes"]),  # 0: None, all
        "--batch-size",
        str(s["batch_size"]),
        "--verbose",
        *(["--warmup"] if cfg.warmup else []),
    ]


def settings(cfg: BenchConfig, case: dict) -> dict:
    return {
        "max_n_logits": cfg.max_n_logits,
        "desired_logit_prob": cfg.desired_logit_prob,
        "max_feature_nodes": case["max_feature_nodes"],  # 0: every active feature
        "batch_size": case["batch_size"],
        "dtype": "float32",
    }


def ours_settings(s: dict) -> dict:
    """`settings` as `circuits.attribute` takes them: it has no "all", and a budget above any
    active count is all."""
    return {**s, "max_feature_nodes": s["max_feature_nodes"] or 2**31 - 1}


def child_ours(args) -> int:
    """The measured run of our engine (a fresh process): load, then time `circuits.attribute`."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from ct_runner import GPUMemory, PeakRSS, anon_bytes, peak_rss_bytes, rss_bytes, touch

    import circuits
    from transcoders.circuit_tracer_format import load_circuit_tracer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    t0 = time.perf_counter()
    lm = circuits.load_model(args.model, device=args.device)
    tc = load_circuit_tracer(args.transcoders).to(lm.device)
    tokens = [int(t) for t in args.tokens.split(",")]
    if lm.tokenize(args.text).tolist() != tokens:
        raise SystemExit("the prompt text does not tokenize to the case's token ids")
    s = json.loads(args.settings)
    # encoders, decoders and the (un)embedding stay memory-mapped on disk (attribution reads the
    # active features' rows, the prompt's embedding rows, and passes over the encoders and the
    # unembedding from the file), as circuit-tracer keeps its CLT decoders on disk: neither tool's
    # on-demand weights are read ahead
    vocab = lm.sites.embed.weight.data_ptr()
    touch(
        [p for p in lm.model.parameters() if p.data_ptr() != vocab],
        [p for name, p in tc.named_parameters() if not name.startswith(("W_dec", "W_enc"))],
    )
    t_load = time.perf_counter() - t0
    warmup_s = None
    if args.warmup:  # the same settings on the first tokens of the prompt (BOS + up to 7)
        t = time.perf_counter()
        circuits.attribute(
            lm, lm.tokenizer.decode(tokens[1:WARMUP_TOKENS]), transcoders=tc, progress=False, **s
        )
        GPUMemory(args.device).sync()
        warmup_s = time.perf_counter() - t
    rss_before, anon_before = rss_bytes(), anon_bytes()
    gpu = GPUMemory(args.device)
    prof = __import__("cProfile").Profile() if args.profile else None
    # kernels' own time, on a GPU only: on the CPU the report does not show it, and recording every
    # operator would slow the cProfile'd stages the report does show
    on_gpu = str(args.device).startswith("cuda")
    ops = op_profiler(args.device) if args.profile and on_gpu else contextlib.nullcontext()
    with PeakRSS() as peak, ops:
        t1 = time.perf_counter()
        if prof:
            prof.enable()
        graph = circuits.attribute(lm, args.text, transcoders=tc, progress=True, **s)
        gpu.sync()
        wall = time.perf_counter() - t1
        if prof:
            prof.disable()
    info = {
        "tool": "ours",
        "wall_s": wall,
        "load_s": t_load,
        "warmup_s": warmup_s,
        "peak_rss_attribution": int(peak.peak),
        "peak_anon_attribution": int(peak.peak_anon),
        "anon_before": int(anon_before),
        **gpu.report(),
        "peak_rss": int(max(peak.peak, peak_rss_bytes())),
        "rss_before": int(rss_before),
        "n_active_features": int(graph.metadata["n_active_features"]),
        "n_selected_features": int(graph.metadata["n_feature_rows"]),
        "threads": torch.get_num_threads(),
        "timing_s": graph.metadata.get("timing_s", {}),
        "edge_backend": graph.metadata.get("edge_backend"),
        "versions": graph.metadata.get("versions", {}),
    }
    if prof:
        import pstats

        from attribution import _profile_table  # benchmarks/attribution.py: the same stages

        info["profile"] = _profile_table(pstats.Stats(prof), wall)
        if on_gpu:
            info["ops"] = op_table(ops, args.device)
        # the matrix products the attribution ran (their shapes, as executed: truncated passes
        # counted as run), in one more call with no profiler watching; the compiled edge kernels are
        # not counted (few FLOPs)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as flops:
            circuits.attribute(lm, args.text, transcoders=tc, progress=False, **s)
        info["matmul_gflop"] = flops.get_total_flops() / 1e9
    if args.fd:
        info["fd"] = token_edges_by_finite_differences(lm, tc, graph)
    graph.save(args.out)
    print(json.dumps(info))
    return 0


def op_profiler(device: str):
    """torch.profiler over the profiled run: on a GPU its kernels (what the device itself spends),
    on the CPU PyTorch's operators. cProfile's stages are host time, which on a GPU says little:
    kernels run asynchronously, so the device's own time shows whether the GPU is busy or waits for
    the host. (The benchmark uses it on GPU runs only: on the CPU the compiled edge kernels, not
    being operators, are missed.)"""
    from torch.profiler import ProfilerActivity, profile

    gpu = str(device).startswith("cuda")
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else []))


def op_table(prof, device: str, top: int = 8) -> dict:
    """{"busy_s": the device's total time in its own operations (kernels and copies on a GPU;
    PyTorch operators' self time on the CPU, where the compiled edge kernels, not being operators,
    are left out), "top": [(name, calls, seconds)] the largest, by that time}."""
    from torch.autograd import DeviceType

    gpu = str(device).startswith("cuda")
    rows = []
    for ev in prof.key_averages():
        if gpu != (
            ev.device_type != DeviceType.CPU
        ):  # a GPU kernel also counts as its launching operator's time
            continue
        t = ev.self_device_time_total if gpu else ev.self_cpu_time_total
        if t > 0:
            rows.append((ev.key, int(ev.count), t / 1e6))
    rows.sort(key=lambda r: -r[2])
    return {"busy_s": sum(r[2] for r in rows), "top": rows[:top]}


# -- finite differences of token edges -------------------------------------------------------------


def token_edges_by_finite_differences(lm, tc, graph, n_features: int = 8) -> dict:
    """Token edges measured directly: in the frozen replacement model (feature activations and
    errors held fixed, so every node input is affine in the embeddings) add the embedding of
    position p once more, x_0[p] -> 2 x_0[p], and read the change of each target's input. For an
    affine map that change is exactly the direct effect of token node p. Targets: every logit node
    and the `n_features` most active feature rows after BOS. Returns {"targets": [node id],
    "values": [targets x n_pos]}."""
    import torch

    from circuits.graph import FEATURE
    from circuits.replacement import FrozenWeights, frozen_forward, run_and_freeze

    state = run_and_freeze(lm, torch.as_tensor(graph.tokens))
    fw = FrozenWeights(lm)
    with torch.no_grad():
        acts = [tc.encode(l, state.mlp_in[l]) for l in range(tc.n_layers)]
        errors = state.mlp_out - tc.reconstruct(state.mlp_in).float()
        feats = np.flatnonzero((graph.kind == FEATURE) & graph.has_row & (graph.pos > 0))
        feats = feats[np.argsort(-graph.activation[feats])][:n_features]
        logits = graph.logit_nodes

        def inputs(run) -> np.ndarray:
            demeaned = run["logits"] - run["logits"].mean()
            vals = [float(demeaned[graph.feature[i]]) for i in logits]
            vals += [
                float(run["preacts"][graph.layer[i]][graph.pos[i], graph.feature[i]]) for i in feats
            ]
            return np.array(vals)

        base = inputs(frozen_forward(state, fw, tc, acts, errors))
        cols = []
        for p in range(graph.n_pos):
            emb = state.embeddings.clone()
            emb[p] *= 2
            cols.append(inputs(frozen_forward(state, fw, tc, acts, errors, embeddings=emb)) - base)
    ids = [graph.node_id(int(i)) for i in [*logits, *feats]]
    return {"targets": ids, "values": np.stack(cols, 1).tolist()}


# -- agreement -------------------------------------------------------------------------------------


def ct_graph(path: Path) -> dict:
    """circuit-tracer's saved graph: adjacency and a node id per row/column in our notation."""
    import scipy.sparse as sp

    z = np.load(path, allow_pickle=False)
    L, n = int(z["n_layers"]), len(z["tokens"])
    active, sel = z["active_features"], z["selected_features"]
    ids = (
        [f"f:{active[i][0]}:{active[i][1]}:{active[i][2]}" for i in sel]
        + [f"e:{l}:{p}" for l in range(L) for p in range(n)]
        + [f"t:{p}" for p in range(n)]
        + [f"l:{t}" for t in z["logit_ids"]]
    )
    adj = sp.csr_array((z["adj_data"], z["adj_indices"], z["adj_indptr"]), shape=tuple(z["shape"]))
    rows = np.zeros(len(ids), dtype=bool)
    rows[: len(sel)] = True
    rows[len(ids) - len(z["logit_ids"]) :] = True
    return {
        "ids": ids,
        "adj": adj,
        "has_row": rows,
        "logit_ids": z["logit_ids"].tolist(),
        "logit_probabilities": z["logit_probabilities"],
        "n_layers": L,
        "n_pos": n,
    }


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def agreement(ours_path: Path, ct_path: Path, embed_scale: float) -> dict:
    """Compare the two graphs on the nodes both kept: rows of targets both computed, columns of
    sources both have. Edges (entries nonzero in either graph) are split into: features and errors
    after BOS (expected to agree to float rounding), errors at position 0 (circuit-tracer zeroes
    them by design), token edges (circuit-tracer's are smaller by sqrt(d_model) by its choice of
    embedding vector)."""
    from circuits.graph import FEATURE, load_graph

    ours, ct = load_graph(ours_path), ct_graph(ct_path)
    o_ids = ours.node_ids()
    o_index, c_index = {k: i for i, k in enumerate(o_ids)}, {k: i for i, k in enumerate(ct["ids"])}
    shared = [k for k in ct["ids"] if k in o_index]
    targets = [k for k in shared if ours.has_row[o_index[k]] and ct["has_row"][c_index[k]]]
    O = ours.adjacency[[o_index[k] for k in targets]][:, [o_index[k] for k in shared]].toarray()
    C = ct["adj"][[c_index[k] for k in targets]][:, [c_index[k] for k in shared]].toarray()
    kind = np.array([k[0] for k in shared])
    pos = np.array(
        [
            int(k.split(":")[2]) if k[0] in "fe" else int(k.split(":")[1]) if k[0] == "t" else -1
            for k in shared
        ]
    )

    def part(mask, scale=1.0):
        o, c = O[:, mask].ravel(), C[:, mask].ravel() * scale
        nz = (o != 0) | (c != 0)
        o, c = o[nz], c[nz]
        both = (o != 0) & (c != 0)
        return {
            "edges": int(nz.sum()),
            "pearson": _pearson(o, c),
            "max_abs_diff": float(np.abs(o - c).max()) if len(o) else 0.0,
            "max_abs": float(np.abs(o).max()) if len(o) else 0.0,
            "median_ratio": float(np.median(o[both] / c[both])) if both.any() else float("nan"),
            "abs_weight_ours": float(np.abs(o).sum()),
        }

    main = ((kind == "f") | (kind == "e")) & (pos > 0)
    o_logits = ours.logit_tokens.tolist()
    probs_o = dict(zip(o_logits, ours.logit_probabilities.tolist()))
    dp = [
        abs(probs_o[t] - p)
        for t, p in zip(ct["logit_ids"], ct["logit_probabilities"].tolist())
        if t in probs_o
    ]
    total_o = float(np.abs(O).sum())
    res = {
        "shared_nodes": len(shared),
        "shared_targets": len(targets),
        "nodes_ours": ours.n_nodes,
        "nodes_ct": len(ct["ids"]),
        "features_and_errors": part(main),
        "errors_at_bos": part((kind == "e") & (pos == 0)),
        "tokens": part(kind == "t"),
        "tokens_rescaled": part(kind == "t", embed_scale),
        "same_logits": sorted(o_logits) == sorted(ct["logit_ids"]),
        "logit_ids_ours": o_logits,
        "logit_ids_ct": ct["logit_ids"],
        "max_logit_prob_diff": max(dp) if dp else float("nan"),
        "ours_bos_features": int(((ours.kind == FEATURE) & (ours.pos == 0)).sum()),
        "abs_weight_shared_ours": total_o,
    }
    return res


def fd_agreement(fd: dict, ours_path: Path, ct_path: Path) -> dict:
    """Relative error of each tool's token edges against the finite differences (over targets both
    kept)."""
    from circuits.graph import load_graph

    ours, ct = load_graph(ours_path), ct_graph(ct_path)
    o_index, c_index = (
        {k: i for i, k in enumerate(ours.node_ids())},
        {k: i for i, k in enumerate(ct["ids"])},
    )
    vals = np.array(fd["values"])
    err_o, err_c, n = [], [], 0
    for t, row in zip(fd["targets"], vals):
        if t not in c_index or not ct["has_row"][c_index[t]]:
            continue
        o = np.array([ours.adjacency[o_index[t], o_index[f"t:{p}"]] for p in range(len(row))])
        c = np.array([ct["adj"][c_index[t], c_index[f"t:{p}"]] for p in range(len(row))])
        scale = max(np.abs(row).max(), 1e-12)
        err_o.append(np.abs(o - row).max() / scale)
        err_c.append(np.abs(c - row).max() / scale)
        n += 1
    return {
        "targets": n,
        "max_rel_err_ours": max(err_o) if err_o else float("nan"),
        "max_rel_err_ct": max(err_c) if err_c else float("nan"),
    }


# -- work and the machine's peak -------------------------------------------------------------------


def attribution_flops(
    sites, n: int, kind: str, skip: bool, d_sae: int, n_active: int, row_layers
) -> dict:
    """Floating-point operations the attribution must do (multiply-add = 2), counted from the
    model's shapes:
    forward: one pass over the prompt (attention causal, logits at the last position only), plus
             encoding every transcoder feature at every position, the skip term and decoding the
             active features;
    backward: for each computed row, one transposed pass through the frozen linear model from the
             target's layer down (value and output projections, frozen patterns, skip term);
    edges: each row's gradient dotted with every source's output vector (features, errors,
           tokens)."""
    L, D, H, KV, hd, V, M = (
        sites.n_layers,
        sites.d_model,
        sites.n_heads,
        sites.n_kv_heads,
        sites.head_dim,
        sites.vocab_size,
        sites.d_mlp,
    )
    pairs = n * (n + 1) / 2
    n_out = (L + 1) / 2 if kind == "clt" else 1.0  # average output layers of a CLT feature
    per_layer = (
        2 * n * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * M) + 2 * 2 * pairs * H * hd
    )
    forward = L * per_layer + 2 * D * V
    forward += L * 2 * n * D * d_sae + (L * 2 * n * D * D if skip else 0) + 2 * D * n_active * n_out
    back_layer = (
        2 * n * (D * KV * hd + H * hd * D) + 2 * pairs * H * hd + (2 * n * D * D if skip else 0)
    )
    backward = float(sum(back_layer * int(l) for l in row_layers))
    edges = len(row_layers) * 2 * D * (n_active * n_out + L * n + n)
    return {
        "forward": forward,
        "backward": backward,
        "edges": edges,
        "total": forward + backward + edges,
    }


def peak_flops(threads: int, size: int = 4096, reps: int = 5, device: str = "cpu") -> float:
    """This machine's float32 matmul rate (best of `reps`), measured in a fresh process: the CPU
    with `threads` threads, or the GPU (TF32 off, as both tools run it)."""
    if str(device).startswith("cuda"):
        size, sync = 8192, "torch.cuda.synchronize()"
    else:
        sync = "0"
    code = (
        f"import torch,time;torch.set_num_threads({threads});"
        f"a=torch.randn({size},{size},device='{device}');"
        f"b=torch.randn({size},{size},device='{device}');a@b;{sync};best=1e9\n"
        f"for _ in range({reps}):\n "
        f"t=time.perf_counter();a@b;{sync};best=min(best,time.perf_counter()-t)\n"
        f"print(2*{size}**3/best)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return float(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        ).stdout.strip()
    )


# -- the whole benchmark ---------------------------------------------------------------------------


def run(cfg: BenchConfig) -> str:
    from gemma_lm.files import atomic_write_text, cache_dir

    if "circuit-tracer" in cfg.tools and not Path(cfg.ct_python).exists():
        raise SystemExit(
            f"{cfg.ct_python} is missing: run `bash benchmarks/setup_circuit_tracer.sh` first"
        )
    work = Path(cfg.workdir) if cfg.workdir else cache_dir() / "bench" / "vs_circuit_tracer"
    (work / "runs").mkdir(parents=True, exist_ok=True)
    cases, notes = prepare(cfg, work)
    print(
        f"[vs_circuit_tracer] {len(cases)} cases x {cfg.repeats} repeats x {len(cfg.tools)} tools; "
        f"work in {work}",
        flush=True,
    )
    results: dict[str, dict] = {}
    # alternate which tool goes first
    runs = [
        (r, case, tool)
        for r in range(cfg.repeats)
        for case in cases
        for tool in (cfg.tools if r % 2 == 0 else cfg.tools[::-1])
    ]
    if (
        cfg.profile and "ours" in cfg.tools
    ):  # apart from the timed runs: the profiler slows what it watches
        runs += [("profile", case, "ours") for case in cases]
    for r, case, tool in runs:
        tag = f"{case['name']}-{tool}-{r}"
        out = work / "runs" / (tag + (".npz" if tool == "circuit-tracer" else ".graph.npz"))
        report = work / "runs" / (tag + ".json")
        key = json.dumps(
            [
                case["tokens"],
                case["dir"],
                case["model_dir"],
                cfg.device,
                settings(cfg, case),
                code_fingerprint(tool),
                cfg.warmup,
                case["threads"],
                cfg.busy,
            ]
        )
        if cfg.resume and report.exists():
            old = json.loads(report.read_text())
            if old.get("key") == key:
                results[tag] = old
                continue
        fd = tool == "ours" and r == 0 and case["n_pos"] <= cfg.fd_max_tokens
        cmd = (
            ct_command(case, cfg, out)
            if tool == "circuit-tracer"
            else ours_command(case, cfg, out, fd, profile=r == "profile")
        )
        print(f"[vs_circuit_tracer] {tag} ...", end=" ", flush=True)
        log = work / "runs" / (tag + ".log")
        res = run_measured(cmd, cfg, log, case["threads"])
        res.update(key=key, out=str(out))
        if tool == "circuit-tracer" and "failed" not in res:
            res["phases"] = ct_phases(log.read_text(errors="replace"))
        print(
            res.get("failed") or f"{res['wall_s']:.1f} s, {res['peak_rss'] / 2**30:.2f} GB",
            flush=True,
        )
        atomic_write_text(report, json.dumps(res))
        results[tag] = res
    peak = {t: peak_flops(t, device=cfg.device) for t in cfg.threads}
    text = report_markdown(cfg, cases, results, notes, peak)
    atomic_write_text(cfg.out, text)
    print(text)
    return text


def _median(xs):
    return float(np.median(xs)) if xs else float("nan")


def report_markdown(
    cfg: BenchConfig, cases: list[dict], results: dict, notes: list[str], peak: dict[int, float]
) -> str:
    import circuits
    from gemma_lm.models import DEFAULT_MODEL

    gb = 2**30
    on_gpu = str(cfg.device).startswith("cuda")
    threads = "/".join(map(str, cfg.threads))
    budgets = "/".join(str(f or "all (None)") for f in cfg.max_feature_nodes)
    gpu_name = next((r["gpu_name"] for r in results.values() if r.get("gpu_name")), "a GPU")
    where = (
        f"{gpu_name} (peak float32 matmul {max(peak.values()) / 1e12:.1f} TFLOP/s, TF32 off); "
        f"host {_cpu()}, {os.cpu_count()} cores, {threads} threads per run"
        if on_gpu
        else f"{_cpu()}, {os.cpu_count()} cores, {threads} threads per run; peak float32 matmul "
        + ", ".join(f"{p / 1e9:.0f} GFLOP/s ({t} threads)" for t, p in peak.items())
        + (
            "; busy: one competing single-threaded CPU-bound process ran beside every measured "
            "run (both tools)"
            if cfg.busy
            else ""
        )
    )
    model = (
        f"{cfg.model} (random weights at the Gemma 3 {cfg.model.removeprefix('random-').upper()} "
        "shape)"
        if cfg.model.startswith("random-")
        else DEFAULT_MODEL
    )
    mem = "GPU" if on_gpu else "RSS"
    lines = [
        "## Side by side with circuit-tracer 0.5.0"
        + (f" on {gpu_name}" if on_gpu else "")
        + (f": {cfg.model}" if cfg.model.startswith("random-") else ""),
        "",
        f"Command: `python benchmarks/vs_circuit_tracer.py {' '.join(_cli_args(cfg))}`".rstrip()
        + "  ",
        f"Machine: {where}; {time.strftime('%Y-%m-%d')}  ",
        f"Model: {model} (float32, {'GPU' if on_gpu else 'CPU'}). Settings for both: max_n_logits "
        f"{cfg.max_n_logits}, desired_logit_prob {cfg.desired_logit_prob}, max_feature_nodes "
        f"{budgets}, batch size {cfg.batch_tokens} tokens / n_pos (16..256). Random "
        f"sets calibrated to L0 {cfg.l0:g}: skip PLT {cfg.d_sae_skip} wide, CLT {cfg.d_sae_clt} "
        f"per layer. {cfg.repeats} runs per tool, alternating, each a fresh process; times are "
        "medians.",
        "",
    ]
    versions = next(
        (r.get("versions") for r in results.values() if r.get("tool") == "circuit-tracer"), None
    )
    if versions:
        lines += [
            f"Peer: {', '.join(f'{k} {v}' for k, v in versions.items())}; ours: gemma-circuits "
            f"{circuits.__version__}.",
            "",
        ]
    anon_col = "" if on_gpu else " peak anon GB |"
    lines += [
        f"| case | tool | tokens | batch | active features | rows | wall s | peak {mem} GB | "
        f"attribution Δ{mem} GB |{anon_col} GFLOP | % of peak |",
        "|---|---|---|---|---|---|---|---|---|" + ("" if on_gpu else "---|") + "---|---|",
    ]
    summary, phases = [], []
    for case in cases:
        per_tool = {}
        for tool in cfg.tools:
            runs = [results.get(f"{case['name']}-{tool}-{r}") for r in range(cfg.repeats)]
            ok = [x for x in runs if x and "failed" not in x]
            bad = [x for x in runs if x and "failed" in x]
            if not ok:
                why = bad[0] if bad else {"failed": "not run", "where": ""}
                lines.append(
                    f"| {case['name']} | {tool} | {case['n_pos']} | {case['batch_size']} | | | "
                    f"{why['failed']}; last progress: `{why.get('where', '')}` | "
                    f"{why.get('peak_rss', 0) / gb:.2f} | |{'' if on_gpu else ' |'} | |"
                )
                continue
            wall = _median([x["wall_s"] for x in ok])
            # the process's peak (on a GPU: its GPU memory, the model and transcoders included), and
            # its rise in attribution
            peaks = [x["gpu_peak" if on_gpu else "peak_rss"] for x in ok]
            rss = max(peaks)
            during = max(
                x["gpu_peak"] - x["gpu_before"]
                if on_gpu
                else x["peak_rss_attribution"] - x["rss_before"]
                for x in ok
            )
            spread = f" ({min(peaks) / gb:.2f}-{rss / gb:.2f})" if len(ok) > 1 else ""
            # anonymous memory: runs recorded before it was measured have none
            anon = max(
                (x["peak_anon_attribution"] for x in ok if "peak_anon_attribution" in x),
                default=None,
            )
            spent = ok[0].get("timing_s") or ok[0].get("phases") or {}
            warm = (
                f"warm-up call {ok[0]['warmup_s']:.2f} s; "
                if ok[0].get("warmup_s") is not None
                else ""
            )
            phases.append(
                f"| {case['name']} | {tool} | {warm}"
                + ", ".join(f"{k} {v:.1f}" for k, v in spent.items() if k != "load")
                + " |"
            )
            rows = ok[0]["n_selected_features"]
            work = _work(case, ok[0], tool, _sites(case["model_dir"]))
            per_tool[tool] = {
                "wall": wall,
                "rss": rss,
                "rss_median": _median(peaks),
                "during": during,
                "anon": anon,
            }
            anon_cell = "" if on_gpu else f" {'–' if anon is None else f'{anon / gb:.2f}'} |"
            lines.append(
                f"| {case['name']} | {tool} | {case['n_pos']} | {case['batch_size']} | "
                f"{ok[0]['n_active_features']} | {rows} | {wall:.2f} "
                f"({min(x['wall_s'] for x in ok):.2f}-{max(x['wall_s'] for x in ok):.2f}) | "
                f"{rss / gb:.2f}{spread} | {during / gb:.2f} |{anon_cell} "
                f"{work['total'] / 1e9:.1f} | "
                f"{100 * work['total'] / wall / peak[case['threads']]:.1f} |"
            )
        if len(per_tool) == 2:
            o, c = per_tool["ours"], per_tool["circuit-tracer"]
            anon_ratio = (
                ""
                if on_gpu
                else (
                    " – |" if None in (o["anon"], c["anon"]) else f" {o['anon'] / c['anon']:.3f} |"
                )
            )
            summary.append(
                f"| {case['name']} | {c['wall'] / o['wall']:.1f}x | {o['rss'] / c['rss']:.3f} | "
                f"{o['rss_median'] / c['rss_median']:.3f} | "
                f"{o['during'] / max(c['during'], 1):.2f} |{anon_ratio}"
            )
    if summary:
        lines += [
            "",
            "Speed and memory, ours relative to circuit-tracer (time: how many times faster; "
            "memory: our peak as a fraction of theirs, the highest of each tool's runs, and the "
            "ratio of the medians):",
            "",
            f"| case | speed-up | peak {mem} ratio | of medians | attribution Δ{mem} "
            "ratio |" + ("" if on_gpu else " peak anon ratio |"),
            "|---|---|---|---|---|" + ("" if on_gpu else "---|"),
            *summary,
        ]
    if phases:
        lines += [
            "",
            "Where the time goes (seconds; first run of each; ours from the graph's metadata, "
            "circuit-tracer from its verbose log):",
            "",
            "| case | tool | phases |",
            "|---|---|---|",
            *phases,
        ]
    profiled = [
        (case["name"], results[f"{case['name']}-ours-profile"])
        for case in cases
        if "profile" in results.get(f"{case['name']}-ours-profile", {})
    ]
    case_threads = {case["name"]: case["threads"] for case in cases}
    if profiled:
        stages = [name for name, _ in profiled[0][1]["profile"]]
        lines += [
            "",
            "Our time by stage (seconds; one more run per case under cProfile, apart from the "
            "timed runs"
            + (
                "; on a GPU a stage includes the waits for GPU work queued before it"
                if on_gpu
                else ""
            )
            + "):",
            "",
            "| stage | " + " | ".join(name for name, _ in profiled) + " |",
            "|---|" + "---|" * len(profiled),
        ]
        for i, stage_name in enumerate(stages):
            lines.append(
                f"| {stage_name} | "
                + " | ".join(f"{res['profile'][i][1]:.2f}" for _, res in profiled)
                + " |"
            )
        if all(
            "matmul_gflop" in res for _, res in profiled
        ):  # what the matmuls alone need at the machine's peak
            lines.append(
                "| matrix products it ran, GFLOP (torch's FlopCounterMode) | "
                + " | ".join(f"{res['matmul_gflop']:.1f}" for _, res in profiled)
                + " |"
            )
            lines.append(
                "| the same at the peak matmul rate above, s | "
                + " | ".join(
                    f"{res['matmul_gflop'] * 1e9 / peak[case_threads[name]]:.3f}"
                    for name, res in profiled
                )
                + " |"
            )
    # GPU runs record them
    with_ops = [(name, res["ops"]) for name, res in profiled if "ops" in res]
    if with_ops:
        lines += [
            "",
            "What the GPU itself does in the profiled run (torch.profiler: kernels and copies); "
            "busy is their total, against the timed run's wall time (far below it: the GPU waits "
            "for the host):",
            "",
            "| case | busy s | timed wall s | largest (calls, s) |",
            "|---|---|---|---|",
        ]
        for name, ops in with_ops:
            timed = results.get(f"{name}-ours-0", {}).get("wall_s", float("nan"))
            top = "; ".join(f"{_short_op(k)} ({calls}, {sec:.3f})" for k, calls, sec in ops["top"])
            lines.append(f"| {name} | {ops['busy_s']:.2f} | {timed:.2f} | {top} |")
    lines += [
        "",
        "### Agreement",
        "",
        "On the nodes both graphs kept (rows both computed x sources both have); r and max |diff| "
        "over edges nonzero in either graph. Features and errors after BOS should agree to float "
        "rounding. circuit-tracer zeroes every feature and error at position 0 (BOS) by design; "
        "its token edges use the unscaled embedding row (see below).",
        "",
        "| case | shared nodes | shared rows | edges | Pearson r | max abs diff (max abs) | same "
        "logits | max logit p diff | BOS error edges (ours, share of weight) | token edges: ours "
        "/ theirs | token r after x sqrt(d) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fd_lines, embed_scale = [], _sites(cases[0]["model_dir"]).embed_scale if cases else float("nan")
    for case in cases:
        o, c = (
            results.get(f"{case['name']}-ours-0"),
            results.get(f"{case['name']}-circuit-tracer-0"),
        )
        if not (o and c and "failed" not in o and "failed" not in c):
            continue
        a = agreement(Path(o["out"]), Path(c["out"]), _sites(case["model_dir"]).embed_scale)
        fe, bos, tok, tok2 = (
            a["features_and_errors"],
            a["errors_at_bos"],
            a["tokens"],
            a["tokens_rescaled"],
        )
        share = bos["abs_weight_ours"] / max(a["abs_weight_shared_ours"], 1e-30)
        lines.append(
            f"| {case['name']} | {a['shared_nodes']} | {a['shared_targets']} | {fe['edges']} | "
            f"{fe['pearson']:.6f} | {fe['max_abs_diff']:.2g} ({fe['max_abs']:.2g}) | "
            f"{'yes' if a['same_logits'] else 'NO'} | {a['max_logit_prob_diff']:.1e} | "
            f"{bos['edges']}, {100 * share:.1f}% | {tok['median_ratio']:.4f} | "
            f"{tok2['pearson']:.6f} |"
        )
        if "fd" in o:
            f = fd_agreement(o["fd"], Path(o["out"]), Path(c["out"]))
            fd_lines.append(
                f"| {case['name']} | {f['targets']} | {f['max_rel_err_ours']:.1e} | "
                f"{f['max_rel_err_ct']:.3f} |"
            )
    if fd_lines:
        lines += [
            "",
            "Token edges against finite differences in the frozen replacement model (x_0[p] -> 2 "
            "x_0[p] with features and errors held fixed; exact for this affine map). Gemma 3 "
            f"scales embeddings by sqrt(d_model) = {embed_scale:.4f}; circuit-tracer multiplies "
            "the gradient at the scaled embedding by the unscaled row, so its token edges are too "
            "small by that factor.",
            "",
            "| case | targets | max rel. error, ours | max rel. error, circuit-tracer |",
            "|---|---|---|---|",
            *fd_lines,
        ]
    lines += [
        "",
        "How to read: wall time is the attribution call alone, after loading, with every weight "
        "each tool keeps in memory already read once (memory-mapped weights made resident). "
        "Weights either tool reads from disk on demand stay there: circuit-tracer's CLT decoders, "
        "and all our decoders (memory-mapped views of the files, of which attribution reads the "
        "active features' rows), our encoders (views of the files too; attribution's one pass "
        "over them and the active features' vectors are read from the file) and our model's "
        "embedding matrix (tied to the unembedding; attribution reads the prompt's rows and "
        "passes over the vocabulary from the file, `LoadedModel.embed` / `unembed`). Peak RSS is "
        "the whole process, so ΔRSS (peak during attribution minus the resident size before it) "
        "isolates the attribution itself. Peak anon is the anonymous part of the resident memory "
        "at its peak during the attribution call (sampled every 10 ms): RSS minus file-backed "
        "pages. Both tools' model weights are memory-mapped safetensors files (circuit-tracer "
        "through transformers, ours through gemma_lm.gemma3), so they count in RSS but not here: "
        "clean file pages, which the kernel can drop and read again when memory runs short; "
        "anonymous memory it cannot. GFLOP is the work the attribution must do (one forward pass, "
        "one transposed pass per row down from its layer, the edge dot products), the same "
        "formula for both tools; % of peak divides it by the wall time and the matmul rate above. "
        "The count takes every transposed pass over the whole prompt; ours stops each batch at "
        "the last position its rows can reach (causal attention), so it does less than the count "
        "and can pass 100%. Both tools' rows differ when max_feature_nodes is below the active "
        "count: they rank features by influence at different moments, and circuit-tracer never "
        "selects BOS features."
        + (
            f" With --warmup, each process first traced the prompt's first {WARMUP_TOKENS} tokens "
            "with the same settings (the warm-up call, not in the wall time), so that one-time "
            "costs of a process (on a GPU: CUDA context, cuBLAS handles, kernels loaded on first "
            "use) stay out of the timed call."
            if cfg.warmup
            else ""
        )
        + (
            " On the GPU, memory is CUDA memory allocated by each process (PyTorch's peak), not "
            "resident memory."
            if on_gpu
            else " The Gemma 3 1B/4B-shaped GPU cases (`--model random-1b --device cuda`) are in "
            "their own table."
        ),
    ]
    if notes:
        lines += ["", "Notes: " + " ".join(notes)]
    return "\n".join(lines) + "\n"


def _short_op(name: str, width: int = 60) -> str:
    """A kernel's or operator's name for a table cell: no `void `, no `|`, cut to `width` (a GPU
    kernel's template arguments say which matmul variant it is, so they stay as far as they fit)."""
    return " ".join(name.removeprefix("void ").split()).replace("|", "/")[:width]


def _work(case: dict, res: dict, tool: str, sites) -> dict:
    """FLOPs of the run, from the rows it computed and its active features. A feature row of layer l
    passes back through the attention of layers l..0; a logit row through all layers."""
    import yaml

    cfg = yaml.safe_load((Path(case["dir"]) / "config.yaml").read_text())
    gc = cfg.get("gemma_circuits", {})
    kind, skip, d_sae = gc.get("kind", "plt"), bool(gc.get("skip")), int(gc.get("d_sae", 0))
    if tool == "ours":
        from circuits.graph import FEATURE, load_graph

        g = load_graph(res["out"])
        row_layers = list(g.layer[g.has_row & (g.kind == FEATURE)] + 1) + [sites.n_layers] * len(
            g.logit_nodes
        )
    else:
        z = np.load(res["out"], allow_pickle=False)
        row_layers = list(z["active_features"][z["selected_features"], 0] + 1) + [
            sites.n_layers
        ] * len(z["logit_ids"])
    return attribution_flops(
        sites, case["n_pos"], kind, skip, d_sae, res["n_active_features"], row_layers
    )


def _sites(model_dir: str):
    """The model's shapes, from its Hugging Face directory, without loading it."""
    from types import SimpleNamespace

    c = json.loads((Path(model_dir) / "config.json").read_text())
    return SimpleNamespace(
        n_layers=c["num_hidden_layers"],
        d_model=c["hidden_size"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        vocab_size=c["vocab_size"],
        d_mlp=c["intermediate_size"],
        embed_scale=float(c["hidden_size"]) ** 0.5,
    )


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cli_args(cfg: BenchConfig) -> list[str]:
    default, out = BenchConfig(), []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v != getattr(default, f.name):
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                out.append(flag if v else "--no-" + f.name.replace("_", "-"))
            else:
                out += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out


def parse_config(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = BenchConfig()
    for f in fields(BenchConfig):
        v = getattr(default, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=v)
        elif isinstance(v, list):
            conv = int if v and isinstance(v[0], int) else str
            p.add_argument(
                flag,
                default=v,
                type=lambda s, conv=conv: [conv(x) for x in s.split(",") if x],
                help=f"comma-separated (default {','.join(map(str, v))})",
            )
        else:
            p.add_argument(flag, type=type(v), default=v, help=f"default {v}")
    return BenchConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ours":  # the measured child process of our engine
        p = argparse.ArgumentParser()
        for a in (
            "--model",
            "--device",
            "--transcoders",
            "--text",
            "--tokens",
            "--out",
            "--settings",
        ):
            p.add_argument(a, required=True)
        p.add_argument("--fd", action="store_true")
        p.add_argument("--profile", action="store_true")
        p.add_argument("--warmup", action="store_true")
        return child_ours(p.parse_args(argv[1:]))
    run(parse_config(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
