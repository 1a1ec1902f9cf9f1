"""Attribution speed and memory on the real gemma-3-270m: 10-, 32- and 128-token prompts.

    python benchmarks/attribution.py   # all lengths, writes benchmarks/results/attribution.md
    python benchmarks/attribution.py --lengths 10 --threads 1

Transcoders: the embedded default set when it has been trained (cached), and random skip transcoders
with d_sae 16384 whose thresholds are calibrated (on a text other than the prompts) to ~40 active
features per position per layer; one table each. Under heavy load use --threads 1 (two threads
fighting other processes for two cores run several times slower); the GEMM rate in the header is the
yardstick. Each prompt length runs in its own process, so its peak RSS is its own (model +
transcoders + attribution). The 10-token run is also profiled: where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ct_runner import peak_rss_bytes  # noqa: E402  (VmHWM: ru_maxrss would include the parent's)

TEXT = (
    "Fact: Michael Jordan plays the sport of basketball, and many people consider him the "
    "greatest player in the history of the game. He grew up in Wilmington, North Carolina, played "
    "college basketball for the Tar Heels, and was drafted by the Chicago Bulls in 1984. With the "
    "Bulls he won six championships in the nineties, earning the finals award each time, and his "
    "duels with Magic Johnson, Larry Bird and the Detroit Pistons made the league famous around "
    "the world. Between two of those title runs he left to play minor league baseball for a "
    "season, which still surprises people today. After retiring for good he became an owner of "
    "the team in Charlotte, and his shoes, first sold in 1985, remain among the most popular "
    "sneakers ever made. Fans still argue about whether anyone will match what he did on the "
    "court, and every new star is measured against him sooner or later."
)
CALIBRATION = (
    "The committee met on Tuesday to discuss the budget for the coming year. Several members "
    "raised concerns about rising costs, while others argued that the new library would pay for "
    "itself."
)
RESULTS = Path(__file__).parent / "results" / "attribution.md"
D_SAE, L0 = 16384, 40


def prompt_of_length(lm, n_tokens: int) -> str:
    """The longest word prefix of TEXT with at most n_tokens tokens (BOS included)."""
    words, best = TEXT.split(" "), ""
    for k in range(1, len(words) + 1):
        text = " ".join(words[:k])
        if len(lm.tokenize(text)) > n_tokens:
            break
        best = text
    return best


def random_skip_transcoders(lm, path: Path) -> None:
    """Random skip transcoders, thresholds calibrated to ~L0 active features per position per
    layer."""
    import torch

    from circuits.replacement import run_and_freeze
    from transcoders.formats import save_native
    from transcoders.testing import random_transcoders

    s = lm.sites
    tc = random_transcoders(
        s.n_layers, s.d_model, D_SAE, kind="skip", seed=0, l0=L0, model_name=lm.name
    )
    state = run_and_freeze(lm, lm.tokenize(CALIBRATION))
    with torch.no_grad():
        for l in range(s.n_layers):
            pre = tc.pre_activation(l, state.mlp_in[l])
            tc.threshold[l].fill_(float(torch.quantile(pre.flatten()[::2], 1 - L0 / D_SAE)))
    save_native(tc, path)


def default_available() -> bool:
    try:
        from transcoders.default import default_transcoders_dir
    except ImportError:
        return False
    return (default_transcoders_dir() / "config.json").exists()


def _profile_table(stats: pstats.Stats, total: float) -> list[tuple[str, float]]:
    """Seconds in the stages of one attribution, from cumulative times of the functions that make
    them."""
    cum = {}
    for (file, _, name), (_, _, _, ct, _) in stats.stats.items():
        key = f"{Path(file).name}:{name}"
        cum[key] = cum.get(key, 0.0) + ct
    get = lambda k: cum.get(k, 0.0)  # noqa: E731
    edges = get("attribution.py:visit")
    backward = get("replacement.py:run") - edges
    rows = [
        ("forward pass of the real model (frozen state)", get("replacement.py:run_and_freeze")),
        (
            "encode features, errors, frozen node inputs",
            get("model.py:sparse_encode")
            + get("replacement.py:decode_sparse")
            + get("replacement.py:frozen_forward"),
        ),
        ("transposed model: backward passes (matmuls)", backward),
        ("  of which attention (W_o, patterns, W_v)", get("replacement.py:_attention")),
        ("edges: features (kernel) + errors + tokens", edges),
        ("  of which feature edges", get("attribution.py:_feature_edges")),
        ("rows to CSR", get("attribution.py:add")),
        ("influence ordering", get("attribution.py:influence")),
        ("final adjacency (CSR assembly)", get("attribution.py:adjacency")),
    ]
    rows.append(("other", total - sum(v for k, v in rows if not k.startswith("  "))))
    return rows


def run_one(n_tokens: int, transcoders: str, profile: bool) -> dict:
    """(In a child process.) Load, trace one prompt, report times and peak RSS as JSON."""
    import torch

    import circuits
    from circuits.attribution import attribute
    from transcoders.formats import load_any

    t0 = time.perf_counter()
    lm = circuits.load_model()
    if transcoders == "default":
        from transcoders.default import load_default_transcoders

        tc = load_default_transcoders(lm, progress=False)
    else:
        tc = load_any(transcoders, model=lm)
    t_load = time.perf_counter() - t0
    prompt = prompt_of_length(lm, n_tokens)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t1 = time.perf_counter()
    graph = attribute(lm, prompt, transcoders=tc, progress=False)
    total = time.perf_counter() - t1
    if prof:
        prof.disable()
    m = graph.metadata
    out = {
        "n_tokens": graph.n_pos,
        "load_s": t_load,
        "forward_s": m["timing_s"]["forward"],
        "attribution_s": m["timing_s"]["attribution"],
        "total_s": total,
        "n_active": m["n_active_features"],
        "n_rows": m["n_feature_rows"],
        "row_order": m["row_order"],
        "nnz": int(graph.adjacency.nnz),
        "edge_backend": m["edge_backend"],
        "batch_size": m["batch_size_used"],
        "peak_rss_gb": peak_rss_bytes() / 2**30,
        "threads": torch.get_num_threads(),
        "top": graph.logit_strings[0],
        "l0": m["n_active_features"] / (graph.n_pos * graph.n_layers),
    }
    if prof:
        out["profile"] = _profile_table(pstats.Stats(prof), total)
    return out


def gemm_gflops(threads: int | None) -> float:
    """The float32 matrix-product rate this machine gives right now (the backward pass is matrix
    products): a yardstick for comparing runs taken under different load."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(2048, 640), torch.randn(640, 1024)
    a @ b
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    return 20 * 2 * 2048 * 640 * 1024 / (time.perf_counter() - t) / 1e9


