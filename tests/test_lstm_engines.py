"""LSTM engine conformance: every engine present (numpy, cython, cupy) against the textbook's LSTM
written plainly (tests/reference_lstm.py, float64) and central differences, through the one
protocol stated in fastseq/ops/_numpy.py (forward, backward, step; per-row biases; integer ids
as one-hot inputs; need_dh0), directly and through TimeLSTM. The Cython engine's own machinery
(buffer pool, split path) is tested after that.

The cython engine is skipped where fastseq._ext is not importable (a failure instead under
FASTSEQ_REQUIRE_EXT=1, unless FASTSEQ_KERNEL=numpy blocked it on purpose); the cupy engine needs
CuPy and an NVIDIA GPU and is skipped, saying why, everywhere else (its kernel sources are checked
on the CPU by tests/test_cupy_source.py).
"""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference_lstm as reference
from conftest import numerical_grad
from fastseq import backend
from fastseq.layers import TimeLSTM
from fastseq.ops import _numpy, _pool, engine_for

REQUIRE_EXT = os.environ.get("FASTSEQ_REQUIRE_EXT", "0") == "1"


class Engine:
    """An engine module with the array module its arrays live in."""

    def __init__(self, name, module, xp):
        self.name, self.module, self.xp = name, module, xp

    def dev(self, a):
        return a if a is None or self.xp is np or not isinstance(a, np.ndarray) else self.xp.asarray(a)

    def host(self, a):
        return None if a is None else backend.to_cpu(a)

    def tol(self, dtype):
        if np.dtype(dtype) == np.float64:
            return 1e-10
        return 1e-4 if self.name == "cupy" else 1e-5  # float32: cuBLAS sums in another order

    def __repr__(self):
        return self.name


def load_engine(name):
    if name == "numpy":
        return Engine("numpy", _numpy, np)
    if name == "cython":
        if not backend.cython_available():
            blocked = sys.modules.get("fastseq._ext", True) is None
            if REQUIRE_EXT and not blocked:
                pytest.fail("FASTSEQ_REQUIRE_EXT=1 but the Cython LSTM engine is not importable",
                            pytrace=False)
            pytest.skip("cython engine: fastseq._ext is not importable here")
        return Engine("cython", importlib.import_module("fastseq.ops._cython"), np)
    if not backend.gpu_available():
        pytest.skip(f"cupy engine: no usable GPU ({backend._cupy_error})")
    return Engine("cupy", importlib.import_module("fastseq.ops._cupy"), importlib.import_module("cupy"))


ALL = ["numpy", "cython", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=ALL)
def engine(request):
    return load_engine(request.param)


@pytest.fixture(params=["numpy", "cython"])
def cpu_engine(request):
    """Host engines: for edge cases the CuPy engine leaves to tests/test_cupy_engine.py."""
    return load_engine(request.param)


@pytest.fixture
def cy():
    """The Cython engine module (its own machinery)."""
    return load_engine("cython").module


