"""Transient spikes of anonymous memory during attribution, and where they happen.

    python benchmarks/memory_spikes.py  # the README prompt, default set, 8 runs
    python benchmarks/memory_spikes.py --transcoders DIR --tokens 8 --runs 10

Traces the same prompt `--runs` times in one process. A thread samples the process's anonymous
resident memory (RssAnon) every millisecond and keeps the main thread's Python stack at the highest
sample of each run. Our peak varies between identical runs; this shows where the main thread was at
each run's peak. Prints one line per run, and the stack where a run rose above `--threshold-gb`.

What it found (issue 9's notes): the large ones (+0.15-0.35 GB for a few milliseconds, in some
processes and not in others) were glibc's heap growing during the pass over the memory-mapped
encoders (`gemma_lm.weights.matmul`): /proc/self/smaps showed [heap] regions growing and new, fully
touched 64 MiB arena heaps. Not reference cycles (none), not transparent huge pages (madvise-only
here), not removed by MALLOC_ARENA_MAX=1 or a fixed MALLOC_MMAP_THRESHOLD_. The read buffers were
just under 32 MiB, which glibc serves from its heap once its mmap threshold has risen; at 8 MiB
(`gemma_lm.weights.CHUNK_BYTES`) the first attribution of fresh processes (skip set, 8 tokens) peaks
at +110..136 MiB instead of +107..257, and the side-by-side's skip-128 runs at 1.03-1.05 GB instead
of 1.04-1.29.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ct_runner import anon_bytes  # noqa: E402

import circuits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--transcoders", default="default", help="default, or a path (any layout we read)"
    )
    ap.add_argument("--prompt", default="Fact: Michael Jordan plays the sport of")
    ap.add_argument(
        "--tokens",
        type=int,
        default=0,
        help="instead of --prompt: a prompt of exactly this many tokens",
    )
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--threshold-gb",
        type=float,
        default=0.1,
        help="print the stack of runs that rose above this",
    )
    ap.add_argument(
        "--touch",
        action="store_true",
        help="read the model's and the transcoders' resident weights first, as "
        "vs_circuit_tracer.py does",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = circuits.load_model()
    from transcoders.default import resolve_transcoders

    tc = resolve_transcoders(args.transcoders, lm, progress=False)
    if args.touch:
        from ct_runner import touch

        vocab = lm.sites.embed.weight.data_ptr()
        touch(
            [p for p in lm.model.parameters() if p.data_ptr() != vocab],
            [p for name, p in tc.named_parameters() if not name.startswith(("W_dec", "W_enc"))],
        )
    prompt = args.prompt
    if args.tokens:
        from vs_circuit_tracer import exact_prompt

        prompt = exact_prompt(lm, args.tokens)[0]
    n_pos = len(lm.tokenize(prompt))
    main_thread = threading.get_ident()
    for run in range(args.runs):
        base, peak, done = anon_bytes(), [0, ""], threading.Event()

        def sample(base=base, peak=peak, done=done):
            while not done.is_set():
                rise = anon_bytes() - base
                if rise > peak[0]:
                    peak[0] = rise
                    if rise > args.threshold_gb * 2**30:
                        peak[1] = "".join(
                            traceback.format_stack(sys._current_frames()[main_thread])[-6:]
                        )
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t = time.perf_counter()
        circuits.attribute(
            lm, prompt, tc, progress=False, batch_size=max(1, 2048 // n_pos), max_feature_nodes=2048
        )
        done.set()
        thread.join()
        print(
            f"run {run}: {time.perf_counter() - t:.1f} s, anonymous memory peak "
            f"+{peak[0] / 2**30:.3f} GB over the start",
            flush=True,
        )
        if peak[1]:
            print(peak[1])


if __name__ == "__main__":
    main()
