"""Interventions (circuits/interventions.py): constrained patching in the frozen and the full world.

The references here are written independently of the code under test: plain hooks on the real model
that subtract a decoder vector, the graph's own edges, and Hugging Face's greedy `generate`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from circuits.attribution import attribute
from circuits.graph import ERROR, FEATURE, load_supernodes
from circuits.interventions import Intervention, intervene, intervene_each
from gemma_lm.errors import UserError
from gemma_lm.testing import tiny_model
from transcoders.testing import random_transcoders

PROMPT = "The cat sat on a mat"


def tc_for(lm, kind="plt", seed=1, d_sae=48):
    s = lm.sites
    return random_transcoders(s.n_layers, s.d_model, d_sae, kind=kind, seed=seed)


def real_logits(lm, tokens, hooks=()):
    """Last-position logits of the plain model with optional (module, forward_hook) pairs."""
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            return lm.model(tokens[None], use_cache=False, logits_to_keep=1).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()


def subtract_at(pos: int, vector: torch.Tensor):
    """A forward hook that subtracts `vector` from a module's output at position `pos`."""

    def hook(module, args, output):
        out = output.clone()
        out[0, pos] -= vector.to(out.dtype)
        return out

    return hook


def active_feature(tc, lm, tokens, layer, pos):
    """(feature, activation) of the most active feature of `layer` at `pos` in the clean run."""
    from circuits.replacement import run_and_freeze

    acts = tc.encode(layer, run_and_freeze(lm, tokens).mlp_in[layer, pos])
    f = int(acts.argmax())
    assert acts[f] > 0, "the test needs an active feature here"
    return f, float(acts[f].detach())


def demeaned(raw: torch.Tensor, ids) -> torch.Tensor:
    """What a logit node's input is: the pre-softcap logit minus the mean logit over the
    vocabulary."""
    return raw[ids] - raw.mean()


# -- no intervention -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_no_intervention_reproduces_clean_logits(kind, softcap):
    lm = tiny_model(seed=2, softcap=softcap)
    tc = tc_for(lm, kind)
    tokens = lm.tokenize(PROMPT)
    ref = real_logits(lm, tokens)
    full = intervene(lm, PROMPT, None, transcoders=tc, mode="full", progress=False)
    # bit for bit: the held errors add back exactly what was there
    assert torch.equal(full.logits, ref)
    assert torch.equal(full.logits_clean, ref)
    frozen = intervene(lm, PROMPT, [], transcoders=tc, mode="frozen", progress=False)
    torch.testing.assert_close(frozen.logits, ref, atol=2e-4, rtol=1e-5)
    assert torch.equal(frozen.logits, frozen.logits_clean)
    assert frozen.n_changed_features == 0 and full.n_changed_features == 0


# -- full mode: zeroing a feature is removing its decoder vector -----------------------------------


def test_full_zero_last_layer_feature_equals_model_with_decoder_removed():
    lm = tiny_model(seed=3)
    tc = tc_for(lm, "plt")
    tokens = lm.tokenize(PROMPT)
    L, p = lm.sites.n_layers, len(tokens) - 1
    f, a = active_feature(tc, lm, tokens, L - 1, p)
    ref = real_logits(
        lm,
        tokens,
        [
            (
                lm.sites.layers[L - 1].post_feedforward_layernorm,
                subtract_at(p, a * tc.W_dec[L - 1][f].detach()),
            )
        ],
    )
    r = intervene(
        lm, PROMPT, [("zero", f"f:{L - 1}:{p}:{f}")], transcoders=tc, mode="full", progress=False
    )
    torch.testing.assert_close(r.logits, ref, atol=1e-5, rtol=1e-6)
    assert (r.logits - r.logits_clean).abs().max() > 1e-3  # the intervention did something


