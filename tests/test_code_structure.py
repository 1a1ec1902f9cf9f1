"""The shape of the code: layers that import one way, no import cycles, short functions.

The layers (docs/development.md): `gemma_lm` (the language model and its weight store) at the
bottom, `transcoders` on it, `circuits` on both. Inside `circuits` the stages run the way the data
flows: graph type -> replacement model -> attribution -> pruning -> outputs and analyses ->
commands; no stage imports a later one. Imports are read with `ast` from the sources, function-local
ones included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["gemma_lm", "transcoders", "circuits"]  # bottom first
# circuits' modules by stage; a module may import its own stage and earlier ones only
CIRCUIT_STAGES = [
    ["circuits.graph", "circuits.backend"],
    ["circuits.replacement"],
    ["circuits.attribution"],
    ["circuits.pruning"],
    [
        "circuits.export",
        "circuits.labels",
        "circuits.comparison",
        "circuits.interventions",
        "circuits.explain",
        "circuits.attention",
        "circuits.heads",
    ],
    ["circuits.render", "circuits.render_attention", "circuits.batch"],
    ["circuits", "circuits.__main__", "circuits.cli", "circuits.info"]
    + [f"circuits.{p.stem}" for p in (ROOT / "circuits").glob("commands*.py")],
]
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imported(module: str, node: ast.AST) -> list[str]:
    """The library modules an import statement of `module` loads (its package's, for a name that is
    not a module; nothing for a compiled extension)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
        return [t for t in targets if t.split(".")[0] in LAYERS]
    if node.level:
        package = module.split(".")
        if MODULES[module].name != "__init__.py":
            package = package[:-1]
        base = ".".join(
            package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
        )
    else:
        base = node.module or ""
    if base.split(".")[0] not in LAYERS:
        return []
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in MODULES:
            out.append(full)
        elif not list((ROOT / Path(*full.split("."))).parent.glob(f"{alias.name}.*.so")):
            out.append(base)
    return out


def _import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(_imported(name, node))
        graph[name] = found - {name}
    return graph


GRAPH = _import_graph()


def _rank(module: str) -> tuple[int, int]:
    layer = LAYERS.index(module.split(".")[0])
    stage = next((i for i, s in enumerate(CIRCUIT_STAGES) if module in s), None)
    return layer, stage if layer == 2 else 0


def test_every_circuits_module_has_a_stage():
    staged = {m for stage in CIRCUIT_STAGES for m in stage}
    assert {m for m in MODULES if m.split(".")[0] == "circuits"} == staged


def test_layers_import_downwards_only():
    wrong = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if t in MODULES and _rank(t) > _rank(m)
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(GRAPH):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_a_test_of_the_rules_can_fail():
    """The checks above see what they are meant to: a known upward import and a known cycle."""
    assert (
        "gemma_lm.models" in GRAPH["transcoders.model"]
        or "gemma_lm.weights" in GRAPH["transcoders.model"]
    )
    fake = ast.parse("from circuits.graph import AttributionGraph\nfrom . import models")
    assert _imported("gemma_lm.weights", fake.body[0]) == ["circuits.graph"]
    assert _rank("circuits.graph") > _rank("gemma_lm.weights")
    assert _imported("gemma_lm.weights", fake.body[1]) == ["gemma_lm.models"]


@pytest.mark.parametrize("lower", ["gemma_lm", "transcoders"])
def test_lower_layers_import_without_the_upper_ones(lower):
    """Importing every module of a lower layer loads no module of a layer above it."""
    modules = sorted(m for m in MODULES if m.split(".")[0] in LAYERS[: LAYERS.index(lower) + 1])
    modules = [m for m in modules if not m.endswith("__main__")]
    above = LAYERS[LAYERS.index(lower) + 1 :]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {above!r})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - start + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
