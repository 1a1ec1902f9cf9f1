"""How faithful the attribution graphs of a transcoder set are: replacement and completeness scores,
the error share of the target logit, circuit sizes, and whether zeroing a circuit's features moves
the target logit the way the graph says.

    python benchmarks/faithfulness.py                      # the default set, every prompt
    OMP_NUM_THREADS=2 python benchmarks/faithfulness.py --limit 6
    python benchmarks/faithfulness.py --transcoders sets/skip --dev --json out/faith.json

For every prompt of benchmarks/data/faithfulness_prompts.jsonl (written for this benchmark; each
target is among gemma-3-270m's top 3 next tokens, `check_prompts`): the attribution graph (default
options, no dashboards) and its circuit (`circuits.prune`, default thresholds), scored under two
conventions: "kept" (the graph as traced: the error nodes at <bos> are errors like any other) and
"bos zeroed" (circuit-tracer's: the edges out of the error nodes at position 0 are dropped, then the
graph is scored and pruned again). Then the circuit's most influential features are zeroed one at a
time in the real model (`circuits.intervene`, mode "full") and in the frozen replacement model (mode
"frozen", features respond); the graph's prediction of each change is the feature's signed total
effect on the target logit along the full graph's edges (`predicted_ablation_effects`). Per prompt:
the Spearman correlations of predicted and frozen changes with the real ones. Once per set: the
spliced CE recovered on held-out text (`transcoders.evaluate`, its defaults).

`score_set(lm, tc, prompts)` scores one set (other scripts compare several in one process) and
`section_markdown(result, command)` writes its results section (benchmarks/results/faithfulness.md
by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from scipy.stats import spearmanr

import circuits
from circuits.attribution import AttributionConfig, choose_logits, single_token
from circuits.explain import error_share
from circuits.graph import ERROR, FEATURE, AttributionGraph
from circuits.pruning import _layer_key, _solve_influence, topological_levels
from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write_text
from transcoders.default import default_transcoders_dir, resolve_transcoders
from transcoders.evaluate import evaluate_transcoders

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "benchmarks" / "data" / "faithfulness_prompts.jsonl"
DEV_PROMPTS = ROOT.parent / "shared" / "prompts" / "dev.jsonl"
OUT = ROOT / "benchmarks" / "results" / "faithfulness.md"
CATEGORIES = (
    "facts",
    "two-hop",
    "antonyms",
    "grammar",
    "sequences",
    "arithmetic",
    "code",
    "multilingual",
    "long-range",
)
LONG_RANGE_TOKENS = (25, 60)  # prompt length of a long-range reference, <bos> included
TOP_K = 3  # a prompt's target must be among the model's top TOP_K next tokens

# the numbers of a prompt's record that the means average (booleans become fractions)
METRICS = (
    "kept_full_replacement",
    "kept_pruned_replacement",
    "kept_full_completeness",
    "kept_pruned_completeness",
    "zeroed_full_replacement",
    "zeroed_pruned_replacement",
    "zeroed_full_completeness",
    "zeroed_pruned_completeness",
    "error_share_direct",
    "error_share_total",
    "zeroed_error_share_total",
    "circuit_nodes",
    "circuit_edges",
    "circuit_features",
    "spearman_graph_full",
    "spearman_frozen_full",
    "target_is_top",
    "seconds",
)


# -- prompts ---------------------------------------------------------------------------------------


def read_prompts(path: str | Path, category: str | None = None) -> list[dict]:
    """The prompts of a JSONL file: `{"prompt", "target", "category"}` per line (`category`, when
    given, fills in a missing one)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no prompt file at {path}; give one with --prompts FILE")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompts.append(
                {
                    "prompt": str(item["prompt"]),
                    "target": str(item["target"]),
                    "category": str(item.get("category") or category or "uncategorised"),
                }
            )
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f"{path}:{n} is not a JSON object with 'prompt' and 'target'; fix that line"
            ) from None
    return prompts