def markdown(results: list[dict], which: str, command: str, gflops: float) -> str:
    import torch

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    lines = [
        f"## Attribution on gemma-3-270m ({datetime.date.today().isoformat()})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{results[0]['threads']} torch threads, load average {os.getloadavg()[0]:.1f} at the end, "
        f"float32 GEMM {gflops:.0f} GFLOP/s at the start  ",
        f"Transcoders: {which}  ",
        f"Edge kernel: {results[0]['edge_backend']}; float32; default options "
        f"(max 8192 feature rows, batch 256)",
        "",
        "| tokens | load s | forward s | attribution s | active features | L0/pos/layer | feature "
        "rows (order) | edges | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['n_tokens']} | {r['load_s']:.1f} | {r['forward_s']:.2f} | "
            f"{r['attribution_s']:.1f} | {r['n_active']} | {r['l0']:.0f} | {r['n_rows']} "
            f"({r['row_order']}) | {r['nnz']:,} | {r['peak_rss_gb']:.2f} |"
        )
    prof = next((r for r in results if "profile" in r), None)
    if prof:
        lines += [
            "",
            f"Where the time goes ({prof['n_tokens']} tokens, {prof['total_s']:.1f} s from prompt "
            "to graph):",
            "",
            "| stage | s | share |",
            "|---|---|---|",
        ]
        for name, sec in prof["profile"]:
            lines.append(f"| {name} | {sec:.2f} | {100 * sec / prof['total_s']:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[10, 32, 128])
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads in the measured processes"
    )
    p.add_argument(
        "--transcoders",
        default="all",
        help="all (the default set if trained, then random skip), default, random, or a path",
    )
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one length
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_one(args.one, args.transcoders, args.profile)))
        return
    command = "python benchmarks/attribution.py " + " ".join(sys.argv[1:])
    kinds = [args.transcoders]
    if args.transcoders == "all":
        kinds = (["default"] if default_available() else []) + ["random"]
    sections = []
    with tempfile.TemporaryDirectory(prefix="bench-attribution-") as tmp:
        for kind in kinds:
            if kind == "random":
                import circuits

                print(
                    f"building random skip transcoders (d_sae {D_SAE}, calibrated to L0 ~{L0})",
                    file=sys.stderr,
                )
                random_skip_transcoders(circuits.load_model(), Path(tmp) / "tc")
                spec, which = (
                    str(Path(tmp) / "tc"),
                    (
                        f"random skip, d_sae {D_SAE}, thresholds calibrated to "
                        f"~{L0} active per position per layer on another text"
                    ),
                )
            elif kind == "default":
                spec, which = "default", "the embedded default set (transcoders.default)"
            else:
                spec, which = kind, kind
            gflops = gemm_gflops(args.threads)
            results = [
                _child(n, spec, args.threads, profile=n == min(args.lengths)) for n in args.lengths
            ]
            sections.append(markdown(results, which, command, gflops))
            print(sections[-1])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from gemma_lm.files import atomic_write_text

    atomic_write_text(out, "\n".join(sections))


def _child(n_tokens: int, spec: str, threads: int | None, profile: bool) -> dict:
    """Run one length in its own process (its own peak RSS) and parse its result."""
    cmd = [sys.executable, __file__, "--one", str(n_tokens), "--transcoders", spec]
    if threads:
        cmd += ["--threads", str(threads)]
    if profile:
        cmd.append("--profile")
    print(f"{spec}: {n_tokens} tokens ...", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"the {n_tokens}-token run failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


if __name__ == "__main__":
    main()
