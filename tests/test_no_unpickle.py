"""No file a user hands us is ever unpickled: no module of the project calls anything that can
unpickle (checked on the source), and a resumed `transcoders train` that finds pickled payloads in
its checkpoint folder never runs them (checked on a tiny model through the command line)."""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import serve_model

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gemma_lm", "transcoders", "circuits", "benchmarks", "scripts")

# modules whose loaders unpickle (or, for shelve and marshal, load Python objects): never imported
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
UNPICKLING_MODULES |= {"marshal", "torch.package", "torch.hub", "torch.serialization"}
# calls that unpickle whatever their arguments (torch.load: weights_only=True is still a pickle
# reader, if a restricted one; the project needs none)
UNPICKLING_CALLS = {
    "torch.load",
    "torch.jit.load",
    "pandas.read_pickle",
    "numpy.lib.format.read_array",
}
# Hugging Face model classes: from_pretrained falls back to torch.load on pytorch_model.bin
# unless safetensors is required (or the weights are GGUF)
MODEL_LOADER_SAFE_KEYWORDS = ("use_safetensors", "gguf_file")


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it was imported as (`np` -> numpy, `load` -> torch.load)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    """`np.load` -> "numpy.load" (the head resolved through the imports); "" for other calls."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _keyword(call: ast.Call, name: str):
    """The constant value of keyword `name` of `call`; None if not given by name (absent, or in
    **kwargs), ... if not a constant."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else ...
    return None


def _imports(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def _call_problem(call: ast.Call, aliases: dict[str, str]) -> str | None:
    name = _dotted(call.func, aliases)
    if name in UNPICKLING_CALLS or name.startswith("torch.serialization."):
        return f"{name}() unpickles"
    if name == "numpy.load" and _keyword(call, "allow_pickle") is not False:
        return "numpy.load() without allow_pickle=False"
    if _keyword(call, "allow_pickle") not in (None, False):
        return f"{name or 'a call'}(allow_pickle=...) may unpickle"
    if _keyword(call, "weights_only") not in (None, True):
        return f"{name or 'a call'}(weights_only=...) may unpickle"
    if name.endswith(".from_pretrained") and "Model" in name.split(".")[-2]:
        if not any(_keyword(call, k) not in (None, False) for k in MODEL_LOADER_SAFE_KEYWORDS):
            return f"{name}() without use_safetensors=True may torch.load pytorch_model.bin"
    if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
        return f"{name}() builds Python objects; use yaml.safe_load"
    return None


def unpickling_sites(source: str) -> list[tuple[int, str]]:
    """(line, what) for each place in Python `source` that can unpickle or load Python objects."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        for module in _imports(node):
            if module in UNPICKLING_MODULES or module.split(".")[0] in UNPICKLING_MODULES:
                found.append((node.lineno, f"imports {module}"))
        if isinstance(node, ast.Call):
            problem = _call_problem(node, aliases)
            if problem:
                found.append((node.lineno, problem))
    return sorted(set(found))


def test_no_module_can_unpickle():
    sources = _sources()
    assert len(sources) > 50 and ROOT / "transcoders" / "train.py" in sources
    found = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in sources
        for line, what in unpickling_sites(path.read_text())
    ]
    assert not found, "code that can unpickle a file:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=True)",
        "from torch import load\nload(p)",
        "import torch as t\nt.serialization.load(p)",
        "import pickle",
        "import pickle as pk",
        "from pickle import loads",
        "import dill.settings",
        "import numpy as np\nnp.load(p)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "import numpy as np\nnp.load(p, allow_pickle=flag)",
        "import numpy as np\nnp.load(p, **kw)",
        "from numpy import load\nload(p)",
        "import pandas as pd\npd.read_pickle(p)",
        "from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained(p)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "f(p, weights_only=False)",
    ],
)
def test_the_scan_finds_unpickling(source):
    assert unpickling_sites(source), source


@pytest.mark.parametrize(
    "source",
    [
        "import numpy as np\nnp.load(p, allow_pickle=False)",
        "import json\njson.load(f)",
        "from safetensors.torch import load_file\nload_file(p)",
        "import yaml\nyaml.safe_load(text)",
        "from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained(p)",
        "import transformers as t\nt.AutoModelForCausalLM.from_pretrained(p, use_safetensors=True)",
        "import torch\ntorch.save(x, p)",
        "'torch.load and pickle, in a docstring'",
    ],
)
def test_the_scan_passes_safe_readers(source):
    assert not unpickling_sites(source), source


# -- pickled payloads in the checkpoint folder -----------------------------------------------------


class Payload:
    """Unpickled, it creates the file `marker`: it would run code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _train_argv(out: Path, corpus: Path) -> list[str]:
    return [
        "train",
        "--out",
        str(out),
        "--model",
        "tiny",
        "--kind",
        "plt",
        "--activation",
        "topk",
        "--d-sae",
        "16",
        "--k",
        "2",
        "--text",
        f"file:{corpus}",
        "--context",
        "32",
        "--tokens",
        "640",
        "--batch-size",
        "64",
        "--buffer-tokens",
        "256",
        "--harvest-dtype",
        "float32",
        "--compute-dtype",
        "float32",
        "--init-tokens",
        "128",
        "--checkpoint-every",
        "4",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """(the corpus, the checkpoint folder of a run of `_train_argv`'s settings: step 8 of 10)."""
    from gemma_lm.jobs import from_args
    from gemma_lm.testing import tiny_model
    from transcoders.cli import build_parser
    from transcoders.train import train_transcoders

    root = tmp_path_factory.mktemp("good")
    corpus = root / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"Paragraph {i}: the lazy dog sleeps {i * 3} hours a day." for i in range(40))
    )
    args = build_parser().parse_args(_train_argv(root / "tc", corpus))
    cfg = replace(from_args(args._command.job, args), keep_checkpoint=True)
    train_transcoders(cfg, loaded=tiny_model(seed=0))
    assert json.loads(cfg.checkpoint_path().read_text())["step"] == 8
    return corpus, cfg.checkpoint_dir()


