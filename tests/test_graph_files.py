"""Graph files against damage and kills: every malformed file is a one-line UserError (a fuzz over
truncations, byte flips, missing, extra and retyped arrays), a writer killed mid-save leaves the
previous file intact, and its temporary file is removed by the next write.

The kill test starts this file as a script (`_fault_server` at the bottom): it builds the tiny
model once and forks one `circuits trace` per run, so that 20+ kills cost one interpreter start.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_render import synthetic_graph

from circuits.graph import FORMAT_VERSION, load_graph
from circuits.pruning import prune
from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write, atomic_write_text

NODE_ARRAYS = ("kind", "layer", "pos", "feature", "activation", "node_input", "row_constant")


@pytest.fixture
def graph_file(tmp_path) -> Path:
    """A small graph file as `save` writes it (synthetic: 40 features, influence, labels)."""
    return synthetic_graph(n_features=40, seed=3).save(tmp_path / "graph.npz")


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _header(arrays: dict) -> dict:
    return json.loads(arrays["header"].tobytes().decode())


def _with_header(arrays: dict, header) -> dict:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return {**arrays, "header": np.frombuffer(raw, dtype=np.uint8)}


def _write(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


def _load_or_error(path: Path):
    """The graph at `path`, or the message of the UserError loading it raised; any other exception
    fails the test. The message is one line, names the file and gives no numpy pickle hint."""
    try:
        return load_graph(path)
    except UserError as e:
        message = str(e)
    assert "\n" not in message and str(path) in message, message
    assert "allow_pickle" not in message and "Traceback" not in message, message
    return message


def _assert_consistent(graph) -> None:
    """What the loader promises of a graph it returns, and that the stages run on it."""
    n = graph.n_nodes
    for name in (*NODE_ARRAYS, "has_row"):
        assert len(getattr(graph, name)) == n, name
    assert graph.adjacency.shape == (n, n)
    graph.adjacency.check_format(full_check=True)
    assert len(graph.tokens) == len(graph.token_strings)
    assert len(graph.logit_probabilities) == len(graph.logit_nodes)
    assert np.isfinite(graph.adjacency.data).all() and np.isfinite(graph.activation).all()
    assert all(0 <= k < n for k in graph.labels)
    graph.summary()
    [graph.node_label(i) for i in range(n)]
    try:
        pruned = prune(graph)
    except UserError as e:  # a flipped index can close a cycle, which pruning refuses
        assert "cycle" in str(e)
    else:
        assert pruned.n_nodes <= n


# -- each kind of damage: its own message ----------------------------------------------------------


def _changed(graph_file: Path, name: str, value) -> dict:
    arrays = _arrays(graph_file)
    if value is None:
        del arrays[name]
    else:
        arrays[name] = value
    return arrays


def _damaged_files(graph_file: Path):
    """(description, arrays to write, expected words) for each kind of damage."""
    a = _arrays(graph_file)
    n = len(a["kind"])
    header = _header(a)
    indptr = a["adj_indptr"]
    decreasing = indptr.copy()
    decreasing[5] = decreasing[6] + 1
    nan_row_input = a["node_input"].copy()
    nan_row_input[np.flatnonzero(a["has_row"])[0]] = np.nan
    shuffled_kind = a["kind"][::-1].copy()
    far_pos = a["pos"].copy()
    far_pos[0] = len(a["tokens"])
    far_layer = a["layer"].copy()
    far_layer[0] = header["n_layers"]
    return [
        ("missing", _changed(graph_file, "adj_data", None), "adj_data missing"),
        ("extra", _changed(graph_file, "extra", np.zeros(3)), "unexpected 'extra'"),
        ("dtype", _changed(graph_file, "kind", a["kind"].astype(np.float32)), "kind is a <f4"),
        ("strings", _changed(graph_file, "tokens", np.array(["a"] * 9)), "tokens is a <U1"),
        ("2-D", _changed(graph_file, "pos", a["pos"][:, None]), f"shape ({n}, 1)"),
        ("short", _changed(graph_file, "layer", a["layer"][:-2]), f"{n - 2} entries for {n}"),
        ("indptr length", _changed(graph_file, "adj_indptr", indptr[:-2]), "adj_indptr has"),
        ("indptr order", _changed(graph_file, "adj_indptr", decreasing), "does not rise"),
        ("indptr end", _changed(graph_file, "adj_data", a["adj_data"][:-1]), "ends at"),
        ("index", _changed(graph_file, "adj_indices", a["adj_indices"] + n), "outside [0,"),
        ("nan edge", _changed(graph_file, "adj_data", a["adj_data"] * np.nan), "adj_data holds"),
        ("nan input", _changed(graph_file, "node_input", nan_row_input), "node_input is NaN"),
        ("kind order", _changed(graph_file, "kind", shuffled_kind), "kind is not"),
        ("pos", _changed(graph_file, "pos", far_pos), "pos has a position outside"),
        ("layer", _changed(graph_file, "layer", far_layer), "layer has a feature"),
        (
            "logits",
            _changed(graph_file, "logit_probabilities", a["logit_probabilities"][:1]),
            "logit_probabilities has 1 entries for 3 logit nodes",
        ),
        ("not json", _with_header(a, b"{nope"), "the header is not JSON"),
        ("not utf-8", _with_header(a, b'{"a": "\xff"}'), "the header is not JSON"),
        ("no prompt", _with_header(a, {**header, "prompt": None}), "prompt is missing"),
        ("shape", _with_header(a, {**header, "shape": [n, n + 1]}), "shape is"),
        ("n_layers", _with_header(a, {**header, "n_layers": "18"}), "n_layers is str"),
        ("label", _with_header(a, {**header, "labels": {str(n): "x"}}), "labels name node"),
        ("version", _with_header(a, {**header, "version": "1"}), "version is '1'"),
    ]


def test_each_kind_of_damage_is_named_in_one_line(graph_file, tmp_path):
    for what, arrays, words in _damaged_files(graph_file):
        message = _load_or_error(_write(tmp_path / "bad.npz", arrays))
        assert isinstance(message, str), f"{what}: loaded"
        assert "is not a complete gemma-circuits graph" in message, (what, message)
        assert words in message and message.endswith("trace it again"), (what, message)


def test_empty_truncated_and_foreign_files(graph_file, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert "(the file is empty)" in _load_or_error(empty)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(graph_file.read_bytes()[: graph_file.stat().st_size // 2])
    assert "the archive is truncated or damaged" in _load_or_error(cut)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    assert "is not a gemma-circuits graph file (not an .npz archive)" in _load_or_error(text)
    other_zip = tmp_path / "other.npz"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "not a graph")
    assert "without a gemma-circuits header" in _load_or_error(other_zip)
    other_npz = _write(tmp_path / "other2.npz", {"x": np.zeros(3)})
    assert "without a gemma-circuits header" in _load_or_error(other_npz)
    foreign = _write(tmp_path / "foreign.npz", _with_header(_arrays(graph_file), {"format": "x"}))
    assert "does not name the gemma-circuits-graph format" in _load_or_error(foreign)
    newer = _header(_arrays(graph_file)) | {"version": FORMAT_VERSION + 1}
    future = _write(tmp_path / "future.npz", _with_header(_arrays(graph_file), newer))
    assert "upgrade gemma-circuits" in _load_or_error(future)
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    assert "is a directory" in _load_or_error(folder)


class _Payload:
    """Unpickling this writes a marker file: the loader must never do it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_pickled_content_is_refused_without_running(graph_file, tmp_path):
    marker = tmp_path / "ran"
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps(_Payload(marker)))
    assert "not an .npz archive" in _load_or_error(pickled)
    objects = _arrays(graph_file)
    objects["activation"] = np.array([_Payload(marker)] * len(objects["kind"]), dtype=object)
    np.savez(tmp_path / "objects.npz", **objects, allow_pickle=True)
    message = _load_or_error(tmp_path / "objects.npz")
    assert "activation holds Python objects, which are never unpickled" in message
    assert not marker.exists()


