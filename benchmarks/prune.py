"""How long influence, scores and pruning take on attribution graphs of 2,000 to 10,000 nodes.

    python benchmarks/prune.py                 # sizes 2000 5000 10000, 3 repeats
    python benchmarks/prune.py --sizes 10000 --repeats 5

Graphs are random but shaped like real ones (features spread over 18 layers and the prompt's
positions, one error node per layer and position, dense rows: every feature and logit reads from a
few hundred to a few thousand earlier nodes). Baseline: the dense power series w A + w A^2 + ...
(the peer tool's way), run in torch on the same machine. Prints a markdown table and writes it to
benchmarks/results/prune.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from circuits.graph import ERROR, FEATURE, LOGIT, TOKEN, AttributionGraph
from circuits.pruning import compute_influence, graph_scores, logit_weights, prune
from gemma_lm.files import atomic_write_text


def random_attribution_graph(
    n_nodes: int,
    n_layers: int = 18,
    n_pos: int = 32,
    n_logits: int = 10,
    min_in: int = 200,
    max_in: int = 2000,
    seed: int = 0,
) -> AttributionGraph:
    """A layered DAG of about n_nodes nodes with attribution-graph structure and dense rows."""
    rng = np.random.default_rng(seed)
    n_err = n_layers * n_pos
    n_feat = n_nodes - n_err - n_pos - n_logits
    if n_feat < 1:
        raise ValueError("n_nodes too small for the layers and positions")
    f_layer = np.sort(rng.integers(0, n_layers, n_feat))
    f_pos = rng.integers(0, n_pos, n_feat)
    kind = np.repeat(
        np.array([FEATURE, ERROR, TOKEN, LOGIT], np.int8), [n_feat, n_err, n_pos, n_logits]
    )
    layer = np.concatenate(
        [
            f_layer,
            np.repeat(np.arange(n_layers), n_pos),
            np.full(n_pos, -1),
            np.full(n_logits, n_layers),
        ]
    ).astype(np.int32)
    pos = np.concatenate(
        [f_pos, np.tile(np.arange(n_pos), n_layers), np.arange(n_pos), np.full(n_logits, n_pos - 1)]
    ).astype(np.int32)
    sources = np.flatnonzero(kind != LOGIT)
    indptr, indices, data = [0], [], []
    for t in range(len(kind)):
        if kind[t] not in (FEATURE, LOGIT):
            indptr.append(indptr[-1])
            continue
        ok = sources[(layer[sources] < layer[t]) & (pos[sources] <= pos[t])]
        k = min(len(ok), int(rng.integers(min_in, max_in)))
        pick = np.sort(rng.choice(ok, k, replace=False)) if k else ok[:0]
        indices.append(pick)
        data.append((rng.standard_normal(k) * rng.lognormal(0, 1.2, k)).astype(np.float32))
        indptr.append(indptr[-1] + k)
    n = len(kind)
    adj = sp.csr_array(
        (np.concatenate(data), np.concatenate(indices), np.asarray(indptr)), shape=(n, n)
    )
    has_row = np.isin(kind, (FEATURE, LOGIT))
    return AttributionGraph(
        prompt="benchmark",
        tokens=np.arange(n_pos),
        token_strings=[f"t{i}" for i in range(n_pos)],
        kind=kind,
        layer=layer,
        pos=pos,
        feature=np.arange(n, dtype=np.int64),
        activation=np.ones(n, np.float32),
        node_input=np.where(has_row, np.asarray(adj.sum(axis=1)).ravel(), np.nan).astype(
            np.float32
        ),
        row_constant=np.zeros(n, np.float32),
        has_row=has_row,
        adjacency=adj,
        logit_probabilities=np.sort(rng.dirichlet(np.ones(n_logits)))[::-1].astype(np.float32),
        n_layers=n_layers,
    )


def dense_power_series(graph: AttributionGraph) -> np.ndarray:
    """Baseline: normalise a dense |A| and sum w A^k until the product vanishes (float32 torch)."""
    a = torch.from_numpy(np.abs(graph.adjacency.toarray()))
    a = a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)
    v = torch.from_numpy(logit_weights(graph).astype(np.float32))
    total = torch.zeros_like(v)
    for _ in range(graph.n_nodes):
        v = v @ a
        if not bool(v.any()):
            break
        total += v
    return total.numpy()


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prune.md"))
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        g = random_attribution_graph(n, seed=n)
        t_infl, infl = best_of(partial(compute_influence, g), args.repeats)
        t_scores, _ = best_of(partial(graph_scores, g, infl), args.repeats)
        t_prune, p = best_of(partial(prune, g), args.repeats)
        t_dense, dense = best_of(partial(dense_power_series, g), args.repeats)
        err = float(np.abs(dense - infl).max() / max(np.abs(infl).max(), 1e-30))
        rows.append(
            (
                n,
                g.adjacency.nnz,
                t_infl,
                t_scores,
                t_prune,
                t_dense,
                err,
                p.n_nodes,
                p.adjacency.nnz,
            )
        )
        print(
            f"{n} nodes: influence {t_infl:.3f}s, prune {t_prune:.3f}s, dense baseline "
            f"{t_dense:.3f}s",
            flush=True,
        )
    table = [
        "| nodes | edges | influence (s) | scores (s) | prune, end to end (s) | dense power "
        "series (s) | max rel. diff vs dense | pruned nodes | pruned edges |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    table += [
        f"| {n:,} | {e:,} | {a:.3f} | {s:.3f} | {p:.3f} | {d:.3f} | {r:.1e} | {pn:,} | {pe:,} |"
        for n, e, a, s, p, d, r, pn, pe in rows
    ]
    text = "\n".join(
        [
            "## Pruning (benchmarks/prune.py)",
            "",
            f"Command: `python benchmarks/prune.py --sizes {' '.join(map(str, args.sizes))} "
            f"--repeats {args.repeats}`  ",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"threads {torch.get_num_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {date.today()}  ",
            "Best of the repeats. `prune` includes influence, scores of the full and pruned "
            "graph, edge influence and building the pruned graph. Random layered graphs with "
            "dense rows (200-2,000 inputs per row).",
            "",
            *table,
            "",
        ]
    )
    print("\n" + text)
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
