"""The local replacement model: frozen forward pass exactness, Gemma 3 details, and the transposed
model against autograd through the frozen forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from circuits.replacement import (
    FrozenWeights,
    TransposedModel,
    check_prompt,
    frozen_forward,
    run_and_freeze,
    softcap,
)
from gemma_lm.errors import UserError
from gemma_lm.testing import tiny_model
from transcoders.testing import random_transcoders

# 38 tokens: longer than the tiny sliding window (4)
PROMPT = "The cat sat on the mat, then it ran."

CONFIGS = {  # name -> tiny_model options
    "base": {},
    "softcap": {"softcap": 5.0},
    "gqa": {"n_heads": 4, "n_kv_heads": 2, "n_layers": 4},
    "mha": {"n_heads": 2, "n_kv_heads": 2, "sliding_window": 2},
}


def _setup(config: dict, kind: str, seed: int = 0, prompt: str = PROMPT, d_sae: int = 96):
    lm = tiny_model(seed=seed, **config)
    s = lm.sites
    tc = random_transcoders(s.n_layers, s.d_model, d_sae, kind=kind, seed=seed + 1, l0=6)
    state = run_and_freeze(lm, lm.tokenize(prompt))
    return lm, tc, state, FrozenWeights(lm)


def _clean(tc, state):
    acts = [tc.encode(l, state.mlp_in[l]).float() for l in range(tc.n_layers)]
    errors = state.mlp_out - tc.reconstruct(state.mlp_in).float()
    return acts, errors


@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_frozen_forward_reproduces_the_model(config, kind):
    lm, tc, state, fw = _setup(CONFIGS[config], kind)
    acts, errors = _clean(tc, state)
    out = frozen_forward(state, fw, tc, acts, errors)
    with torch.no_grad():
        hf = lm.model(lm.tokenize(PROMPT)[None], output_hidden_states=True)
    assert (softcap(out["logits"], fw.softcap) - hf.logits[0, -1]).abs().max() < 1e-4
    assert (out["mlp_in"] - state.mlp_in).abs().max() < 1e-4
    # every residual the real model computed, through the frozen linear model
    for l, h in enumerate(hf.hidden_states[:-1]):
        assert (out["resid"][l] - h[0]).abs().max() < 1e-4 * max(1.0, h.abs().max().item())


def test_softcap_is_applied_after_the_linear_logits():
    lm, tc, state, fw = _setup(CONFIGS["softcap"], "plt")
    acts, errors = _clean(tc, state)
    raw = frozen_forward(state, fw, tc, acts, errors)["logits"]
    assert fw.softcap == 5.0
    assert raw.abs().max() > 5.0  # the cap matters on this model
    assert (softcap(raw, 5.0) - state.logits).abs().max() < 1e-4
    assert (raw - state.logits).abs().max() > 1e-2


def test_token_nodes_are_scaled_embeddings():
    lm, tc, state, fw = _setup({}, "plt")
    tokens = lm.tokenize(PROMPT)
    table = lm.model.model.embed_tokens.weight
    assert lm.sites.embed_scale == pytest.approx(math.sqrt(lm.sites.d_model))
    assert torch.allclose(state.embeddings, table[tokens] * math.sqrt(lm.sites.d_model), atol=1e-5)


def test_norm_gains_are_one_plus_weight():
    lm, tc, state, fw = _setup({}, "plt")
    s = lm.sites.layers[1]
    assert torch.allclose(fw.g_ff[1], 1 + s.pre_feedforward_layernorm.weight)
    # the recorded MLP input is s_ff * (1 + w) * m with m = x + attention: check against the scale
    # alone
    m = state.mlp_in[1] / (state.s_ff[1, :, None] * fw.g_ff[1])
    assert torch.allclose(
        torch.rsqrt(m.pow(2).mean(-1) + lm.sites.rms_norm_eps), state.s_ff[1], rtol=1e-4
    )


def test_patterns_hold_the_sliding_window_and_causality():
    lm, tc, state, fw = _setup({"sliding_window": 3}, "plt")
    n = state.n_pos
    q, k = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    for l, site in enumerate(lm.sites.layers):
        p = state.patterns[l]
        assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5)
        outside = k > q
        if site.is_sliding:
            outside |= (q - k) >= site.sliding_window
        assert p[:, outside].abs().max() == 0
    assert state.causal
    assert any(s.is_sliding for s in lm.sites.layers) and not all(
        s.is_sliding for s in lm.sites.layers
    )


def _autograd_gradients(state, fw, tc, acts, errors, layer, pos, vec):
    """Gradient of one target with respect to every x_l, by autograd through `frozen_forward`."""
    L, n, D = fw.n_layers, state.n_pos, fw.d_model
    deltas = {l: torch.zeros(n, D, requires_grad=True) for l in range(L + 1)}
    with torch.enable_grad():
        out = frozen_forward(state, fw, tc, acts, errors, resid_delta=deltas)
        value = (out["final"] @ vec) if layer == L else (out["mlp_in"][layer, pos] @ vec)
        grads = torch.autograd.grad(value, [deltas[l] for l in range(L + 1)], allow_unused=True)
    return torch.stack([torch.zeros(n, D) if g is None else g for g in grads])


@pytest.mark.parametrize(
    "config,kind", [("base", "skip"), ("gqa", "clt"), ("mha", "plt"), ("softcap", "skip")]
)
def test_transposed_model_matches_autograd(config, kind):
    lm, tc, state, fw = _setup(CONFIGS[config], kind)
    acts, errors = _clean(tc, state)
    L, n, D = fw.n_layers, state.n_pos, fw.d_model
    g = torch.Generator().manual_seed(0)
    targets = [(L, n - 1), (L - 1, n - 1), (L - 1, 3), (1, 7), (0, 0), (L - 2, n // 2), (1, n - 2)]
    layer = torch.tensor([t[0] for t in targets])
    pos = torch.tensor([t[1] for t in targets])
    vecs = torch.randn(len(targets), D, generator=g)
    refs = [
        _autograd_gradients(state, fw, tc, acts, errors, l, p, vecs[i])
        for i, (l, p) in enumerate(targets)
    ]
    engine = TransposedModel(state, fw, tc)
    embeddings = state.embeddings.clone()
    state.drop_activations()  # as attribution does: the transposed pass reads only what is kept
    assert (
        state.mlp_in is None
        and state.patterns is None
        and torch.equal(state.embeddings, embeddings)
    )
    G = engine.full_gradients(layer, pos, vecs)
    for i, (l, p) in enumerate(targets):
        ref = refs[i]
        assert torch.allclose(G[i], ref, atol=1e-5, rtol=1e-4), (l, p)
        assert ref[: l + 1, : p + 1].abs().max() > 0
        # causality: nothing reaches positions after the target
        assert G[i, :, p + 1 :].abs().sum() == 0


def test_transposed_model_without_causal_patterns():
    """A bidirectional Gemma 3 (use_bidirectional_attention) reads later positions: no position
    truncation."""
    lm = tiny_model(seed=2)
    lm.model.config.use_bidirectional_attention = True
    tc = random_transcoders(3, 64, 64, kind="skip", seed=3, l0=6)
    state = run_and_freeze(lm, lm.tokenize("abcdefgh"))
    assert not state.causal
    fw = FrozenWeights(lm)
    acts, errors = _clean(tc, state)
    vec = torch.randn(1, 64)
    G = TransposedModel(state, fw, tc).full_gradients(torch.tensor([2]), torch.tensor([1]), vec)
    ref = _autograd_gradients(state, fw, tc, acts, errors, 2, 1, vec[0])
    assert G[0, 0, 2:].abs().max() > 0  # later positions do matter here
    assert torch.allclose(G[0], ref, atol=1e-5, rtol=1e-4)


def test_targets_must_be_sorted_by_layer():
    lm, tc, state, fw = _setup({}, "plt")
    with pytest.raises(ValueError, match="sorted"):
        TransposedModel(state, fw, tc).run(
            torch.tensor([0, 2]), torch.tensor([1, 1]), torch.zeros(2, 64), lambda *a: None
        )


def test_check_prompt_refuses_empty_and_long_prompts():
    lm = tiny_model(seed=0)
    with pytest.raises(UserError, match="empty"):
        check_prompt(lm, lm.tokenize(""))
    with pytest.raises(UserError, match="model's context"):
        check_prompt(lm, lm.tokenize("x" * 300))  # the tiny context is 256
    with pytest.raises(UserError, match="max-tokens"):
        check_prompt(lm, lm.tokenize("hello"), max_tokens=3)
    check_prompt(lm, lm.tokenize("hello"), max_tokens=6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
def test_real_model_frozen_forward_is_exact(real_model, kind):
    lm = real_model
    s = lm.sites
    tc = random_transcoders(
        s.n_layers, s.d_model, 256, kind=kind, seed=0, l0=16, model_name=lm.name
    )
    state = run_and_freeze(lm, lm.tokenize("Fact: the capital of the state containing Dallas is"))
    acts, errors = _clean(tc, state)
    out = frozen_forward(state, FrozenWeights(lm), tc, acts, errors)
    assert (out["logits"] - state.logits).abs().max() < 1e-4


@pytest.mark.slow
def test_the_default_set_with_its_errors_reproduces_the_logits(real_model, default_transcoders):
    """The embedded default set, spliced in with its error terms, gives back the model's logits."""
    lm, tc = real_model, default_transcoders
    state = run_and_freeze(
        lm, lm.tokenize("The opposite of hot is cold, and the opposite of up is")
    )
    acts, errors = _clean(tc, state)
    out = frozen_forward(state, FrozenWeights(lm), tc, acts, errors)
    assert (out["logits"] - state.logits).abs().max() < 1e-4
