"""Feature dashboards of the default transcoder set: wall time per stage, tokens/s, peak memory.

    python benchmarks/dashboards.py                              # default set, default settings
    python benchmarks/dashboards.py --transcoders PATH           # another set (its model: --model)
    python benchmarks/dashboards.py --max-tokens 65536 --batch 8 # other settings
    python benchmarks/dashboards.py --compare-max-tokens 65536   # also: what a shorter pass changes
    python benchmarks/dashboards.py --compare-float32            # also: bfloat16 vs float32 harvest

Builds into a temporary folder (the user's own dashboards are left alone) with `build_dashboards`
at `DashboardConfig`'s defaults unless told otherwise, and reads the time of every stage from the
dashboards' own record (`stage_seconds` in dashboards.json: text = tokenising, forward = the
model body, encode = the transcoders' encoders, merge = the top-k store, output_tokens,
token_strings). A comparison builds a second set of dashboards and reports how far it agrees with
the first: the share of top contexts both hold, of auto labels that are the same, and of live
features with all k contexts filled. Peak memory is the process's (ru_maxrss, model loading
included), taken before any comparison. Threads: --threads, else OMP_NUM_THREADS, else 2. Writes
benchmarks/results/dashboards.json (--out) and prints it; --markdown PATH also writes a section
for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transcoders_default import machine  # noqa: E402  (benchmarks/ is this script's folder)

from gemma_lm.files import atomic_write_text  # noqa: E402
from gemma_lm.models import DEFAULT_MODEL, load_model  # noqa: E402
from transcoders.dashboards import DashboardConfig, build_dashboards, load_dashboards  # noqa: E402
from transcoders.data import text_source  # noqa: E402
from transcoders.default import resolve_transcoders  # noqa: E402

STAGES = ("text", "forward", "encode", "merge", "output_tokens", "token_strings")


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_timed(lm, tc, out: Path, settings: dict) -> tuple[object, float]:
    t = time.perf_counter()
    path = build_dashboards(lm, tc, out=str(out), restart=True, **settings)
    return load_dashboards(path), time.perf_counter() - t


def stage_report(d, wall: float) -> dict:
    stages = {k: d.meta["stage_seconds"].get(k, 0.0) for k in STAGES}
    pass_s = sum(stages[k] for k in ("text", "forward", "encode", "merge"))
    tokens = d.meta["tokens_seen"]
    return {
        "wall_seconds": round(wall, 1),
        "tokens": tokens,
        "contexts": d.meta["n_contexts"],
        "tokens_per_second_pass": round(tokens / max(pass_s, 1e-9)),
        "tokens_per_second_forward": round(tokens / max(stages["forward"], 1e-9)),
        "tokens_per_second_overall": round(tokens / wall),
        "stage_seconds": stages,
        "live_features": int((d.t["n_active"] > 0).sum()),
        "features": int(d.t["n_active"].numel()),
    }


def label_sample(d, per_layer: int = 8) -> dict[str, list]:
    """[feature, density, auto label] of `per_layer` live features spread evenly over the live
    features of the first, middle and last layer."""
    out = {}
    for layer in sorted({0, d.n_layers // 2, d.n_layers - 1}):
        live = torch.nonzero(d.t["n_active"][layer]).flatten().tolist()
        picked = live[:: max(1, len(live) // per_layer)][:per_layer]
        out[str(layer)] = [
            [f, round(d.feature(layer, f)["density"], 5), d.feature(layer, f)["auto_label"]]
            for f in picked
        ]
    return out


def agreement(a, b) -> dict:
    """How far dashboards `b` agree with `a` (the same stream of contexts): over features live in
    both, the share of a's top contexts that b holds too, and of auto labels that are equal; and,
    for each, the share of live features with every one of the k slots filled."""
    live = torch.nonzero((a.t["n_active"] > 0) & (b.t["n_active"] > 0)).tolist()
    shared = held = same_label = 0
    for layer, f in live:
        x = {c for c in a.t["top_context"][layer, f].tolist() if c >= 0}
        y = {c for c in b.t["top_context"][layer, f].tolist() if c >= 0}
        shared, held = shared + len(x & y), held + len(x)
        same_label += a.feature(layer, f)["auto_label"] == b.feature(layer, f)["auto_label"]

    def full(d):
        alive = d.t["n_active"] > 0
        return round(float(((d.t["top_acts"][..., -1] > 0) & alive).sum() / alive.sum()), 4)

    return {
        "live_in_both": len(live),
        "top_contexts_shared": round(shared / max(1, held), 4),
        "labels_equal": round(same_label / max(1, len(live)), 4),
        "all_k_filled": {"first": full(a), "second": full(b)},
    }


def compare(lm, tc, first, work: Path, settings: dict, change: dict) -> dict:
    d, wall = build_timed(lm, tc, work / "compare", {**settings, **change})
    return {"settings": change, **stage_report(d, wall), "agreement": agreement(first, d)}


def markdown(result: dict) -> str:
    r, cfg = result["run"], result["settings"]
    lines = [
        "## Feature dashboards of the default transcoders",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Date: {result['date']}; /proc/loadavg {result['loadavg_start']} at the start, "
        f"{result['loadavg_end']} at the end (other jobs sharing the CPU slow the timings).",
        "",
        f"{r['tokens']} tokens ({r['contexts']} contexts of {cfg['context']}, batch "
        f"{cfg['batch']}, harvested in {cfg['harvest_dtype']}, k {cfg['k']}) for "
        f"{r['live_features']} live features of {r['features']}: {r['wall_seconds']:.0f} s "
        f"in all, {r['tokens_per_second_overall']} tokens/s overall, "
        f"{r['tokens_per_second_pass']} tokens/s in the pass; peak memory "
        f"{result['peak_rss_mib']:.0f} MiB.",
        "",
        "| stage | seconds |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["stage_seconds"].items()]
    for c in result.get("comparisons", []):
        a = c["agreement"]
        lines += [
            "",
            f"Against {c['settings']} ({c['wall_seconds']:.0f} s): {a['top_contexts_shared']:.1%} "
            f"of top contexts shared, {a['labels_equal']:.1%} of labels equal, all k contexts "
            f"filled for {a['all_k_filled']['first']:.1%} / {a['all_k_filled']['second']:.1%} of "
            "live features.",
        ]
    return "\n".join(lines) + "\n"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = DashboardConfig()
    ap.add_argument("--transcoders", default="default", help="'default' or a transcoder folder")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    for name in ("max_tokens", "batch", "context", "k"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    ap.add_argument("--harvest-dtype", default=defaults.harvest_dtype)
    ap.add_argument("--compare-max-tokens", type=int, default=0)
    ap.add_argument("--compare-float32", action="store_true")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dashboards.json"))
    ap.add_argument("--markdown", default="", help="also write a BENCHMARKS.md section here")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = loadavg()
    t = time.perf_counter()
    lm = load_model(args.model)
    tc = resolve_transcoders(args.transcoders, lm, args.progress)
    load_seconds = time.perf_counter() - t
    settings = dict(
        max_tokens=args.max_tokens,
        batch=args.batch,
        context=args.context,
        k=args.k,
        harvest_dtype=args.harvest_dtype,
        progress=args.progress,
    )
    with tempfile.TemporaryDirectory(prefix="dashboards-bench-") as tmp:
        work = Path(tmp)
        # the first use of a text source parses and caches it; a build does not time that part
        text_source(DashboardConfig.text, lm, "train", gen_samples=DashboardConfig.gen_samples)
        first, wall = build_timed(lm, tc, work / "main", settings)
        run, peak = stage_report(first, wall), peak_rss_mib()
        comparisons = []
        if args.compare_max_tokens:
            change = {"max_tokens": args.compare_max_tokens}
            comparisons.append(compare(lm, tc, first, work, settings, change))
        if args.compare_float32:
            change = {"harvest_dtype": "float32"}
            comparisons.append(compare(lm, tc, first, work, settings, change))
        labels = label_sample(first)
    head = f"OMP_NUM_THREADS={args.threads} python benchmarks/dashboards.py"
    cmd = " ".join([head] + sys.argv[1:])
    result = {
        "benchmark": "dashboards",
        "command": cmd,
        "machine": machine(),
        "date": started,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "threads": torch.get_num_threads(),
        "transcoders": args.transcoders,
        "model": args.model,
        "settings": {k: v for k, v in first.meta["settings"].items()},
        "load_seconds": round(load_seconds, 1),
        "run": run,
        "peak_rss_mib": round(peak),
        "comparisons": comparisons,
        "labels": labels,
    }
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    atomic_write_text(Path(args.out), text + "\n")
    print(f"wrote {args.out}")
    if args.markdown:
        atomic_write_text(Path(args.markdown), markdown(result))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