def assert_close(actual, expected, rtol, what=""):
    """||actual - expected|| <= rtol * max(||expected||, 0.01 sqrt(size)).

    Norm-wise relative error; arrays whose RMS is below 0.01 (inputs and upstream gradients here
    are O(1)) are compared absolutely at that scale instead, since a few-ulp difference in a
    saturated gate g makes a relative difference of g(1-g) far above eps in either engine."""
    actual = np.asarray(backend.to_cpu(actual), dtype=np.float64)
    expected = np.asarray(backend.to_cpu(expected), dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err = np.linalg.norm(actual - expected)
    scale = max(np.linalg.norm(expected), 0.01 * np.sqrt(expected.size), 1e-300)
    assert err <= rtol * scale, f"{what}: relative error {err / scale:.3g} > {rtol:g}"


def make_case(rng, N, T, D, H, dtype, zero_state=False, scale=1.0):
    xs = rng.standard_normal((N, T, D)) * scale
    Wx = rng.standard_normal((D, 4 * H)) / np.sqrt(D)
    Wh = rng.standard_normal((H, 4 * H)) / np.sqrt(H)
    b = rng.standard_normal(4 * H) * 0.5
    if zero_state:
        h0, c0 = np.zeros((N, H)), np.zeros((N, H))
    else:
        h0, c0 = np.tanh(rng.standard_normal((N, H))), rng.standard_normal((N, H))
    dhs = rng.standard_normal((N, T, H))
    return [a.astype(dtype) for a in (xs, Wx, Wh, b, h0, c0, dhs)]


def run_engine(engine, xs, Wx, Wh, b, h0, c0, dhs, need_dh0=True):
    """forward then backward on the engine's device; everything back on the host."""
    if not isinstance(engine, Engine):
        engine = Engine(getattr(engine, "__name__", "?").rsplit("_", 1)[-1], engine, np)
    args = [engine.dev(a) for a in (xs, Wx, Wh, b, h0, c0)]
    hs, hT, cT, cache = engine.module.forward(*args)
    hs = engine.host(hs).copy()  # as it was right after forward
    xp = engine.xp
    grads = [xp.full(a.shape, np.nan, a.dtype) for a in args[1:4]]
    dxs, dh0 = engine.module.backward(engine.dev(dhs), cache, grads, need_dh0=need_dh0)
    out = dict(hs=hs, hT=hT, cT=cT, dxs=dxs, dh0=dh0, dWx=grads[0], dWh=grads[1], db=grads[2])
    return {k: engine.host(v) for k, v in out.items()}


def run_reference(xs, Wx, Wh, b, h0, c0, dhs):
    """run_engine's outputs from the reference (float64); integer ids as explicit one-hot rows."""
    if np.issubdtype(np.asarray(xs).dtype, np.integer):
        xs = np.eye(Wx.shape[0])[xs]
    hs, hT, cT, cache = reference.forward(xs, Wx, Wh, b, h0, c0)
    dxs, dh0, dWx, dWh, db = reference.backward(dhs, cache)
    return dict(hs=hs, hT=hT, cT=cT, dxs=dxs, dh0=dh0, dWx=dWx, dWh=dWh, db=db)


def reference_state(xs, Wx, Wh, b, h0, c0):
    """The reference's h_T, c_T (integer ids as explicit one-hot rows)."""
    if np.issubdtype(np.asarray(xs).dtype, np.integer):
        xs = np.eye(Wx.shape[0])[xs]
    return reference.forward(xs, Wx, Wh, b, h0, c0)[1:3]


def compare(engine, case, dtype, tol=None):
    """The engine against the reference on one case: values of every output, dtypes kept."""
    ref = run_reference(*case)
    out = run_engine(engine, *case)
    for k in ref:
        assert out[k].dtype == dtype, f"{k}: dtype {out[k].dtype}"
        assert_close(out[k], ref[k], tol or engine.tol(dtype), f"{engine} {k}")
    return out


# --- forward and backward against the reference ------------------------------------------------

shapes = st.tuples(st.integers(1, 9), st.integers(1, 8), st.integers(1, 12), st.integers(1, 10))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(shape=shapes, dtype=st.sampled_from([np.float32, np.float64]), zero_state=st.booleans(),
       scale=st.sampled_from([0.1, 1.0, 4.0]), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_random_shapes(engine, shape, dtype, zero_state, scale, seed):
    rng = np.random.default_rng(seed)
    compare(engine, make_case(rng, *shape, dtype, zero_state, scale), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(128, 7, 16, 128), (128, 4, 16, 128), (33, 5, 7, 77),
                                   (2, 3, 300, 5), (1, 1, 1, 1),
                                   # one chunk with products in panels (per step, and over all
                                   # steps only)
                                   (20, 6, 64, 256), (7, 9, 300, 300)])
@pytest.mark.parametrize("zero_state", [False, True])
def test_matches_reference_larger(engine, shape, dtype, zero_state):
    rng = np.random.default_rng(sum(shape))
    compare(engine, make_case(rng, *shape, dtype, zero_state), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_gates(engine, dtype):
    """Huge pre-activations: gates saturate to 0/1 exactly like the reference, nothing non-finite."""
    rng = np.random.default_rng(4)
    compare(engine, make_case(rng, 6, 5, 4, 7, dtype, scale=200.0), dtype)


def test_nan_propagates(cpu_engine):
    rng = np.random.default_rng(5)
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, 3, 4, 2, 5, np.float32)
    xs[1, 2, 0] = np.nan
    hs, hT, cT, _ = cpu_engine.module.forward(xs, Wx, Wh, b, h0, c0)
    assert np.isnan(hs[1, 2:]).all() and np.isnan(hT[1]).all()
    assert np.isfinite(hs[0]).all() and np.isfinite(hs[2]).all() and np.isfinite(hs[1, :2]).all()


def dhs_variants(rng, N, T, H, dtype):
    base = rng.standard_normal((N, T, H)).astype(dtype)
    time_major = np.ascontiguousarray(base.transpose(1, 0, 2)).transpose(1, 0, 2)
    wide = np.zeros((N, T, 2 * H), dtype)
    wide[..., ::2] = base
    reversed_t = np.ascontiguousarray(base[:, ::-1])[:, ::-1]
    return {
        "contiguous": base,
        "time-major view": time_major,
        "strided last axis": wide[..., ::2],
        "fortran": np.asfortranarray(base),
        "negative stride": reversed_t,
        "broadcast (read-only)": np.broadcast_to(base[:, :1], (N, T, H)),
        "float64 input": base.astype(np.float64),
    }


def check_noncontiguous_dhs(engine, seed, N, dtype):
    rng = np.random.default_rng(seed)
    T, D, H = 4, 3, 6
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, N, T, D, H, dtype)
    for name, dhs in dhs_variants(rng, N, T, H, dtype).items():
        ref = run_reference(xs, Wx, Wh, b, h0, c0, dhs)
        out = run_engine(engine, xs, Wx, Wh, b, h0, c0, dhs)
        for k in ref:
            assert_close(out[k], ref[k], engine.tol(dtype), f"{name}: {k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noncontiguous_dhs(cpu_engine, dtype):
    check_noncontiguous_dhs(cpu_engine, 6, 5, dtype)


def test_grads_are_overwritten_not_accumulated(engine):
    rng = np.random.default_rng(8)
    case = make_case(rng, 3, 2, 4, 5, np.float64)
    xs, Wx, Wh, b, h0, c0, dhs = [engine.dev(a) for a in case]
    grads = [engine.xp.full(a.shape, 7.0) for a in (Wx, Wh, b)]
    *_, cache = engine.module.forward(xs, Wx, Wh, b, h0, c0)
    engine.module.backward(dhs, cache, grads)
    ref = run_reference(*case)
    for g, k in zip(grads, ("dWx", "dWh", "db")):
        assert_close(g, ref[k], 1e-10, k)


def test_empty_batch(cpu_engine):
    rng = np.random.default_rng(11)
    out = run_engine(cpu_engine, *make_case(rng, 0, 3, 2, 4, np.float32))
    assert out["hs"].shape == (0, 3, 4) and out["dxs"].shape == (0, 3, 2)
    assert np.all(out["dWx"] == 0) and np.all(out["db"] == 0)
    out = run_engine(cpu_engine, *make_case(rng, 0, 3, 2, 4, np.float32), need_dh0=False)
    assert out["dxs"].shape == (0, 3, 2) and out["dh0"] is None


# --- central differences (float64) ------------------------------------------------------------

@pytest.mark.parametrize("zero_state", [False, True])
@pytest.mark.parametrize("row_bias", [False, True])
def test_gradients_by_central_differences(engine, zero_state, row_bias):
    rng = np.random.default_rng(12)
    N, T, D, H = 2, 3, 3, 4
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, N, T, D, H, np.float64, zero_state)
    if row_bias:
        b = rng.standard_normal((N, 4 * H)) * 0.5
    R = rng.standard_normal((N, T, H))
    dev = engine.dev

    def loss():
        hs, hT, cT, _ = engine.module.forward(*[dev(a) for a in (xs, Wx, Wh, b, h0, c0)])
        return float((engine.host(hs) * R).sum())

    *_, cache = engine.module.forward(*[dev(a) for a in (xs, Wx, Wh, b, h0, c0)])
    grads = [engine.xp.zeros(a.shape) for a in (Wx, Wh, b)]
    dxs, dh0 = engine.module.backward(dev(R), cache, grads)
    for name, x, g in (("xs", xs, dxs), ("Wx", Wx, grads[0]), ("Wh", Wh, grads[1]),
                       ("b", b, grads[2]), ("h0", h0, dh0)):
        num = numerical_grad(loss, x)
        g = engine.host(g)
        err = np.linalg.norm(num - g) / max(np.linalg.norm(num) + np.linalg.norm(g), 1e-12)
        assert err < 1e-7, f"d{name}: relative error {err:.3g}"