def test_full_zero_clt_feature_removes_its_decoder_from_every_layer_it_writes():
    """A CLT feature of layer 0 at an early position writes to all layers; the effect reaches the
    last position only through recomputed attention. Later MLPs and later features are silenced in
    this model, so that the real model and the replacement react to the change identically, and the
    reference is the plain model with the feature's decoder vectors subtracted at every layer."""
    lm = tiny_model(seed=4)
    tc = tc_for(lm, "clt", d_sae=32)
    L = lm.sites.n_layers
    with torch.no_grad():
        for l in range(1, L):
            lm.sites.layers[l].mlp.down_proj.weight.zero_()  # real MLP output of layer l is 0
            tc.W_enc[l].zero_()
            tc.b_enc[l].fill_(-1.0)  # features of layers >= 1 never fire
    tokens = lm.tokenize(PROMPT)
    p = 2
    f, a = active_feature(tc, lm, tokens, 0, p)
    hooks = [
        (
            lm.sites.layers[l].post_feedforward_layernorm,
            subtract_at(p, a * tc.W_dec[0][f, l].detach()),
        )
        for l in range(L)
    ]
    ref = real_logits(lm, tokens, hooks)
    r = intervene(
        lm, tokens, [("zero", f"f:0:{p}:{f}")], transcoders=tc, mode="full", progress=False
    )
    torch.testing.assert_close(r.logits, ref, atol=1e-5, rtol=1e-6)
    assert (r.logits - r.logits_clean).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
def test_full_zero_error_node_removes_the_error_vector(kind):
    lm = tiny_model(seed=3)
    tc = tc_for(lm, kind)
    tokens = lm.tokenize(PROMPT)
    from circuits.replacement import run_and_freeze

    clean = run_and_freeze(lm, tokens)
    L, p = lm.sites.n_layers, len(tokens) - 1
    error = (clean.mlp_out - tc.reconstruct(clean.mlp_in))[L - 1, p].detach()
    ref = real_logits(
        lm, tokens, [(lm.sites.layers[L - 1].post_feedforward_layernorm, subtract_at(p, error))]
    )
    r = intervene(
        lm, PROMPT, [("zero", f"e:{L - 1}:{p}")], transcoders=tc, mode="full", progress=False
    )
    torch.testing.assert_close(r.logits, ref, atol=1e-5, rtol=1e-6)
    half = intervene(
        lm, PROMPT, [("scale", f"e:{L - 1}:{p}", 0.5)], transcoders=tc, mode="full", progress=False
    )
    ref_half = real_logits(
        lm, tokens, [(lm.sites.layers[L - 1].post_feedforward_layernorm, subtract_at(p, error / 2))]
    )
    torch.testing.assert_close(half.logits, ref_half, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("kind", ["skip", "clt"])
def test_full_mode_equals_hand_spliced_replacement_model(kind):
    """The general case: every MLP output replaced by the transcoder output of its live input plus
    the clean error (written here from scratch), with one mid-layer feature's decoder contribution
    removed."""
    lm = tiny_model(seed=5)
    tc = tc_for(lm, kind, d_sae=32)
    tokens = lm.tokenize(PROMPT)
    from circuits.replacement import run_and_freeze

    clean = run_and_freeze(lm, tokens)
    errors = clean.mlp_out - tc.reconstruct(clean.mlp_in)
    layer, p = 1, 3
    f, a = active_feature(tc, lm, tokens, layer, p)
    acts = {}

    def enc(l):
        def hook(module, args, output):
            acts[l] = tc.encode(l, output[0])
            acts[("x", l)] = output[0]

        return hook

    def dec(l):
        def hook(module, args, output):
            y = tc.b_dec[l] + errors[l]
            for s in tc.output_layers_into(l):
                w = tc.W_dec[s][:, l - s] if tc.is_clt else tc.W_dec[s]
                y = y + acts[s] @ w
                if s == layer:
                    y[p] -= a * w[f]
            if tc.W_skip is not None:
                y = y + acts[("x", l)] @ tc.W_skip[l]
            return y[None].detach()

        return hook

    hooks = [(s.pre_feedforward_layernorm, enc(l)) for l, s in enumerate(lm.sites.layers)]
    hooks += [(s.post_feedforward_layernorm, dec(l)) for l, s in enumerate(lm.sites.layers)]
    ref = real_logits(lm, tokens, hooks)
    r = intervene(
        lm, PROMPT, [("zero", f"f:{layer}:{p}:{f}")], transcoders=tc, mode="full", progress=False
    )
    torch.testing.assert_close(r.logits, ref, atol=1e-4, rtol=1e-5)
    assert (r.logits - r.logits_clean).abs().max() > 1e-3


# -- frozen mode: the graph's edges predict the change ---------------------------------------------


@pytest.fixture(params=["plt", "clt"])
def traced(request):
    lm = tiny_model(seed=6, softcap=8.0)
    tc = tc_for(lm, request.param, d_sae=32)
    with (
        torch.no_grad()
    ):  # decoders strong enough that paths through features stand out of float32 noise
        for w in tc.W_dec:
            w.mul_(20.0)
    g = attribute(
        lm, PROMPT, transcoders=tc, max_n_logits=4, desired_logit_prob=1.0, progress=False
    )
    assert g.has_row[g.kind == FEATURE].all()  # every feature row computed: the graph is complete
    return lm, tc, g


def test_frozen_held_features_change_logits_by_exactly_the_direct_edges(traced):
    """With every other feature held, the frozen model is linear in one feature's activation:
    scaling it by (1 + eps) moves each logit node's input (the demeaned pre-softcap logit) by eps *
    edge weight."""
    lm, tc, g = traced
    logit_nodes, logit_ids = g.logit_nodes, torch.as_tensor(g.logit_tokens)
    feats = g.nodes_of(FEATURE)
    strongest = feats[np.argsort(-np.abs(g.adjacency[logit_nodes][:, feats].toarray()).sum(0))[:5]]
    for i in strongest:
        eps = -1.0 if i == strongest[0] else 0.5  # zeroing is eps = -1
        r = intervene(
            lm,
            g,
            [("scale", g.node_id(i), 1 + eps)],
            transcoders=tc,
            propagate=False,
            progress=False,
        )
        got = demeaned(r.raw_logits, logit_ids) - demeaned(r.raw_logits_clean, logit_ids)
        want = eps * g.adjacency[logit_nodes][:, [i]].toarray().ravel()
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=2e-5)
    assert r.n_changed_features == 1


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_intervene_each_equals_one_intervene_per_entry(traced, mode):
    """An ablation sweep shares the clean run across its entries and changes no number: each entry
    gives exactly what `intervene` gives for it alone (an empty entry: the clean logits)."""
    lm, tc, g = traced
    feats = g.nodes_of(FEATURE)[:3]
    entries = [{g.node_id(int(i)): 0.0} for i in feats] + [
        {},
        [("scale", g.node_id(int(feats[0])), 2.0)],
    ]
    swept = intervene_each(lm, g, entries, transcoders=tc, mode=mode, progress=False)
    assert len(swept) == len(entries)
    for entry, got in zip(entries, swept):
        alone = intervene(lm, g, entry, transcoders=tc, mode=mode, progress=False)
        assert torch.equal(got.logits, alone.logits) and torch.equal(
            got.logits_clean, alone.logits_clean
        )
        assert got.applied == alone.applied
        for a, b in zip(got.acts, alone.acts):
            assert torch.equal(a, b)
    assert torch.equal(swept[len(feats)].logits, swept[len(feats)].logits_clean)
    assert not torch.equal(swept[0].logits, swept[0].logits_clean)