def take_in_turn(prompts: list[dict], limit: int | None) -> list[dict]:
    """At most `limit` prompts, taken in turn from each category (file order within one)."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    queues: dict[str, list[dict]] = {}
    for p in prompts:
        queues.setdefault(p["category"], []).append(p)
    out = []
    while len(out) < limit:
        for q in queues.values():
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def _prompt_failure(lm, item: dict, top_k: int) -> str | None:
    """Why `item` does not qualify (None when it does): its target is not one token, not among the
    model's top `top_k`, or not a logit node of a default trace; a long-range prompt's length."""
    tokens = lm.tokenize(item["prompt"])
    try:
        target = single_token(lm, item["target"])
    except UserError as e:
        return str(e)
    logits = lm.last_logits(tokens).float().cpu()
    rank = int((logits > logits[target]).sum())
    if rank >= top_k:
        return f"target is rank {rank + 1}, not in the top {top_k}"
    if target not in choose_logits(lm, logits, AttributionConfig())[0]:
        return "target would not be a logit node of a default trace"
    lo, hi = LONG_RANGE_TOKENS
    if item.get("category") == "long-range" and not lo <= len(tokens) <= hi:
        return f"a long-range prompt needs {lo}-{hi} tokens, this one has {len(tokens)}"
    return None


@torch.no_grad()
def check_prompts(lm, prompts: list[dict], top_k: int = TOP_K) -> list[dict]:
    """The prompts that do not qualify, each with `reason` and the model's top tokens (`top`:
    [[token, probability], ...]); [] when all do."""
    failures = []
    for item in prompts:
        reason = _prompt_failure(lm, item, top_k)
        if reason is not None:
            probs = torch.softmax(lm.last_logits(lm.tokenize(item["prompt"])).float().cpu(), -1)
            top = probs.topk(top_k)
            failures.append(
                {
                    **item,
                    "reason": reason,
                    "top": [
                        [lm.tokenizer.decode([int(i)]), round(float(p), 4)]
                        for p, i in zip(top.values, top.indices)
                    ],
                }
            )
    return failures


# -- the two conventions and the graph's predictions -----------------------------------------------


def bos_zeroed(graph: AttributionGraph, starts_with_bos: bool) -> AttributionGraph:
    """A copy of `graph` without the edges out of its error nodes at position 0 (circuit-tracer's
    convention: the <bos> attention sink is the same in every prompt); their input moves into the
    targets' `row_constant`, as pruning does. Without a <bos> token the graph itself comes back."""
    if not starts_with_bos:
        return graph
    drop = np.flatnonzero((graph.kind == ERROR) & (graph.pos == 0))
    keep = np.ones(graph.n_nodes)
    keep[drop] = 0.0
    adj = sp.csr_array(graph.adjacency @ sp.diags_array(keep).astype(graph.adjacency.dtype))
    adj.eliminate_zeros()
    dropped = np.asarray(graph.adjacency.sum(axis=1)).ravel() - np.asarray(adj.sum(axis=1)).ravel()
    return dataclasses.replace(
        graph,
        adjacency=adj,
        row_constant=(graph.row_constant + dropped).astype(graph.row_constant.dtype),
        metadata=dict(graph.metadata),
        influence=None,
    )


def predicted_ablation_effects(graph: AttributionGraph, target: int) -> np.ndarray:
    """`[n_nodes]`: the change of node `target`'s input that the graph predicts when each node is
    zeroed alone, every other error and token held and every feature responding linearly.

    An edge A[t, s] is s's contribution to t's input, so it scales with s's activation a_s: a unit
    change of a_s moves t's input by M[t, s] = A[t, s] / a_s, and an active feature's activation
    moves with its input one for one (ReLU, JumpReLU, TopK, BatchTopK alike). The total effect of
    s on the target is the sum over paths of the products of M, x = e_target^T (I - M)^-1, one
    back-substitution over the graph's levels (as `circuits.pruning` solves influence); zeroing s
    changes the target by -a_s x[s], i.e. minus the sum over paths of the products of the signed
    edges, each divided by the activations of the features it passes through. Error and token
    nodes are sources only: for them a_s is taken as 1."""
    scale = np.ones(graph.n_nodes)
    feats = graph.kind == FEATURE
    scale[feats] = graph.activation[feats]
    m = sp.csr_array(graph.adjacency, dtype=np.float64)
    m = sp.csr_array(m @ sp.diags_array(1.0 / scale))
    onehot = np.zeros(graph.n_nodes)
    onehot[target] = 1.0
    total = _solve_influence(m, onehot, topological_levels(m, _layer_key(graph)))
    return -scale * total


def logit_input(logits: torch.Tensor, token: int, softcap: float | None) -> float:
    """What a logit node's input is (the graph's metadata `logit_input`): the pre-softcap logit of
    `token` minus the mean pre-softcap logit over the vocabulary, from logits `[vocab]`."""
    raw = logits.double()
    if softcap:
        raw = softcap * torch.atanh((raw / softcap).clamp(-1 + 1e-12, 1 - 1e-12))
    return float(raw[token] - raw.mean())


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation; NaN for fewer than 3 pairs or a constant side."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)


