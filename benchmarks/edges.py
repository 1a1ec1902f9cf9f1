"""Edge kernels against the pure-PyTorch reference at the shapes of Gemma 3 270M and 4B (random
weights).

    python benchmarks/edges.py                      # every case, 1 thread and all threads
    python benchmarks/edges.py --cases 270m-plt-64 --threads 1
    python benchmarks/edges.py --quick              # small shapes, a smoke run

One call computes the edges from the active features of one source layer to a batch of B = 256
targets (attribution calls it once per source layer and batch: 18 times for 270M, 34 for 4B). Active
features: L0 features per position (transcoders on Gemma 3 fire ~20-60 per layer per token), random
ids among d_sae = 16384; the gradients are a slice of a `[B, L + 1, n_pos, D]`-style buffer, as
attribution passes them. Methods: `cpp` (the compiled kernel), `torch` (`feature_edges_torch`, the
reference and the fallback), and `v0`, the first reference (gather each feature's gradient rows,
then einsum), kept here to show what it cost. Each (case, method, threads) runs in a fresh process
so that its peak memory (max RSS above the inputs) is its own. Prints a markdown table and writes it
to benchmarks/results/edges.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import date

CASES = {
    # name: (description, shape)
    "270m-plt-16": (
        "270M PLT, 16 tokens, L0 40",
        dict(D=640, F=16384, n_pos=16, l0=40, n_out=1, B=256),
    ),
    "270m-plt-64": (
        "270M PLT, 64 tokens, L0 40",
        dict(D=640, F=16384, n_pos=64, l0=40, n_out=1, B=256),
    ),
    "270m-plt-128": (
        "270M PLT, 128 tokens, L0 20",
        dict(D=640, F=16384, n_pos=128, l0=20, n_out=1, B=256),
    ),
    "270m-plt-64-bf16": (
        "270M PLT bf16 decoder, 64 tokens, L0 40",
        dict(D=640, F=16384, n_pos=64, l0=40, n_out=1, B=256, dec_dtype="bfloat16"),
    ),
    "270m-clt-64": (
        "270M CLT layer 9 (writes 9 layers), 64 tokens, L0 40",
        dict(D=640, F=16384, n_pos=64, l0=40, n_out=9, B=256),
    ),
    "4b-plt-64": (
        "4B PLT, 64 tokens, L0 60",
        dict(D=2560, F=16384, n_pos=64, l0=60, n_out=1, B=256),
    ),
    "4b-plt-64-bf16": (
        "4B PLT bf16 decoder, 64 tokens, L0 60",
        dict(D=2560, F=16384, n_pos=64, l0=60, n_out=1, B=256, dec_dtype="bfloat16"),
    ),
}
QUICK = {
    "270m-plt-16": dict(D=640, F=4096, n_pos=8, l0=20, n_out=1, B=64),
    "270m-clt-64": dict(D=640, F=4096, n_pos=8, l0=20, n_out=4, B=64),
}
GPU_METHODS = ("cuda", "cuda-rowwise", "torch@cuda")
# v0 gathers [B, n_out, n_active, D]: run it only where that fits comfortably in memory
V0_MAX_BYTES = 1 << 30


@dataclass
class EdgesBenchConfig:
    cases: list[str] = field(default_factory=lambda: list(CASES))
    threads: list[int] = field(default_factory=lambda: sorted({1, os.cpu_count() or 1}))
    min_seconds: float = 1.0  # repeat each measurement at least this long (and at least 3 times)
    quick: bool = False
    # only these (default: every method that can run here)
    methods: list[str] = field(default_factory=list)
    out: str = "benchmarks/results/edges.md"


def v0_feature_edges(grad, pos, feat, act, decoder):
    """The first reference implementation: per feature, gather its gradient rows and contract."""
    import torch

    B, n_out = grad.shape[0], grad.shape[1]
    out = torch.empty(B, len(feat), dtype=torch.float32)
    chunk = max(1, (1 << 22) // max(1, n_out * decoder.shape[-1]))
    for s in range(0, len(feat), chunk):
        rows = decoder.index_select(0, feat[s : s + chunk]).float()  # [c, n_out, D]
        g = grad.index_select(2, pos[s : s + chunk]).float()  # [B, n_out, c, D]
        out[:, s : s + chunk] = torch.einsum("cod,bocd->bc", rows, g) * act[s : s + chunk].float()
    return out


def _peak_rss_bytes(reset: bool = False) -> int:
    """The process's peak RSS (Linux VmHWM); `reset` first lowers it to the current RSS."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _inputs(shape: dict, device: str = "cpu"):
    """Random inputs `(args, number of output entries)` on `device`."""
    import torch

    g = torch.Generator().manual_seed(0)
    B, D = shape["B"], shape["D"]
    n_out, n, l0, F = shape["n_out"], shape["n_pos"], shape["l0"], shape["F"]
    buffer = torch.randn(B, n_out + 1, n, D, generator=g).to(device)
    dec_dtype = getattr(torch, shape.get("dec_dtype", "float32"))
    decoder = torch.randn(F, n_out, D, generator=g, dtype=dec_dtype).to(device)
    pos = torch.arange(n).repeat_interleave(l0)
    feat = torch.stack([torch.randperm(F, generator=g)[:l0] for _ in range(n)]).flatten()
    act = torch.rand(n * l0, generator=g) * 5
    return (buffer[:, 1:], pos.to(device), feat.to(device), act.to(device), decoder), B * n * l0


