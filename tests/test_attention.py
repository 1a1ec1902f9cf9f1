"""QK attribution and head loadings: exact against the model's own attention and the graph's own
edges, finite differences in the frozen model, and one clear error per kind of bad request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import serve_model

from circuits.attention import (
    prompt_sources,
    qk,
    qk_of_sources,
    qk_text,
    qk_view,
    top_pairs,
)
from circuits.attribution import attribute
from circuits.cli import run
from circuits.graph import load_graph
from circuits.heads import head_loadings, loadings_text
from circuits.replacement import decode_sparse, frozen_forward
from gemma_lm.errors import UserError
from gemma_lm.testing import tiny_model
from transcoders.formats import save_native
from transcoders.testing import random_transcoders

PROMPT = "When Mary and John went to the store, John gave a drink to"
SHAPES = {
    "mqa": dict(),  # 2 query heads share 1 key/value head
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mha": dict(n_heads=2, n_kv_heads=2),
    "softcap": dict(softcap=5.0),
}


def _world(shape="mqa", kind="skip", seed=0):
    lm = tiny_model(seed=seed, **SHAPES[shape])
    s = lm.sites
    tc = random_transcoders(s.n_layers, s.d_model, 96, kind=kind, seed=seed + 1, l0=6)
    return lm, tc, attribute(lm, PROMPT, transcoders=tc, progress=False)


def _visible_key(lm, layer: int, query: int) -> int:
    """A key other than the query and <bos> that the layer's window still shows."""
    site = lm.sites.layers[layer]
    return query - 2 if site.is_sliding else 3


def _assert_exact(r, rel=1e-4):
    pairs_total = float((r.q_parts.double() @ r.k_parts.double().T).sum()) * r.scaling
    scale = max(abs(r.score), 1e-3)
    assert abs(pairs_total - r.score) / scale < rel
    assert abs(float(r.query_side.astype(np.float64).sum()) - r.score) / scale < rel
    assert abs(float(r.key_side.astype(np.float64).sum()) - r.score) / scale < rel
    assert abs(r.residual) / scale < rel
    assert r.pattern_error < 1e-5  # the rebuilt scores give the model's own attention row