# -- one prompt ------------------------------------------------------------------------------------


def _scores(prefix: str, circuit: AttributionGraph) -> dict:
    """A circuit's `scores` (`circuits.pruning.graph_scores` of the full and the pruned graph) as
    flat keys."""
    return {
        f"{prefix}_{which}_{name}": float(circuit.scores[which][name])
        for which in ("full", "pruned")
        for name in ("replacement", "completeness")
    }


def _circuit_size(circuit: AttributionGraph) -> dict:
    return {
        "circuit_nodes": int(circuit.n_nodes),
        "circuit_edges": int(circuit.adjacency.nnz),
        "circuit_features": int((circuit.kind == FEATURE).sum()),
    }


def _target_node(graph: AttributionGraph, token: int) -> int | None:
    found = np.flatnonzero(graph.logit_tokens == token)
    return int(graph.logit_nodes[found[0]]) if len(found) else None


def _error_shares(graph: AttributionGraph, zeroed: AttributionGraph, node: int | None) -> dict:
    if node is None:
        return dict.fromkeys(
            ("error_share_direct", "error_share_total", "zeroed_error_share_total"), math.nan
        )
    kept = error_share(graph, node)
    return {
        "error_share_direct": kept.direct,
        "error_share_total": kept.total,
        "zeroed_error_share_total": error_share(zeroed, node).total,
    }


def strongest_features(circuit: AttributionGraph, n: int) -> list[str]:
    """Node ids of the circuit's `n` feature nodes of largest influence (full-graph influence, as
    `circuits.prune` records it), strongest first."""
    feats = circuit.nodes_of(FEATURE)
    order = feats[np.argsort(-circuit.influence[feats], kind="stable")][:n]
    return [circuit.node_id(int(i)) for i in order]


def _ablations(lm, tc, graph: AttributionGraph, node_ids: list[str], mode: str, token: int):
    """The change of the target's logit input when each feature of `node_ids` is zeroed alone, in
    `mode` (one sweep: the clean run is shared)."""
    entries = [{node_id: 0.0} for node_id in node_ids]
    runs = circuits.intervene_each(
        lm, graph, entries, transcoders=tc, mode=mode, propagate=True, progress=False
    )
    softcap = lm.sites.final_logit_softcapping
    changes = []
    for r in runs:
        after = r.raw_logits if r.raw_logits is not None else r.logits
        before = r.raw_logits_clean if r.raw_logits_clean is not None else r.logits_clean
        cap = None if r.raw_logits is not None else softcap
        changes.append(logit_input(after, token, cap) - logit_input(before, token, cap))
    return changes


def ablation_check(lm, tc, graph, circuit, target: int | None, n: int, frozen: bool) -> dict:
    """Zero each of the circuit's `n` strongest features alone: the graph's predicted change of the
    target logit, the real (full re-run) one, with `frozen` the frozen-model one too, and their
    rank correlations."""
    if target is None or n == 0:
        return {"ablations": [], "spearman_graph_full": math.nan, "spearman_frozen_full": math.nan}
    token = int(graph.feature[target])
    predicted = predicted_ablation_effects(graph, target)
    index = {node_id: i for i, node_id in enumerate(graph.node_ids())}
    nodes = strongest_features(circuit, n)
    full = _ablations(lm, tc, graph, nodes, "full", token)
    in_frozen = _ablations(lm, tc, graph, nodes, "frozen", token) if frozen else [math.nan] * n
    rows = [
        {
            "node": node_id,
            "influence": float(circuit.influence[circuit.index_of(node_id)]),
            "predicted": float(predicted[index[node_id]]),
            "full": f,
            "frozen": z,
        }
        for node_id, f, z in zip(nodes, full, in_frozen)
    ]
    return {
        "ablations": rows,
        "spearman_graph_full": spearman([r["predicted"] for r in rows], full),
        "spearman_frozen_full": spearman(in_frozen, full) if frozen else math.nan,
    }


