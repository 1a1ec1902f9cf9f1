"""Assemble BENCHMARKS.md from the result sections the benchmarks write to benchmarks/results/*.md.

    python benchmarks/collect.py

Each benchmark is rerunnable on its own (its command heads its section); this only gathers their
latest results, in a fixed order, under one index, so BENCHMARKS.md never holds a number no
benchmark printed."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ORDER = [  # (results file, what it measures)
    (
        "attribution.md",
        "Attribution of one prompt on gemma-3-270m: time, memory, where the time goes",
    ),
    (
        "vs_circuit_tracer.md",
        "Side by side with circuit-tracer 0.5.0: speed, memory, agreement of the graphs",
    ),
    (
        "vs_circuit_tracer_gpu.md",
        "Side by side with circuit-tracer on a GPU: Gemma 3 1B- and 4B-shaped models",
    ),
    ("edges.md", "The compiled edge kernels against the PyTorch reference"),
    ("gpu_session.md", "The CUDA kernels and GPU tests on a lent GPU"),
    ("edges_gpu.md", "The CUDA edge kernels against the PyTorch reference on the GPU"),
    ("prune.md", "Pruning by influence"),
    (
        "transcoders_default.md",
        "The embedded default transcoders: training time, FVU, L0, dead features, delta CE",
    ),
    (
        "faithfulness.md",
        "Faithfulness of the default transcoders' graphs: replacement, completeness, ablations",
    ),
    (
        "dashboards.md",
        "Feature dashboards of the default transcoders: time per stage, memory, agreement",
    ),
    (
        "transcoder_kinds.md",
        "Transcoder kinds, widths and token counts at equal training time: graph scores",
    ),
    ("first_use.md", "First use from an empty cache: time and peak memory of the README command"),
    ("batch_resume.md", "Batch tracing across two ranks, killed and resumed"),
    ("attention.md", "QK attribution and head loadings: seconds and memory at 9 and 128 tokens"),
]


def main() -> int:
    missing = [name for name, _ in ORDER if not (RESULTS / name).exists()]
    if missing:
        print(
            f"missing results: {', '.join(missing)} (run their benchmarks first)", file=sys.stderr
        )
        return 1
    extra = sorted(p.name for p in RESULTS.glob("*.md") if p.name not in dict(ORDER))
    lines = [
        "# Benchmarks",
        "",
        "Every section below was written by the benchmark named in its command, on the machine "
        "and date it",
        "states; `python benchmarks/collect.py` gathers them from `benchmarks/results/`. Speed "
        "targets are",
        "measured here, never by timed assertions in the tests.",
        "",
    ]
    lines += [f"- [{what}](#{_anchor(RESULTS / name)})" for name, what in ORDER]
    lines.append("")
    for name in [n for n, _ in ORDER] + extra:
        lines += [(RESULTS / name).read_text().strip(), ""]
    out = ROOT / "BENCHMARKS.md"
    tmp = out.with_suffix(".md.partial")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


def _anchor(path: Path) -> str:
    """GitHub's anchor of the first heading of a results file."""
    head = (
        next(line for line in path.read_text().splitlines() if line.startswith("#"))
        .lstrip("#")
        .strip()
    )
    return "".join(c for c in head.lower().replace(" ", "-") if c.isalnum() or c in "-_")


if __name__ == "__main__":
    sys.exit(main())