def test_frozen_zeroing_an_error_node_removes_its_edge(traced):
    lm, tc, g = traced
    logit_nodes, logit_ids = g.logit_nodes, torch.as_tensor(g.logit_tokens)
    errs = g.nodes_of(ERROR)
    i = errs[np.argmax(np.abs(g.adjacency[logit_nodes][:, errs].toarray()).sum(0))]
    r = intervene(lm, g, [("zero", g.node_id(i))], transcoders=tc, propagate=False, progress=False)
    got = demeaned(r.raw_logits, logit_ids) - demeaned(r.raw_logits_clean, logit_ids)
    np.testing.assert_allclose(
        got.numpy(), -g.adjacency[logit_nodes][:, [i]].toarray().ravel(), rtol=1e-3, atol=2e-5
    )


def graph_path_prediction(g, source: int, eps: float) -> np.ndarray:
    """First-order change of the logit nodes' inputs when `source` is scaled by 1 + eps and every
    later feature follows its pre-activation (active JumpReLU: d act = d pre): the sum over all
    paths in the graph. r[t] is the relative change of node t; a node's input changes by sum_s
    A[t, s] r[s]."""
    A = g.adjacency.tocsr().astype(np.float64)
    r = np.zeros(g.n_nodes)
    r[source] = eps
    for t in g.nodes_of(FEATURE):  # sorted by layer: sources come before their targets
        if t != source and g.layer[t] > g.layer[source]:
            r[t] = (A[[t]] @ r)[0] / g.activation[t]
    return A[g.logit_nodes] @ r


