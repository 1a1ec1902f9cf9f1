"""Which transcoders make the most readable graphs for a given training budget on a CPU.

    python benchmarks/transcoder_kinds.py                    # every candidate, then the tables
    python benchmarks/transcoder_kinds.py --only skip-1024,clt-skip-1024 --prompts 8

Two groups of candidates, all on the embedded gemma-3-270m and the default recipe's text, context,
seed and batch size (`transcoders.recipes` "default"), differing only where named:

- "budget": kinds, widths and activations, each trained for as long as the default recipe trains.
  A candidate's token count is the default's steps divided by the ratio of its seconds per step to
  the default's, both measured by short probe runs one right after the other on this machine (a
  CLT's dense decoder makes its steps far slower than a skip set's, so at equal time it sees fewer
  tokens; a ratio holds up on a busy machine far better than a time does).
- "curve": the default recipe at 15k-120k tokens (its own 120k included), and at widths 512-4096
  on 60k tokens, to show what limits the scores.

Every run trains in a process of its own (`transcoders train`, its peak RSS from `os.wait4`), all
from one shared cache of harvested activations, so harvesting is paid once and left out of the
training minutes. Each trained set is then scored in this process with `faithfulness.score_set` on
`--prompts` prompts of the faithfulness prompt set (its categories in turn): graph replacement and
completeness (full and pruned), spliced CE recovered and the ablation Spearman. Finished runs and
scores are kept under `--work` and reused when the benchmark is run again (delete a candidate's
folder there to redo it). Writes benchmarks/results/transcoder_kinds.md (atomically) after every
candidate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from faithfulness import read_prompts, score_set, take_in_turn  # noqa: E402

import circuits  # noqa: E402
from gemma_lm.files import atomic_write_text, cache_dir  # noqa: E402
from gemma_lm.jobs import to_argv  # noqa: E402
from transcoders.formats import load_native  # noqa: E402
from transcoders.train import TrainConfig  # noqa: E402

PROMPTS = ROOT / "benchmarks" / "data" / "faithfulness_prompts.jsonl"
PROBE_STEPS = 8  # steps of a probe run
CE_TOKENS = 2048  # held-out tokens of each set's spliced CE (the faithfulness benchmark uses 8192)


@dataclass
class Candidate:
    name: str
    group: str  # "budget" or "curve"
    settings: dict = field(default_factory=dict)  # TrainConfig fields over recipe "default"
    tokens: int | None = None  # None: from the budget


CANDIDATES = [
    Candidate("skip-1024", "budget"),
    Candidate("skip-512", "budget", {"d_sae": 512, "matryoshka": [128]}),
    Candidate("skip-4096", "budget", {"d_sae": 4096, "matryoshka": [256, 1024]}),
    Candidate("skip-jumprelu-1024", "budget", {"activation": "jumprelu"}),
    Candidate("clt-1024", "budget", {"kind": "clt"}),
    Candidate("clt-skip-1024", "budget", {"kind": "clt", "skip": True}),
    *(Candidate(f"skip-1024-{t}k", "curve", {}, t * 1024) for t in (15, 30, 60)),
    *(
        Candidate(f"skip-{w}-60k", "curve", {"d_sae": w, "matryoshka": m}, 60 * 1024)
        for w, m in ((512, [128]), (2048, [256, 1024]), (4096, [256, 1024]))
    ),
]
# the curves' rows; "skip-1024" (the default recipe, 120k tokens) is on the first
CURVES = {
    "Curve: the default recipe against training tokens": [
        "skip-1024-15k",
        "skip-1024-30k",
        "skip-1024-60k",
        "skip-1024",
    ],
    "Curve: the default recipe against width, on 60k tokens": [
        "skip-512-60k",
        "skip-1024-60k",
        "skip-2048-60k",
        "skip-4096-60k",
    ],
}


def config_of(c: Candidate, tokens: int, out: Path, acts: Path, threads: int) -> TrainConfig:
    return TrainConfig(
        recipe="default",
        **c.settings,
        tokens=tokens,
        out=str(out),
        activation_cache=str(acts),
        threads=threads,
        progress=False,
    )


def run_training(cfg: TrainConfig, log: Path) -> dict:
    """`transcoders train` for `cfg` in a process of its own: its seconds and peak RSS."""
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "transcoders", "train", *to_argv(cfg)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"training {cfg.out} failed (status {status}); see {log}")
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    return {
        "wall_s": time.time() - t0,
        "train_s": config["metrics"]["seconds_last_session"],
        "peak_rss_gb": usage.ru_maxrss / 2**20,
    }


def probe_seconds_per_step(c: Candidate, work: Path, acts: Path, threads: int, tag: str) -> float:
    """Seconds per training step of candidate c on this machine, from a short run."""
    out = work / "probes" / f"{c.name}-{tag}"
    recipe = TrainConfig(recipe="default", **c.settings)
    cfg = config_of(c, PROBE_STEPS * recipe.batch_size, out, acts, threads)
    if not (out / "config.json").exists():
        run_training(cfg, work / "probes" / f"{c.name}-{tag}.log")
    config = json.loads((out / "config.json").read_text())
    return config["metrics"]["seconds_last_session"] / PROBE_STEPS


def budget_tokens(c: Candidate, work: Path, acts: Path, threads: int) -> tuple[int, float]:
    """(tokens, step-time ratio): the tokens candidate c trains on in the time the default recipe
    trains, from the ratio of its seconds per step to the default's, the two probed in turn (a
    ratio drifts far less with the machine's load than either time does)."""
    reference = CANDIDATES[0]  # the default recipe itself
    default = TrainConfig(recipe="default")
    if c.name == reference.name:
        return default.tokens, 1.0
    # alternating, twice each, the faster of each pair: a burst of other work on the machine
    # slows one probe, rarely both
    times: dict[str, list[float]] = {"reference": [], "candidate": []}
    for i in range(2):
        for role, who in (("reference", reference), ("candidate", c)):
            tag = f"{role}-{i}" if role == "candidate" else f"reference-for-{c.name}-{i}"
            times[role].append(probe_seconds_per_step(who, work, acts, threads, tag))
    ratio = min(times["candidate"]) / min(times["reference"])
    batch = TrainConfig(recipe="default", **c.settings).batch_size
    return max(1, round(default.steps / ratio)) * batch, ratio


