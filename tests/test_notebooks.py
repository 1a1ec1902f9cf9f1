"""The notebooks in notebooks/ run as shipped.

Each is executed top to bottom with nbclient in its small `ci` setting
(GEMMA_CIRCUITS_NOTEBOOK_SCALE=ci) and must produce its pictures and tables; each is stored without
outputs, opens with what the reader will learn and how long it takes, and imports only the public
API."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# what each notebook must show when it runs: output MIME types, text that must appear, files it
# writes
EXPECTED = {
    "01_trace_a_prompt": {
        "mime": {"image/png", "image/svg+xml", "text/markdown", "text/html"},
        "text": ["Strongest paths into the top logit", "largest relative mismatch"],
        "files": ["circuit.svg", "circuit.html", "circuit.npz"],
    },
    "02_prune_and_compare": {
        "mime": {"image/png", "image/svg+xml", "text/markdown", "text/html"},
        "text": ["Node threshold sweep", "Edge threshold sweep", "Jaccard"],
        "files": ["difference.svg", "circuit_a.npz", "circuit_b.npz", "comparison.json"],
    },
    "03_interventions": {
        "mime": {"image/png", "text/markdown"},
        "text": ["direct effects: graph and intervention agree", "continuation, intervened"],
        "files": [],
    },
    "04_train_transcoders": {
        "mime": {"image/png", "text/markdown"},
        "text": ["| mean |", "CE recovered", "reloaded:"],
        "files": [],
    },
    "05_attention": {
        "mime": {"image/png", "text/markdown"},
        "text": [
            "head loadings sum to the edge weight",
            "the pair parts sum to the score",
            "Strongest pairs",
            "rather than",
        ],
        "files": [],
    },
}
# runs the real gemma-3-270m with a small budget even in ci
REAL_MODEL_IN_CI = {"02_prune_and_compare"}

# modules a notebook may import from this project: the public API
PUBLIC_MODULES = {
    "gemma_lm",
    "gemma_lm.files",
    "circuits",
    "circuits.graph",
    "circuits.pruning",
    "circuits.comparison",
    "circuits.render",
    "circuits.explain",
    "circuits.interventions",
    "circuits.labels",
    "transcoders",
    "transcoders.dashboards",
    "transcoders.formats",
    "transcoders.train",
    "transcoders.evaluate",
    "transcoders.default",
    # the stand-ins of the ci scale (a tiny random model and random transcoders): fixtures, not API
    "gemma_lm.testing",
    "transcoders.testing",
}


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_the_notebooks_are_all_there():
    assert {p.stem for p in NOTEBOOKS} == set(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs_and_valid(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_says_what_and_how_long(path):
    first = nbformat.read(path, as_version=4).cells[0]
    assert first.cell_type == "markdown"
    assert "What you will learn" in first.source
    assert re.search(
        r"How long it takes on a laptop CPU:\*\* about [\d–-]+ minutes", first.source
    ), first.source
    assert "GEMMA_CIRCUITS_NOTEBOOK_SCALE" in first.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_imports_only_the_public_api(path):
    for source in _code(nbformat.read(path, as_version=4)):
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                modules, names = [node.module or ""], [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                modules, names = [a.name for a in node.names], []
            elif isinstance(node, ast.Attribute):
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                assert not private, f"{path.name} reaches into a private attribute: .{node.attr}"
                continue
            else:
                continue
            for m in modules:
                if m.split(".")[0] in ("circuits", "transcoders"):
                    assert m in PUBLIC_MODULES, f"{path.name} imports {m}, which is not public API"
            assert not [n for n in names if n.startswith("_")], (
                f"{path.name} imports private names {names}"
            )


def _outputs(nb) -> tuple[set[str], str]:
    """(MIME types of every display output, all text shown: streams, text/plain, markdown, HTML)."""
    mimes, text = set(), []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.output_type == "stream":
                text.append(o.text)
            elif o.output_type in ("display_data", "execute_result"):
                mimes.update(o.data)
                text += [
                    str(o.data.get(k, "")) for k in ("text/plain", "text/markdown", "text/html")
                ]
    return mimes, "\n".join(text)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.slow) if p.stem in REAL_MODEL_IN_CI else p
        for p in NOTEBOOKS
    ],
    ids=lambda p: p.stem,
)
def test_notebook_runs(path, tmp_path, monkeypatch, request):
    from nbclient import NotebookClient

    if path.stem in REAL_MODEL_IN_CI:
        # train them once per machine, not inside the kernel
        request.getfixturevalue("default_transcoders")
    monkeypatch.setenv("GEMMA_CIRCUITS_NOTEBOOK_SCALE", "ci")  # the kernel inherits the environment
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    mimes, text = _outputs(nb)
    want = EXPECTED[path.stem]
    assert want["mime"] <= mimes, (
        f"{path.name} showed {sorted(mimes)}, missing {sorted(want['mime'] - mimes)}"
    )
    for snippet in want["text"]:
        assert snippet in text, f"{path.name} never showed {snippet!r}"
    assert "Traceback" not in text
    written = tmp_path / "outputs" / path.stem
    for name in want["files"]:
        assert (written / name).stat().st_size > 0, f"{path.name} did not write {name}"