def score_prompt(lm, tc, item: dict, ablate: int = 20, frozen: bool = False) -> dict:
    """The record of one prompt: scores under both conventions, the target's error share, the
    circuit's size, the ablation check and the seconds of each step."""
    token = single_token(lm, item["target"])  # a bad target stops before the work
    t0 = time.perf_counter()
    graph = circuits.attribute(lm, item["prompt"], transcoders=tc, progress=False, dashboards=False)
    t1 = time.perf_counter()
    node = _target_node(graph, token)
    circuit = circuits.prune(graph)
    zeroed = bos_zeroed(graph, lm.starts_with_bos(torch.as_tensor(graph.tokens)))
    zeroed_circuit = circuits.prune(zeroed)
    t2 = time.perf_counter()
    ablations = ablation_check(lm, tc, graph, circuit, node, ablate, frozen)
    t3 = time.perf_counter()
    probs = dict(zip(graph.logit_tokens.tolist(), graph.logit_probabilities.tolist()))
    return {
        **item,
        "n_tokens": int(graph.n_pos),
        "target_probability": float(probs.get(token, math.nan)),
        "target_is_top": bool(graph.logit_tokens[0] == token),
        **_scores("kept", circuit),
        **_scores("zeroed", zeroed_circuit),
        **_error_shares(graph, zeroed, node),
        **_circuit_size(circuit),
        "graph_nodes": int(graph.n_nodes),
        "graph_edges": int(graph.adjacency.nnz),
        **ablations,
        "seconds_attribute": t1 - t0,
        "seconds_prune": t2 - t1,
        "seconds_ablate": t3 - t2,
        "seconds": time.perf_counter() - t0,
    }


# -- one set ---------------------------------------------------------------------------------------


def means(records: list[dict]) -> dict:
    """`METRICS` averaged over `records` (NaN left out) and the prompts counted, in all and per
    category: {"all": {...}, "by_category": {category: {...}}}."""

    def avg(rs):
        out = {"n": len(rs)}
        for key in METRICS:
            vals = np.array([float(r[key]) for r in rs], dtype=np.float64)
            out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
        return out

    cats = list(dict.fromkeys(r["category"] for r in records))
    return {
        "all": avg(records),
        "by_category": {c: avg([r for r in records if r["category"] == c]) for c in cats},
    }


def describe_transcoders(tc, name: str | None = None) -> dict:
    """Name, kind, width, k and training tokens of a set (from `tc.cfg`). The name: `name`, else
    the folder its training run wrote (recorded in its config), else "(unnamed)"."""
    cfg = tc.cfg
    trained_to = str((cfg.extra.get("train_config") or {}).get("out") or "")
    return {
        "name": name or (Path(trained_to).name if trained_to else "(unnamed)"),
        "kind": cfg.kind,
        "activation": cfg.activation,
        "d_sae": int(cfg.d_sae),
        "k": cfg.k,
        "matryoshka_prefixes": cfg.matryoshka_prefixes,
        "training_tokens": cfg.metrics.get("tokens"),
    }


def _spliced_ce(lm, tc, options: dict) -> dict:
    res = evaluate_transcoders(tc, lm, progress=False, **options)
    keys = ("tokens", "ce_clean", "ce_spliced", "ce_zero_ablated", "delta_ce", "ce_recovered")
    return {**{k: res[k] for k in keys}, "mean_fvu": res["mean_fvu"], "seconds": res["seconds"]}


def _progress_line(i: int, n: int, r: dict) -> str:
    return (
        f"[{i}/{n}] {r['category']:<12} {json.dumps(r['prompt'])[:48]:<48} "
        f"R {r['kept_full_replacement']:.3f}/{r['kept_pruned_replacement']:.3f} "
        f"C {r['kept_full_completeness']:.3f}/{r['kept_pruned_completeness']:.3f} "
        f"zeroed R {r['zeroed_full_replacement']:.3f} C {r['zeroed_full_completeness']:.3f} "
        f"err {r['error_share_total']:.3f} rho {r['spearman_graph_full']:+.2f}/"
        f"{r['spearman_frozen_full']:+.2f} {r['seconds']:.1f} s"
    )