# --- one step (generation) -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("row_bias", [False, True])
@pytest.mark.parametrize("zero_state", [False, True])
@pytest.mark.parametrize("N", [1, 5])
def test_steps_match_forward(engine, dtype, row_bias, zero_state, N):
    """T calls of step() give forward's hs, h_T and c_T (the same recurrence, one step at a time;
    one row: generation's matrix-vector products)."""
    rng = np.random.default_rng(31)
    T, D, H = 4, 3, 6
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, N, T, D, H, dtype, zero_state)
    if row_bias:
        b = (rng.standard_normal((N, 4 * H)) * 0.5).astype(dtype)
    hs, hT, cT, _ = reference.forward(xs, Wx, Wh, b, h0, c0)
    d = [engine.dev(a) for a in (xs, Wx, Wh, b, h0, c0)]
    h, c = d[4], d[5]
    for t in range(T):
        h, c = engine.module.step(d[0][:, t], d[1], d[2], d[3], h, c)
        assert h.dtype == dtype and c.dtype == dtype
        assert_close(h, hs[:, t], engine.tol(dtype), f"h at step {t}")
    assert_close(h, hT, engine.tol(dtype), "h_T")
    assert_close(c, cT, engine.tol(dtype), "c_T")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stepper_is_step(engine, dtype):
    """stepper(Wx, Wh, b) (the weights prepared once for a run of steps) gives step()'s bits,
    and the reference's states."""
    rng = np.random.default_rng(33)
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, 1, 5, 3, 6, dtype)
    d = [engine.dev(a) for a in (xs, Wx, Wh, b, h0, c0)]
    run = engine.module.stepper(*d[1:4])
    h1 = h2 = d[4]
    c1 = c2 = d[5]
    h, c = h0, c0
    for t in range(xs.shape[1]):
        h1, c1 = engine.module.step(d[0][:, t], *d[1:4], h1, c1)
        h2, c2 = run(d[0][:, t], h2, c2)
        h, c, _ = reference.step(xs[:, t], Wx, Wh, b, h, c)
        np.testing.assert_array_equal(engine.host(h2), engine.host(h1))
        np.testing.assert_array_equal(engine.host(c2), engine.host(c1))
        assert_close(h2, h, engine.tol(dtype), f"h at step {t}")
        assert_close(c2, c, engine.tol(dtype), f"c at step {t}")


@pytest.mark.parametrize("N,H,dtype", [(1, 6, np.float64), (200, 128, np.float32),
                                       (200, 6, np.float64)])
def test_numpy_step_is_forwards_arithmetic(N, H, dtype):
    """The reference step does forward's operations in forward's order: identical bits (also
    where forward runs its recurrence in two pieces of rows and step in one)."""
    rng = np.random.default_rng(32)
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, N, 1, 3, H, dtype)
    assert len(_numpy._row_pieces(N, np)) == (2 if N > 1 else 1)
    hs, hT, cT, _ = _numpy.forward(xs, Wx, Wh, b, h0, c0)
    h, c = _numpy.step(xs[:, 0], Wx, Wh, b, h0, c0)
    np.testing.assert_array_equal(h, hT)
    np.testing.assert_array_equal(c, cT)


# --- inference: final_state ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("row_bias", [False, True])
@pytest.mark.parametrize("zero_state", [False, True])
@pytest.mark.parametrize("ids", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 4, 6), (200, 7, 13, 16), (600, 3, 13, 8)])
def test_final_state_matches_forward(engine, shape, dtype, row_bias, zero_state, ids):
    if ids:
        ids_engine(engine)
    rng = np.random.default_rng(sum(shape) + 3)
    case = (ids_case if ids else make_case)(rng, *shape, dtype, zero_state)
    if row_bias:
        case[3] = (rng.standard_normal((shape[0], 4 * shape[3])) * 0.5).astype(dtype)
    hT, cT = reference_state(*case[:6])
    h, c = engine.module.final_state(*[engine.dev(a) for a in case[:6]])
    assert h.dtype == dtype and c.dtype == dtype
    assert_close(h, hT, engine.tol(dtype), "h_T")
    assert_close(c, cT, engine.tol(dtype), "c_T")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
def test_final_state_start_rows(engine, dtype, zero_state):
    """start (N,): row n starts from row start[n] of (h0, c0) (M rows), as if gathered."""
    rng = np.random.default_rng(35)
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, 300, 3, 4, 6, dtype, zero_state)
    h0, c0, start = h0[:7], c0[:7], rng.integers(0, 7, 300)
    want = reference_state(xs, Wx, Wh, b, h0[start], c0[start])
    got = engine.module.final_state(*[engine.dev(a) for a in (xs, Wx, Wh, b, h0, c0, start)])
    for g, w, what in zip(got, want, ("h_T", "c_T")):
        assert_close(g, w, engine.tol(dtype), what)
    with pytest.raises(ValueError, match="outside"):
        start[5] = 7
        engine.module.final_state(*[engine.dev(a) for a in (xs, Wx, Wh, b, h0, c0, start)])


