"""Feature dashboards (transcoders/dashboards.py): exact top contexts in bounded memory,
resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import serve_model

from circuits.attribution import attribute
from circuits.graph import FEATURE, load_graph
from circuits.labels import attach_dashboards
from gemma_lm.errors import UserError
from gemma_lm.testing import tiny_model
from transcoders.dashboards import (
    TopContexts,
    UnembeddingScreen,
    _extremes,
    _most_extreme,
    _screened_extremes,
    auto_label,
    build_dashboards,
    load_dashboards,
    output_tokens,
    transcoder_identity,
)
from transcoders.testing import random_transcoders

WORDS = "the cat dog sat on mat ran far away big small red blue house tree river".split()


@pytest.fixture
def text_file(tmp_path):
    rng = np.random.default_rng(0)
    paras = [". ".join(" ".join(rng.choice(WORDS, 10)) for _ in range(3)) for _ in range(60)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paras))
    return path


def setup(kind="plt"):
    lm = tiny_model(seed=11)
    tc = random_transcoders(lm.sites.n_layers, lm.sites.d_model, 24, kind=kind, seed=3)
    return lm, tc


def small(text_file, out, **kw):
    opts = dict(
        text=f"file:{text_file}",
        out=str(out),
        k=4,
        context=24,
        before=3,
        after=2,
        max_tokens=2400,
        batch=5,
        gen_samples=0,
        harvest_dtype="float32",
        progress=False,
    )
    return {**opts, **kw}


# -- the store -------------------------------------------------------------------------------------


def test_planted_top_contexts_are_found_exactly():
    """Each feature fires strongly in a planted set of contexts, at a planted position, with planted
    values; elsewhere it only fires weakly. The stream arrives in batches of varying size."""
    g = torch.Generator().manual_seed(0)
    L, Fe, T, N, k, before, after = 2, 7, 9, 50, 4, 2, 1
    tokens = torch.randint(0, 1000, (N, T), generator=g)
    acts = torch.rand(L, N, T, Fe, generator=g) * 0.5 * (torch.rand(L, N, T, Fe, generator=g) < 0.3)
    planted = {}
    for l in range(L):
        for f in range(Fe):
            ctx = torch.randperm(N, generator=g)[: k + 2]  # more planted contexts than slots
            # distinct, all above 0.5
            vals = 1 + torch.randperm(100, generator=g)[: k + 2].float() / 10
            pos = torch.randint(0, T, (k + 2,), generator=g)
            acts[l, ctx, pos, f] = vals
            best = vals.argsort(descending=True)[:k]
            planted[l, f] = (ctx[best], vals[best], pos[best])
    store = TopContexts(L, Fe, k, before, after)
    start, sizes = 0, [1, 3, 7, 2, 11, 5, 4, 8, 9]
    for size in sizes:
        ids = torch.arange(start, min(N, start + size))
        for l in range(L):
            store.update(l, acts[l, ids], tokens[ids], ids)
        start += size
    assert start >= N
    padded = torch.nn.functional.pad(tokens, (before, after), value=-1)
    for (l, f), (ctx, vals, pos) in planted.items():
        assert store.top_context[l, f].tolist() == ctx.tolist()
        assert torch.equal(store.top_acts[l, f], vals)
        for j in range(k):
            window = slice(int(pos[j]), int(pos[j]) + before + 1 + after)
            assert store.window_tokens[l, f, j].tolist() == padded[ctx[j], window].tolist()
            assert float(store.window_acts[l, f, j, before]) == pytest.approx(
                float(vals[j]), rel=1e-3
            )
    assert torch.equal(store.n_active, (acts > 0).sum((1, 2)))
    assert torch.equal(store.max_act, acts.amax((1, 2)))


def test_store_memory_does_not_grow_with_tokens_seen():
    L, Fe, k = 2, 16, 3
    store = TopContexts(L, Fe, k, 4, 2)
    sizes = {name: (t.shape, t.dtype) for name, t in store.state().items()}
    before = store.nbytes
    g = torch.Generator().manual_seed(1)
    for step in range(200):  # 200 x 4 contexts x 16 tokens
        ids = torch.arange(step * 4, step * 4 + 4)
        for l in range(L):
            store.update(
                l,
                torch.rand(4, 16, Fe, generator=g),
                torch.randint(0, 50, (4, 16), generator=g),
                ids,
            )
    assert store.nbytes == before
    assert {name: (t.shape, t.dtype) for name, t in store.state().items()} == sizes
    assert set(vars(store)) == {"k", "before", "after", *sizes}  # nothing else accumulates


# -- the pass on a model ---------------------------------------------------------------------------


def brute_force(lm, tc, text_file, context, max_tokens):
    """All activations of every context at once `[L, N, T - 1, F]` and the context tokens
    `[N, T]`."""
    from transcoders.data import harvest, text_source, token_sequences

    paras = text_source(f"file:{text_file}", lm, "train", gen_samples=0)
    seqs = list(token_sequences(lm, paras, context))[: max_tokens // context]
    ids = torch.stack(seqs)
    x, _ = harvest(lm, ids, drop_bos=False)
    x = x.reshape(len(seqs), context, tc.n_layers, -1)
    acts = torch.stack([tc.encode(l, x[:, 1:, l]) for l in range(tc.n_layers)]).detach()
    return acts, ids


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_dashboards_hold_the_true_top_contexts(tmp_path, text_file, kind):
    lm, tc = setup(kind)
    opts = small(text_file, tmp_path / "d")
    d = load_dashboards(build_dashboards(lm, tc, **opts))
    acts, ids = brute_force(lm, tc, text_file, opts["context"], opts["max_tokens"])
    L, N, T1, Fe = acts.shape
    assert d.meta["tokens_seen"] == N * T1 and d.meta["n_contexts"] == N
    peak = acts.amax(2)  # [L, N, F]
    torch.testing.assert_close(d.t["n_active"], (acts > 0).sum((1, 2)), rtol=0, atol=0)
    torch.testing.assert_close(d.t["max_act"], peak.amax(1), rtol=1e-5, atol=1e-6)
    counts = torch.bincount(ids[:, 1:].flatten(), minlength=lm.sites.vocab_size)
    assert torch.equal(d.t["token_counts"], counts)
    checked = 0
    for l in range(L):
        for f in range(Fe):
            vals, order = torch.sort(peak[l, :, f], descending=True, stable=True)
            k = opts["k"]
            torch.testing.assert_close(d.t["top_acts"][l, f], vals[:k], rtol=1e-5, atol=1e-6)
            gaps = (vals[:k] - vals[1 : k + 1]).abs()
            for j in range(k):  # where the ranking is unambiguous, the very same contexts
                if vals[j] > 0 and gaps[j] > 1e-4 and (j == 0 or (vals[j - 1] - vals[j]) > 1e-4):
                    assert int(d.t["top_context"][l, f, j]) == int(order[j])
                    p = int(acts[l, order[j], :, f].argmax())
                    lo = max(0, p - opts["before"])
                    window = ids[order[j], 1:][lo : p + opts["after"] + 1].tolist()
                    stored = d.t["window_tokens"][l, f, j]
                    assert stored[stored >= 0].tolist() == window
                    checked += 1
    assert checked > L * Fe  # most slots were checked


def test_output_tokens_are_decoder_times_final_gain_times_unembedding():
    lm, tc = setup("clt")
    layer, feats = 0, torch.tensor([2, 5, 11])
    pid, pval, sid, sval = output_tokens(tc, lm, layer, feats, n=5)
    W_U, gain = lm.sites.lm_head.weight.detach(), 1 + lm.sites.final_norm.weight.detach()
    for row, f in enumerate(feats.tolist()):
        v = W_U @ (tc.W_dec[layer][f].detach().sum(0) * gain)
        v = v - v.mean()
        assert pid[row].tolist() == v.argsort(descending=True)[:5].tolist()
        assert sid[row].tolist() == v.argsort()[:5].tolist()
        torch.testing.assert_close(
            pval[row], v.sort(descending=True).values[:5], rtol=1e-4, atol=1e-5
        )


def test_killed_run_resumes_to_the_same_result(tmp_path, text_file, monkeypatch):
    lm, tc = setup("plt")
    whole = load_dashboards(build_dashboards(lm, tc, **small(text_file, tmp_path / "whole")))
    import transcoders.dashboards as dashboards

    real, calls = dashboards._mlp_inputs, {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt  # a kill in the middle of the pass
        return real(*a, **kw)

    monkeypatch.setattr(dashboards, "_mlp_inputs", dying)
    opts = small(text_file, tmp_path / "resumed", checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        build_dashboards(lm, tc, **opts)
    ckpt = json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())
    assert ckpt["batches_done"] == 6
    with pytest.raises(UserError, match="unfinished"):
        load_dashboards(tmp_path / "resumed")
    calls["n"] = -(10**9)
    resumed = load_dashboards(build_dashboards(lm, tc, **opts))
    assert calls["n"] == -(10**9) + 20 - 6  # only the batches after the checkpoint were run again
    for name, t in whole.t.items():
        assert torch.equal(t, resumed.t[name]), name
    assert not (tmp_path / "resumed" / "checkpoint.json").exists()


def test_other_settings_are_refused_and_restart_rebuilds(tmp_path, text_file):
    lm, tc = setup("plt")
    out = build_dashboards(lm, tc, **small(text_file, tmp_path / "d"))
    # complete: nothing to do
    assert build_dashboards(lm, tc, **small(text_file, tmp_path / "d")) == out
    with pytest.raises(UserError, match="other settings"):
        build_dashboards(lm, tc, **small(text_file, tmp_path / "d", k=5))
    other = random_transcoders(lm.sites.n_layers, lm.sites.d_model, 24, seed=99)
    with pytest.raises(UserError, match="other settings or transcoders"):
        build_dashboards(lm, other, **small(text_file, tmp_path / "d"))
    d = load_dashboards(
        build_dashboards(lm, tc, **small(text_file, tmp_path / "d", k=5, restart=True))
    )
    assert d.t["top_acts"].shape[-1] == 5


def test_attach_dashboards_to_a_graph_and_round_trip(tmp_path, text_file):
    lm, tc = setup("plt")
    d = load_dashboards(build_dashboards(lm, tc, **small(text_file, tmp_path / "d")))
    g = attribute(lm, "the big red house", transcoders=tc, progress=False)
    assert attach_dashboards(g, d, n_contexts=3) == len(g.nodes_of(FEATURE))
    i = g.nodes_of(FEATURE)[0]
    entry = g.dashboards[g.node_id(i)]
    assert set(entry) >= {
        "density",
        "max_activation",
        "top_contexts",
        "top_promoted",
        "top_suppressed",
        "auto_label",
    }
    layer, f = int(g.layer[i]), int(g.feature[i])
    assert entry["density"] == pytest.approx(int(d.t["n_active"][layer, f]) / d.meta["tokens_seen"])
    assert len(entry["top_contexts"]) <= 3 and all(
        len(c["tokens"]) == len(c["acts"]) for c in entry["top_contexts"]
    )
    assert (
        entry["top_promoted"][0][1] >= entry["top_promoted"][-1][1] > entry["top_suppressed"][0][1]
    )
    g.save(tmp_path / "g.npz")
    back = load_graph(tmp_path / "g.npz")
    assert back.dashboards == json.loads(json.dumps(g.dashboards))
    small_graph = back.subgraph(np.array([i] + list(back.logit_nodes)))
    assert g.node_id(i) in small_graph.dashboards
    wrong = random_transcoders(lm.sites.n_layers, lm.sites.d_model, 40, seed=3)
    g2 = attribute(lm, "the big red house", transcoders=wrong, progress=False)
    with pytest.raises(UserError, match="describe"):
        attach_dashboards(g2, d)


def ctx(*pairs):
    """A hand-made top context: (token, activation) pairs."""
    return {"tokens": [t for t, _ in pairs], "acts": [a for _, a in pairs]}


def test_auto_label_quotes_a_consistent_peak_and_its_phrase():
    jordan = [ctx((" Michael", 0.1), (" Jordan", 3.0), (" scored", 1.0)) for _ in range(3)]
    other = [ctx((" Air", 0.0), (" Jordan", 2.0)), ctx((" the", 0.4), (" river", 1.5))]
    outputs = [[" basketball", 3.0], [" NBA", 2.0], [".", 1.0]]
    assert auto_label(jordan + other, outputs) == '"Michael Jordan" → basketball'
    assert auto_label(jordan + other, outputs, width=40) == '"Michael Jordan" → basketball, NBA'
    # the token before the peak differs every time: the token alone
    varied = [ctx((f" w{i}", 0.0), (" Jordan", 2.0)) for i in range(4)]
    assert auto_label(varied, outputs) == '"Jordan" → basketball, NBA'
    assert auto_label(varied[:1], outputs) == '"Jordan" → basketball, NBA'  # one context


def test_auto_label_of_mixed_peaks_lists_the_most_common():
    contexts = [
        ctx(("a", 0.0), (" cat", 2.0), ("!", 1.0)),
        ctx((" dog", 3.0), ("s", 0.5)),
        ctx(("x", 0.1), (" cat", 0.2)),
        ctx((" red", 1.0)),
        ctx((" sun", 1.0)),
    ]
    assert auto_label(contexts, [[" Paris", 2.0], [" France", 1.0]]) == "cat/dog… → Paris, France"
    assert auto_label(contexts[:2], [[" Paris", 2.0]]) == "cat/dog → Paris"  # all shown: no …


def test_auto_label_cleans_tokens_and_prefers_words():
    newline = [ctx((f"w{i}", 0.0), ("\n", 2.0)) for i in range(3)]
    outputs = [[",", 3.0], ["\n", 2.5], ["", 2.0], [" Paris", 1.0], ["Paris", 0.9], [" paris", 0.8]]
    assert auto_label(newline, outputs) == '"⏎" → Paris'  # punctuation, empty, repeats skipped
    assert auto_label(newline, [[",", 1.0], [".", 0.5]]) == '"⏎" → , .'  # nothing better left
    pieces = [["ulsory", 3.0], [" mandatory", 2.0], ["ée", 1.5], [" required", 1.0]]
    assert auto_label([], pieces) == "→ mandatory, required, ulsory"  # word starts first
    assert auto_label([ctx(("  ", 1.0))], [["\tdef", 1.0]]) == '"␣" → ⇥def'


def test_auto_label_without_contexts_or_outputs():
    assert auto_label([], [[" dog", 1.0], [" cat", 0.5]]) == "→ dog, cat"  # fired, no contexts
    assert auto_label([], []) == "(never fired)"  # a dead feature
    assert auto_label([ctx((" dog", 1.0))], []) == '"dog"'
    assert auto_label([{"tokens": [], "acts": []}], [[" dog", 1.0]]) == "→ dog"


def test_auto_label_truncates_long_tokens_to_the_width():
    long_in, long_out = [ctx(("x" * 50, 1.0))], [["y" * 50, 1.0], ["z", 0.5]]
    for width in (16, 24, 32):
        label = auto_label(long_in, long_out, width=width)
        assert len(label) == width and label.startswith('"xxx') and label.endswith("y…")
        assert '…" → ' in label
    assert len(auto_label([], long_out)) == 32
    assert auto_label(long_in, []) == '"' + "x" * 29 + '…"'


def test_dashboards_feature_labels_from_all_stored_contexts(tmp_path, text_file):
    lm, tc = setup("plt")
    d = load_dashboards(build_dashboards(lm, tc, **small(text_file, tmp_path / "d")))
    layer, f = map(int, torch.nonzero(d.t["n_active"])[0])
    full, short = d.feature(layer, f), d.feature(layer, f, n_contexts=1, n_tokens=2)
    assert len(short["top_contexts"]) == 1 and len(short["top_promoted"]) == 2
    everything = d.feature(layer, f, n_contexts=99, n_tokens=99)
    assert short["auto_label"] == full["auto_label"]
    assert full["auto_label"] == auto_label(
        everything["top_contexts"], everything["top_promoted_in_text"]
    )
    # the promoted tokens in the text: the promoted tokens that the text holds, in the same order
    seen = {d._s(i) for i in torch.nonzero(d.t["token_counts"]).flatten().tolist()}
    held = [p for p in everything["top_promoted"] if p[0] in seen]
    assert everything["top_promoted_in_text"][: len(held)] == held
    assert d.identity == d.meta["transcoders"] == transcoder_identity(tc)


# -- output tokens found through a low-precision screen -------------------------------------------


@pytest.mark.parametrize("largest", [True, False])
def test_most_extreme_by_blocks_equals_topk(largest):
    g = torch.Generator().manual_seed(5)
    v = torch.randn(9, 64 * 256, generator=g)  # float32: no ties
    values, ids = _most_extreme(v, 20, largest)
    top = v.topk(20, dim=1, largest=largest)
    assert torch.equal(values, top.values) and torch.equal(ids, top.indices)


def test_screened_output_tokens_equal_the_float32_ones(monkeypatch):
    g = torch.Generator().manual_seed(6)
    W_U, d = torch.randn(20000, 48, generator=g), torch.randn(37, 48, generator=g)
    exact = _extremes(d, W_U, 10)
    screened = _screened_extremes(d, W_U, UnembeddingScreen.of(W_U), 10)
    for a, b in zip(screened, exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # a screen that hides every row's best token: its error bound says so, and those rows are
    # scored exactly
    import transcoders.dashboards as dashboards

    wrong, redone = W_U.clone(), []
    wrong[exact[0][:, 0]] *= -1
    monkeypatch.setattr(
        dashboards, "_extremes", lambda d, *a: redone.append(len(d)) or _extremes(d, *a)
    )
    screened = _screened_extremes(d, W_U, UnembeddingScreen.of(W_U, wrong.bfloat16()), 10)
    assert redone == [37]
    for a, b in zip(screened, exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_allowed", [3, 500])
def test_screened_promoted_tokens_among_allowed_ones(n_allowed):
    g = torch.Generator().manual_seed(7)
    W_U, d = torch.randn(4096, 32, generator=g), torch.randn(21, 32, generator=g)
    allowed = torch.zeros(4096, dtype=torch.bool)
    allowed[torch.randperm(4096, generator=g)[:n_allowed]] = True
    exact = _extremes(d, W_U, 5, allowed)
    screened = _screened_extremes(d, W_U, UnembeddingScreen.of(W_U), 5, allowed)
    assert len(exact) == len(screened) == 6
    want = (d @ W_U.T).masked_fill(~allowed, -float("inf")).topk(5, dim=1)
    assert torch.equal(exact[4], want.indices)
    torch.testing.assert_close(screened[5], exact[5], rtol=1e-5, atol=1e-5)
    found = screened[5].isfinite()
    assert torch.equal(screened[4][found], exact[4][found])
    assert bool(allowed[screened[4][found]].all())
    assert int(found.sum()) == 21 * min(5, n_allowed)


def test_output_tokens_in_text_mark_missing_ones():
    lm, tc = setup("plt")
    allowed = torch.zeros(lm.sites.vocab_size, dtype=torch.bool)
    allowed[[3, 9, 40]] = True
    out = output_tokens(tc, lm, 1, torch.arange(6), n=5, allowed=allowed)
    assert len(out) == 6
    ids, values = out[4], out[5]
    assert set(ids[:, :3].flatten().tolist()) <= {3, 9, 40}
    assert (ids[:, 3:] == -1).all() and (values[:, 3:] == 0).all()
    assert torch.equal(out[0], output_tokens(tc, lm, 1, torch.arange(6), n=5)[0])


def test_built_dashboards_hold_the_exact_output_tokens(tmp_path, text_file):
    lm, tc = setup("clt")
    d = load_dashboards(build_dashboards(lm, tc, **small(text_file, tmp_path / "d")))
    for l in range(tc.n_layers):
        alive = torch.nonzero(d.t["n_active"][l]).flatten()
        pid, pval, sid, sval = output_tokens(tc, lm, l, alive, n=10)
        assert d.t["promoted_ids"][l, alive].tolist() == pid.tolist()
        assert d.t["suppressed_ids"][l, alive].tolist() == sid.tolist()
        torch.testing.assert_close(d.t["promoted_values"][l, alive], pval, rtol=1e-4, atol=1e-5)


def test_bfloat16_harvesting_finds_nearly_the_same_contexts(tmp_path, text_file):
    """The default harvests with a bfloat16 copy of the model: the top contexts it finds are
    those of float32 activations but for near ties."""
    lm, tc = setup("plt")
    runs = {
        dtype: load_dashboards(
            build_dashboards(lm, tc, **small(text_file, tmp_path / dtype, harvest_dtype=dtype))
        )
        for dtype in ("float32", "bfloat16")
    }
    a, b = (runs[k].t for k in ("float32", "bfloat16"))
    assert runs["bfloat16"].meta["settings"]["harvest_dtype"] == "bfloat16"
    same = total = 0
    for l in range(tc.n_layers):
        for f in range(tc.d_sae):
            x, y = set(a["top_context"][l, f].tolist()), set(b["top_context"][l, f].tolist())
            same, total = same + len(x & y), total + len(x)
    assert same / total > 0.8
    torch.testing.assert_close(b["max_act"], a["max_act"], rtol=0.05, atol=0.05)
    assert set(runs["bfloat16"].meta["stage_seconds"]) >= {"forward", "encode", "merge", "text"}


def test_cli_builds_dashboards_next_to_native_transcoders(tmp_path, text_file, monkeypatch):
    from transcoders.cli import run
    from transcoders.formats import save_native

    lm, tc = setup("plt")
    save_native(tc, tmp_path / "tc")
    serve_model(monkeypatch, lm)
    argv = [
        "dashboards",
        "--transcoders",
        str(tmp_path / "tc"),
        "--text",
        f"file:{text_file}",
        "--k",
        "3",
        "--context",
        "24",
        "--max-tokens",
        "960",
        "--no-progress",
    ]
    assert run(argv) == 0
    d = load_dashboards(tmp_path / "tc" / "dashboards")
    assert d.t["top_acts"].shape == (lm.sites.n_layers, 24, 3)
    assert run(argv[:-1] + ["--k", "0"]) == 2  # a UserError, one line


@pytest.mark.slow
def test_real_model_dashboards_decode_real_tokens(real_model, tmp_path, text_file):
    lm = real_model
    tc = random_transcoders(lm.sites.n_layers, lm.sites.d_model, 16, activation="topk", k=2, seed=2)
    d = load_dashboards(
        build_dashboards(
            lm, tc, **small(text_file, tmp_path / "d", context=32, max_tokens=256, batch=4)
        )
    )
    assert d.meta["tokens_seen"] == 8 * 31
    layer, f = map(int, torch.nonzero(d.t["n_active"])[0])
    entry = d.feature(layer, f)
    source = text_file.read_text()
    assert entry["top_contexts"]
    for c in entry[
        "top_contexts"
    ]:  # windows are pieces of the text (paragraphs are packed in shuffled order)
        assert all(piece in source for piece in "".join(c["tokens"]).split("\n\n"))
    ids = d.t["promoted_ids"][layer, f].tolist()
    assert [s for s, _ in entry["top_promoted"]] == [lm.tokenizer.decode([i]) for i in ids]
