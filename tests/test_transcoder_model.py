"""TranscoderSet invariants every consumer relies on: sparse and dense encodings agree, decoders
read by row equal the stored ones, CLT decoding sums every source layer, activation rules,
compatibility checks, and the training-mode activations (straight-through gradients, BatchTopK)
against their definitions."""

from __future__ import annotations

import pytest
import torch

from gemma_lm.errors import UserError
from transcoders.activations import batchtopk, batchtopk_per_layer, jumprelu, step
from transcoders.testing import random_transcoders


@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
@pytest.mark.parametrize("activation", ["jumprelu", "topk", "batchtopk", "relu"])
def test_sparse_encode_matches_dense(kind, activation):
    tc = random_transcoders(3, 16, 40, kind=kind, activation=activation, l0=5, seed=1)
    x = torch.randn(3, 7, 16) * 4
    layer, pos, feat, act = tc.sparse_encode(x)
    for l in range(3):
        dense = tc.encode(l, x[l])
        rows = layer == l
        rebuilt = torch.zeros_like(dense)
        rebuilt[pos[rows], feat[rows]] = act[rows]
        torch.testing.assert_close(rebuilt, dense)
    key = layer * 10_000 + pos * 100 + feat
    assert torch.all(key[1:] > key[:-1]), "not sorted by layer, position, feature"


def test_clt_decode_sums_every_source_layer_and_rows_match():
    tc = random_transcoders(4, 8, 12, kind="clt", skip=True, seed=2)
    x = torch.randn(4, 5, 8)
    acts = [tc.encode(l, x[l]) for l in range(4)]
    out = tc.decode(acts, x)
    for l in range(4):
        expect = tc.b_dec[l] + tc.skip_term(l, x[l])
        for s in range(l + 1):
            expect = expect + acts[s] @ tc.W_dec[s][:, l - s]
        torch.testing.assert_close(out[l], expect)
        assert list(tc.output_layers(l)) == list(range(l, 4))
        assert list(tc.output_layers_into(l)) == list(range(0, l + 1))
    feats = torch.tensor([3, 0, 11])
    torch.testing.assert_close(tc.decoder_rows(1, feats), tc.decoder_weight(1)[feats])
    assert tc.decoder_weight(1).shape == (12, 3, 8)
    torch.testing.assert_close(tc.reconstruct(x), out)


def test_topk_and_threshold_rules():
    tc = random_transcoders(1, 16, 64, activation="topk", k=5, seed=3)
    acts = tc.encode(0, torch.randn(50, 16) * 5)
    assert int((acts > 0).sum(-1).max()) <= 5
    bt = random_transcoders(1, 16, 64, activation="batchtopk", k=5, seed=3)
    bt.threshold[0].fill_(0.7)
    pre = bt.pre_activation(0, torch.randn(50, 16))
    torch.testing.assert_close(bt.activate(0, pre), pre * (pre > 0.7))


def test_check_compatible_names_both_sides(tiny):
    tc = random_transcoders(
        tiny.sites.n_layers + 1, tiny.sites.d_model, 8, model_name="other-model"
    )
    with pytest.raises(UserError, match="other-model.*layers"):
        tc.check_compatible(tiny.sites, tiny.name)
    random_transcoders(tiny.sites.n_layers, tiny.sites.d_model, 8).check_compatible(
        tiny.sites, tiny.name
    )


def test_jumprelu_straight_through_gradients():
    pre = torch.tensor([[0.10, 0.52, 0.49, 2.0]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    eps = 0.1
    out = jumprelu(pre, theta, eps)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.0, 0.52, 0.0, 2.0]]))
    out.sum().backward()
    # d/dpre: 1 where it fires; d/dtheta: -(theta/eps) * rect((pre - theta)/eps)
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -5.0, -5.0, 0.0]))
    # broadcast shapes reduce to theta's own shape
    theta2 = torch.full((1, 4), 0.5, requires_grad=True)
    step(pre.detach(), theta2, eps).sum().backward()
    torch.testing.assert_close(theta2.grad, torch.tensor([[0.0, -10.0, -10.0, 0.0]]))


def test_batchtopk_keeps_k_per_position_over_the_batch():
    pre = torch.randn(3, 20, 30)
    acts, floor = batchtopk_per_layer(pre, 4)
    for l in range(3):
        assert int((acts[l] > 0).sum()) == 80
        single, single_floor = batchtopk(pre[l], 4)
        torch.testing.assert_close(single, acts[l])
        torch.testing.assert_close(single_floor, floor[l])
        assert float(acts[l][acts[l] > 0].min()) == pytest.approx(float(floor[l]))