@pytest.mark.parametrize("H,dtype", [(6, np.float64), (128, np.float32)])
def test_numpy_inference_is_forwards_arithmetic(H, dtype):
    """The reference final_state does forward's operations in forward's order (ids): identical
    bits to forward (forward's two pieces of rows and inference's blocks cut the products
    alike)."""
    rng = np.random.default_rng(33)
    ids, Wx, Wh, b, h0, c0, _ = ids_case(rng, 700, 4, 7, H, dtype, False)
    _, hT, cT, _ = _numpy.forward(ids, Wx, Wh, b, h0, c0)
    for got, want in zip(_numpy.final_state(ids, Wx, Wh, b, h0, c0), (hT, cT)):
        np.testing.assert_array_equal(got, want)


def test_numpy_inference_blocks_on_threads():
    """The reference's blocks of rows may run on several threads: same bits for 1, 2, 3."""
    rng = np.random.default_rng(34)
    N = 2 * _numpy.BLOCK_ROWS + 37
    fcase = ids_case(rng, N, 3, 7, 6, np.float32, False)[:6]
    runs = []
    for n in (1, 2, 3):
        with backend.using(threads=n):
            runs.append(_numpy.final_state(*fcase))
    for other in runs[1:]:
        for a, b in zip(other, runs[0]):
            np.testing.assert_array_equal(a, b)


def test_inference_ids_out_of_range_rejected(cpu_engine):
    ids, Wx, Wh, b, h0, c0, _ = ids_case(np.random.default_rng(1), 3, 2, 4, 5, np.float32, True)
    ids[1, 1] = 4
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        cpu_engine.module.final_state(ids, Wx, Wh, b, h0, c0)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (40, 6), (300, 7)])
def test_timelstm_final_state_shares_prefixes(engine, fused, shape, monkeypatch):
    """Stepping once per distinct prefix (rows with few symbols share many) gives forward's
    last state for every row."""
    from fastseq.layers import TimeEmbedding
    rng = np.random.default_rng(shape[0])
    V, D, H = 13, 5, 16
    N, T = shape
    ids = rng.integers(0, 3, shape)  # 3 symbols: the prefixes repeat
    if T > 4:  # columns 1-3: the base-V digits of a permutation of the rows, so that the
        # prefixes are all distinct from step 3 on and the last steps run as one call
        ids[:, 1:4] = rng.permutation(N)[:, None] // V ** np.arange(3) % V
    make = make_layer(rng, D, H, np.float32, stateful=False)
    E = (rng.standard_normal((V, D)) * 0.5).astype(np.float32)
    monkeypatch.setattr(TimeLSTM, "fuse_embedding", lambda self, e, i: fused)
    with backend.using(engine.name):
        layer, embed = make(engine), TimeEmbedding(engine.dev(E))
        hs = layer.forward(embed.forward(engine.dev(ids)))
        h, c = layer.final_state(engine.dev(ids), embed)
    assert_close(h, engine.host(hs)[:, -1], engine.tol(np.float32), "h_T")
    assert_close(c, engine.host(layer.c), engine.tol(np.float32), "c_T")


# --- need_dh0=False: the product for dh0 is skipped, everything else unchanged ------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
def test_no_dh0_matches(engine, dtype, zero_state):
    """Without dh0 the engine gives bit-identical gradients to itself with dh0, and dh0 is None."""
    rng = np.random.default_rng(21)
    for shape in [(1, 1, 1, 1), (3, 2, 5, 7), (9, 8, 12, 10), (65, 7, 16, 32), (128, 7, 16, 128)]:
        case = make_case(rng, *shape, dtype, zero_state)
        full = compare(engine, case, dtype)
        out = run_engine(engine, *case, need_dh0=False)
        assert out["dh0"] is None
        for k in ("dxs", "dWx", "dWh", "db"):
            np.testing.assert_array_equal(out[k], full[k], err_msg=f"{engine} {k}")


# --- one bias per row (b of shape (N, 4H)): PeekyDecoder folds h Wx_h into it -------------------

def row_bias_case(rng, shape, dtype, zero_state):
    case = make_case(rng, *shape, dtype, zero_state)
    N, H = shape[0], shape[3]
    case[3] = (rng.standard_normal((N, 4 * H)) * 0.5).astype(dtype)
    return case


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 4, 6), (128, 4, 16, 128)])
def test_row_bias_matches_reference(engine, shape, dtype, zero_state):
    rng = np.random.default_rng(sum(shape))
    out = compare(engine, row_bias_case(rng, shape, dtype, zero_state), dtype)
    assert out["db"].shape == (shape[0], 4 * shape[3])


# --- integer ids as one-hot inputs: x_t Wx is a gather, dWx a scatter-add ------------------------

def ids_case(rng, N, T, V, H, dtype, zero_state):
    case = make_case(rng, N, T, V, H, dtype, zero_state)
    case[0] = rng.integers(0, V, (N, T))
    return case


def ids_engine(engine):
    if not engine.module.TAKES_IDS:
        pytest.skip(f"the {engine} engine takes no ids (TimeLSTM gathers the embedding first)")
    return engine


