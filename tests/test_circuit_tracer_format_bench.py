"""The pieces of benchmarks/vs_circuit_tracer.py that decide its numbers: node matching and
agreement (against a graph laid out with circuit-tracer's conventions), finite differences of token
edges, threshold calibration, the FLOP count, prompt cutting, and the run supervisor's limits. Tiny
random models only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import circuits
from circuits.graph import ERROR, FEATURE, TOKEN
from transcoders.testing import random_transcoders

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vs_circuit_tracer as bench  # noqa: E402


@pytest.fixture
def traced(tiny, tmp_path):
    s = tiny.sites
    tc = random_transcoders(s.n_layers, s.d_model, 96, kind="skip", l0=6, seed=0)
    # BOS features kept: the agreement must set them apart from what both tools compute
    graph = circuits.attribute(
        tiny,
        "the cat sat",
        transcoders=tc,
        progress=False,
        max_feature_nodes=10_000,
        bos_features=True,
    )
    path = graph.save(tmp_path / "ours.graph.npz")
    return tiny, tc, graph, path


def write_like_circuit_tracer(graph, path: Path, embed_scale: float, seed: int = 0) -> None:
    """Our graph in circuit-tracer's conventions: no features at BOS, zero BOS errors, token edges
    with the unscaled embedding, features in another order; node order features, errors
    [layer, pos], tokens, logits."""
    import scipy.sparse as sp

    feats = np.flatnonzero((graph.kind == FEATURE) & (graph.pos > 0))
    active = np.stack([graph.layer[feats], graph.pos[feats], graph.feature[feats]], 1)
    order = np.random.default_rng(seed).permutation(len(feats))
    L, n = graph.n_layers, graph.n_pos
    err = {(int(graph.layer[i]), int(graph.pos[i])): i for i in graph.nodes_of(ERROR)}
    tok = {int(graph.pos[i]): i for i in graph.nodes_of(TOKEN)}
    nodes = (
        [feats[j] for j in order]
        + [err[(l, p)] for l in range(L) for p in range(n)]
        + [tok[p] for p in range(n)]
        + list(graph.logit_nodes)
    )
    dense = graph.adjacency.toarray()[np.ix_(nodes, nodes)]
    n_sel = len(feats)
    dense[:, n_sel : n_sel + L * n : n] = 0  # errors at position 0
    dense[:, n_sel + L * n : n_sel + L * n + n] /= embed_scale
    dense[n_sel : -len(graph.logit_nodes)] = 0  # error and token nodes have no rows
    adj = sp.csr_array(dense.astype(np.float32))
    np.savez(
        path,
        adj_data=adj.data,
        adj_indices=adj.indices,
        adj_indptr=adj.indptr,
        shape=np.array(dense.shape),
        active_features=active,
        selected_features=order,
        tokens=graph.tokens,
        logit_ids=graph.logit_tokens,
        logit_probabilities=graph.logit_probabilities,
        n_layers=np.array(L),
    )


def test_agreement_matches_nodes_and_isolates_design_differences(traced, tmp_path):
    lm, tc, graph, path = traced
    scale = lm.sites.embed_scale
    write_like_circuit_tracer(graph, tmp_path / "ct.npz", scale)
    a = bench.agreement(path, tmp_path / "ct.npz", scale)
    fe = a["features_and_errors"]
    assert fe["edges"] > 100 and fe["pearson"] > 1 - 1e-9 and fe["max_abs_diff"] == 0.0
    assert a["same_logits"] and a["max_logit_prob_diff"] == 0.0
    assert a["errors_at_bos"]["edges"] > 0 and np.isnan(a["errors_at_bos"]["pearson"])
    assert a["tokens"]["median_ratio"] == pytest.approx(scale, rel=1e-5)
    assert a["tokens_rescaled"]["pearson"] > 1 - 1e-6
    assert a["ours_bos_features"] == int(((graph.kind == FEATURE) & (graph.pos == 0)).sum()) > 0
    assert a["shared_targets"] == int(((graph.kind == FEATURE) & (graph.pos > 0)).sum()) + len(
        graph.logit_nodes
    )

    # a disagreement shows
    z = dict(np.load(tmp_path / "ct.npz", allow_pickle=False))
    z["adj_data"] = z["adj_data"].copy()
    z["adj_data"][: len(z["adj_data"]) // 2] *= -1
    np.savez(tmp_path / "bad.npz", **z)
    bad = bench.agreement(path, tmp_path / "bad.npz", scale)["features_and_errors"]
    assert bad["pearson"] < 0.9 and bad["max_abs_diff"] > 0


def test_finite_differences_confirm_scaled_token_edges(traced, tmp_path):
    lm, tc, graph, path = traced
    fd = bench.token_edges_by_finite_differences(lm, tc, graph, n_features=4)
    assert len(fd["targets"]) == len(graph.logit_nodes) + 4
    vals = np.array(fd["values"])
    assert vals.shape == (len(fd["targets"]), graph.n_pos) and np.abs(vals).max() > 0
    write_like_circuit_tracer(graph, tmp_path / "ct.npz", lm.sites.embed_scale)
    res = bench.fd_agreement(fd, path, tmp_path / "ct.npz")
    assert res["targets"] == len(fd["targets"])
    assert res["max_rel_err_ours"] < 1e-4
    assert res["max_rel_err_ct"] > 0.5  # unscaled embeddings miss by a factor sqrt(d_model) = 8


def test_calibrated_thresholds_give_the_asked_l0(tiny):
    from circuits.replacement import run_and_freeze

    s = tiny.sites
    tc = random_transcoders(s.n_layers, s.d_model, 256, kind="clt", l0=1, seed=1)
    mlp_in = run_and_freeze(tiny, tiny.tokenize(bench.CALIBRATION)).mlp_in
    bench.calibrate_thresholds(tc, mlp_in, 12.0)
    for l in range(s.n_layers):
        l0 = (tc.encode(l, mlp_in[l, 1:]) != 0).sum(-1).float().mean()
        assert abs(float(l0) - 12.0) < 0.5


def test_flop_count_scales_with_the_work():
    from types import SimpleNamespace

    sites = SimpleNamespace(
        n_layers=4, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, vocab_size=100, d_mlp=64
    )
    one = bench.attribution_flops(sites, 8, "plt", False, 128, 50, [4, 2])
    two = bench.attribution_flops(sites, 8, "plt", False, 128, 50, [4, 2, 4, 2])
    assert two["forward"] == one["forward"]
    assert two["backward"] == 2 * one["backward"] and two["edges"] == 2 * one["edges"]
    skip = bench.attribution_flops(sites, 8, "skip", True, 128, 50, [4, 2])
    assert skip["backward"] > one["backward"] and skip["forward"] > one["forward"]
    clt = bench.attribution_flops(sites, 8, "clt", False, 128, 50, [4, 2])
    assert clt["edges"] > one["edges"]
    assert bench.peak_flops(1, size=128, reps=1) > 0


def test_op_profile_ranks_the_work_it_saw():
    import torch

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    with bench.op_profiler("cpu") as prof:
        for _ in range(3):
            (a @ b).relu_()
    ops = bench.op_table(prof, "cpu", top=2)
    assert ops["top"][0][:2] == ("aten::mm", 3) and len(ops["top"]) == 2
    assert ops["busy_s"] >= sum(sec for _, _, sec in ops["top"]) > 0
    assert bench._short_op("void gemm<float|x>(int)  ", width=12) == "gemm<float/x"


def test_prompts_are_cut_at_exact_lengths(tiny):
    for n in (8, 32):
        text, tokens = bench.exact_prompt(tiny, n)
        assert len(tokens) == n and tiny.tokenize(text).tolist() == tokens


def test_run_supervisor_reports_and_stops(tmp_path):
    cfg = bench.BenchConfig(timeout_s=2, max_rss_gb=0.5)
    ok = bench.run_measured(
        [sys.executable, "-c", "print('noise'); print('{\"wall_s\": 1.5}')"],
        cfg,
        tmp_path / "a.log",
        1,
    )
    assert ok == {"wall_s": 1.5}
    slow = bench.run_measured(
        [
            sys.executable,
            "-c",
            "import time, sys; print('3/10 [00:01', file=sys.stderr, flush=True); time.sleep(30)",
        ],
        cfg,
        tmp_path / "b.log",
        1,
    )
    assert "time limit" in slow["failed"] and slow["where"].startswith("3/10")
    big = bench.run_measured(
        [sys.executable, "-c", "import time; x = bytearray(900 * 2**20); time.sleep(30)"],
        cfg,
        tmp_path / "c.log",
        1,
    )
    assert "memory limit" in big["failed"]
    crash = bench.run_measured(
        [sys.executable, "-c", "raise SystemExit('broken input')"], cfg, tmp_path / "d.log", 1
    )
    assert "exit code 1" in crash["failed"] and "broken input" in crash["failed"]


def test_config_drives_the_command_line():
    cfg = bench.parse_config(["--sets", "skip", "--lengths", "8,32", "--no-resume", "--l0", "12"])
    assert (cfg.sets, cfg.lengths, cfg.resume, cfg.l0) == (["skip"], [8, 32], False, 12.0)
    assert bench._cli_args(cfg) == [
        "--sets",
        "skip",
        "--lengths",
        "8,32",
        "--l0",
        "12.0",
        "--no-resume",
    ]
    assert cfg.batch_size(8) == 256 and cfg.batch_size(128) == 16


def test_busy_mode_runs_a_competitor_beside_the_measured_process(tmp_path):
    """The measured process sees its thread count, and in busy mode a CPU-bound process that is
    running before it starts and is gone after it ends. (The probe splits the competitor's text so
    that its own command line does not match.)"""
    probe = (
        "import os, json, subprocess;"
        "ps = subprocess.run(['ps', '-eo', 'args'], capture_output=True, text=True).stdout;"
        "print(json.dumps({'threads': os.environ['OMP_NUM_THREADS'],"
        " 'competitors': ps.count('np.tanh(a ' + '@ a.T')}))"
    )
    quiet = bench.run_measured(
        [sys.executable, "-c", probe], bench.BenchConfig(), tmp_path / "q.log", 1
    )
    busy = bench.run_measured(
        [sys.executable, "-c", probe], bench.BenchConfig(busy=True), tmp_path / "b.log", 2
    )
    assert quiet == {"threads": "1", "competitors": 0}
    assert busy == {"threads": "2", "competitors": 1}
    after = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "np.tanh(a @ a.T" not in after


def test_settings_grid_names_every_case():
    cfg = bench.parse_config(["--max-feature-nodes", "0,7500,2048", "--threads", "1,2"])
    assert cfg.max_feature_nodes == [0, 7500, 2048] and cfg.threads == [1, 2]
    assert bench._setting_suffix(cfg, 0, 1) == "-fall-t1"
    assert bench._setting_suffix(cfg, 7500, 2) == "-f7500-t2"
    assert bench._setting_suffix(bench.BenchConfig(), 2048, 2) == ""  # one setting: names as before
    case = {"max_feature_nodes": 0, "batch_size": 16, "threads": 1}
    s = bench.settings(cfg, case)
    assert s["max_feature_nodes"] == 0  # the same for both tools; circuit-tracer reads it as None
    # ours has no None: "all" is a budget above any active count
    assert bench.ours_settings(s)["max_feature_nodes"] >= 2**31 - 1