def test_what_the_format_allows_loads(graph_file, tmp_path):
    """node_input is NaN for source-only nodes (tokens, errors) and rowless features; wider
    integer and float dtypes; no influence before pruning."""
    graph = load_graph(graph_file)
    assert np.isnan(graph.node_input[~graph.has_row]).all()
    wide = {
        k: (v.astype(np.float64) if v.dtype == np.float32 else v)
        for k, v in _arrays(graph_file).items()
    }
    wide["layer"] = wide["layer"].astype(np.int64)
    del wide["influence"]
    back = load_graph(_write(tmp_path / "wide.npz", wide))
    _assert_consistent(back)
    assert back.influence is None and back.adjacency.nnz == graph.adjacency.nnz


# -- the fuzz --------------------------------------------------------------------------------------


def _fuzz_files(graph_file: Path, tmp_path: Path, rng: np.random.Generator):
    """Paths of damaged copies of `graph_file`, one at a time (each overwrites the last)."""
    data = graph_file.read_bytes()
    path = tmp_path / "fuzz.npz"
    for cut in np.unique(np.linspace(0, len(data) - 1, 60).astype(int)):
        path.write_bytes(data[:cut])
        yield path
    for _ in range(100):  # flips in the archive bytes: mostly CRC or zlib errors
        flipped = bytearray(data)
        for at in rng.integers(0, len(data), rng.integers(1, 4)):
            flipped[at] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(flipped))
        yield path
    arrays = _arrays(graph_file)
    for _ in range(100):  # flips inside an array's values, in a sound archive: the checks' work
        name = str(rng.choice(sorted(arrays)))
        raw = bytearray(arrays[name].tobytes())
        if raw:
            raw[int(rng.integers(0, len(raw)))] ^= 1 << int(rng.integers(0, 8))
        flipped = np.frombuffer(bytes(raw), dtype=arrays[name].dtype)
        yield _write(path, {**arrays, name: flipped})
    dtypes = ["<f2", "<f8", "<i2", "<i8", "<u4", "|b1", "<U3", "<c8", ">f4", ">i4"]
    for name in sorted(arrays):
        yield _write(path, {k: v for k, v in arrays.items() if k != name})
        yield _write(path, {**arrays, f"{name}_copy": arrays[name]})
        for dtype in dtypes:
            yield _write(path, {**arrays, name: arrays[name].astype(dtype)})