def _measure(shape: dict, method: str, threads: int, min_seconds: float, conn) -> None:
    """Child process: time one method on one case; send back (wall seconds, CPU seconds of all
    threads, peak extra bytes, output bytes)."""
    try:
        import torch

        torch.set_num_threads(threads)
        from circuits import backend as be

        gpu = method in GPU_METHODS
        args, n_out_entries = _inputs(shape, "cuda" if gpu else "cpu")
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        fn = {
            "cpp": lambda: be.feature_edges(*args, backend="cpp"),
            "torch": lambda: be.feature_edges_torch(*args),
            "cuda": lambda: be.feature_edges(*args, backend="cuda"),
            "cuda-rowwise": lambda: be._ext.feature_edges(*args, variant="rowwise"),
            "torch@cuda": lambda: be.feature_edges_torch(*args),
            "v0": lambda: v0_feature_edges(*args),
        }[method]
        if gpu:
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            sync()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _peak_rss_bytes(reset=True)
            out = fn()
            peak = _peak_rss_bytes() - base
        del out
        wall, cpu, start = [], [], time.perf_counter()
        while len(wall) < 3 or time.perf_counter() - start < min_seconds:
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        conn.send((min(wall), min(cpu), max(0, peak), 4 * n_out_entries))
    except Exception as e:  # report, don't hang the parent
        conn.send(f"{e.__class__.__name__}: {e}")


def measure(shape, method, threads, min_seconds):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_measure, args=(shape, method, threads, min_seconds, child))
    p.start()
    result = parent.recv()
    p.join()
    if isinstance(result, str):
        raise RuntimeError(f"{method}: {result}")
    return result


def methods_for(shape: dict) -> list[str]:
    import torch

    from circuits import backend as be

    gpu = ["torch@cuda"] if torch.cuda.is_available() else []
    if gpu and be._ext.has_cuda():
        gpu[:0] = ["cuda", "cuda-rowwise"]
    names = ["cpp", "torch", *gpu]
    gather = 4 * shape["B"] * shape["n_out"] * shape["n_pos"] * shape["l0"] * shape["D"]
    if 2 * gather <= V0_MAX_BYTES:
        names.append("v0")
    return names