def score_set(
    lm,
    tc,
    prompts: list[dict],
    ablate: int = 20,
    progress: bool = True,
    ce: bool | dict = True,
    name: str | None = None,
    frozen: bool = False,
) -> dict:
    """Score transcoder set `tc` (called `name`) on `prompts`: per-prompt records (`score_prompt`),
    their means (`means`), the spliced CE of the set (`transcoders.evaluate.evaluate_transcoders`:
    its defaults for True, these options for a dict, skipped for False), the date, wall time and
    load averages."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start, t0 = os.getloadavg(), time.perf_counter()
    records = []
    for i, item in enumerate(prompts, 1):
        records.append(score_prompt(lm, tc, item, ablate, frozen))
        if progress:
            print(_progress_line(i, len(prompts), records[-1]), file=sys.stderr, flush=True)
    spliced = _spliced_ce(lm, tc, {} if ce is True else ce) if ce is not False else None
    return {
        "transcoders": describe_transcoders(tc, name),
        "date": date,
        "ablate": ablate,
        "frozen": frozen,
        "records": records,
        "means": means(records),
        "ce": spliced,
        "seconds": time.perf_counter() - t0,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    }


# -- the results section ---------------------------------------------------------------------------


def _f(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pair(r: dict, a: str, b: str) -> str:
    return f"{_f(r[a])} / {_f(r[b])}"


def _score_cells(r: dict) -> list[str]:
    """Replacement and completeness (full / pruned) under both conventions, the error share, the
    circuit's size and the two correlations."""
    return [
        _pair(r, "kept_full_replacement", "kept_pruned_replacement"),
        _pair(r, "kept_full_completeness", "kept_pruned_completeness"),
        _pair(r, "zeroed_full_replacement", "zeroed_pruned_replacement"),
        _pair(r, "zeroed_full_completeness", "zeroed_pruned_completeness"),
        _pair(r, "error_share_total", "zeroed_error_share_total"),
        f"{_f(r['circuit_nodes'], 0)} / {_f(r['circuit_edges'], 0)} / "
        f"{_f(r['circuit_features'], 0)}",
        _f(r["spearman_graph_full"], 2),
        _f(r["spearman_frozen_full"], 2),
    ]


SCORE_HEAD = (
    "replacement kept (full / pruned) | completeness kept | replacement bos zeroed | "
    "completeness bos zeroed | error share of target (kept / zeroed) | circuit nodes / edges / "
    "features | ρ graph vs full | ρ frozen vs full"
)


