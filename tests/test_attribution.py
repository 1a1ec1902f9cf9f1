"""Attribution graphs: completeness per node, edges against an independent reference and against
finite differences in the frozen model, batching invariance, influence ordering, logit node choice,
and one clear error per kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.attribution import AttributionConfig, RowStore, attribute
from circuits.backend import _ext, feature_edges_torch
from circuits.graph import ERROR, FEATURE, LOGIT, TOKEN, load_graph
from circuits.replacement import FrozenWeights, TransposedModel, frozen_forward, run_and_freeze
from gemma_lm.errors import UserError
from gemma_lm.testing import tiny_model
from transcoders.testing import random_transcoders

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _setup(kind="skip", seed=0, d_sae=96, l0=6, **config):
    lm = tiny_model(seed=seed, **config)
    s = lm.sites
    return lm, random_transcoders(s.n_layers, s.d_model, d_sae, kind=kind, seed=seed + 1, l0=l0)


def _trace(lm, tc, prompt=PROMPT, **options):
    return attribute(lm, prompt, transcoders=tc, progress=False, **options)


def _completeness_error(graph) -> np.ndarray:
    """|incoming edges + constant - input| relative to |input| for every computed row."""
    rows = np.flatnonzero(graph.has_row)
    adj = graph.adjacency.astype(np.float64)
    total = np.asarray(adj.sum(axis=1)).ravel()[rows] + graph.row_constant[rows]
    return np.abs(total - graph.node_input[rows]) / np.maximum(np.abs(graph.node_input[rows]), 1e-2)


class Frozen:
    """The frozen model of a graph's prompt, for reference computations."""

    @torch.no_grad()
    def __init__(self, lm, tc, graph):
        self.lm, self.tc, self.graph = lm, tc, graph
        self.state = run_and_freeze(lm, torch.as_tensor(graph.tokens))
        self.fw = FrozenWeights(lm)
        L = tc.n_layers
        self.acts = [tc.encode(l, self.state.mlp_in[l]).float() for l in range(L)]
        if not graph.metadata["settings"][
            "bos_features"
        ]:  # <bos>'s MLP outputs are its error nodes
            for a in self.acts:
                a[0] = 0.0
        self.errors = self.state.mlp_out - tc.decode(self.acts, self.state.mlp_in).float()

    def target(self, i: int):
        """(layer, pos, vector) that node i reads."""
        g = self.graph
        if g.kind[i] == LOGIT:
            j = int(np.flatnonzero(g.logit_nodes == i)[0])
            contrast = g.metadata["contrast_token"]
            return (
                g.n_layers,
                g.n_pos - 1,
                self.fw.logit_directions([int(g.logit_tokens[j])], contrast)[0],
            )
        return (
            int(g.layer[i]),
            int(g.pos[i]),
            self.tc.W_enc[int(g.layer[i])][:, int(g.feature[i])].float(),
        )

    def input_of(self, i: int, out: dict) -> float:
        layer, pos, vec = self.target(i)
        if self.graph.kind[i] == LOGIT:
            return float(out["final"] @ vec)
        return float(out["preacts"][layer][pos, int(self.graph.feature[i])])

    @torch.no_grad()
    def reference_row(self, i: int) -> np.ndarray:
        """Node i's incoming edges from full gradients and the backend's reference contraction."""
        g, tc, st = self.graph, self.tc, self.state
        layer, pos, vec = self.target(i)
        G = TransposedModel(st, self.fw, tc).full_gradients(
            torch.tensor([layer]), torch.tensor([pos]), vec[None]
        )
        row = np.zeros(g.n_nodes)
        for s in range(tc.n_layers):
            cols = np.flatnonzero((g.kind == FEATURE) & (g.layer == s))
            if len(cols):
                n_out = len(tc.output_layers(s))
                e = feature_edges_torch(
                    G[:, s + 1 : s + 1 + n_out],
                    torch.as_tensor(g.pos[cols]).long(),
                    torch.as_tensor(g.feature[cols]),
                    torch.as_tensor(g.activation[cols]),
                    tc.decoder_weight(s),
                )
                row[cols] = e[0].numpy()
        row[g.kind == ERROR] = (G[0, 1:] * self.errors).sum(-1).flatten().numpy()
        row[g.kind == TOKEN] = (G[0, 0] * st.embeddings).sum(-1).numpy()
        return row