def run(cfg: EdgesBenchConfig) -> str:
    import torch

    from circuits import backend as be
    from gemma_lm.files import atomic_write_text

    if be._ext is None:
        raise SystemExit(
            f"the compiled extension is not built ({be._ext_error}); "
            f"run `python setup.py build_ext --inplace` first"
        )
    gpu_only = bool(cfg.methods) and all(m in GPU_METHODS for m in cfg.methods)
    lines = [
        "## Edge kernels "
        + (f"on the GPU ({torch.cuda.get_device_name()}) " if gpu_only else "")
        + "(benchmarks/edges.py)",
        "",
        f"`python benchmarks/edges.py{' --quick' if cfg.quick else ''} "
        f"--threads {' '.join(map(str, cfg.threads))}"
        f"{' --methods ' + ' '.join(cfg.methods) if cfg.methods else ''}` "
        f"on {date.today()}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, "
        f"micro-kernel {be._ext.simd()}, load average {os.getloadavg()[0]:.1f} at the start. "
        f"One call = the edges of one source layer's active features to B targets (attribution "
        f"makes one per source layer and batch). Wall and CPU (all threads): best of >= 3 runs; "
        f"on a busy machine the CPU time of a 1-thread run is the steadier measure. Speed-ups: "
        f"against `torch`, the pure-PyTorch reference (per-position matmuls). `v0` is the first "
        f"reference (per-feature gather + einsum), run only where its gather fits in 1 GiB. "
        f"Peak: max RSS above the inputs in a fresh process (the output included); on the GPU "
        f"(`cuda`, and `torch@cuda`, the reference on the GPU, which GPU rows are compared with): "
        f"peak allocated CUDA memory above the inputs. "
        + (
            ""
            if torch.cuda.is_available()
            else "No GPU on this machine: the CUDA kernels were not run."
        ),
        "",
        "| case | shape | threads | method | wall (ms) | CPU (ms) | vs torch (wall) "
        "| vs torch (CPU) | peak extra (MB) | output (MB) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in cfg.cases:
        desc, shape = CASES[name]
        shape = dict(shape, **QUICK.get(name, {})) if cfg.quick else shape
        if cfg.quick and name not in QUICK:
            continue
        desc = f"(quick) {desc}" if cfg.quick else desc
        dims = ", ".join(f"{k}={v}" for k, v in shape.items())
        for threads in cfg.threads:
            methods = [m for m in methods_for(shape) if not cfg.methods or m in cfg.methods]
            results = {m: measure(shape, m, threads, cfg.min_seconds) for m in methods}
            for m, (wall, cpu, peak, out_bytes) in results.items():
                ref = results.get("torch@cuda" if m in GPU_METHODS else "torch")
                # no reference: --methods
                ratio = (lambda r, t: f"{r / t:.2f}x") if ref else (lambda r, t: "-")
                ref_wall, ref_cpu = ref[:2] if ref else (0.0, 0.0)
                row = (
                    f"| {desc} | {dims} | {threads} | {m} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | "
                    f"{ratio(ref_wall, wall)} | {ratio(ref_cpu, cpu)} | {peak / 2**20:.0f} | "
                    f"{out_bytes / 2**20:.1f} |"
                )
                lines.append(row)
                print(row, flush=True)
    text = "\n".join(lines) + "\n"
    if cfg.out:
        atomic_write_text(cfg.out, text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = EdgesBenchConfig()
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=d.cases)
    p.add_argument("--threads", nargs="+", type=int, default=d.threads)
    p.add_argument("--min-seconds", type=float, default=d.min_seconds)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--methods",
        nargs="+",
        default=d.methods,
        help="only these methods, e.g. cuda cuda-rowwise torch@cuda "
        "(default: all that can run here)",
    )
    p.add_argument("--out", default=d.out, help="markdown file to write ('' for none)")
    a = p.parse_args(argv)
    print(
        run(
            EdgesBenchConfig(
                cases=a.cases,
                threads=a.threads,
                min_seconds=a.min_seconds,
                quick=a.quick,
                methods=a.methods,
                out=a.out,
            )
        )
    )


if __name__ == "__main__":
    main()