def compare_ids(engine, case, dtype):
    """Ids against the same inputs as explicit one-hot float rows."""
    ids, Wx = case[0], case[1]
    onehot = np.eye(Wx.shape[0], dtype=dtype)[ids]
    ref = run_reference(onehot, *case[1:])
    out = run_engine(engine, *case)
    assert out["dxs"] is None
    for k in ref:
        if k != "dxs":
            assert_close(out[k], ref[k], engine.tol(dtype), f"{engine} {k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 4, 6), (128, 7, 13, 128)])
def test_ids_input_matches_one_hot_rows(engine, shape, dtype, zero_state):
    rng = np.random.default_rng(sum(shape) + 1)
    compare_ids(ids_engine(engine), ids_case(rng, *shape, dtype, zero_state), dtype)


def test_ids_out_of_range_rejected(engine):
    ids_engine(engine)
    rng = np.random.default_rng(0)
    case = ids_case(rng, 3, 2, 4, 5, np.float32, True)
    case[0][1, 1] = 4
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        engine.module.forward(*[engine.dev(a) for a in case[:6]])


# --- through TimeLSTM ---------------------------------------------------------------------------

def make_layer(rng, D, H, dtype, stateful):
    Wx = (rng.standard_normal((D, 4 * H)) / np.sqrt(D)).astype(dtype)
    Wh = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(dtype)
    b = (rng.standard_normal(4 * H) * 0.1).astype(dtype)

    def make(engine):
        return TimeLSTM(*[engine.dev(p.copy()) for p in (Wx, Wh, b)], stateful=stateful)
    make.params, make.stateful = (Wx, Wh, b), stateful
    return make


def drive(engine, make, chunks, dchunks, h=None):
    """Forward and backward over consecutive chunks on one engine; every output on the host."""
    with backend.using(engine.name):
        layer = make(engine)
        if h is not None:
            layer.set_state(engine.dev(h.copy()))
        outs = []
        for xs, dhs in zip(chunks, dchunks):
            outs.append(engine.host(layer.forward(engine.dev(xs))).copy())
            assert layer._kernel is engine.module
            dxs = layer.backward(engine.dev(dhs))
            outs += [engine.host(dxs), engine.host(layer.dh)] + [engine.host(g).copy()
                                                                  for g in layer.grads]
        return outs + [engine.host(layer.h), engine.host(layer.c)]


def drive_reference(make, chunks, dchunks, h=None):
    """drive()'s outputs from the reference: a stateful layer carries (h, c) from chunk to chunk
    (and starts from a given h); one that is not starts every chunk from zeros."""
    Wx, Wh, b = make.params
    zeros = np.zeros((chunks[0].shape[0], Wh.shape[0]))
    h0, c0 = (h if h is not None and make.stateful else zeros), zeros
    outs = []
    for xs, dhs in zip(chunks, dchunks):
        hs, hT, cT, cache = reference.forward(xs, Wx, Wh, b, h0, c0)
        outs += [hs, *reference.backward(dhs, cache)]  # hs, dxs, dh, dWx, dWh, db
        h0, c0 = (hT, cT) if make.stateful else (zeros, zeros)
    return outs + [hT, cT]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stateful_continuation_through_timelstm(engine, dtype):
    rng = np.random.default_rng(13)
    N, D, H = 4, 5, 6
    make = make_layer(rng, D, H, dtype, stateful=True)
    chunks = [rng.standard_normal((N, T, D)).astype(dtype) for T in (3, 5)]
    dchunks = [rng.standard_normal((N, T, H)).astype(dtype) for T in (3, 5)]
    ref = drive_reference(make, chunks, dchunks)
    out = drive(engine, make, chunks, dchunks)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert_close(a, b, engine.tol(dtype), f"output {i}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_set_state_with_given_h(engine, dtype):
    rng = np.random.default_rng(14)
    N, T, D, H = 3, 4, 2, 5
    h = np.tanh(rng.standard_normal((N, H))).astype(dtype)
    make = make_layer(rng, D, H, dtype, stateful=False)
    chunks = [rng.standard_normal((N, T, D)).astype(dtype)]
    dchunks = [rng.standard_normal((N, T, H)).astype(dtype)]
    ref = drive_reference(make, chunks, dchunks, h=h)
    out = drive(engine, make, chunks, dchunks, h=h)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert_close(a, b, engine.tol(dtype), f"output {i}")
    assert np.abs(out[2]).sum() > 0  # dh (gradient of the given h) is not trivially zero


def test_timelstm_need_dh(engine):
    rng = np.random.default_rng(24)
    make = make_layer(rng, 5, 6, np.float64, stateful=False)
    xs = engine.dev(rng.standard_normal((4, 3, 5)))
    dhs = engine.dev(rng.standard_normal((4, 3, 6)))
    outs = []
    with backend.using(engine.name):
        for need in (True, False):
            layer = make(engine)
            assert layer.need_dh is True  # textbook default
            layer.need_dh = need
            layer.forward(xs)
            dxs = layer.backward(dhs)
            assert (layer.dh is None) == (not need)
            outs.append([engine.host(dxs)] + [engine.host(g).copy() for g in layer.grads])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [3, 128])
def test_timelstm_context(engine, dtype, N):
    """TimeLSTM with a context (PeekyDecoder's shapes at N=128) gives the reference's outputs
    and gradients, and its step() with that context follows forward."""
    rng = np.random.default_rng(N)
    D, K, H, T = 16, 32, 24, 4
    params = [(rng.standard_normal(s) * 0.3).astype(dtype)
              for s in ((K + D, 4 * H), (H, 4 * H), (4 * H,))]
    x = rng.standard_normal((N, T, D)).astype(dtype)
    c = rng.standard_normal((N, K)).astype(dtype)
    h0 = rng.standard_normal((N, H)).astype(dtype)
    w = rng.standard_normal((N, T, H)).astype(dtype)
    with backend.using(engine.name):
        layer = TimeLSTM(*[engine.dev(p.copy()) for p in params], stateful=True)
        layer.set_state(engine.dev(h0.copy()))
        y = layer.forward(engine.dev(x), context=engine.dev(c))
        dx = layer.backward(engine.dev(w))
        stepper = TimeLSTM(*[engine.dev(p.copy()) for p in params])
        stepper.set_state(engine.dev(h0.copy()))
        steps = [engine.host(stepper.step(engine.dev(x[:, t]), context=engine.dev(c))).copy()
                 for t in range(T)]
        got = [engine.host(a) for a in (y, dx, layer.dh, layer.dcontext, *layer.grads)]
    # the reference: the context is an input held constant, ahead of x's columns
    xc = np.concatenate([np.broadcast_to(c[:, None], (N, T, K)), x], axis=2)
    hs, _, _, cache = reference.forward(xc, *params, h0, np.zeros((N, H)))
    dxc, dh, dWx, dWh, db = reference.backward(w, cache)
    want = [hs, dxc[:, :, K:], dh, dxc[:, :, :K].sum(axis=1), dWx, dWh, db, hs]
    names = ["hs", "dx", "dh", "dcontext", "dWx", "dWh", "db", "stepped hs"]
    for what, a, b in zip(names, got + [np.stack(steps, axis=1)], want):
        assert_close(a, b, engine.tol(dtype) * 10, what)


def test_engine_for_follows_the_configuration(cpu_engine):
    x = np.zeros((1, 1, 1), np.float32)
    with backend.using(cpu_engine.name):
        assert engine_for(x) is cpu_engine.module
        assert engine_for(x.astype(np.float16)) is _numpy  # the Cython engine: float32/64 only


def test_encoder_skips_dh():
    import fastseq
    model = fastseq.Seq2seq(13, 16, 32, seed=0)
    assert model.encoder.lstm.need_dh is False
    assert model.decoder.lstm.need_dh is True
    rng = np.random.default_rng(25)
    model.forward(rng.integers(0, 13, (4, 7)), rng.integers(0, 13, (4, 5)))
    model.backward()
    assert model.encoder.lstm.dh is None
    assert model.decoder.lstm.dh is not None


@pytest.mark.parametrize("model_name", ["Seq2seq", "PeekySeq2seq"])
def test_models_fused_embedding_same_results(cpu_engine, model_name, monkeypatch):
    """Seq2seq / PeekySeq2seq at the addition task's sizes (where the embedding is fused into the
    LSTM) give the loss and gradients of the unfused computation."""
    import fastseq
    rng = np.random.default_rng(9)
    xs, ts = rng.integers(0, 13, (128, 7)), rng.integers(0, 13, (128, 5))
    results = []
    with backend.using(cpu_engine.name):
        for fused in (True, False):
            monkeypatch.setattr(TimeLSTM, "fuse_embedding", lambda self, e, i, f=fused: f)
            model = getattr(fastseq, model_name)(13, 16, 128, seed=0)
            loss = model.forward(xs, ts)
            model.backward()
            results.append([np.array(loss)] + [g.copy() for g in model.grads])
    for what, a, b in zip(["loss"] + model.param_names, *results):
        assert_close(a, b, 1e-4, what)


# =================================================================================================
# The Cython engine's own machinery

def test_default_engine_is_cython_when_built(cy):
    """A fresh process picks the built extension by itself (no FASTSEQ_KERNEL)."""
    code = "import fastseq.backend as b; print(b.config.engine)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("FASTSEQ_KERNEL", "GPU")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                       env={**env, "PYTHONPATH": root})
    assert r.stdout.strip() == "cython", r.stderr


@pytest.fixture
def cyeng(cy):
    return Engine("cython", cy, np)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cython_engine_matches(cyeng, dtype):
    rng = np.random.default_rng(2)
    for shape in [(1, 1, 1, 1), (1, 4, 5, 6), (5, 3, 4, 6), (128, 7, 16, 128), (40, 2, 300, 9)]:
        for zero_state in (False, True):
            compare(cyeng, make_case(rng, *shape, dtype, zero_state), dtype)


def test_noncontiguous_inputs_and_grads(cy):
    rng = np.random.default_rng(7)
    dtype = np.float32
    xs, Wx, Wh, b, h0, c0, dhs = make_case(rng, 4, 3, 5, 6, dtype)
    ref = run_reference(xs, Wx, Wh, b, h0, c0, dhs)
    xs_view = np.ascontiguousarray(xs.transpose(1, 0, 2)).transpose(1, 0, 2)
    hs, hT, cT, cache = cy.forward(xs_view, np.asfortranarray(Wx), Wh, b, np.asfortranarray(h0), c0)
    grads = [np.asfortranarray(np.zeros_like(Wx)), np.zeros_like(Wh), np.zeros_like(b)]
    ids = [id(g) for g in grads]
    dxs, dh0 = cy.backward(dhs, cache, grads)
    assert [id(g) for g in grads] == ids  # written in place
    got = dict(hs=hs, hT=hT, cT=cT, dxs=dxs, dh0=dh0, dWx=grads[0], dWh=grads[1], db=grads[2])
    for k in ref:
        assert_close(got[k], ref[k], 1e-5, k)


def test_cache_serves_one_backward(cy):
    rng = np.random.default_rng(9)
    xs, Wx, Wh, b, h0, c0, dhs = make_case(rng, 2, 2, 3, 4, np.float32)
    *_, cache = cy.forward(xs, Wx, Wh, b, h0, c0)
    grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
    cy.backward(dhs, cache, grads)
    with pytest.raises(ValueError, match="one backward"):
        cy.backward(dhs, cache, grads)


def test_rejects_bad_input(cy):
    rng = np.random.default_rng(10)
    xs, Wx, Wh, b, h0, c0, dhs = make_case(rng, 2, 2, 3, 4, np.float32)
    with pytest.raises(TypeError):
        cy.forward(xs, Wx, Wh.astype(np.float64), b, h0, c0)
    with pytest.raises(TypeError):
        cy.forward(xs.astype(np.float16), Wx.astype(np.float16), Wh.astype(np.float16),
                   b.astype(np.float16), h0.astype(np.float16), c0.astype(np.float16))
    with pytest.raises(ValueError):
        cy.forward(xs, Wx, Wh, b, h0[:1], c0)
    *_, cache = cy.forward(xs, Wx, Wh, b, h0, c0)
    with pytest.raises(ValueError):
        cy.backward(dhs[:, :1], cache, [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)])