def train_candidate(c: Candidate, args, work: Path, acts: Path) -> dict:
    """Train candidate c (or reuse its finished run): its record."""
    record_path = work / c.name / "record.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    tokens, ratio = (c.tokens, None) if c.tokens else budget_tokens(c, work, acts, args.threads)
    out = work / c.name / "set"
    cfg = config_of(c, tokens, out, acts, args.threads)
    print(f"[kinds] training {c.name}: {tokens} tokens", file=sys.stderr, flush=True)
    record = {
        "name": c.name,
        "group": c.group,
        "kind": cfg.kind,
        "skip": cfg.has_skip,
        "activation": cfg.activation,
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "tokens": tokens,
        "step_time_ratio": ratio,
        **run_training(cfg, work / c.name / "train.log"),
    }
    atomic_write_text(record_path, json.dumps(record, indent=1))
    return record


def score_candidate(c: Candidate, record: dict, lm, prompts, args, work: Path) -> dict:
    """Faithfulness scores of candidate c's set (or the kept ones)."""
    path = work / c.name / f"scores-{args.prompts}-{args.ablate}.json"
    if path.exists():
        return json.loads(path.read_text())
    print(f"[kinds] scoring {c.name}", file=sys.stderr, flush=True)
    tc = load_native(work / c.name / "set", model=lm)
    scores = score_set(lm, tc, prompts, ablate=args.ablate, ce={"tokens": CE_TOKENS}, name=c.name)
    atomic_write_text(path, json.dumps(scores, indent=1, default=float))
    return scores


