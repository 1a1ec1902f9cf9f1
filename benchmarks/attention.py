"""QK attribution and head loadings on the real gemma-3-270m with the default transcoders: seconds
and memory of one QK attribution and of the head loadings of a pruned circuit, at 9 and 128 tokens.

    python benchmarks/attention.py                 # writes benchmarks/results/attention.md
    python benchmarks/attention.py --lengths 9 --repeats 5

Each length runs in a process of its own. Per length: the prompt is traced and pruned (not timed
here: benchmarks/attribution.py times tracing); then timed, each the median of --repeats runs:
  freeze   the prompt rebuilt for attention analyses (`attention.prompt_sources`: one forward pass
           of the real model, features, error vectors, the q/k norm scales and rotary maps);
  qk       one QK attribution on the frozen prompt (last position as the query, the key its head
           attends to most), on a sliding and on a global layer;
  heads    the head loadings of the pruned circuit's strongest edges between positions (--edges).
Memory: the resident set within each step, sampled every 10 ms, above what the process held
before it (the model and transcoders), and the process's own peak. Exactness rides along: the
largest |residual| / |score| of the QK attributions and |residual| / |edge weight| of the loadings.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attribution import prompt_of_length  # noqa: E402
from ct_runner import PeakRSS, peak_rss_bytes, rss_bytes  # noqa: E402
from transcoders_default import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "attention.md"
HEADS = [(5, 0), (11, 1)]  # a sliding layer, a global layer of gemma-3-270m (every sixth global)


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median seconds, peak resident bytes above the start, the last result)."""
    times, peak, out = [], 0, None
    for _ in range(repeats):
        before = rss_bytes()
        with PeakRSS() as mem:
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        peak = max(peak, mem.peak - before)
    return statistics.median(times), peak, out


def run_one(n_tokens: int, repeats: int, n_edges: int) -> dict:
    import numpy as np
    import torch

    import circuits
    from circuits.attention import prompt_sources, qk_of_sources
    from circuits.heads import loadings_of_sources, strongest_cross_position_edges
    from transcoders.default import resolve_transcoders

    lm = circuits.load_model()
    tc = resolve_transcoders("default", lm, progress=False)
    prompt = prompt_of_length(lm, n_tokens)
    graph = circuits.attribute(lm, prompt, transcoders=tc, progress=False, dashboards=False)
    circuit = circuits.prune(graph)
    tokens = torch.as_tensor(graph.tokens)
    freeze_s, freeze_mem, ps = _timed(lambda: prompt_sources(lm, tc, tokens, circuit), repeats)
    row = {"tokens": graph.n_pos, "freeze_s": freeze_s, "freeze_mb": freeze_mem / 2**20}
    errors = []
    for layer, head in HEADS:
        one = functools.partial(qk_of_sources, ps, prompt, layer, head, -1, None)
        s, mem, r = _timed(one, repeats)
        row[f"qk_L{layer}_s"], row[f"qk_L{layer}_mb"] = s, mem / 2**20
        row[f"qk_L{layer}_sources"] = len(r.source_ids)
        errors.append(abs(r.residual) / max(abs(r.score), 1e-6))
    edges = strongest_cross_position_edges(circuit, n_edges)
    s, mem, hl = _timed(lambda: loadings_of_sources(ps, circuit, edges), repeats)
    row.update(heads_s=s, heads_mb=mem / 2**20, edges=len(edges), circuit_nodes=circuit.n_nodes)
    row["qk_max_rel_residual"] = max(errors)
    row["heads_max_rel_residual"] = float(np.max(np.abs(hl.residual) / np.abs(hl.weights)))
    row["peak_rss_gb"] = peak_rss_bytes() / 2**30
    return row


def markdown(rows: list[dict], command: str, repeats: int) -> str:
    load = Path("/proc/loadavg").read_text().split()[:3]
    out = [
        "## QK attribution and head loadings (benchmarks/attention.py)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}; {datetime.date.today()}; load average {' '.join(load)} at the "
        "end  ",
        "Model: gemma-3-270m (float32, CPU), the embedded default transcoders; each length in its "
        f"own process; times are medians of {repeats} runs. QK: last position as the query, the "
        "key its head attends to most, on layer 5 head 0 (sliding) and layer 11 head 1 (global). "
        "Memory: resident set within the step above what the process held before it (model and "
        "transcoders loaded), sampled every 10 ms.",
        "",
        "| tokens | freeze s (MB) | QK L5 s (MB) | QK L11 s (MB) | sources | head loadings s (MB) "
        "| edges / circuit nodes | process peak GB | max rel. residual QK / loadings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['tokens']} | {r['freeze_s']:.2f} ({r['freeze_mb']:.0f}) "
            f"| {r['qk_L5_s']:.2f} ({r['qk_L5_mb']:.0f}) | {r['qk_L11_s']:.2f} "
            f"({r['qk_L11_mb']:.0f}) | {r['qk_L11_sources']} | {r['heads_s']:.2f} "
            f"({r['heads_mb']:.0f}) | {r['edges']} / {r['circuit_nodes']} | "
            f"{r['peak_rss_gb']:.2f} | {r['qk_max_rel_residual']:.1e} / "
            f"{r['heads_max_rel_residual']:.1e} |"
        )
    return "\n".join(out) + "\n"


def _child(n: int, repeats: int, n_edges: int) -> dict:
    cmd = [sys.executable, __file__, "--one", str(n), "--repeats", str(repeats)]
    print(f"{n} tokens ...", file=sys.stderr)
    proc = subprocess.run(cmd + ["--edges", str(n_edges)], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"the {n}-token run failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[9, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--edges", type=int, default=20, help="edges of the circuit to load")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one length
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.repeats, args.edges)))
        return
    rows = [_child(n, args.repeats, args.edges) for n in args.lengths]
    command = "python benchmarks/attention.py " + " ".join(sys.argv[1:])
    text = markdown(rows, command.strip(), args.repeats)
    print(text)
    from gemma_lm.files import atomic_write_text

    atomic_write_text(Path(args.out), text)


if __name__ == "__main__":
    main()
