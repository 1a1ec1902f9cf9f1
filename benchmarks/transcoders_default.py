"""Benchmark of the embedded default transcoder set: train the default recipe from scratch (timed),
then `transcoders eval` it on held-out text, and write benchmarks/results/transcoders_default.md.

    python benchmarks/transcoders_default.py                # train from scratch + eval (~10 min)
    python benchmarks/transcoders_default.py --reuse        # evaluate the cached default set only
    python benchmarks/transcoders_default.py --compare-clt  # also a CLT trained for the same steps

The from-scratch run trains into a temporary directory; if the user's cache holds no default set
yet, the result is moved there (so the benchmark also warms the cache). Threads: OMP_NUM_THREADS
(default 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(
            l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), Python {platform.python_version()}"
    )


def train_timed(cfg, lm) -> tuple[object, float]:
    from transcoders.train import train_transcoders

    t = time.time()
    tc = train_transcoders(cfg, loaded=lm)
    return tc, time.time() - t


PROMPTS = ROOT / "tests" / "data" / "batch_prompts_20.jsonl"


def prompt_l0(tc, lm) -> float:
    """Active features per position per layer on the short English prompts of PROMPTS (BOS left
    out): what sets a graph's size, and far above the held-out L0 when the training text is
    off-domain."""
    from transcoders.data import harvest

    fired = positions = 0
    for line in PROMPTS.read_text().splitlines():
        ids = lm.tokenizer(json.loads(line)["prompt"], return_tensors="pt").input_ids
        mlp_in, _ = harvest(lm, ids)  # [n_pos - 1, L, D]
        fired += sum(int((tc.encode(l, mlp_in[:, l]) > 0).sum()) for l in range(tc.n_layers))
        positions += mlp_in.shape[0] * tc.n_layers
    return fired / positions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--reuse", action="store_true", help="evaluate the cached default set; do not train"
    )
    ap.add_argument(
        "--compare-clt",
        action="store_true",
        help="also train and evaluate a CLT (d_sae 512) for the same number of steps",
    )
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument(
        "--activation-cache",
        default="",
        help="reuse harvested activation shards from this "
        "folder (and keep new ones there); timings then "
        "leave out the reused harvesting",
    )
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "transcoders_default.md")
    )
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from circuits import load_model
    from gemma_lm.files import cache_dir
    from transcoders.default import (
        DEFAULT_NAME,
        default_recipe,
        default_transcoders_dir,
        load_default_transcoders,
    )
    from transcoders.evaluate import EvalConfig, evaluate_transcoders, results_table

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()[0]
    lm = load_model()
    runs = []  # (label, transcoder set, training seconds or None)
    if args.reuse:
        runs.append(("default (cached)", load_default_transcoders(lm), None))
    else:
        work = cache_dir() / "transcoders" / f".bench-{DEFAULT_NAME}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(str(work) + ".train", ignore_errors=True)
        cfg = default_recipe(work)
        cfg.activation_cache = args.activation_cache
        tc, seconds = train_timed(cfg, lm)
        runs.append(
            (f"default: {cfg.kind} {cfg.activation}, d_sae {cfg.d_sae}, k {cfg.k}", tc, seconds)
        )
        target = default_transcoders_dir()
        if not (target / "config.json").exists():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(work, target)
        else:
            shutil.rmtree(work, ignore_errors=True)
        if args.compare_clt:
            clt_dir = cache_dir() / "transcoders" / ".bench-clt"
            shutil.rmtree(clt_dir, ignore_errors=True)
            ccfg = default_recipe(clt_dir)
            ccfg.activation_cache = args.activation_cache
            ccfg.kind, ccfg.d_sae, ccfg.skip, ccfg.matryoshka = "clt", 512, False, [64, 256]
            ctc, cseconds = train_timed(ccfg, lm)
            runs.append(
                (
                    f"CLT: {ccfg.activation}, d_sae {ccfg.d_sae}, k {ccfg.k}, same steps",
                    ctc,
                    cseconds,
                )
            )
            shutil.rmtree(clt_dir, ignore_errors=True)
    results = []
    for label, tc, seconds in runs:
        res = evaluate_transcoders(tc, lm, EvalConfig(tokens=args.eval_tokens, json=""))
        res["prompt_l0"] = prompt_l0(tc, lm)
        results.append((label, res, seconds))
        print(f"\n{label}\n" + results_table(res))
    load_end = os.getloadavg()[0]

    cmd = " ".join(["OMP_NUM_THREADS=2 python benchmarks/transcoders_default.py"] + sys.argv[1:])
    lines = [
        "## Default transcoders (gemma-3-270m)",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine()}  ",
        f"Date: {started}; load average {load_start:.1f} at the start, {load_end:.1f} at the end "
        f"(other jobs sharing the CPU slow the timings).",
        "",
    ]
    if len(results) > 1:
        lines += [
            "| set | train time | mean FVU | mean L0 | dead | dense | delta CE | CE recovered |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, res, seconds in results:
            lines.append(
                f"| {label} | {seconds / 60:.1f} min | {res['mean_fvu']:.3f} | "
                f"{res['mean_l0']:.1f} | {res['mean_dead_frac']:.1%} | "
                f"{res['mean_dense_frac']:.1%} | {res['delta_ce']:+.3f} | "
                f"{res['ce_recovered']:.1%} |"
            )
        lines.append("")
    label, res, seconds = results[0]
    if seconds is not None:
        reused = (
            " (reusing cached activation shards)"
            if args.activation_cache
            else " (harvesting included)"
        )
        lines.append(f"Training the default recipe from scratch{reused}: {seconds / 60:.1f} min.")
    lines += [
        "",
        f"On the {len(PROMPTS.read_text().splitlines())} English prompts of "
        f"`tests/data/{PROMPTS.name}` ({label}): {res['prompt_l0']:.1f} active features per "
        f"position per layer (BOS left out), against {res['mean_l0']:.1f} on the held-out text.",
    ]
    lines += [
        "",
        f"Per layer ({label}; {res['tokens']} held-out tokens of the builtin text; dead = never "
        "fired on them, dense = fired on more than 10% of them):",
        "",
        results_table(res),
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