def means_table(m: dict) -> list[str]:
    lines = [
        f"| category | prompts | {SCORE_HEAD} | target top-1 | s / prompt |",
        "| --- | ---: |" + " ---: |" * 10,
    ]
    rows = [*m["by_category"].items(), ("**all**", m["all"])]
    for cat, r in rows:
        top, secs = f"{r['target_is_top']:.0%}", _f(r["seconds"], 1)
        cells = [cat, str(r["n"]), *_score_cells(r), top, secs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cell_text(text: str, width: int = 60) -> str:
    text = json.dumps(text, ensure_ascii=False)[1:-1]
    text = text if len(text) <= width else "…" + text[-(width - 1) :]
    return text.replace("|", "\\|")


def prompt_table(records: list[dict]) -> list[str]:
    lines = [
        f"| # | category | prompt | target | p | {SCORE_HEAD} | s |",
        "| ---: | --- | --- | --- | ---: |" + " ---: |" * 9,
    ]
    for i, r in enumerate(records, 1):
        cells = [
            str(i),
            r["category"],
            _cell_text(r["prompt"]),
            f"`{_cell_text(r['target'], 20)}`",
            _f(r["target_probability"], 2),
            *_score_cells(r),
            _f(r["seconds"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={omp}), Python {platform.python_version()}"
    )


def _set_lines(result: dict) -> list[str]:
    t = result["transcoders"]
    ce = result["ce"]
    lines = [
        f"Transcoders: {t['name']} ({t['kind']}, {t['activation']}, width {t['d_sae']}, "
        f"k {t['k']}, matryoshka {t['matryoshka_prefixes']}, trained on "
        f"{t['training_tokens']} tokens).",
    ]
    if ce is not None:
        lines.append(
            f"Spliced CE on {ce['tokens']} held-out tokens (`transcoders.evaluate` defaults): "
            f"clean {ce['ce_clean']:.3f}, spliced {ce['ce_spliced']:.3f}, MLPs zeroed "
            f"{ce['ce_zero_ablated']:.3f}: CE recovered {ce['ce_recovered']:.1%}, mean FVU "
            f"{ce['mean_fvu']:.3f} ({ce['seconds']:.0f} s)."
        )
    return lines


def _timing_line(result: dict) -> str:
    recs = result["records"]
    secs = np.array([r["seconds"] for r in recs]) if recs else np.zeros(1)
    parts = {
        k: np.mean([r[f"seconds_{k}"] for r in recs]) if recs else 0.0
        for k in ("attribute", "prune", "ablate")
    }
    return (
        f"{len(recs)} prompts in {result['seconds']:.0f} s wall (CE included); per prompt "
        f"{secs.mean():.1f} s mean, {secs.min():.1f}-{secs.max():.1f} s (attribution "
        f"{parts['attribute']:.1f} s, pruning both conventions {parts['prune']:.1f} s, "
        f"{result['ablate']} ablations x {2 if result.get('frozen') else 1} modes "
        f"{parts['ablate']:.1f} s)."
    )


NOTES = " ".join(
    """Kept: the graph as traced, its <bos> error nodes counted as errors. Bos zeroed: the edges out
of the error nodes at position 0 dropped (circuit-tracer's convention), then scored and pruned
again. Scores are `circuits.pruning.graph_scores` (full / pruned graph, default thresholds). Error
share: the share of the target logit's normalised input that starts at error nodes, all path
lengths (`circuits.explain.error_share`), in the full graph. ρ: Spearman correlation, over the
circuit's most influential features zeroed one at a time, of the graph's predicted change of the
target logit (its total effect along the full graph's edges) and of the frozen model's change
(attention and norms frozen, features respond) with the real change (full re-run with the
transcoders spliced in and the errors held); the logit is the demeaned pre-softcap logit, as in the
graph's logit nodes. – : not defined (target not a logit node, or a constant side).""".split()
)


def section_markdown(result: dict, command: str) -> str:
    """The results section of one run (`score_set`'s result, with a "dev" result inside when the
    dev prompts were scored too)."""
    lines = [
        "## Faithfulness of the graphs (benchmarks/faithfulness.py)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}  ",
        f"Date: {result.get('date', '')}; load average "
        f"{' '.join(f'{x:.2f}' for x in result['loadavg_start'])} at the start, "
        f"{' '.join(f'{x:.2f}' for x in result['loadavg_end'])} at the end.",
        "",
        *_set_lines(result),
        _timing_line(result),
        "",
        NOTES,
        "",
        *means_table(result["means"]),
        "",
        "### Per prompt",
        "",
        *prompt_table(result["records"]),
    ]
    dev = result.get("dev")
    if dev is not None:
        lines += ["", "### Check: the shared dev prompts (../shared/prompts/dev.jsonl)", ""]
        lines += [_timing_line(dev), "", *means_table(dev["means"]), ""]
        lines += prompt_table(dev["records"])
    elif result.get("dev_note"):
        lines += ["", result["dev_note"]]
    return "\n".join(lines) + "\n"


# -- the command -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transcoders", default="default", help="'default' or a transcoder directory")
    p.add_argument("--prompts", default=str(PROMPTS), help="JSONL: prompt, target, category")
    p.add_argument("--limit", type=int, help="score at most N prompts, taken in turn per category")
    p.add_argument("--ablate", type=int, default=20, help="features zeroed per prompt (0: none)")
    p.add_argument("--frozen", action="store_true", help="also ablate in the frozen model")
    p.add_argument("--dev", action="store_true", help="also score ../shared/prompts/dev.jsonl")
    p.add_argument("--out", default=str(OUT), help="the markdown section")
    p.add_argument("--json", default="", help="also dump every record and mean here")
    args = p.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.ablate < 0:
        raise UserError("--limit must be >= 1 and --ablate >= 0")
    return args


def run(args: argparse.Namespace, command: str) -> dict:
    prompts = take_in_turn(read_prompts(args.prompts), args.limit)
    lm = circuits.load_model()
    tc = resolve_transcoders(args.transcoders, lm)
    name = Path(args.transcoders).name
    if args.transcoders == "default":
        name = f"default ({default_transcoders_dir().name})"
    result = score_set(lm, tc, prompts, ablate=args.ablate, name=name, frozen=args.frozen)
    if args.dev and DEV_PROMPTS.exists():
        dev = read_prompts(DEV_PROMPTS, category="dev")
        result["dev"] = score_set(
            lm, tc, dev, ablate=args.ablate, ce=False, name=name, frozen=args.frozen
        )
        result["loadavg_end"] = result["dev"]["loadavg_end"]
    elif args.dev:
        result["dev_note"] = f"The dev prompts ({DEV_PROMPTS}) are missing here; skipped."
    return result


def json_ready(obj):
    """`obj` with NaN and infinities as None (strict JSON) and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        command = shlex.join(["python", "benchmarks/faithfulness.py", *(argv or sys.argv[1:])])
        result = run(args, command)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = section_markdown(result, command)
    atomic_write_text(Path(args.out), text)
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        atomic_write_text(
            Path(args.json), json.dumps(json_ready(result), indent=1, allow_nan=False) + "\n"
        )
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