def test_fuzz_every_damaged_file_loads_consistently_or_fails_in_one_line(graph_file, tmp_path):
    outcomes = []
    # retyped and flipped values overflow in casts and in pruning's sums: expected, not checked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for path in _fuzz_files(graph_file, tmp_path, np.random.default_rng(23)):
            result = _load_or_error(path)
            if not isinstance(result, str):
                _assert_consistent(result)
            outcomes.append(isinstance(result, str))
    assert sum(outcomes) > 300 and outcomes.count(False) > 20  # both outcomes were exercised


# -- stale temporary files -------------------------------------------------------------------------


def test_next_write_removes_stale_partials_of_that_target_only(tmp_path):
    target = tmp_path / "g.npz"
    stale = [tmp_path / ".g.npz.k1l2m3n4.partial", tmp_path / ".g.npz.a_b9c8d7.partial"]
    others = [
        tmp_path / ".g.npz.pruned.npz.k1l2m3n4.partial",  # another target's (g.npz.pruned.npz)
        tmp_path / ".h.npz.k1l2m3n4.partial",
        tmp_path / ".g.npz.partial",
    ]
    for p in stale + others:
        p.write_bytes(b"half a file")
    live = tmp_path / ".g.npz.z9y8x7w6.partial"  # a writer still at work holds its lock
    live.write_bytes(b"being written")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        atomic_write_text(target, "new")
        assert live.exists()
    assert target.read_text() == "new"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)
    atomic_write_text(target, "newer")  # the writer is gone now: its file is stale
    assert not live.exists()


def test_a_failed_write_leaves_no_partial_and_the_old_file(tmp_path):
    target = tmp_path / "g.json"
    atomic_write_text(target, "old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["g.json"]


# -- SIGKILL during `circuits trace` ---------------------------------------------------------------

OUTPUTS = ("g.npz", "g.pruned.npz")
TRACE_OPTIONS = "--prune --model tiny --no-dashboards --no-progress --max-feature-nodes 40".split()


def _snapshot(out: Path) -> dict[str, bytes | None]:
    return {name: (out / name).read_bytes() if (out / name).exists() else None for name in OUTPUTS}


def _check_outputs(out: Path, before: dict, reference: dict, dying_in: str | None) -> None:
    """Each output is absent (never written yet), the previous complete file byte for byte, or a
    new complete one: it loads and has the reference graph's nodes and edges. The file whose save
    was killed is the previous one."""
    after = _snapshot(out)
    for name in OUTPUTS:
        if name == dying_in:
            assert after[name] == before[name], f"{name} changed by a killed save"
        if after[name] is None:
            assert before[name] is None, f"{name} disappeared"
            continue
        graph = load_graph(out / name)
        assert np.array_equal(graph.kind, reference[name].kind), name
        assert (graph.adjacency != reference[name].adjacency).nnz == 0, name


def _partials(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".*.partial"))


def _start_server(tmp_path: Path) -> subprocess.Popen:
    # this checkout's packages, whatever the environment has installed
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    server = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path / "out"), str(tmp_path / "tc")],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if server.stdout.readline().strip() != "ready":
        server.kill()
        pytest.fail("the fault server did not start (its error is on stderr above)")
    return server


