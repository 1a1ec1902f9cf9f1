"""First use, as a new user meets it: the README's main command from an empty cache, timed.

    python benchmarks/first_use.py            # a fresh cache in a temporary folder
    python benchmarks/first_use.py --keep DIR # the cache in DIR (kept), e.g. to warm it

Runs the trace part of the README's main command (after `<!-- main-command -->`; the set-up step
is left out: it installs packages, which a machine that runs this already has) with
GEMMA_CIRCUITS_CACHE pointing at an empty folder, so the model is assembled from its PyPI package,
the default transcoders are trained and their dashboards built, and then the prompt is traced.
Measures the wall time of each stage (from the progress lines on stderr), the peak RSS of the
largest process (`os.wait4`), and the peak of the whole process tree's summed RSS (sampled every
0.2 s: the training runs in a child while the trace process holds its model). Writes
benchmarks/results/first_use.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemma_lm.files import atomic_write_text  # noqa: E402

# stderr lines that start each stage (the first match of each, in order)
STAGES = [
    ("model assembly", re.compile(r"loading gemma-3-270m")),
    ("training", re.compile(r"training the default transcoders")),
    ("dashboards", re.compile(r"^(sampling text from the model|dashboards:)")),
    ("trace", re.compile(r"^attribution")),
]


def main_command() -> list[str]:
    """The trace command of the README's main command (the part after `&&`)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- main-command -->", 1)[1].split("```")[1]
    line = block.strip().splitlines()[0]
    trace = line.split("&&", 1)[1].strip()
    return shlex.split(trace)


def tree_rss_bytes(root: int) -> int:
    """Summed RSS of process `root` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run(cache: Path, out: Path) -> dict:
    """The trace command with `cache` as the cache root, in folder `out`: stage times, peaks, its
    output."""
    argv = [sys.executable if a == "python3" else a for a in main_command()]
    # run where `out`'s files may go, so that it prints exactly what the README shows
    env = {**os.environ, "GEMMA_CIRCUITS_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    # text mode splits the progress bars' carriage returns into lines
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(argv, env=env, cwd=out, **pipes)
    peak_tree, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak_tree[0] = max(peak_tree[0], tree_rss_bytes(proc.pid))
            time.sleep(0.2)

    marks: dict[str, float] = {}

    def read_stderr():
        for line in iter(proc.stderr.readline, ""):
            for name, pattern in STAGES:
                if name not in marks and pattern.search(line):
                    marks[name] = time.time() - t0

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, read_stderr)]
    for t in threads:
        t.start()
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    done.set()
    if status != 0:
        raise SystemExit(f"the command failed (status {status}): {shlex.join(argv)}")
    return {
        "argv": argv,
        "wall_s": wall,
        "marks": marks,
        "peak_process_gb": usage.ru_maxrss / 2**20,
        "peak_tree_gb": peak_tree[0] / 2**30,
        "stdout": stdout,
    }


def stage_rows(result: dict) -> list[str]:
    """(stage, seconds) rows from the marks: each stage lasts until the next one starts."""
    starts = sorted((t, name) for name, t in result["marks"].items())
    ends = [t for t, _ in starts[1:]] + [result["wall_s"]]
    rows = [f"| start-up | {starts[0][0]:.0f} |"] if starts else []
    rows += [f"| {name} | {end - t:.0f} |" for (t, name), end in zip(starts, ends)]
    return rows


def section(result: dict, loads: tuple[float, float], started: str) -> str:
    import torch

    minutes = result["wall_s"] / 60
    return "\n".join(
        [
            "## First use: the README's main command from an empty cache (benchmarks/first_use.py)",
            "",
            f"Command: `{shlex.join(['python', 'benchmarks/first_use.py', *sys.argv[1:]])}`  ",
            f"Runs: `{shlex.join(main_command())}` with an empty GEMMA_CIRCUITS_CACHE  ",
            f"Machine: {os.cpu_count()} cores, torch {torch.__version__}; {started}; load "
            f"average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end",
            "",
            f"Wall time {minutes:.1f} min; peak RSS {result['peak_process_gb']:.2f} GB in the "
            f"largest process, {result['peak_tree_gb']:.2f} GB summed over the process tree "
            "(the trace process holds its model while the training runs in a child).",
            "",
            "| stage | seconds |",
            "|---|---|",
            *stage_rows(result),
            "",
            "What it printed:",
            "",
            "```",
            result["stdout"].rstrip(),
            "```",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--keep", default="", help="use (and keep) this folder as the cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "first_use.md"))
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.keep) if args.keep else Path(tmp) / "cache"
        if cache.exists() and any(cache.iterdir()):
            raise SystemExit(f"{cache} is not empty; first use needs an empty cache")
        cache.mkdir(parents=True, exist_ok=True)
        result = run(cache, Path(tmp))
    text = section(result, (load0, os.getloadavg()[0]), started)
    atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