def row(record: dict, scores: dict | None) -> str:
    """One line of the comparison table."""
    kind = record["kind"] + ("+skip" if record["kind"] == "clt" and record["skip"] else "")
    cells = [
        record["name"],
        kind,
        str(record["d_sae"]),
        f"{record['activation']} {record['k']}",
        f"{record['tokens'] // 1024}k",
        "" if record["step_time_ratio"] is None else f"{record['step_time_ratio']:.2f}",
        f"{record['train_s'] / 60:.1f}",
        f"{record['peak_rss_gb']:.2f}",
    ]
    if scores is None:
        return "| " + " | ".join(cells + ["not scored"] * 6) + " |"
    m = scores["means"]["all"]
    cells += [
        f"{m['kept_full_replacement']:.3f}",
        f"{m['kept_full_completeness']:.3f}",
        f"{m['kept_pruned_replacement']:.3f}",
        f"{m['zeroed_full_replacement']:.3f}",
        f"{100 * scores['ce']['ce_recovered']:.1f}%",
        f"{m['spearman_graph_full']:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| candidate | kind | width | activation, k | tokens | step time / default's | train min "
    "| peak RSS GB | full repl. "
    "| full compl. | pruned repl. | full repl., bos zeroed | CE recovered | ablation Spearman |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def section(records: list[dict], scores: dict, args, started: str, loads: tuple) -> str:
    """The results section: the equal-budget table and the curves."""
    machine = f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    command = "python benchmarks/transcoder_kinds.py " + " ".join(sys.argv[1:])
    parts = [
        "## Transcoder kinds at equal training budget (benchmarks/transcoder_kinds.py)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine}; started {started}, load average {loads[0]:.1f} at the start, "
        f"{loads[1]:.1f} at the end  ",
        f"Scored on {args.prompts} prompts of benchmarks/data/faithfulness_prompts.jsonl "
        f"(the categories in turn), {args.ablate} ablations each "
        f"(faithfulness.score_set; means over prompts), CE recovered on {CE_TOKENS} held-out "
        "tokens. Every run "
        'uses recipe "default" but for what its row names; harvesting comes from one shared '
        "activation cache and is not in the minutes.",
        "",
    ]
    by_name = {r["name"]: r for r in records}
    budget = [r["name"] for r in records if r["group"] == "budget"]
    tables = {"Equal budget: each as long as the default recipe's training steps": budget, **CURVES}
    for title, names in tables.items():
        parts += [f"### {title}", "", HEADER]
        parts += [row(by_name[n], scores.get(n)) for n in names if n in by_name]
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=16, help="score on the first N prompts")
    ap.add_argument("--ablate", type=int, default=10, help="features ablated per prompt")
    ap.add_argument("--only", default="", help="comma-separated candidate names")
    ap.add_argument("--train-only", action="store_true", help="train every candidate, score none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(cache_dir() / "benchmarks" / "transcoder_kinds"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transcoder_kinds.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {c.name for c in CANDIDATES})
    if unknown:
        raise SystemExit(f"unknown candidate {unknown[0]}; known: {[c.name for c in CANDIDATES]}")
    chosen = [c for c in CANDIDATES if not names or c.name in names]
    work = Path(args.work)
    acts = work / "activations"
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()[0]
    records = [train_candidate(c, args, work, acts) for c in chosen]
    scores: dict = {}
    if not args.train_only:
        lm = circuits.load_model()
        prompts = take_in_turn(read_prompts(PROMPTS), args.prompts)
        for c, r in zip(chosen, records):
            scores[c.name] = score_candidate(c, r, lm, prompts, args, work)
            text = section(records, scores, args, started, (load0, os.getloadavg()[0]))
            atomic_write_text(Path(args.out), text)
    text = section(records, scores, args, started, (load0, os.getloadavg()[0]))
    atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
