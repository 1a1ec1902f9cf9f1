"""Two-process batch trace of 20 prompts on the real gemma-3-270m, killed halfway (SIGKILL), then
resumed.

    python benchmarks/batch_resume.py                       # the default set (trained on first use)
    python benchmarks/batch_resume.py --transcoders DIR     # any transcoder set
    python benchmarks/batch_resume.py --random-transcoders  # random skip transcoders (no training)

Runs `torchrun --nproc-per-node 2 -m circuits trace-batch tests/data/batch_prompts_20.jsonl`, kills
torchrun and both workers once half the graphs exist, resumes with the same command, then checks
that every prompt has exactly one graph and one index line, that the graphs written before the kill
were kept untouched, and prints a markdown table of the times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "tests" / "data" / "batch_prompts_20.jsonl"


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [int(x) for x in out.split()]


def _graphs(out: Path) -> dict[str, float]:
    """Graph file name -> modification time."""
    folder = out / "graphs"
    return {p.name: p.stat().st_mtime for p in folder.glob("*.npz")} if folder.exists() else {}


def _launch(args, out: Path, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "circuits",
        "trace-batch",
        str(PROMPTS),
        "--out",
        str(out),
        "--transcoders",
        args.transcoders,
        "--max-feature-nodes",
        str(args.max_feature_nodes),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transcoders", default="default")
    p.add_argument(
        "--random-transcoders", action="store_true", help="random skip transcoders (no training)"
    )
    p.add_argument("--max-feature-nodes", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--out", default="", help="output folder (default: a temporary one)")
    args = p.parse_args()
    n = sum(1 for line in PROMPTS.read_text().splitlines() if line.strip())
    work = Path(args.out or tempfile.mkdtemp(prefix="batch_resume_"))
    out = work / "graphs_out"
    if args.random_transcoders:
        from transcoders.formats import save_native
        from transcoders.testing import random_transcoders

        args.transcoders = str(work / "random_skip")
        save_native(
            random_transcoders(
                18,
                640,
                2048,
                kind="skip",
                activation="batchtopk",
                k=16,
                seed=0,
                model_name="gemma-3-270m",
            ),
            args.transcoders,
        )
    if (
        args.transcoders == "default"
    ):  # train (or find) the default set first, so the timings are tracing only
        from circuits import load_model
        from transcoders.default import load_default_transcoders

        load_default_transcoders(load_model())

    t0 = time.time()
    run = _launch(args, out, work / "run1.log")
    while len(_graphs(out)) < n // 2:
        if run.poll() is not None:
            sys.exit(f"the first run ended before half the graphs existed; see {work / 'run1.log'}")
        time.sleep(0.2)
    victims = _children(run.pid)
    for pid in victims + [run.pid]:
        os.kill(pid, signal.SIGKILL)
    run.wait()
    t_kill = time.time() - t0
    time.sleep(1)
    before = _graphs(out)
    for pid in victims:  # make sure no worker outlived the kill
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )

    t1 = time.time()
    run = _launch(args, out, work / "run2.log")
    rc = run.wait()
    t_resume = time.time() - t1
    after = _graphs(out)
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in index]
    kept = all(after.get(name) == mtime for name, mtime in before.items())
    lost = n - len(after)
    duplicated = len(ids) - len(set(ids))
    ok = (
        rc == 0
        and lost == 0
        and duplicated == 0
        and len(index) == n
        and kept
        and all(r["status"] == "ok" for r in index)
    )
    resume_log = (work / "run2.log").read_text()
    traced_line = next((x for x in resume_log.splitlines() if " traced, " in x), "")

    print(f"## batch trace kill/resume ({n} prompts, 2 ranks, gloo)\n")
    print(
        "command: `python benchmarks/batch_resume.py"
        f"{' --random-transcoders' if args.random_transcoders else ''}` "
        f"(transcoders {args.transcoders if not args.random_transcoders else 'random skip'}, "
        f"max_feature_nodes {args.max_feature_nodes}, OMP_NUM_THREADS={args.threads})  "
    )
    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}\n"
    )
    print("| stage | wall s | graphs on disk |")
    print("| --- | ---: | ---: |")
    print(f"| first run, SIGKILLed (torchrun + both workers) | {t_kill:.1f} | {len(before)} |")
    print(f"| resumed run (same command) | {t_resume:.1f} | {len(after)} |")
    print(f"\nresumed run: `{traced_line.strip()}`  ")
    print(
        f"index lines {len(index)}, unique ids {len(set(ids))}, graphs lost {lost}, duplicated "
        f"{duplicated}, graphs from before the kill untouched: {kept}; overall "
        f"{'OK' if ok else 'FAILED'}\n"
    )
    seconds = sorted(r["seconds"] for r in index if r.get("seconds") is not None)
    if seconds:
        print(
            f"per-prompt attribution: median {seconds[len(seconds) // 2]:.1f} s, max "
            f"{seconds[-1]:.1f} s; outputs in {work}"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
