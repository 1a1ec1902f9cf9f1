"""The circuit-tracer side of the side-by-side benchmark. Runs inside the venv that
benchmarks/setup_circuit_tracer.sh makes (circuit-tracer 0.5.0, transformers 4.x); imports nothing
of ours.

    .venv-ct/bin/python benchmarks/ct_runner.py attribute --model DIR --transcoders DIR \
        --tokens 2,818,... --out run.npz \
        [--max-n-logits 10 --desired-logit-prob 0.95 --max-feature-nodes 8192 --batch-size 256]
    .venv-ct/bin/python benchmarks/ct_runner.py encode --transcoders DIR \
        --inputs mlp_in.safetensors --out out.safetensors

`attribute` loads the model (nnsight backend, eager attention) and the transcoders from a directory
in circuit-tracer's layout, times `circuit_tracer.attribute` on the given token ids, and writes the
graph as an .npz: node table in circuit-tracer's order (selected features, errors [layer, pos],
tokens, logits), the adjacency as CSR (targets x sources), logit ids and probabilities, wall time
and resident memory. `encode` writes circuit-tracer's own feature activations and reconstructions of
given MLP inputs `[L, n, D]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

# --warmup: the prompt's first tokens (BOS included), traced once before the timed call
WARMUP_TOKENS = 8


def _patch_hub():
    # circuit-tracer 0.5.0 imports HF_HUB_ENABLE_HF_TRANSFER, which huggingface_hub >= 1.0 no longer
    # defines
    import huggingface_hub.constants as c

    if not hasattr(c, "HF_HUB_ENABLE_HF_TRANSFER"):
        c.HF_HUB_ENABLE_HF_TRANSFER = False


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def anon_bytes() -> int:
    """Resident anonymous memory (RssAnon: resident minus file-backed and shared pages). Clean
    file-backed pages (memory-mapped weights) count in RSS but the kernel can drop them whenever it
    needs the memory; anonymous pages it cannot."""
    with open("/proc/self/statm") as f:
        _, resident, shared = (int(v) for v in f.read().split()[:3])
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own peak resident memory (VmHWM). Not ru_maxrss: Linux carries that across
    fork and exec, so a child would report its parent's resident size at the fork whenever that was
    larger."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return rss_bytes()


class PeakRSS:
    """Samples resident memory every 10 ms in a thread: the peak within a block (`peak_rss_bytes`
    covers the process), and the peak of its anonymous part (`anon_bytes`)."""

    def __enter__(self):
        self.peak, self.peak_anon = rss_bytes(), anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        self.peak, self.peak_anon = max(self.peak, rss_bytes()), max(self.peak_anon, anon_bytes())

    def _run(self):
        while not self._stop.wait(0.01):
            self._sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


class GPUMemory:
    """CUDA memory of a block on a GPU run: allocated before it and the peak within it (nothing on
    the CPU)."""

    def __init__(self, device: str):
        import torch

        self.cuda = str(device).startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()

    def sync(self) -> None:
        if self.cuda:
            __import__("torch").cuda.synchronize()

    def report(self) -> dict:
        if not self.cuda:
            return {}
        import torch

        return {
            "gpu_before": int(self.before),
            "gpu_peak": int(torch.cuda.max_memory_allocated()),
            "gpu_name": torch.cuda.get_device_name(),
        }


def touch(*parameter_groups) -> None:
    """Read every weight once so that memory-mapped weights are resident before timing: both tools
    then start attribution with what they keep in memory loaded, and ΔRSS measures attribution
    alone. (Decoders that circuit-tracer reads from disk on demand are not parameters and stay on
    disk, as it intends.)"""
    import torch

    with torch.no_grad():
        for group in parameter_groups:
            for p in group:
                if p.device.type != "meta":
                    p.sum()


def load_transcoders(path: Path, dtype, device: str = "cpu"):
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    # a directory in circuit-tracer's cache layout: config.yaml + layer_{l} / W_enc_{l}, W_dec_{l}
    # files
    transcoders, config = load_transcoders_from_cache(
        path.name, cache_dir=path.parent, dtype=dtype, device=__import__("torch").device(device)
    )
    return transcoders, config


def cmd_encode(args) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    tc, config = load_transcoders(Path(args.transcoders), torch.float32)
    mlp_in = load_file(args.inputs)["mlp_in"]  # [L, n, D]
    out = {}
    with torch.no_grad():
        if config["model_kind"] == "cross_layer_transcoder":
            acts = tc.encode(mlp_in)  # [L, n, F]
            sparse = acts.to_sparse()
            recon = tc.decode(sparse, mlp_in)
        else:
            acts = torch.stack([t.encode(mlp_in[l]) for l, t in enumerate(tc)])
            recon = torch.stack([t.decode(acts[l], mlp_in[l]) for l, t in enumerate(tc)])
    out["acts"] = acts.contiguous()
    out["reconstruction"] = recon.contiguous()
    save_file(out, args.out)
    return 0


def cmd_attribute(args) -> int:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    from circuit_tracer import ReplacementModel, attribute

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    transcoders, _ = load_transcoders(Path(args.transcoders), dtype, args.device)
    model = ReplacementModel.from_pretrained_and_transcoders(
        args.model, transcoders, backend="nnsight", device=torch.device(args.device), dtype=dtype
    )
    tokens = torch.tensor([int(t) for t in args.tokens.split(",")])
    touch(model.parameters(), transcoders.parameters())
    t_load = time.perf_counter() - t0
    warmup_s = None
    if (
        args.warmup
    ):  # the same settings on the first tokens of the prompt, as vs_circuit_tracer.py does for ours
        t = time.perf_counter()
        attribute(
            tokens[:WARMUP_TOKENS],
            model,
            max_n_logits=args.max_n_logits,
            desired_logit_prob=args.desired_logit_prob,
            batch_size=args.batch_size,
            max_feature_nodes=args.max_feature_nodes or None,
            verbose=False,
        )
        GPUMemory(args.device).sync()
        warmup_s = time.perf_counter() - t
    rss_before, anon_before = rss_bytes(), anon_bytes()
    gpu = GPUMemory(args.device)
    with PeakRSS() as peak:
        t1 = time.perf_counter()
        graph = attribute(
            tokens,
            model,
            max_n_logits=args.max_n_logits,
            desired_logit_prob=args.desired_logit_prob,
            batch_size=args.batch_size,
            max_feature_nodes=args.max_feature_nodes or None,
            verbose=args.verbose,
        )
        gpu.sync()
        wall = time.perf_counter() - t1
    adj = graph.adjacency_matrix.float().cpu()
    csr = adj.to_sparse_csr()  # targets x sources, stored sparse so the file stays small
    selected = graph.selected_features.cpu().numpy()
    active = graph.active_features.cpu().numpy()  # [n_active, 3] layer, pos, feature
    info = {
        "tool": "circuit-tracer",
        "wall_s": wall,
        "load_s": t_load,
        "warmup_s": warmup_s,
        "peak_rss": int(max(peak.peak, peak_rss_bytes())),
        "peak_rss_attribution": int(peak.peak),
        "rss_before": int(rss_before),
        "peak_anon_attribution": int(peak.peak_anon),
        "anon_before": int(anon_before),
        **gpu.report(),
        "n_active_features": int(len(active)),
        "n_selected_features": int(len(selected)),
        "threads": torch.get_num_threads(),
        "versions": {
            k: __import__(m).__version__
            for k, m in [
                ("circuit_tracer", "circuit_tracer"),
                ("torch", "torch"),
                ("transformers", "transformers"),
            ]
            if hasattr(__import__(m), "__version__")
        },
    }
    np.savez_compressed(
        args.out,
        adj_data=csr.values().numpy(),
        adj_indices=csr.col_indices().numpy(),
        adj_indptr=csr.crow_indices().numpy(),
        shape=np.array(adj.shape),
        active_features=active,
        selected_features=selected,
        activation_values=graph.activation_values.float().cpu().numpy(),
        tokens=tokens.numpy(),
        logit_ids=graph.logit_token_ids.cpu().numpy(),
        logit_probabilities=graph.logit_probabilities.float().cpu().numpy(),
        n_layers=np.array(graph.cfg.n_layers),
        info=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8),
    )
    print(json.dumps(info))
    return 0


def main(argv=None) -> int:
    _patch_hub()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser(
        "attribute", help="time circuit_tracer.attribute on one prompt and save its graph"
    )
    a.add_argument("--model", required=True, help="local Hugging Face directory of the model")
    a.add_argument("--transcoders", required=True, help="directory in circuit-tracer's layout")
    a.add_argument("--tokens", required=True, help="comma-separated token ids, BOS first")
    a.add_argument("--out", required=True)
    a.add_argument("--max-n-logits", type=int, default=10)
    a.add_argument("--desired-logit-prob", type=float, default=0.95)
    a.add_argument(
        "--max-feature-nodes", type=int, default=8192, help="0: None (every active feature)"
    )
    a.add_argument("--batch-size", type=int, default=256)
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a.add_argument("--device", default="cpu", help="cpu or cuda")
    a.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    a.add_argument("--verbose", action="store_true")
    a.add_argument(
        "--warmup",
        action="store_true",
        help=f"trace the first {WARMUP_TOKENS} tokens once before timing",
    )
    a.set_defaults(func=cmd_attribute)
    e = sub.add_parser(
        "encode", help="circuit-tracer's activations and reconstructions of given MLP inputs"
    )
    e.add_argument("--transcoders", required=True)
    e.add_argument("--inputs", required=True, help="safetensors file with mlp_in [L, n, D]")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_encode)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