def _tensors(folder: Path) -> Path:
    (file,) = folder.glob("checkpoint-*.safetensors")
    return file


def _point_record_at(folder: Path, name: str, data: bytes) -> None:
    """checkpoint.json naming `name` with the size and sha256 of `data`."""
    path = folder / "checkpoint.json"
    record = json.loads(path.read_text())
    record["tensors"].update(file=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    path.write_text(json.dumps(record))


def _plant(folder: Path, case: str, payload: bytes, pt_payload: bytes) -> str:
    """Put the payload where `case` says; returns the file the error must name."""
    if case == "old checkpoint.pt alone":
        for p in folder.iterdir():
            p.unlink()
    if case.startswith("old checkpoint.pt"):
        (folder / "checkpoint.pt").write_bytes(pt_payload)
        return "checkpoint.pt"
    if case == "checkpoint.json":
        (folder / "checkpoint.json").write_bytes(payload)
        return "checkpoint.json"
    tensors = _tensors(folder)
    tensors.write_bytes(payload)
    if case == "tensors file, checkpoint.json agreeing":
        _point_record_at(folder, tensors.name, payload)
    if case == "a path out of the folder":
        (folder.parent / "payload.pkl").write_bytes(payload)
        _point_record_at(folder, "../payload.pkl", payload)
        return "checkpoint.json"
    return tensors.name


PAYLOAD_CASES = [
    "old checkpoint.pt alone",
    "old checkpoint.pt beside a checkpoint",
    "checkpoint.json",
    "tensors file",
    "tensors file, checkpoint.json agreeing",
    "a path out of the folder",
]


def _payloads(marker: Path) -> tuple[bytes, bytes]:
    """(the payload pickled, the payload as torch.save writes it: what checkpoint.pt held)."""
    import io

    buf = io.BytesIO()
    torch.save({"step": 8, "net": Payload(marker)}, buf)
    return pickle.dumps(Payload(marker)), buf.getvalue()


def test_the_payloads_run_when_unpickled(tmp_path):
    """(So that the tests below, where they do not run, can fail.)"""
    plain, saved = _payloads(tmp_path / "ran")
    pickle.loads(plain)
    assert (tmp_path / "ran").exists()
    (tmp_path / "ran").unlink()
    torch.load(__import__("io").BytesIO(saved), weights_only=False)
    assert (tmp_path / "ran").exists()


def _train_cli(monkeypatch, argv: list[str]) -> int:
    from gemma_lm.testing import tiny_model
    from transcoders import cli, train

    serve_model(monkeypatch, tiny_model(seed=0))
    monkeypatch.setattr(train, "own_process", lambda: None)  # this process goes on after the run
    return cli.run(argv)


@pytest.mark.parametrize("case", PAYLOAD_CASES)
def test_resume_never_unpickles_the_checkpoint_folder(
    tmp_path, monkeypatch, capsys, good_checkpoint, case
):
    corpus, good = good_checkpoint
    out = tmp_path / "tc"
    folder = Path(str(out) + ".train")
    shutil.copytree(good, folder)
    marker = tmp_path / "payload-ran"
    named = _plant(folder, case, *_payloads(marker))
    status = _train_cli(monkeypatch, _train_argv(out, corpus))
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists(), "a pickled payload ran"
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(folder / named) in err[0] and f"delete {folder}" in err[0], err[0]
    assert not out.exists()


def test_payloads_in_leftover_partial_files_are_removed_unread(
    tmp_path, monkeypatch, capsys, good_checkpoint
):
    """Temporary files of a killed run's writes are deleted, never read: the run resumes."""
    corpus, good = good_checkpoint
    out = tmp_path / "tc"
    folder = Path(str(out) + ".train")
    shutil.copytree(good, folder)
    marker = tmp_path / "payload-ran"
    payload, _ = _payloads(marker)
    partials = [
        folder / ".checkpoint.json.k1ll3d.partial",
        folder / ".checkpoint-00000012-0badc0de.safetensors.partial",
        tmp_path / ".tc.k1ll3d.partial",
    ]
    for p in partials:
        p.write_bytes(payload)
    assert _train_cli(monkeypatch, _train_argv(out, corpus)) == 0, capsys.readouterr().err
    assert not marker.exists() and not any(p.exists() for p in partials)
    assert (out / "config.json").exists() and not folder.exists()
