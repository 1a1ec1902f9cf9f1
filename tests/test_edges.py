"""Edge kernels (circuits.backend, csrc/): the compiled kernels against a float64 ground truth and
the pure-PyTorch reference, over random shapes, layouts and dtypes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuits import backend as be
from gemma_lm.errors import UserError

HAS_EXT = be._ext is not None
needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason=f"compiled extension not built ({be._ext_error})"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def exact(grad, pos, feat, act, decoder):
    """Ground truth in float64 from the (already rounded) inputs, and the sum of |terms| per
    entry."""
    rows = decoder.double()[feat]  # [n, n_out, D]
    g = grad.double()[:, :, pos]  # [B, n_out, n, D]
    value = torch.einsum("iod,boid->bi", rows, g) * act.double()
    scale = torch.einsum("iod,boid->bi", rows.abs(), g.abs()) * act.double().abs()
    return value, scale


def assert_close(out, grad, pos, feat, act, decoder):
    """float32 accumulation of exactly representable inputs: error well below 1e-4 of the
    |terms|."""
    assert out.dtype == torch.float32 and out.shape == (grad.shape[0], len(feat))
    value, scale = exact(grad, pos, feat, act, decoder)
    err = (out.double() - value).abs()
    bound = 1e-4 * scale + 1e-6
    assert bool((err <= bound).all()), f"max error {float((err - bound).max()):.3g} over the bound"


def magnitude(t: torch.Tensor) -> float:
    """Largest |entry| (at least 1), to scale absolute tolerances."""
    return max(1.0, float(t.abs().max())) if t.numel() else 1.0


def make_grad(B, n_out, n_pos, D, dtype, layout, gen):
    """Gradients `[B, n_out, n_pos, D]` in one of the layouts callers pass."""
    if layout == "slice":  # a slice of the [B, L + 1, n_pos, D] buffer
        return torch.randn(B, n_out + 2, n_pos, D, generator=gen).to(dtype)[:, 1 : 1 + n_out]
    if layout == "permuted":  # built position-major, as the transposed pass produces it
        return torch.randn(n_pos, n_out, B, D, generator=gen).to(dtype).permute(2, 1, 0, 3)
    if layout == "strided_d":  # no unit stride along D
        return torch.randn(B, n_out, n_pos, 2 * D, generator=gen).to(dtype)[..., ::2]
    raise ValueError(layout)


def make_decoder(F, n_out, D, dtype, layout, gen):
    """Decoders `[F, n_out, D]`: a PLT `[F, D]` viewed as `[F, 1, D]`, a CLT `[F, n_out, D]`, or
    transposed storage."""
    if layout == "plt" and n_out == 1:
        return torch.randn(F, D, generator=gen).to(dtype).unsqueeze(1)
    if layout == "transposed":
        return torch.randn(n_out, D, F, generator=gen).to(dtype).permute(2, 0, 1)
    return torch.randn(F, n_out, D, generator=gen).to(dtype)


def make_case(
    B,
    n_out,
    n_pos,
    D,
    F,
    n,
    seed,
    gdtype=torch.float32,
    ddtype=torch.float32,
    glayout="slice",
    dlayout="clt",
):
    gen = torch.Generator().manual_seed(seed)
    grad = make_grad(B, n_out, n_pos, D, gdtype, glayout, gen)
    decoder = make_decoder(F, n_out, D, ddtype, dlayout, gen)
    pos = torch.randint(0, n_pos, (n,), generator=gen)
    feat = torch.randint(0, F, (n,), generator=gen)
    act = torch.rand(n, generator=gen) * 3
    return grad, pos, feat, act, decoder


cases = st.fixed_dictionaries(
    {
        "B": st.integers(1, 20),
        "n_out": st.integers(1, 4),
        "n_pos": st.integers(1, 7),
        "D": st.integers(1, 70),
        "F": st.integers(1, 40),
        "n": st.integers(0, 60),
        "seed": st.integers(0, 2**16),
        "gdtype": st.sampled_from(DTYPES),
        "ddtype": st.sampled_from(DTYPES),
        "glayout": st.sampled_from(["slice", "permuted", "strided_d"]),
        "dlayout": st.sampled_from(["plt", "clt", "transposed"]),
    }
)


# -- the reference ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_reference_matches_float64(c):
    args = make_case(**c)
    assert_close(be.feature_edges_torch(*args), *args)


def test_reference_handles_no_features_and_one_position():
    grad, pos, feat, act, decoder = make_case(3, 2, 1, 16, 5, 0, seed=0)
    assert be.feature_edges_torch(grad, pos, feat, act, decoder).shape == (3, 0)
    args = make_case(3, 2, 1, 16, 5, 9, seed=1)
    assert_close(be.feature_edges_torch(*args), *args)


# -- the compiled CPU kernel -----------------------------------------------------------------------


@needs_ext
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_cpp_matches_float64_and_reference(c):
    args = make_case(**c)
    out = be.feature_edges(*args, backend="cpp")
    assert_close(out, *args)
    ref = be.feature_edges_torch(*args)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * magnitude(ref))


@needs_ext
@pytest.mark.parametrize(
    "B,n_out,n_pos,D,F,n",
    [
        # D over the 1024-float K block, not a multiple of the vector width
        (3, 1, 4, 2500, 30, 20),
        (5, 2, 2, 64, 500, 700),  # several 128-feature chunks at one position
        (300, 1, 3, 24, 50, 40),  # more batch rows than one work item takes
        (1, 1, 1, 1, 1, 1),  # everything of size one
        (7, 3, 5, 33, 9, 0),  # no active features
        (0, 1, 2, 8, 4, 5),  # no targets
    ],
)
def test_cpp_edge_shapes(B, n_out, n_pos, D, F, n):
    args = make_case(B, n_out, n_pos, D, F, n, seed=B + n)
    out = be.feature_edges(*args, backend="cpp")
    assert out.shape == (B, n)
    assert_close(out, *args)


@needs_ext
def test_cpp_invariants_permutation_scaling_threads():
    """Each entry is one float32 dot product whose order does not depend on the other features:
    permuting the features permutes the columns exactly, doubling the activations doubles the output
    exactly, and the thread count changes nothing."""
    grad, pos, feat, act, decoder = make_case(
        37, 2, 6, 150, 300, 260, seed=3, ddtype=torch.bfloat16
    )
    out = be.feature_edges(grad, pos, feat, act, decoder, backend="cpp")
    perm = torch.randperm(len(feat), generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        be.feature_edges(grad, pos[perm], feat[perm], act[perm], decoder, backend="cpp"),
        out[:, perm],
    )
    assert torch.equal(be.feature_edges(grad, pos, feat, act * 2, decoder, backend="cpp"), out * 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = be.feature_edges(grad, pos, feat, act, decoder, backend="cpp")
        torch.set_num_threads(2)
        assert torch.equal(be.feature_edges(grad, pos, feat, act, decoder, backend="cpp"), single)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, out)


@needs_ext
@pytest.mark.parametrize("simd", ["avx512", "avx2", "generic"])
def test_every_simd_kernel(simd):
    """The micro-kernel is chosen once per process, so each one is checked in a subprocess."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        import test_edges as t
        from circuits import _edges
        print(_edges.simd())
        shapes = [(13, 1, 5, 40, 30, 70), (6, 3, 2, 1100, 20, 33), (40, 2, 3, 17, 9, 300)]
        for i, (B, n_out, n_pos, D, F, n) in enumerate(shapes):
            for gd, dd in [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)]:
                args = t.make_case(B, n_out, n_pos, D, F, n, seed=i, gdtype=gd, ddtype=dd,
                                   glayout="permuted")
                t.assert_close(_edges.feature_edges(*args), *args)
        print("ok")
    """) % os.path.dirname(__file__)
    env = dict(os.environ, GEMMA_CIRCUITS_SIMD=simd, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    chosen, status = res.stdout.split()[:2]
    if chosen != simd:
        pytest.skip(f"this CPU has no {simd} (got {chosen})")
    assert status == "ok"


# -- argument checks and backend choice ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bad_arguments(backend):
    grad, pos, feat, act, decoder = make_case(2, 2, 3, 8, 5, 4, seed=0)
    with pytest.raises(ValueError, match="does not match grad"):
        be.feature_edges(grad, pos, feat, act, decoder[:, :1], backend=backend)
    with pytest.raises(ValueError, match=r"feat must lie in \[0, 5\)"):
        be.feature_edges(grad, pos, feat + 5, act, decoder, backend=backend)
    with pytest.raises(ValueError, match=r"pos must lie in \[0, 3\)"):
        be.feature_edges(grad, pos - 4, feat, act, decoder, backend=backend)
    with pytest.raises(ValueError, match="one length"):
        be.feature_edges(grad, pos, feat, act[:2], decoder, backend=backend)
    with pytest.raises(ValueError, match="unknown edge backend"):
        be.feature_edges(grad, pos, feat, act, decoder, backend="fortran")


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("GEMMA_CIRCUITS_BACKEND", raising=False)
    assert be.active_backend("cpu") == ("cpp" if HAS_EXT else "torch")
    monkeypatch.setenv("GEMMA_CIRCUITS_BACKEND", "torch")
    assert be.active_backend("cpu") == "torch" and "forced" in be.backend_reason("cpu")
    # not available for CPU tensors: falls back
    monkeypatch.setenv("GEMMA_CIRCUITS_BACKEND", "cuda")
    assert be.active_backend("cpu") == ("cpp" if HAS_EXT else "torch")
    assert "GEMMA_CIRCUITS_BACKEND=cuda" in be.backend_reason("cpu")
    monkeypatch.setenv("GEMMA_CIRCUITS_BACKEND", "opencl")
    with pytest.raises(UserError, match="not a backend"):
        be.active_backend("cpu")
    monkeypatch.delenv("GEMMA_CIRCUITS_BACKEND")
    monkeypatch.setattr(be, "_ext", None)
    monkeypatch.setattr(be, "_ext_error", "ImportError: no module named circuits._edges")
    assert be.active_backend("cpu") == "torch"
    assert "not available" in be.backend_reason("cpu") and "no module named" in be.backend_reason(
        "cpu"
    )
    args = make_case(3, 1, 2, 8, 4, 5, seed=0)
    assert_close(be.feature_edges(*args, backend="cpp"), *args)  # asks for cpp, gets the reference


@needs_ext
def test_info_reports_the_backend(monkeypatch):
    monkeypatch.delenv("GEMMA_CIRCUITS_BACKEND", raising=False)
    from circuits.info import info_lines

    line = next(x for x in info_lines() if x.startswith("edge backend"))
    first = "cuda" if torch.cuda.is_available() and be._ext.has_cuda() else "cpp"
    assert line.startswith(f"edge backend: {first}") and be._ext.simd() in line


# -- features prepared once per source layer (attribution's path) ----------------------------------


@needs_ext
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=150))
def test_tile_plan_covers_every_feature_once(positions):
    """The tiled CUDA kernel's plan, made on the host: a stable sort by position, cut into runs of
    one position of at most TILE_FEATURES features, in order of position."""
    pos = torch.tensor(positions, dtype=torch.long)
    order, tiles = be._ext.feature_tiles(pos)
    assert torch.equal(order, torch.sort(pos, stable=True).indices)
    covered = (
        torch.cat([torch.arange(a, a + n) for a, n, _ in tiles.tolist()])
        if len(tiles)
        else order[:0]
    )
    assert torch.equal(covered, torch.arange(len(pos)))  # every sorted index once, in order
    assert all(1 <= n <= be._ext.TILE_FEATURES for n in tiles[:, 1].tolist())
    for a, n, p in tiles.tolist():
        assert bool((pos[order[a : a + n]] == p).all())
    assert bool((tiles[1:, 2] >= tiles[:-1, 2]).all())
    with pytest.raises(RuntimeError, match="negative"):
        be._ext.feature_tiles(torch.tensor([-1, 0]))


@needs_ext
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not (torch.cuda.is_available() and HAS_EXT and be._ext.has_cuda()),
                reason="needs a CUDA build and device",
            ),
        ),
    ],
)
@pytest.mark.parametrize("ddtype", [torch.float32, torch.bfloat16])
def test_position_sorted_features_equal_feature_edges(device, ddtype):
    """Edges from the features before each position P equal feature_edges over those features: 130
    rows, crowded positions (70 features at one position: three tiles), empty positions, 2 output
    layers."""
    gen = torch.Generator().manual_seed(3)
    pos = torch.sort(torch.tensor([0, 2, 2, 5] + [3] * 70 + [7] * 9)).values
    feat, act = (
        torch.randint(0, 50, (len(pos),), generator=gen),
        torch.rand(len(pos), generator=gen) + 0.5,
    )
    grad = make_grad(130, 2, 9, 40, torch.float32, "permuted", gen).to(device)
    decoder = make_decoder(50, 2, 40, ddtype, "clt", gen).to(device)
    features = be.PositionSortedFeatures(pos, feat, act, 50, device)
    for P in [0, 1, 3, 4, 6, 8, 9, None]:
        m = features.count(P)
        assert m == (len(pos) if P is None else int((pos < P).sum()))
        out = features.edges(grad[:, :, :P] if P else grad, decoder, P)
        assert out.shape == (130, m) and out.device.type == device
        assert_close(out.cpu(), grad.cpu(), pos[:m], feat[:m], act[:m], decoder.cpu())
    with pytest.raises(ValueError, match="covers 4 positions"):
        features.edges(grad[:, :, :4], decoder, 6)
    with pytest.raises(ValueError, match="sorted"):
        be.PositionSortedFeatures(pos.flip(0), feat, act, 50, device)
    with pytest.raises(ValueError, match="feat must lie"):
        be.PositionSortedFeatures(pos, feat + 50, act, 50, device)


@needs_ext
@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 12),
    st.integers(1, 50),
    st.floats(0.0, 0.9),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_abs_rmatvec_equals_scipy(rows, n, density, wide, seed):
    """The influence step out += |A|^T w: the compiled single pass against scipy, int32 and int64
    indices, empty rows and zero weights; a column outside out is refused."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    a = sp.random_array((rows, n), density=density, rng=rng, dtype=np.float32, format="csr")
    a.data = a.data * 2 - 1  # signed values
    if wide:
        a.indices, a.indptr = a.indices.astype(np.int64), a.indptr.astype(np.int64)
    w = rng.random(rows) * (rng.random(rows) > 0.3)
    start = rng.random(n)
    fast, ref = start.copy(), start.copy()
    be.abs_rmatvec(a, w, fast)
    be.abs_rmatvec(a, w, ref, backend="torch")
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        fast, start + np.abs(a.toarray()).T.astype(np.float64) @ w, rtol=1e-6, atol=1e-9
    )
    if a.nnz:
        with pytest.raises(RuntimeError, match="outside"):
            be.abs_rmatvec(a, np.ones(rows), np.zeros(int(a.indices.max())))