@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
@pytest.mark.parametrize(
    "config,budget",
    [({}, None), ({"softcap": 5.0}, None), ({}, 40), ({"n_heads": 4, "n_kv_heads": 2}, 25)],
)
def test_completeness_per_node(kind, config, budget):
    lm, tc = _setup(kind, **config)
    options = {} if budget is None else {"max_feature_nodes": budget, "batch_size": 16}
    graph = _trace(lm, tc, **options)
    n_feat = int((graph.kind == FEATURE).sum())
    assert n_feat > 100
    assert graph.has_row[graph.kind == FEATURE].sum() == min(n_feat, budget or n_feat)
    assert (
        graph.has_row[graph.kind == LOGIT].all()
        and not graph.has_row[(graph.kind == ERROR) | (graph.kind == TOKEN)].any()
    )
    assert _completeness_error(graph).max() < 1e-4


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("kind,budget", [("plt", None), ("skip", 30), ("clt", None), ("clt", 30)])
def test_edges_equal_the_reference(monkeypatch, backend, kind, budget):
    if backend == "cpp" and _ext is None:
        pytest.skip("the compiled edge kernel is not built")
    monkeypatch.setenv("GEMMA_CIRCUITS_BACKEND", backend)
    lm, tc = _setup(kind, n_heads=4, n_kv_heads=2)
    graph = _trace(
        lm, tc, **({} if budget is None else {"max_feature_nodes": budget, "batch_size": 7})
    )
    assert backend in graph.metadata["edge_backend"]
    ref = Frozen(lm, tc, graph)
    rows = np.flatnonzero(graph.has_row)
    rng = np.random.default_rng(0)
    for i in np.r_[
        graph.logit_nodes, rng.choice(rows[graph.kind[rows] == FEATURE], 8, replace=False)
    ]:
        expected = ref.reference_row(int(i))
        got = graph.adjacency[[int(i)]].toarray()[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "kind,batch_size,budget", [("skip", 256, None), ("clt", 7, None), ("skip", 16, 80)]
)
def test_graph_on_the_gpu_equals_the_cpu(kind, batch_size, budget):
    """The whole attribution on a CUDA device (the cuda edge kernels where built; rows compacted in
    the background) gives the CPU's graph; with a budget, rows in influence order, re-ranked from
    the rows so far."""
    lm, tc = _setup(kind, n_heads=4, n_kv_heads=2)
    options = {"batch_size": batch_size, **({"max_feature_nodes": budget} if budget else {})}
    cpu = _trace(lm, tc, **options)
    lm.model.to("cuda")
    gpu = _trace(lm, tc, **options)
    assert gpu.metadata["device"].startswith("cuda")
    assert (gpu.has_row == cpu.has_row).all() and (gpu.logit_tokens == cpu.logit_tokens).all()
    if budget:
        assert gpu.metadata["row_order"] == "influence" and gpu.metadata["n_feature_rows"] == budget
    a, b = gpu.adjacency.toarray(), cpu.adjacency.toarray()
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max())
    assert _completeness_error(gpu).max() < 1e-3


@pytest.mark.parametrize("kind", ["skip", "clt"])
@torch.no_grad()
def test_edges_are_finite_difference_effects(kind):
    """Scaling a source by (1 + d) in the frozen model moves each target's input by d x the edge."""
    lm, tc = _setup(kind, softcap=5.0)
    graph = _trace(lm, tc, max_n_logits=3, desired_logit_prob=1.0)
    ref = Frozen(lm, tc, graph)
    base = frozen_forward(ref.state, ref.fw, tc, ref.acts, ref.errors)
    rng = np.random.default_rng(1)
    d = 0.5
    adj = graph.adjacency.tocsr()
    targets = np.r_[
        graph.logit_nodes[:2],
        rng.choice(np.flatnonzero((graph.kind == FEATURE) & (graph.layer >= 1)), 4),
    ]
    checked = {FEATURE: 0, ERROR: 0, TOKEN: 0}
    for t in targets:
        row = adj[[int(t)]]
        for want in (FEATURE, ERROR, TOKEN):
            candidates = row.indices[graph.kind[row.indices] == want]
            if not len(candidates):
                continue
            # the strongest edge
            s = int(candidates[np.argmax(np.abs(row.toarray()[0][candidates]))])
            acts, errors, emb = (
                [a.clone() for a in ref.acts],
                ref.errors.clone(),
                ref.state.embeddings.clone(),
            )
            l, p = int(graph.layer[s]), int(graph.pos[s])
            if want == FEATURE:
                acts[l][p, int(graph.feature[s])] *= 1 + d
            elif want == ERROR:
                errors[l, p] *= 1 + d
            else:
                emb[p] *= 1 + d
            moved = frozen_forward(ref.state, ref.fw, tc, acts, errors, embeddings=emb)
            effect = (ref.input_of(int(t), moved) - ref.input_of(int(t), base)) / d
            edge = float(adj[int(t), s])
            assert effect == pytest.approx(
                edge, rel=1e-3, abs=1e-4 * max(1.0, abs(graph.node_input[t]))
            )
            checked[want] += 1
    assert min(checked.values()) >= 2


