"""The same graphs, bit for bit: attribution graphs and their circuits on tiny random models
(several configs and transcoder kinds, fixed seeds) against the digests in
tests/data/graph_digests.json (`tests/graph_digests.py` says how they were made and when to
regenerate them)."""

from __future__ import annotations

import json

import pytest
from graph_digests import CASES, DIGESTS, backends, case_digest

STORED = json.loads(DIGESTS.read_text())


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_graph_equals_its_stored_digest(monkeypatch, backend, name):
    if backend not in backends():
        pytest.skip("the compiled edge kernel is not built")
    monkeypatch.setenv("GEMMA_CIRCUITS_BACKEND", backend)
    got = json.loads(json.dumps(case_digest(name)))
    want = STORED[backend][name]
    for which in ("graph", "circuit"):
        changed = sorted(
            k for k in set(want[which]) | set(got[which]) if want[which].get(k) != got[which].get(k)
        )
        assert not changed, f"{name} ({backend}): the {which} changed in {changed}"