@needs_ext
def test_abs_rmatvec_split_among_threads():
    """Rows split among threads by edge count: long and empty rows on the boundaries, each row
    once."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    lengths = np.array([0, 0, 1_500_000, 0, 3, 700_000, 0, 0, 900_000, 1, 0])
    n = 2_000_000
    indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    indices = np.concatenate([np.sort(rng.choice(n, k, replace=False)) for k in lengths]).astype(
        np.int64
    )
    a = sp.csr_array(
        (rng.standard_normal(len(indices)).astype(np.float32), indices, indptr),
        shape=(len(lengths), n),
    )
    w = rng.random(len(lengths))
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            fast, ref = np.zeros(n), np.zeros(n)
            be.abs_rmatvec(a, w, fast)
            be.abs_rmatvec(a, w, ref, backend="torch")
            np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=0)
    finally:
        torch.set_num_threads(threads)


# -- CUDA (skipped without a GPU and a CUDA build) -------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_EXT and be._ext.has_cuda()),
    reason="needs a CUDA device and the extension built with CUDA",
)


@needs_cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_cuda_matches_float64(c):
    args = [t.cuda() for t in make_case(**c)]
    assert be.active_backend("cuda") == "cuda"
    out = be.feature_edges(*args)
    assert out.is_cuda
    assert_close(out.cpu(), *[t.cpu() for t in args])
    assert_close(be._ext.feature_edges(*args, variant="rowwise").cpu(), *[t.cpu() for t in args])


@needs_cuda
@pytest.mark.parametrize("variant", ["tiled", "rowwise"])
@pytest.mark.parametrize("ddtype", DTYPES)
def test_cuda_many_rows_and_crowded_positions(variant, ddtype):
    """Past one tile in every direction: 130 batch rows (tiles of 64), 200 features on 3 positions
    (tiles of at most 32 features of one position), D = 70 (slabs of 32), 3 output layers, unsorted
    positions."""
    grad, _, _, _, decoder = make_case(130, 3, 5, 70, 90, 0, seed=11, ddtype=ddtype)
    gen = torch.Generator().manual_seed(12)
    pos = torch.tensor([0, 3, 4])[torch.randint(0, 3, (200,), generator=gen)]
    feat, act = torch.randint(0, 90, (200,), generator=gen), torch.rand(200, generator=gen)
    args = [t.cuda() for t in (grad, pos, feat, act, decoder)]
    out = be._ext.feature_edges(*args, variant=variant)
    assert_close(out.cpu(), grad, pos, feat, act, decoder)
    with pytest.raises(RuntimeError, match="variant"):
        be._ext.feature_edges(*args, variant="fastest")


@needs_cuda
def test_cuda_matches_the_reference():
    """The default CUDA path (`feature_edges` on CUDA tensors) against the reference on the CPU."""
    grad, pos, feat, act, decoder = [t.cuda() for t in make_case(40, 2, 5, 300, 50, 120, seed=5)]
    dense = be.feature_edges(grad, pos, feat, act, decoder)
    torch.testing.assert_close(
        dense.cpu(),
        be.feature_edges_torch(*[t.cpu() for t in (grad, pos, feat, act, decoder)]),
        rtol=1e-4,
        atol=1e-3,
    )


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
def test_to_device_copies_host_tensors(device):
    """`to_device` gives the values on the device, also while the GPU is still busy with earlier
    work and when the host tensor changes right after the call (the copy goes through a pinned block
    of its own)."""
    host = torch.arange(1000, dtype=torch.long)
    if device == "cuda":
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(8):
            # queued work the copy must not wait for, nor overtake wrongly
            busy = busy @ busy / 64.0
    out = be.to_device(host, device)
    if device == "cuda":
        host += 5  # the copy's source is a pinned block of its own
    assert out.device.type == device and torch.equal(out.cpu(), torch.arange(1000))
    already = torch.ones(3, device=device)
    assert be.to_device(already, device) is already