def test_rows_do_not_depend_on_batching():
    lm, tc = _setup("skip")
    full = _trace(lm, tc)
    tiny_batches = _trace(lm, tc, batch_size=3)
    by_influence = _trace(
        lm, tc, max_feature_nodes=int((full.kind == FEATURE).sum()) - 1, batch_size=11
    )
    assert (
        full.metadata["row_order"] == "position"
        and by_influence.metadata["row_order"] == "influence"
    )
    for other in (tiny_batches, by_influence):
        rows = np.flatnonzero(other.has_row)
        a, b = full.adjacency[rows].toarray(), other.adjacency[rows].toarray()
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
        np.testing.assert_allclose(
            other.row_constant[rows], full.row_constant[rows], rtol=1e-5, atol=1e-5
        )


def test_influence_ordering_picks_the_strongest_features_first():
    lm, tc = _setup("plt")
    full = _trace(lm, tc)
    budget = 30
    partial = _trace(lm, tc, max_feature_nodes=budget, batch_size=10)
    # the influence estimate of the rows computed so far equals the series sum on their matrix
    store = RowStore(full.n_nodes, int((full.kind != LOGIT).sum()))
    rows = np.flatnonzero(full.has_row)
    order = np.argsort(-full.layer[rows], kind="stable")
    n_src = store.n_src
    store.add(
        rows[order],
        full.layer[rows][order],
        torch.as_tensor(full.adjacency[rows[order]][:, :n_src].toarray()),
        torch.as_tensor(full.row_constant[rows[order]]),
    )
    estimate = store.influence(full.logit_nodes, full.logit_probabilities)
    a = abs(full.adjacency).astype(np.float64).toarray()
    a /= np.maximum(a.sum(1, keepdims=True), 1e-30)
    w = np.zeros(full.n_nodes)
    w[full.logit_nodes] = full.logit_probabilities / full.logit_probabilities.sum()
    exact = np.linalg.solve((np.eye(full.n_nodes) - a).T, w) - w
    np.testing.assert_allclose(estimate, exact, rtol=1e-6, atol=1e-12)
    # the first batch after the logits is the top of the logit rows' influence
    direct = w @ a
    chosen = np.flatnonzero(partial.has_row & (partial.kind == FEATURE))
    top = np.argsort(-direct[: int((full.kind == FEATURE).sum())])[:10]
    assert set(top) <= set(chosen)
    assert len(chosen) == budget


def test_row_store_in_the_background_equals_the_foreground():
    """The GPU's path (compaction on a worker thread while the next batch runs), here on the CPU:
    the same segments, influence and adjacency, rows added in batches; a failing batch raises at the
    next call."""
    lm, tc = _setup("plt")
    full = _trace(lm, tc)
    n_src = int((full.kind != LOGIT).sum())
    rows = np.flatnonzero(full.has_row)
    stores = [RowStore(full.n_nodes, n_src), RowStore(full.n_nodes, n_src, background=True)]
    for store in stores:
        for batch in np.array_split(rows, 5):
            batch = batch[np.argsort(-full.layer[batch], kind="stable")]
            store.add(
                batch,
                full.layer[batch],
                torch.as_tensor(full.adjacency[batch][:, :n_src].toarray()),
                torch.as_tensor(full.row_constant[batch]),
            )
    fore, back = stores
    np.testing.assert_array_equal(
        back.influence(full.logit_nodes, full.logit_probabilities),
        fore.influence(full.logit_nodes, full.logit_probabilities),
    )
    a, b = fore.adjacency(), back.adjacency()
    assert (a != b).nnz == 0 and a.nnz == full.adjacency.nnz
    np.testing.assert_array_equal(back.row_constant, full.row_constant)
    assert back._worker is None  # adjacency() ends the worker
    broken = RowStore(full.n_nodes, n_src, background=True)
    # const of 3 rows for 2
    broken.add(rows[:2], full.layer[rows[:2]], torch.zeros(2, n_src + 1), torch.zeros(3))
    with pytest.raises(ValueError):
        broken.influence(full.logit_nodes, full.logit_probabilities)
    broken.close()