@pytest.mark.parametrize("kind", ["skip", "clt", "plt"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_pairs_sum_to_the_score_on_every_layer(shape, kind):
    lm, tc, graph = _world(shape, kind)
    ps = prompt_sources(lm, tc, torch.as_tensor(graph.tokens), graph)
    n = graph.n_pos
    for layer in range(lm.sites.n_layers):  # sliding and global layers
        for head in range(lm.sites.n_heads):
            r = qk_of_sources(ps, PROMPT, layer, head, -1, _visible_key(lm, layer, n - 1))
            _assert_exact(r)
            assert r.kv_head == head // (lm.sites.n_heads // lm.sites.n_kv_heads)


@torch.no_grad()
def _frozen_score(ps, maps, head, i, j, scale_feature=None, scale_error=None, factor=1.0):
    """score(i, j) of the frozen model with one feature's activation (index into ActiveFeatures)
    or one error vector ((layer, pos)) scaled by `factor`; norm scales as recorded."""
    f, state, fw, tc = ps.features, ps.frozen.state, ps.frozen.weights, ps.frozen.transcoders
    act = f.activation.clone().float()
    if scale_feature is not None:
        act[scale_feature] *= factor
    errors = ps.errors.clone()
    if scale_error is not None:
        errors[scale_error] *= factor
    feature_out = decode_sparse(tc, f.layer, f.pos, f.feature, act, ps.frozen.n_pos, f.decoders)
    x = frozen_forward(
        state, fw, tc, None, errors, feature_out=feature_out, preacts=False, logits=False
    )["resid"][maps.layer]
    lm, s_in = ps.lm, state.s_in[maps.layer]
    kv = head // (lm.sites.n_heads // lm.sites.n_kv_heads)
    q = maps.query_map(lm, head, i, s_in) @ x[i]
    k = maps.keys(lm, kv, x[: j + 1], s_in[: j + 1])[j]
    return float(q @ k) * maps.scaling


@pytest.mark.parametrize("kind", ["skip", "clt"])
def test_finite_differences_match_each_sources_marginal(kind):
    lm, tc, graph = _world("gqa", kind)
    ps = prompt_sources(lm, tc, torch.as_tensor(graph.tokens), graph)
    layer, head, n = lm.sites.n_layers - 1, 3, graph.n_pos
    j = _visible_key(lm, layer, n - 1)
    r = qk_of_sources(ps, PROMPT, layer, head, -1, j)
    maps, eps = ps.head_maps[layer], 1e-2
    marginal = r.query_side + r.key_side
    # the features with the largest marginals (some on both sides), and an error node
    n_feat = len(r.source_ids) - (layer + 1) * n - 1
    checked = 0
    for s in np.argsort(-np.abs(marginal[:n_feat]))[:4]:
        feat = int(ps.sources(layer, n).features[s])
        up = _frozen_score(ps, maps, head, n - 1, j, scale_feature=feat, factor=1 + eps)
        down = _frozen_score(ps, maps, head, n - 1, j, scale_feature=feat, factor=1 - eps)
        fd = (up - down) / (2 * eps)  # exact for a score quadratic in the factor
        assert fd == pytest.approx(float(marginal[s]), rel=1e-3, abs=1e-4)
        checked += 1
    e = r.source_ids.index(f"e:0:{j}")
    up = _frozen_score(ps, maps, head, n - 1, j, scale_error=(0, j), factor=1 + eps)
    down = _frozen_score(ps, maps, head, n - 1, j, scale_error=(0, j), factor=1 - eps)
    assert (up - down) / (2 * eps) == pytest.approx(float(marginal[e]), rel=1e-3, abs=1e-4)
    assert checked == 4


def test_bos_as_key_and_the_query_itself():
    lm, tc, graph = _world()
    ps = prompt_sources(lm, tc, torch.as_tensor(graph.tokens), graph)
    global_layer = next(l for l, s in enumerate(lm.sites.layers) if not s.is_sliding)
    sink = qk_of_sources(ps, PROMPT, global_layer, 0, -1, 0)  # the attention sink
    _assert_exact(sink)
    assert sink.key_pos == 0 and sink.pattern_row[0] == pytest.approx(
        float(ps.frozen.state.patterns[global_layer, 0, -1, 0])
    )
    itself = qk_of_sources(ps, PROMPT, 0, 1, 5, 5)
    _assert_exact(itself)
    # no key: the one the head attends to most
    most = qk_of_sources(ps, PROMPT, global_layer, 1, -1, None)
    assert most.key_pos == int(np.argmax(most.pattern_row))


def test_versus_attributes_the_difference_of_two_scores():
    lm, tc, graph = _world("gqa")
    ps = prompt_sources(lm, tc, torch.as_tensor(graph.tokens), graph)
    layer = next(l for l, s in enumerate(lm.sites.layers) if not s.is_sliding)
    a = qk_of_sources(ps, PROMPT, layer, 2, -1, 3)
    b = qk_of_sources(ps, PROMPT, layer, 2, -1, 7)
    both = qk_of_sources(ps, PROMPT, layer, 2, -1, 3, versus=7)
    assert both.score == pytest.approx(a.score - b.score, rel=1e-5, abs=1e-6)
    assert np.allclose(both.query_side, a.query_side - b.query_side, atol=1e-5)
    assert both.capped_score is None
    assert "rather than" in qk_text(both)


def test_bad_requests_get_one_line_errors():
    lm, tc, graph = _world()
    n = graph.n_pos
    sliding = next(l for l, s in enumerate(lm.sites.layers) if s.is_sliding)
    window = lm.sites.layers[sliding].sliding_window
    cases = {
        "sliding window": dict(layer=sliding, head=0, key_pos=n - 1 - window),
        "heads 0..": dict(layer=0, head=lm.sites.n_heads),
        "layers 0..": dict(layer=lm.sites.n_layers, head=0),
        "causal attention masks it": dict(layer=0, head=0, query_pos=3, key_pos=4),
        "out of range": dict(layer=0, head=0, key_pos=n + 3),
    }
    for message, kw in cases.items():
        with pytest.raises(UserError, match=message) as err:
            qk(lm, graph, transcoders=tc, **kw)
        assert "\n" not in str(err.value)


def test_a_graph_of_another_model_or_transcoder_set_is_refused():
    lm, tc, graph = _world()
    other_tc = random_transcoders(lm.sites.n_layers, lm.sites.d_model, 96, seed=9, l0=6)
    with pytest.raises(UserError, match="other transcoders"):
        qk(lm, graph, 0, 0, transcoders=other_tc)
    with pytest.raises(UserError, match="other transcoders"):
        head_loadings(lm, graph, transcoders=other_tc)
    graph.metadata["model"] = "google/gemma-3-1b-pt"
    with pytest.raises(UserError, match="traced on google/gemma-3-1b-pt"):
        qk(lm, graph, 0, 0, transcoders=tc)


def test_top_pairs_are_the_brute_force_top_pairs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(700, 8, generator=g) * torch.rand(700, 1, generator=g) ** 4
    k = torch.randn(900, 8, generator=g) * torch.rand(900, 1, generator=g) ** 4
    pairs = top_pairs(q, k, 25, 0.5)
    full = (q @ k.T) * 0.5
    want = torch.topk(full.abs().flatten(), 25).values
    assert np.allclose([abs(v) for _, _, v in pairs], want.numpy(), rtol=1e-6)
    for a, b, v in pairs:
        assert v == pytest.approx(float(full[a, b]), rel=1e-6)


@pytest.mark.parametrize("kind", ["skip", "clt", "plt"])
@pytest.mark.parametrize("shape", ["mqa", "gqa"])
def test_head_loadings_sum_to_edge_weights(shape, kind):
    lm, tc, graph = _world(shape, kind)
    hl = head_loadings(lm, graph, n_edges=25, transcoders=tc)
    assert (graph.pos[hl.sources] != graph.pos[hl.targets]).all()
    assert np.all(hl.stay == 0.0)  # a path between two positions moves at least once
    assert np.allclose(hl.residual, 0.0, atol=1e-4 * np.abs(hl.weights).max())
    assert np.allclose(hl.by_key.sum(-1), hl.loadings, atol=1e-5)
    # the key the top head's hop leaves from is one it attends to
    frozen = prompt_sources(lm, tc, torch.as_tensor(graph.tokens), graph).frozen
    for e in range(len(hl.weights)):
        l, h, _, k = hl.top_heads(e, 1)[0]
        q = int(graph.pos[hl.targets[e]])
        assert k != q and float(frozen.state.patterns[l, h, q, k]) > 0
    # same-position edges: the paths that stay put carry the rest
    a = graph.adjacency.tocoo()
    same = np.flatnonzero(graph.pos[a.row] == graph.pos[a.col])[:15]
    local = head_loadings(lm, graph, np.stack([a.col[same], a.row[same]], 1), transcoders=tc)
    assert np.allclose(local.residual, 0.0, atol=1e-4 * np.abs(local.weights).max())
    assert np.any(local.stay != 0.0)


def test_head_loadings_of_a_pruned_circuit_and_a_missing_edge():
    from circuits.pruning import prune

    lm, tc, graph = _world("gqa")
    circuit = prune(graph)
    hl = head_loadings(lm, circuit, n_edges=10, transcoders=tc)
    assert np.allclose(hl.residual, 0.0, atol=1e-4 * np.abs(hl.weights).max())
    assert "why: circuits qk GRAPH --layer" in loadings_text(circuit, hl)
    with pytest.raises(UserError, match="no edge from t:1 to t:2"):
        head_loadings(lm, circuit, [("t:1", "t:2")], transcoders=tc)


@pytest.fixture
def cli_world(tmp_path, monkeypatch):
    lm, tc, graph = _world("gqa")
    save_native(tc, tmp_path / "tc")
    serve_model(monkeypatch, lm)
    graph.save(tmp_path / "g.npz")
    return lm, tc, graph, tmp_path


def test_qk_command_prints_and_writes_json_and_svg(cli_world, capsys):
    lm, tc, graph, tmp = cli_world
    layer = lm.sites.n_layers - 1
    argv = ["qk", str(tmp / "g.npz"), "--layer", str(layer), "--head", "1", "--key", "3"]
    argv += ["--transcoders", str(tmp / "tc"), "--json", str(tmp / "qk.json")]
    assert run(argv + ["--svg", str(tmp / "qk.svg")]) == 0
    out = capsys.readouterr().out
    assert f"layer {layer} head 1" in out and "top pairs" in out and "residual" in out
    view = json.loads((tmp / "qk.json").read_text())
    assert view["key_pos"] == 3 and len(view["matrix"]["values"]) == 10
    assert (tmp / "qk.svg").read_text().lstrip().startswith("<")
    assert run(argv[:-2] + ["--head", "9"]) == 2  # out of range: one line, exit status 2
    assert "heads 0..3" in capsys.readouterr().err


def test_heads_command_lists_edges_and_writes_a_graph_for_the_viewer(cli_world, capsys):
    lm, tc, graph, tmp = cli_world
    argv = ["heads", str(tmp / "g.npz"), "--transcoders", str(tmp / "tc"), "--top", "4"]
    assert run(argv + ["--qk", "2", "--out", str(tmp / "h.npz")]) == 0
    out = capsys.readouterr().out
    assert out.count("why: circuits qk GRAPH") == 4
    stored = load_graph(tmp / "h.npz").metadata["head_loadings"]["edges"]
    assert len(stored) == 4 and "qk" in stored[0] and "qk" not in stored[2]
    src, tgt = stored[1]["source"], stored[1]["target"]
    assert run(argv[:-2] + ["--edge", src, tgt]) == 0
    assert capsys.readouterr().out.count("why:") == 1


@pytest.mark.parametrize("implementation", ["auto", "transformers"])
def test_attention_soft_capping_where_the_implementation_applies_it(tmp_path, implementation):
    """gemma_lm.gemma3 applies a config's attn_logit_softcapping; transformers' Gemma 3 does not:
    the score attributed is the raw one either way, and the attention row rebuilt matches the
    model's only with the cap the model really applied."""
    import sys

    from gemma_lm.models import load_model

    sys.path.insert(0, str(Path(__file__).parent))
    from test_models import _word_tokenizer

    hf = tiny_model(seed=1, vocab_size=64, n_heads=4, n_kv_heads=2).model
    hf.config.attn_logit_softcapping = 0.5
    hf.save_pretrained(tmp_path)
    _word_tokenizer(64).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), implementation=implementation)
    tc = random_transcoders(lm.sites.n_layers, lm.sites.d_model, 32, seed=2, l0=4)
    ps = prompt_sources(lm, tc, torch.tensor([2, 5, 9, 11, 7, 30, 12, 8]))
    r = qk_of_sources(ps, "", lm.sites.n_layers - 1, 1, -1, 2)
    _assert_exact(r)
    if implementation == "auto":  # gemma_lm.gemma3
        assert lm.meta["implementation"] == "gemma_lm.gemma3"
        assert r.capped_score == pytest.approx(0.5 * np.tanh(r.score / 0.5))
    else:
        assert r.capped_score is None


@pytest.mark.slow
def test_exact_on_the_real_model(real_model, default_transcoders):
    lm, tc = real_model, default_transcoders
    graph = attribute(lm, PROMPT, transcoders=tc, progress=False, dashboards=False)
    ps = prompt_sources(lm, tc, torch.as_tensor(graph.tokens), graph)
    n = graph.n_pos
    for layer, head, key in [(5, 0, 0), (3, 2, 2), (11, 1, 4), (17, 3, n - 1)]:
        _assert_exact(qk_of_sources(ps, PROMPT, layer, head, -1, key), rel=1e-4)
    view = qk_view(qk_of_sources(ps, PROMPT, 11, 1, -1, 2, versus=4))
    assert view["versus_pos"] == 4
    hl = head_loadings(lm, graph, n_edges=8, transcoders=tc)
    assert np.allclose(hl.residual, 0.0, atol=1e-4 * np.abs(hl.weights).max())
