"""`circuits trace-batch PROMPTS.jsonl --out DIR`: many prompts, one graph each, on one or many
processes.

    circuits trace-batch prompts.jsonl --out runs/study
    torchrun --nproc-per-node 8 -m circuits trace-batch prompts.jsonl --out runs/study --device cuda
"""

from __future__ import annotations

from gemma_lm.jobs import Command

from .batch import BatchConfig, trace_batch


def run_trace_batch(cfg: BatchConfig) -> int:
    result = trace_batch(cfg)
    if result.rank == 0:
        print(result.table())
        print(
            f"\n{result.n_traced} traced, {result.n_skipped} done before, {result.n_failed} failed "
            f"in {result.seconds:.1f} s; index: {result.index_path}"
        )
        for r in result.records:
            if r["status"] == "failed":
                print(f"failed: {r['id']}: {r.get('error', '')}")
    return 1 if result.n_failed else 0


COMMANDS = [
    Command(
        "trace-batch",
        BatchConfig,
        run_trace_batch,
        "trace every prompt of a JSONL file (splits across torchrun ranks)",
    )
]
