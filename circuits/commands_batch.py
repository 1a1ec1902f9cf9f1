"""`circuits trace-batch PROMPTS.jsonl --out DIR`: many prompts, one graph each, on one or many processes.

circuits trace-batch prompts.jsonl --out runs/study
torchrun --nproc-per-node 8 -m circuits trace-batch prompts.jsonl --out runs/study --device cuda
"""

from __future__ import annotations

import argparse

from gemma_lm.errors import UserError
from gemma_lm.ranks import BACKENDS

from .batch import BatchConfig, trace_batch
from .commands import add_trace_arguments, trace_config


def cmd_trace_batch(args) -> int:
    attribution = trace_config(args)
    if attribution.targets or attribution.contrast:
        raise UserError(
            '--target / --contrast are per prompt in a batch: put "target" / "contrast" on the '
            "prompt's line of the prompts file"
        )
    cfg = BatchConfig(
        prompts=args.prompts,
        out=args.out,
        attribution=attribution,
        scores=args.scores,
        overwrite=args.overwrite,
        dist_backend=args.dist_backend,
        timeout_min=args.timeout_min,
        progress=attribution.progress,
    )
    result = trace_batch(cfg)
    if result.rank == 0:
        print(result.table())
        print(
            f"\n{result.n_traced} traced, {result.n_skipped} done before, {result.n_failed} failed "
            f"in {result.seconds:.1f} s; index: {result.index_path}"
        )
    return 1 if result.n_failed else 0


def register(sub) -> None:
    p = sub.add_parser(
        "trace-batch",
        help="trace every prompt of a JSONL file (splits across torchrun ranks)",
        description="Trace one attribution graph per prompt of PROMPTS.jsonl into DIR/graphs, "
        "with an index (DIR/index.jsonl) and a summary table. Launch with `torchrun "
        "--nproc-per-node N -m circuits trace-batch ...` to split the prompts across N "
        "processes (gloo on the CPU, nccl with --device cuda). Rerun the same command to resume.",
    )
    p.add_argument(
        "prompts",
        metavar="PROMPTS.jsonl",
        help='one JSON object a line: {"prompt": ..., "target": ..., "contrast": ..., "id": ...} '
        "(only prompt is required)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created; reused to resume)"
    )
    add_trace_arguments(p)  # the options of `circuits trace`
    d = BatchConfig()
    p.add_argument(
        "--scores",
        action=argparse.BooleanOptionalAction,
        default=d.scores,
        help="store replacement / completeness scores in each graph (default on)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="retrace prompts whose graph exists already"
    )
    p.add_argument(
        "--dist-backend",
        choices=BACKENDS,
        default=d.dist_backend,
        help="torch.distributed backend under torchrun (default: nccl on CUDA, gloo on the CPU)",
    )
    p.add_argument(
        "--timeout-min",
        type=float,
        default=d.timeout_min,
        help=f"how long a rank waits for the others (default {d.timeout_min:g} minutes)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_trace_batch)