def test_inputs_and_states_are_cast_to_the_weights_dtype(cyeng):
    rng = np.random.default_rng(17)
    case = make_case(rng, 3, 4, 2, 5, np.float32)
    xs, Wx, Wh, b, h0, c0, dhs = case
    ref = run_engine(cyeng, *case)
    out = run_engine(cyeng, xs.astype(np.float64), Wx, Wh, b, h0.astype(np.float64),
                     c0.astype(np.float16), dhs.astype(np.float64))
    for k in ref:
        assert out[k].dtype == np.float32
        assert_close(out[k], ref[k], 1e-3, k)  # c0 went through float16


def test_step_converts_what_the_kernel_cannot_take(cy):
    """step() hands plain arrays straight to the kernel; others (another dtype, not contiguous,
    one bias per row) give the same state as their plain float32 copies would."""
    rng = np.random.default_rng(18)
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, 3, 1, 4, 5, np.float32)
    x = xs[:, 0]
    want = reference.step(x, Wx, Wh, b, h0, c0)
    variants = [(x, h0, c0), (x.astype(np.float64), h0, c0), (x, h0.astype(np.float64), c0),
                (np.asfortranarray(x), h0, np.asfortranarray(c0)),
                (np.repeat(x, 2, axis=1)[:, ::2], h0, c0)]
    for xv, hv, cv in variants:
        h, c = cy.step(xv, Wx, Wh, b, hv, cv)
        assert h.dtype == c.dtype == np.float32
        assert_close(h, want[0], 1e-5, "h")
        assert_close(c, want[1], 1e-5, "c")
    rows = np.tile(b, (3, 1))  # one bias per row
    h, c = cy.step(x, Wx, Wh, rows, h0, c0)
    assert_close(h, want[0], 1e-5, "h (row bias)")