def test_frozen_small_perturbation_follows_the_graph_paths(traced):
    lm, tc, g = traced
    logit_ids = torch.as_tensor(g.logit_tokens)
    feats = g.nodes_of(FEATURE)
    early = feats[g.layer[feats] == 0]
    source = early[np.argmax(np.abs(g.activation[early]))]
    eps = 0.5
    for _ in range(
        8
    ):  # small enough that no feature crosses its threshold: then the world is linear
        r = intervene(
            lm, g, [("scale", g.node_id(source), 1 + eps)], transcoders=tc, progress=False
        )
        if all(torch.equal(a > 0, c > 0) for a, c in zip(r.acts, r.clean_acts)):
            break
        eps /= 4
    else:
        pytest.fail("every perturbation made some feature cross its threshold")
    assert r.n_changed_features > 1  # the change did propagate to downstream features
    got = (demeaned(r.raw_logits, logit_ids) - demeaned(r.raw_logits_clean, logit_ids)).numpy()
    want = graph_path_prediction(g, source, eps)
    direct = eps * g.adjacency[g.logit_nodes][:, [source]].toarray().ravel()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5)
    assert np.abs(want - direct).max() > 20 * (np.abs(got - want).max() + 1e-6)  # paths matter here


# -- targets, supernodes, graphs -------------------------------------------------------------------


def test_supernodes_and_star_positions_expand_to_their_members(tmp_path):
    lm = tiny_model(seed=7)
    tc = tc_for(lm, "plt")
    n = len(lm.tokenize(PROMPT))
    members = [f"f:1:{p}:5" for p in range(n)]
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"supernodes": {"five": members}}))
    groups = load_supernodes(path)
    kw = dict(transcoders=tc, mode="full", progress=False)
    a = intervene(lm, PROMPT, [("scale", "five", 3.0)], supernodes=groups, **kw)
    b = intervene(lm, PROMPT, [("scale", m, 3.0) for m in members], **kw)
    c = intervene(lm, PROMPT, [Intervention("scale", "f:1:*:5", 3.0)], **kw)
    d = intervene(lm, PROMPT, [("scale", tuple(members), 3.0)], **kw)
    assert (
        torch.equal(a.logits, b.logits)
        and torch.equal(a.logits, c.logits)
        and torch.equal(a.logits, d.logits)
    )
    assert a.applied == [f"scale supernode 'five' ({n} nodes) x3"]


def test_set_value_and_dict_form():
    lm = tiny_model(seed=7)
    tc = tc_for(lm, "plt")
    r = intervene(lm, PROMPT, {"f:2:4:7": 3.5}, transcoders=tc, mode="frozen", progress=False)
    assert float(r.acts[2][4, 7]) == 3.5
    assert r.applied == ["set f:2:4:7 = 3.5"]
    row = r.top[0]
    assert row["logit_change"] == pytest.approx(row["logit_after"] - row["logit_before"])
    assert "set f:2:4:7 = 3.5" in r.table()


@pytest.mark.parametrize(
    "bad, message",
    [
        ("f:9:0:1", "layer 9"),
        ("f:0:99:1", "position 99"),
        ("f:0:0:999", "feature 999"),
        ("t:3", "token node"),
        ("l:17", "logit node"),
        ("f:x:0:1", "integers"),
        ("nonsense", "unknown node"),
        ("f:1:2", "cannot read node"),
    ],
)
def test_bad_targets_are_user_errors(bad, message):
    lm = tiny_model(seed=7)
    with pytest.raises(UserError, match=message):
        intervene(lm, PROMPT, [("zero", bad)], transcoders=tc_for(lm), progress=False)


def test_error_nodes_cannot_be_set_and_modes_are_checked():
    lm = tiny_model(seed=7)
    with pytest.raises(UserError, match="error node is a vector"):
        intervene(lm, PROMPT, {"e:0:1": 2.0}, transcoders=tc_for(lm), progress=False)
    with pytest.raises(UserError, match="unknown mode"):
        intervene(lm, PROMPT, None, transcoders=tc_for(lm), mode="fast", progress=False)


def test_graph_prompt_uses_graph_tokens_and_supernodes():
    lm = tiny_model(seed=8)
    tc = tc_for(lm, "plt")
    g = attribute(lm, PROMPT, transcoders=tc, progress=False)
    i = g.nodes_of(FEATURE)[-1]
    g.metadata["supernodes"] = {"last": [g.node_id(i)]}
    r = intervene(lm, g, [("zero", "last")], transcoders=tc, mode="full", progress=False)
    assert r.tokens.tolist() == g.tokens.tolist()
    assert float(r.acts[g.layer[i]][g.pos[i], g.feature[i]]) == 0.0
    g.metadata["model"] = "another-model"
    with pytest.raises(UserError, match="traced on another-model"):
        intervene(lm, g, None, transcoders=tc, progress=False)


