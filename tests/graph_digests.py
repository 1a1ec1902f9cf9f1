"""Digests of attribution graphs on tiny random Gemma 3 models, fixed seeds: the graphs a refactor
must leave bit for bit as they were. `tests/test_graph_digests.py` compares against
`tests/data/graph_digests.json`; regenerate that file only for a change meant to alter graphs, with

    python tests/graph_digests.py --write

(one entry per edge backend available here: torch always, cpp where the compiled kernel is built).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

DIGESTS = Path(__file__).parent / "data" / "graph_digests.json"
PROMPT = "When Mary and John went"

# name -> (model config, transcoder config, attribution options)
CASES = {
    "skip-jumprelu": ({}, {"kind": "skip", "activation": "jumprelu"}, {}),
    "plt-topk-softcap": (
        {"seed": 1, "softcap": 5.0},
        {"kind": "plt", "activation": "topk", "l0": 5},
        {},
    ),
    "clt-batchtopk-gqa": (
        {"seed": 2, "n_heads": 4, "n_kv_heads": 2},
        {"kind": "clt", "activation": "batchtopk", "l0": 6},
        {},
    ),
    "clt-skip-budget": (
        {"seed": 3},
        {"kind": "clt", "skip": True},
        {"max_feature_nodes": 40, "batch_size": 9},
    ),
    "skip-influence-order": (
        {"seed": 4, "n_layers": 4},
        {"kind": "skip"},
        {"max_feature_nodes": 70, "batch_size": 16},
    ),
    "plt-contrast-bos": (
        {"seed": 5},
        {"kind": "plt"},
        {"targets": ["J"], "contrast": "M", "bos_features": True},
    ),
    "skip-bfloat16": ({"seed": 6, "dtype": torch.bfloat16}, {"kind": "skip"}, {"max_n_logits": 4}),
}

_NODE_ARRAYS = (
    "tokens",
    "kind",
    "layer",
    "pos",
    "feature",
    "activation",
    "node_input",
    "row_constant",
    "has_row",
    "logit_probabilities",
)


def _sha(a) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()[
        :20
    ]


def graph_digest(graph) -> dict:
    """sha256 (first 20 hex digits) of every node array, of the CSR adjacency's three arrays, and of
    the influence where set; scores and pruning metadata as numbers."""
    out = {name: _sha(getattr(graph, name)) for name in _NODE_ARRAYS}
    adj = graph.adjacency
    out.update(
        adj_data=_sha(adj.data),
        adj_indices=_sha(adj.indices),
        adj_indptr=_sha(adj.indptr),
        nnz=int(adj.nnz),
        abs_sum=float(np.abs(adj.data.astype(np.float64)).sum()),
    )
    if graph.influence is not None:
        out["influence"] = _sha(graph.influence)
    for key in (
        "scores",
        "pruning",
        "logit_strings",
        "contrast_token",
        "row_order",
        "n_feature_rows",
    ):
        if key in graph.metadata:
            out[key] = graph.metadata[key]
    return out


def case_digest(name: str) -> dict:
    """The digests of case `name`'s full graph and of its circuit at the default thresholds."""
    from circuits import attribute, prune
    from gemma_lm.testing import tiny_model
    from transcoders.testing import random_transcoders

    model_cfg, tc_cfg, options = CASES[name]
    model_cfg = dict(model_cfg)
    lm = tiny_model(seed=model_cfg.pop("seed", 0), **model_cfg)
    s = lm.sites
    tc_cfg = dict(tc_cfg)
    tc = random_transcoders(s.n_layers, s.d_model, 96, seed=11, l0=tc_cfg.pop("l0", 6), **tc_cfg)
    graph = attribute(lm, PROMPT, transcoders=tc, progress=False, **options)
    return {"graph": graph_digest(graph), "circuit": graph_digest(prune(graph))}


def backends() -> list[str]:
    from circuits.backend import _ext

    return ["torch"] + (["cpp"] if _ext is not None else [])


def all_digests() -> dict:
    out = {}
    for backend in backends():
        os.environ["GEMMA_CIRCUITS_BACKEND"] = backend
        out[backend] = {name: case_digest(name) for name in CASES}
    os.environ.pop("GEMMA_CIRCUITS_BACKEND", None)
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/graph_digests.py --write")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    DIGESTS.write_text(json.dumps(all_digests(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {DIGESTS}")