def test_step_rejects_bad_input(cy):
    rng = np.random.default_rng(19)
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, 2, 1, 3, 4, np.float32)
    x = xs[:, 0]
    with pytest.raises(TypeError):
        cy.step(x, Wx, Wh.astype(np.float64), b, h0, c0)  # weights of two dtypes
    with pytest.raises(TypeError):
        cy.step(x.astype(np.float16), *(a.astype(np.float16) for a in (Wx, Wh, b, h0, c0)))
    for args in [(x[:, :2], Wx, Wh, b, h0, c0), (x, Wx[:, :8], Wh, b, h0, c0),
                 (x, Wx, Wh, b[:8], h0, c0), (x, Wx, Wh, b, h0[:1], c0), (x, Wx, Wh, b, h0, c0[:, :3])]:
        with pytest.raises(ValueError):
            cy.step(*args)


def test_kernel_final_state_checks_shapes(cy):
    """The kernel refuses operands whose shapes disagree (the Python side may pass arrays
    straight through), rather than reading or writing outside them."""
    f32 = np.float32
    N, D, H = 2, 3, 4
    ok = dict(xs=np.zeros((N, 1, D), f32), Wx=np.zeros((D, 4 * H), f32),
              Wh=np.zeros((H, 4 * H), f32), b=np.zeros(4 * H, f32), h0=np.zeros((N, H), f32),
              c0=np.zeros((N, H), f32), h=np.empty((N, H), f32), c=np.empty((N, H), f32))
    scratch = np.empty(cy._cpu.infer_scratch_size(N, H, 1), f32)

    def run(**bad):
        a = {**ok, **bad}
        cy._cpu.final_state(a["xs"], a["Wx"], a["Wh"], a["b"], a["h0"], a["c0"], a["h"],
                                 a["c"], scratch, 1)

    run()
    for bad in [dict(Wx=np.zeros((D + 1, 4 * H), f32)), dict(Wx=np.zeros((D, 4 * H + 4), f32)),
                dict(Wh=np.zeros((H, 4 * H + 4), f32)), dict(h0=np.zeros((N, H + 1), f32)),
                dict(c0=np.zeros((N + 1, H), f32)), dict(h=np.empty((N, H - 1), f32)),
                dict(c=np.empty((N - 1, H), f32)), dict(xs=np.zeros((0, 1, D), f32))]:
        with pytest.raises(ValueError):
            run(**bad)


# --- buffer pool ------------------------------------------------------------------------------

def test_pooled_buffers_are_not_shared_while_alive(cy):
    """Two live caches of the same shape, backward in either order; earlier hs stay intact."""
    rng = np.random.default_rng(15)
    cy.clear_pool()
    cases = [make_case(rng, 4, 3, 5, 6, np.float32) for _ in range(3)]
    Wx, Wh, b = cases[0][1:4]
    cases = [[c[0], Wx, Wh, b] + c[4:] for c in cases]
    refs = [run_reference(*c) for c in cases]
    # a dropped cache hands its buffers to the pool...
    *_, cache = cy.forward(*cases[2][:6])
    work = cache.work
    del cache
    # ...and the next forward of that shape reuses them
    hs0, hT0, cT0, cache0 = cy.forward(*cases[0][:6])
    assert cache0.work is work
    hs1, hT1, cT1, cache1 = cy.forward(*cases[1][:6])
    assert all(a is not b for a, b in zip(cache1.work, cache0.work))
    outs = []
    for cache, case in ((cache1, cases[1]), (cache0, cases[0])):
        grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        dxs, dh0 = cy.backward(case[6], cache, grads)
        outs.append((dxs, dh0, grads))
    # a later forward (reusing the released buffers) must not touch the earlier outputs
    cy.forward(*cases[2][:6])
    for (hs, hT, cT), (dxs, dh0, grads), ref in zip(((hs1, hT1, cT1), (hs0, hT0, cT0)), outs,
                                                    (refs[1], refs[0])):
        got = dict(hs=hs, hT=hT, cT=cT, dxs=dxs, dh0=dh0, dWx=grads[0], dWh=grads[1], db=grads[2])
        for k in ref:
            assert_close(got[k], ref[k], 1e-5, k)