def _trace(server: subprocess.Popen, command: str) -> str:
    """One forked `circuits trace`; 'exit CODE' or 'killed'."""
    server.stdin.write(command + "\n")
    server.stdin.flush()
    return server.stdout.readline().strip()


def test_sigkill_at_random_points_never_leaves_a_partial_or_stale_file(tmp_path):
    out = tmp_path / "out"
    server = _start_server(tmp_path)
    try:
        assert _trace(server, "run 0") == "exit 0", (out / "child.log").read_text()[-3000:]
        reference = {name: load_graph(out / name) for name in OUTPUTS}
        duration = float((out / "duration").read_text())
        rng = random.Random(7)
        outcomes = []
        for i in range(24):
            if i % 2:  # a kill from inside, partway through writing one of the files
                dying_in = OUTPUTS[i // 2 % 2]
                command = f"die-in-save {dying_in} {rng.uniform(0.0, 1.0):.3f}"
            else:  # a kill from outside at a random moment (some runs end first)
                dying_in = None
                command = f"kill-after {rng.uniform(0.0, 1.3 * duration):.3f}"
            before = _snapshot(out)
            outcome = _trace(server, command)
            outcomes.append(outcome)
            _check_outputs(out, before, reference, dying_in)
            if dying_in:
                assert outcome == "killed" and any(
                    p.startswith(f".{dying_in}.") for p in _partials(out)
                )
            if outcome == "exit 0":
                assert _partials(out) == [], _partials(out)
        assert _trace(server, "run 0") == "exit 0"
        assert _partials(out) == []
        _check_outputs(out, _snapshot(out), reference, None)
    finally:
        server.stdin.close()  # the server's loop ends
        try:
            server.wait(timeout=60)
        finally:
            server.kill()
            server.stdout.close()
    assert outcomes[::2].count("killed") >= 6, outcomes  # the outside kills mostly hit a run


def _fault_server(out: str, tc_dir: str) -> None:
    """The kill test's child: the tiny model once, then per line on stdin ('run 0', 'kill-after
    SECONDS', 'die-in-save FILE FRACTION') a forked `circuits trace` into OUT; answers 'exit CODE'
    or 'killed' per line."""
    import time

    import torch
    from conftest import serve_model

    from gemma_lm.testing import tiny_model
    from transcoders.formats import save_native
    from transcoders.testing import random_transcoders

    torch.set_num_threads(1)  # no thread pool: forking is safe
    lm = tiny_model(seed=0)
    save_native(
        random_transcoders(3, 64, 96, kind="skip", seed=1, l0=6, model_name=lm.name), tc_dir
    )
    serve_model(pytest.MonkeyPatch(), lambda *a, **kw: lm)
    Path(out).mkdir(parents=True, exist_ok=True)
    print("ready", flush=True)
    for line in sys.stdin:
        mode, *args = line.split()
        pid = os.fork()
        if pid == 0:
            os._exit(_traced_child(out, tc_dir, mode, args))
        if mode == "kill-after":
            time.sleep(float(args[0]))
            os.kill(pid, signal.SIGKILL)  # an exited child is a zombie till waited for: no reuse
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print("killed" if killed else f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


def _traced_child(out: str, tc_dir: str, mode: str, args: list[str]) -> int:
    """In the forked child: `circuits trace --prune` into OUT/g.npz, output to OUT/child.log;
    with 'die-in-save FILE FRACTION' it SIGKILLs itself once FRACTION of FILE is written."""
    import time

    import circuits.graph
    from circuits.cli import run

    log = os.open(Path(out) / "child.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if mode == "die-in-save":
        circuits.graph.atomic_write = _dying_write(args[0], float(args[1]))
    start = time.perf_counter()
    code = run(
        ["trace", "The cat sat on the", "--out", f"{out}/g.npz", "--transcoders", tc_dir]
        + TRACE_OPTIONS
    )
    Path(out, "duration").write_text(str(time.perf_counter() - start))
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _dying_write(name: str, fraction: float):
    """`atomic_write` that, for a file called `name`, writes `fraction` of its bytes to the
    temporary file and then SIGKILLs its own process."""

    def write(path, fill):
        if Path(path).name != name:
            return atomic_write(path, fill)

        def fill_part(f):
            whole = io.BytesIO()
            fill(whole)
            f.write(whole.getvalue()[: int(len(whole.getvalue()) * fraction)])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write(path, fill_part)

    return write


if __name__ == "__main__":
    _fault_server(*sys.argv[1:])
