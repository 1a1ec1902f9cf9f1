"""The pieces of benchmarks/faithfulness.py that decide its numbers: the prompt set and its check,
the <bos>-zeroed convention, the graph's predicted ablation effects (against a dense inverse and the
frozen model), the logit quantity, and `score_set` end to end. Tiny random models only."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import circuits
from circuits.graph import ERROR, FEATURE
from gemma_lm.testing import TinyTokenizer, tiny_model
from transcoders.testing import random_transcoders

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faithfulness as bench  # noqa: E402

PROMPT = "The cat sat on a mat"


def strong_transcoders(lm, kind="plt", seed=1):
    """Random transcoders whose decoders are strong enough that paths through features stand out
    of float32 noise."""
    s = lm.sites
    tc = random_transcoders(s.n_layers, s.d_model, 48, kind=kind, seed=seed)
    with torch.no_grad():
        for w in tc.W_dec:
            w.mul_(20.0)
    return tc


@pytest.fixture
def traced():
    lm = tiny_model(seed=1)
    tc = strong_transcoders(lm)
    graph = circuits.attribute(lm, PROMPT, transcoders=tc, progress=False, dashboards=False)
    assert graph.has_row[graph.kind == FEATURE].all()  # every row computed: no path is cut
    return lm, tc, graph


# -- the prompt set --------------------------------------------------------------------------------


def test_prompt_file_parses_and_covers_every_category():
    lines = bench.PROMPTS.read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines]
    assert len(items) >= 44
    for item in items:
        assert set(item) == {"prompt", "target", "category"}
        assert item["prompt"] and item["target"] and item["category"] in bench.CATEGORIES
    counts = {c: sum(i["category"] == c for i in items) for c in bench.CATEGORIES}
    assert min(counts.values()) >= 4, counts
    assert len({i["prompt"] for i in items}) == len(items)
    if bench.DEV_PROMPTS.exists():  # none of the shared dev prompts
        dev = {json.loads(line)["prompt"] for line in bench.DEV_PROMPTS.read_text().splitlines()}
        assert not dev & {i["prompt"] for i in items}
    assert bench.read_prompts(bench.PROMPTS) == items


def test_check_prompts_reports_targets_outside_the_top_3():
    lm = tiny_model(seed=1)
    logits = lm.last_logits(lm.tokenize(PROMPT)).detach()
    ranked = [int(i) for i in logits.argsort(descending=True)]
    # the tiny tokenizer writes printable characters (ids 3..97) as one token each
    printable = [j for j, i in enumerate(ranked) if 3 <= i < 98]
    assert printable[0] == 0, "the test needs a printable top token"
    low = next(j for j in printable if j >= 3)
    prompts = [
        {"prompt": PROMPT, "target": lm.tokenizer.decode([ranked[0]]), "category": "facts"},
        {"prompt": PROMPT, "target": lm.tokenizer.decode([ranked[low]]), "category": "facts"},
        {"prompt": PROMPT, "target": "ab", "category": "facts"},  # two tokens
    ]
    failures = bench.check_prompts(lm, prompts)
    assert [f["target"] for f in failures] == [prompts[1]["target"], "ab"]
    assert f"rank {low + 1}," in failures[0]["reason"] and "2 tokens" in failures[1]["reason"]
    assert [t for t, _ in failures[0]["top"]] == [lm.tokenizer.decode([i]) for i in ranked[:3]]


def test_take_in_turn_alternates_categories():
    prompts = [{"prompt": str(i), "category": c} for i, c in enumerate("aaabbc")]
    assert [p["prompt"] for p in bench.take_in_turn(prompts, 4)] == ["0", "3", "5", "1"]
    assert bench.take_in_turn(prompts, None) == prompts


# -- the graph's predictions -----------------------------------------------------------------------


def test_predicted_effects_equal_the_dense_inverse(traced):
    """-a_s [(I - M)^-1]_{target, s}, M the adjacency with each feature column divided by its
    activation, inverted densely by numpy."""
    lm, tc, g = traced
    target = int(g.logit_nodes[0])
    scale = np.where(g.kind == FEATURE, g.activation, 1.0).astype(np.float64)
    m = g.adjacency.toarray().astype(np.float64) / scale[None, :]
    total = np.linalg.inv(np.eye(g.n_nodes) - m)[target]
    want = -scale * total
    want[target] = 0.0
    got = bench.predicted_ablation_effects(g, target)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    feats = g.nodes_of(FEATURE)
    direct = -g.adjacency[[target]].toarray().ravel()[feats]
    assert np.abs(got[feats] - direct).max() > 1e-3  # longer paths matter in this graph


def test_predicted_effect_is_the_frozen_models_change_while_it_stays_linear(traced):
    """Scaling an early feature by 1 + eps moves the target logit by -eps times its predicted
    ablation effect in the frozen model with features responding, as long as no feature crosses
    its threshold."""
    lm, tc, g = traced
    target = int(g.logit_nodes[0])
    token = int(g.feature[target])
    feats = g.nodes_of(FEATURE)
    early = feats[g.layer[feats] == 0]
    source = int(early[np.argmax(g.activation[early])])
    predicted = bench.predicted_ablation_effects(g, target)[source]
    eps = 0.5
    for _ in range(8):
        r = circuits.intervene(
            lm, g, [("scale", g.node_id(source), 1 + eps)], transcoders=tc, progress=False
        )
        if all(torch.equal(a > 0, c > 0) for a, c in zip(r.acts, r.clean_acts)):
            break
        eps /= 4
    else:
        pytest.fail("every perturbation made some feature cross its threshold")
    assert r.n_changed_features > 1
    got = bench.logit_input(r.raw_logits, token, None) - bench.logit_input(
        r.raw_logits_clean, token, None
    )
    assert got == pytest.approx(-eps * predicted, rel=2e-3, abs=2e-5)


def test_zeroing_a_last_layer_feature_in_the_frozen_model_is_its_direct_edge(traced):
    """No feature sits after the last layer, so the frozen change is exact: minus its edge."""
    lm, tc, g = traced
    target = int(g.logit_nodes[0])
    feats = g.nodes_of(FEATURE)
    last = feats[g.layer[feats] == g.n_layers - 1]
    i = int(last[np.argmax(np.abs(g.adjacency[[target]].toarray().ravel()[last]))])
    (got,) = bench._ablations(lm, tc, g, [g.node_id(i)], "frozen", int(g.feature[target]))
    edge = float(g.adjacency[[target]].toarray().ravel()[i])
    assert got == pytest.approx(-edge, rel=1e-3, abs=2e-5)
    assert bench.predicted_ablation_effects(g, target)[i] == pytest.approx(-edge, rel=1e-6)


def test_logit_input_undoes_the_softcap_and_the_mean():
    raw = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    capped = 5.0 * torch.tanh(raw / 5.0)
    want = float(raw[7] - raw.mean())
    assert bench.logit_input(capped, 7, 5.0) == pytest.approx(want, rel=1e-6)
    assert bench.logit_input(raw, 7, None) == pytest.approx(want, rel=1e-6)


# -- the two conventions ---------------------------------------------------------------------------


def test_bos_zeroed_drops_only_the_edges_out_of_position_0_errors(traced):
    lm, tc, g = traced
    z = bench.bos_zeroed(g, lm.starts_with_bos(torch.as_tensor(g.tokens)))
    bos_errors = (g.kind == ERROR) & (g.pos == 0)
    dense, zd = g.adjacency.toarray(), z.adjacency.toarray()
    assert np.abs(dense[:, bos_errors]).sum() > 0  # there was something to drop
    assert not zd[:, bos_errors].any()
    np.testing.assert_array_equal(zd[:, ~bos_errors], dense[:, ~bos_errors])
    rows = g.has_row.astype(bool)  # the row invariant holds in the copy
    np.testing.assert_allclose(
        (zd.sum(1) + z.row_constant)[rows], (dense.sum(1) + g.row_constant)[rows], rtol=1e-4
    )
    assert circuits.prune(z).scores["full"] != circuits.prune(g).scores["full"]
    assert bench.bos_zeroed(g, False) is g


class NoBosTokenizer(TinyTokenizer):
    bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text, add_special_tokens=False)


def test_without_bos_both_conventions_score_the_same():
    lm = tiny_model(seed=1)
    lm.tokenizer = NoBosTokenizer(lm.tokenizer.vocab_size)
    tc = strong_transcoders(lm)
    g = circuits.attribute(lm, PROMPT, transcoders=tc, progress=False, dashboards=False)
    assert g.token_strings[0] != "<bos>"
    item = {"prompt": PROMPT, "target": g.logit_strings[0], "category": "facts"}
    r = bench.score_prompt(lm, tc, item, ablate=0)
    for which in ("full", "pruned"):
        for name in ("replacement", "completeness"):
            assert r[f"zeroed_{which}_{name}"] == r[f"kept_{which}_{name}"]


# -- a whole set -----------------------------------------------------------------------------------


def test_score_set_gives_bounded_scores_means_and_a_section():
    lm = tiny_model(seed=1)
    tc = strong_transcoders(lm, kind="skip")
    texts = [PROMPT, "A dog ran to the park", "one two three four"]
    prompts = []
    for text, cat in zip(texts, ["facts", "facts", "sequences"]):
        top = lm.last_logits(lm.tokenize(text)).argmax()
        prompts.append({"prompt": text, "target": lm.tokenizer.decode([int(top)]), "category": cat})
    res = bench.score_set(
        lm, tc, prompts, ablate=6, progress=False, ce={"tokens": 256}, name="tiny-skip"
    )
    recs = res["records"]
    assert len(recs) == 3 and all(r["target_is_top"] for r in recs)
    for r in recs:
        for key in bench.METRICS:
            if "replacement" in key or "completeness" in key or "error_share" in key:
                assert 0.0 <= r[key] <= 1.0, key
        assert len(r["ablations"]) == min(6, r["circuit_features"])
    rhos = [r[k] for r in recs for k in ("spearman_graph_full", "spearman_frozen_full")]
    assert all(-1.0 <= x <= 1.0 for x in rhos if not math.isnan(x))
    assert sum(not math.isnan(x) for x in rhos) >= 2
    facts = [r["kept_full_replacement"] for r in recs if r["category"] == "facts"]
    assert res["means"]["by_category"]["facts"]["kept_full_replacement"] == pytest.approx(
        np.mean(facts)
    )
    assert res["means"]["all"]["n"] == 3
    assert 0 < res["ce"]["tokens"] and math.isfinite(res["ce"]["ce_spliced"])
    text = bench.section_markdown(res, "python benchmarks/faithfulness.py")
    assert text.startswith("## Faithfulness of the graphs (benchmarks/faithfulness.py)")
    assert "Transcoders: tiny-skip (skip, jumprelu, width 48" in text
    assert "| **all** | 3 |" in text and "| sequences | 1 |" in text
    assert sum(line.startswith("| 3 | sequences |") for line in text.splitlines()) == 1