def test_pool_is_bounded(cy, monkeypatch):
    rng = np.random.default_rng(16)
    case = make_case(rng, 3, 2, 4, 5, np.float64)
    cy.clear_pool()
    monkeypatch.setattr(_pool, "MAX_BYTES", 0)
    *_, cache = cy.forward(*case[:6])
    del cache
    assert _pool._bytes == 0 and not _pool._sets
    monkeypatch.setattr(_pool, "MAX_BYTES", 1 << 20)
    for _ in range(3):
        *_, cache = cy.forward(*case[:6])
        cache2 = cy.forward(*case[:6])[3]
        del cache, cache2
    assert 0 < _pool._bytes <= 1 << 20
    cy.clear_pool()
    assert _pool._bytes == 0 and not _pool._sets


# --- chunks: row chunks fixed by N, each with its own time loop, taken by up to n threads -------

@pytest.fixture(params=[1, 2, 3], ids=["1thread", "2threads", "3threads"])
def forced_split(cy, request, monkeypatch):
    """Chunks of 2 rows or more (so small batches run chunked too), on 1, 2 or 3 threads."""
    default = cy._cpu.set_min_chunk_rows(2)
    monkeypatch.setattr(cy, "_threads", lambda: request.param)
    yield request.param
    cy._cpu.set_min_chunk_rows(default)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
def test_split_path_matches(cy, cyeng, dtype, zero_state, forced_split):
    rng = np.random.default_rng(11)
    for shape in [(6, 1, 1, 1), (7, 3, 4, 6), (65, 7, 16, 32), (128, 7, 16, 128), (131, 2, 300, 9)]:
        assert cy._cpu.chunks(shape[0]) >= 2
        compare(cyeng, make_case(rng, *shape, dtype, zero_state), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_path_noncontiguous_dhs(cyeng, dtype, forced_split):
    check_noncontiguous_dhs(cyeng, 12, 9, dtype)


def test_chunks_depend_on_the_batch_only(cy):
    chunks = cy._cpu.chunks
    assert chunks(63) == 1 and chunks(20) == 1
    assert chunks(64) == 2 and chunks(128) == 2 and chunks(191) == 2 and chunks(256) == 4
    assert chunks(5000) == 8  # bounded: each chunk keeps its own dWx, dWh shares


def test_chunks_bit_identical_for_any_thread_count(cy, cyeng, monkeypatch):
    """The chunks' shares are summed in chunk order: 1, 2 or 3 threads give the same bits."""
    rng = np.random.default_rng(12)
    case = make_case(rng, 131, 5, 8, 24, np.float32)
    runs = []
    for n in (1, 2, 3):
        monkeypatch.setattr(cy, "_threads", lambda n=n: n)
        runs.append(run_engine(cyeng, *case))
    for other in runs[1:]:
        for k in runs[0]:
            np.testing.assert_array_equal(other[k], runs[0][k], err_msg=k)


def test_inference_bit_identical_for_any_thread_count_and_batch(cy, monkeypatch):
    """final_state runs in blocks of rows fixed by the batch: 1, 2 or 3 threads give the same
    bits, and a block's results do not depend on the other blocks. (BLAS may round a row
    differently at another position in a block.)"""
    rng = np.random.default_rng(14)
    N = 4 * cy._cpu.infer_rows() + 44
    fcase = ids_case(rng, N, 6, 13, 24, np.float32, False)[:6]
    runs = []
    for n in (1, 2, 3):
        monkeypatch.setattr(cy, "_threads", lambda n=n: n)
        runs.append(cy.final_state(*fcase))
    for other in runs[1:]:
        for a, b in zip(other, runs[0]):
            np.testing.assert_array_equal(a, b)
    B = cy._cpu.infer_rows()
    rows = slice(B, 3 * B)  # blocks 1 and 2
    ids, Wx, Wh, b, h0, c0 = fcase
    part_f = [ids[rows], Wx, Wh, b, h0[rows], c0[rows]]
    for a, b in zip(cy.final_state(*part_f), runs[0]):
        np.testing.assert_array_equal(a, b[rows])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
def test_no_dh0_split_path_matches(cy, cyeng, dtype, zero_state, forced_split):
    rng = np.random.default_rng(22)
    for shape in [(4, 1, 1, 1), (5, 3, 4, 6), (128, 7, 16, 128)]:
        assert cy._cpu.chunks(shape[0]) >= 2
        case = make_case(rng, *shape, dtype, zero_state)
        full = compare(cyeng, case, dtype)
        out = run_engine(cyeng, *case, need_dh0=False)
        for k in ("dxs", "dWx", "dWh", "db"):
            np.testing.assert_array_equal(out[k], full[k], err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_bias_split_path_matches(cyeng, dtype, forced_split):
    rng = np.random.default_rng(5)
    for shape in [(6, 1, 1, 1), (7, 3, 4, 6), (65, 4, 16, 32)]:
        compare(cyeng, row_bias_case(rng, shape, dtype, False), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ids_input_split_path(cyeng, dtype, forced_split):
    rng = np.random.default_rng(6)
    for shape in [(6, 1, 2, 1), (7, 3, 4, 6), (65, 4, 13, 32)]:
        compare_ids(cyeng, ids_case(rng, *shape, dtype, False), dtype)