def test_logit_nodes_by_cumulative_probability():
    lm, tc = _setup("plt", softcap=5.0)  # a flat distribution: many tokens needed
    state = run_and_freeze(lm, lm.tokenize(PROMPT))
    probs = torch.softmax(state.logits, -1).sort(descending=True).values.numpy()
    for desired in (0.05, 0.1, 0.2):
        graph = _trace(lm, tc, desired_logit_prob=desired, max_feature_nodes=0)
        k = int(np.searchsorted(np.cumsum(probs), desired) + 1)
        assert len(graph.logit_nodes) == min(k, 10)
        np.testing.assert_allclose(
            np.sort(graph.logit_probabilities)[::-1], probs[: len(graph.logit_nodes)], rtol=1e-5
        )
    assert len(_trace(lm, tc, desired_logit_prob=1.0, max_feature_nodes=0).logit_nodes) == 10
    assert (
        len(_trace(lm, tc, desired_logit_prob=1.0, max_n_logits=4, max_feature_nodes=0).logit_nodes)
        == 4
    )


def test_named_targets_and_contrast():
    lm, tc = _setup("skip")
    st = run_and_freeze(lm, lm.tokenize(PROMPT))
    fw = FrozenWeights(lm)
    raw = fw.W_U @ (st.resid[-1, -1] * st.s_final[-1] * fw.g_final)  # pre-cap logits
    ids = [lm.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("a", "b")]
    graph = _trace(lm, tc, targets=["a", "b"], max_feature_nodes=10)
    assert graph.logit_tokens.tolist() == ids
    np.testing.assert_allclose(
        graph.node_input[graph.logit_nodes], (raw[ids] - raw.mean()).numpy(), rtol=1e-4, atol=1e-4
    )
    diff = _trace(lm, tc, targets=["a"], contrast="b", max_feature_nodes=10)
    assert diff.logit_strings == ["a - b"] and diff.metadata["contrast_token"] == ids[1]
    assert diff.node_input[diff.logit_nodes[0]] == pytest.approx(
        float(raw[ids[0]] - raw[ids[1]]), rel=1e-4, abs=1e-4
    )
    assert _completeness_error(diff).max() < 1e-4


@pytest.mark.parametrize(
    "options,prompt,message",
    [
        ({}, "", "empty"),
        ({}, "x" * 300, "model's context"),
        ({"max_tokens": 8}, PROMPT, "max-tokens"),
        ({"targets": ["ab"]}, PROMPT, "not one"),
        ({"targets": ["a"], "contrast": "bc"}, PROMPT, "not one"),
        ({"contrast": "a"}, PROMPT, "needs a --target"),
        ({"targets": ["a", "b"], "contrast": "c"}, PROMPT, "exactly one --target"),
        ({"targets": ["a"], "contrast": "a"}, PROMPT, "same token"),
        ({"batch_size": 0}, PROMPT, "batch-size"),
        ({"desired_logit_prob": 0.0}, PROMPT, "desired-logit-prob"),
        ({"max_feature_nodes": -1}, PROMPT, "max-feature-nodes"),
    ],
)
def test_bad_input_is_one_clear_error(options, prompt, message):
    lm, tc = _setup("plt")
    with pytest.raises(UserError, match=message):
        _trace(lm, tc, prompt, **options)


def test_transcoders_of_another_model_are_refused():
    lm, _ = _setup("plt")
    for other in (random_transcoders(2, 64, 32), random_transcoders(3, 32, 32)):
        with pytest.raises(UserError, match="do not fit"):
            _trace(lm, other)
    with pytest.raises(TypeError, match="unknown option"):
        _trace(lm, random_transcoders(3, 64, 32), max_nodes=3)


def test_graph_metadata_and_round_trip(tmp_path):
    lm, tc = _setup("clt")
    graph = _trace(lm, tc, max_feature_nodes=50, batch_size=20)
    m = graph.metadata
    assert m["model"] == lm.name and m["transcoders"]["kind"] == "clt"
    assert (
        m["n_feature_rows"] == 50 and m["row_order"] == "influence" and m["n_feature_batches"] >= 3
    )
    assert m["settings"]["max_feature_nodes"] == 50 and set(m["timing_s"]) >= {
        "load",
        "forward",
        "attribution",
    }
    assert len(graph.token_strings) == graph.n_pos and graph.token_strings[0] == "<bos>"
    assert graph.adjacency[:, graph.logit_nodes].nnz == 0  # logits are sinks
    graph.save(tmp_path / "g.npz")
    back = load_graph(tmp_path / "g.npz")
    assert (back.adjacency != graph.adjacency).nnz == 0 and back.metadata == m
    np.testing.assert_array_equal(back.row_constant, graph.row_constant)