# -- generation ------------------------------------------------------------------------------------


def test_clean_continuation_is_the_models_greedy_continuation():
    lm = tiny_model(seed=9)
    tc = tc_for(lm, "clt", d_sae=32)
    tokens = lm.tokenize(PROMPT)
    r = intervene(lm, PROMPT, None, transcoders=tc, mode="full", generate=6, progress=False)
    with torch.no_grad():
        hf = lm.model.generate(
            tokens[None],
            attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )[0, len(tokens) :].tolist()
    assert r.continuation_tokens_clean == hf[: len(r.continuation_tokens_clean)]
    assert r.continuation_tokens == r.continuation_tokens_clean
    assert r.continuation == lm.tokenizer.decode(r.continuation_tokens)


def test_intervention_is_held_at_its_positions_while_generating():
    """Zeroing a last-layer feature at the last prompt position changes only that position's output:
    the first new token follows the intervened logits, the rest is the plain model's
    continuation."""
    lm = tiny_model(seed=10)
    tc = tc_for(lm, "plt")
    tokens = lm.tokenize(PROMPT)
    L, p = lm.sites.n_layers, len(tokens) - 1
    f, _ = active_feature(tc, lm, tokens, L - 1, p)
    r = intervene(
        lm,
        PROMPT,
        [("set", f"f:{L - 1}:{p}:{f}", 40.0)],
        transcoders=tc,
        mode="frozen",
        generate=4,
        progress=False,
    )
    first = r.continuation_tokens[0]
    full = intervene(
        lm,
        PROMPT,
        [("set", f"f:{L - 1}:{p}:{f}", 40.0)],
        transcoders=tc,
        mode="full",
        progress=False,
    )
    assert first == int(full.logits.argmax())
    rest = intervene(
        lm,
        torch.cat([tokens, torch.tensor([first])]),
        None,
        transcoders=tc,
        mode="full",
        generate=3,
        progress=False,
    ).continuation_tokens_clean
    assert r.continuation_tokens[1:] == rest[: len(r.continuation_tokens) - 1]


# -- the real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_full_mode_zero_matches_decoder_removal(real_model):
    lm = real_model
    tc = random_transcoders(
        lm.sites.n_layers, lm.sites.d_model, 256, activation="topk", k=8, seed=1
    )
    text = "The capital of France is"
    tokens = lm.tokenize(text)
    L, p = lm.sites.n_layers, len(tokens) - 1
    f, a = active_feature(tc, lm, tokens, L - 1, p)
    ref = real_logits(
        lm,
        tokens,
        [
            (
                lm.sites.layers[L - 1].post_feedforward_layernorm,
                subtract_at(p, a * tc.W_dec[L - 1][f].detach()),
            )
        ],
    )
    r = intervene(
        lm,
        text,
        [("zero", f"f:{L - 1}:{p}:{f}")],
        transcoders=tc,
        mode="full",
        generate=3,
        progress=False,
    )
    torch.testing.assert_close(r.logits, ref, atol=1e-4, rtol=1e-5)
    frozen = intervene(lm, text, None, transcoders=tc, progress=False)
    torch.testing.assert_close(frozen.logits, r.logits_clean, atol=2e-3, rtol=1e-4)
    assert r.top[0]["id"] in (int(r.logits_clean.argmax()), int(r.logits.argmax()))
    assert len(r.continuation_tokens) == 3


def test_scaling_an_inactive_feature_is_noted():
    lm = tiny_model(seed=7)
    tc = tc_for(lm, "plt")
    from circuits.replacement import run_and_freeze

    acts = tc.encode(1, run_and_freeze(lm, lm.tokenize(PROMPT)).mlp_in[1]).detach()  # [n, F]
    dead = int(torch.nonzero((acts == 0).all(0))[0])
    live = int(torch.nonzero(acts[2] > 0)[0])
    r = intervene(
        lm,
        PROMPT,
        [("scale", f"f:1:*:{dead}", 5.0), ("zero", f"f:1:2:{live}"), ("set", f"f:1:0:{dead}", 1.0)],
        transcoders=tc,
        progress=False,
    )
    assert r.notes == [
        f"f:1:*:{dead} is inactive in the prompt (activation 0), so scale leaves it at 0 there; "
        f"use set to switch it on"
    ]
    assert r.notes[0] in r.table()