def test_edges_only_run_forward_in_layers_and_positions():
    lm, tc = _setup("skip")
    graph = _trace(lm, tc)
    coo = graph.adjacency.tocoo()
    src, tgt = coo.col, coo.row
    feature_src = graph.kind[src] == FEATURE
    assert (graph.layer[src][feature_src] < graph.layer[tgt][feature_src]).all()
    error_src = graph.kind[src] == ERROR
    assert (graph.layer[src][error_src] < graph.layer[tgt][error_src]).all()
    assert (graph.pos[src] <= graph.pos[tgt]).all()


def test_memory_bound_limits_the_batch():
    lm, tc = _setup("plt")
    small = _trace(lm, tc, memory_gb=0.0005)
    assert 1 <= small.metadata["batch_size_used"] < 256
    assert _completeness_error(small).max() < 1e-4


def test_bfloat16_model():
    lm = tiny_model(seed=0, dtype=torch.bfloat16)
    tc = random_transcoders(3, 64, 96, kind="skip", seed=1, l0=6)
    graph = attribute(lm, PROMPT, transcoders=tc, progress=False, dtype="bfloat16")
    assert graph.metadata["dtype"] == "bfloat16"
    # exact with respect to the frozen (float32) replacement model of the bfloat16 forward pass
    assert _completeness_error(graph).max() < 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_real_model_graph_is_complete_and_linear(real_model):
    lm = real_model
    s = lm.sites
    tc = random_transcoders(
        s.n_layers, s.d_model, 512, kind="skip", seed=0, l0=12, model_name=lm.name
    )
    graph = _trace(
        lm, tc, "Fact: Michael Jordan plays the sport of", max_feature_nodes=128, batch_size=64
    )
    assert graph.logit_strings[0] == " basketball"
    assert _completeness_error(graph).max() < 1e-4
    ref = Frozen(lm, tc, graph)
    out = frozen_forward(ref.state, ref.fw, tc, ref.acts, ref.errors)
    assert (out["logits"] - ref.state.logits).abs().max() < 1e-4
    t = int(graph.logit_nodes[0])
    row = graph.adjacency[[t]]
    s_ = int(row.indices[np.argmax(np.abs(row.data) * (graph.kind[row.indices] == FEATURE))])
    acts = [a.clone() for a in ref.acts]
    acts[int(graph.layer[s_])][int(graph.pos[s_]), int(graph.feature[s_])] *= 2
    moved = frozen_forward(ref.state, ref.fw, tc, acts, ref.errors)
    assert ref.input_of(t, moved) - ref.input_of(t, out) == pytest.approx(
        float(graph.adjacency[t, s_]), rel=1e-3
    )


@pytest.mark.slow
def test_default_transcoders_graph_is_complete(real_model, default_transcoders):
    graph = attribute(
        real_model,
        "The capital of the state containing Dallas is",
        transcoders=default_transcoders,
        progress=False,
        max_feature_nodes=256,
    )
    assert graph.metadata["n_feature_rows"] == min(256, int((graph.kind == FEATURE).sum()))
    assert _completeness_error(graph).max() < 1e-4


def test_config_object_and_overrides_do_not_mutate_each_other():
    lm, tc = _setup("plt")
    cfg = AttributionConfig(max_feature_nodes=5, progress=False)
    graph = attribute(lm, PROMPT, transcoders=tc, config=cfg, batch_size=2)
    assert cfg.batch_size == 256 and graph.metadata["settings"]["batch_size"] == 2


@pytest.mark.parametrize("threads", [1, 2])
def test_attribution_leaves_the_thread_settings_as_it_found_them(threads):
    """Whatever thread counts the engine picks for its own work, the caller's process gets its own
    settings back: torch's intra-op threads, autograd's grad mode, and the default dtype."""
    lm, tc = _setup("clt")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        interop = torch.get_num_interop_threads()
        _trace(lm, tc, max_feature_nodes=20, batch_size=7)
        assert torch.get_num_threads() == threads
        assert torch.get_num_interop_threads() == interop
        assert torch.is_grad_enabled() and torch.get_default_dtype() == torch.float32
    finally:
        torch.set_num_threads(before)
