"""The Cython LSTM engine against the NumPy reference engine (and against central differences).

Skipped when the extension is not built, unless FASTSEQ_REQUIRE_EXT=1 (CI), where a missing
extension fails instead.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import numerical_grad

REQUIRE_EXT = os.environ.get("FASTSEQ_REQUIRE_EXT", "0") == "1"

try:
    # `import a.b.c` always imports the submodule (and sets it as the package's attribute)
    import fastseq.lstm._cython as _cython
except ImportError as e:
    if REQUIRE_EXT:
        pytest.fail(f"FASTSEQ_REQUIRE_EXT=1 but the Cython LSTM kernel is not importable: {e}",
                    pytrace=False)
    pytest.skip(f"Cython LSTM kernel not built ({e})", allow_module_level=True)

from fastseq import lstm  # noqa: E402
from fastseq.lstm import _blas, _numpy, _pool  # noqa: E402

TOL = {np.float32: 1e-5, np.float64: 1e-10}


@pytest.fixture(autouse=True)
def restore_kernel():
    yield
    lstm.set_kernel(None)


def assert_close(actual, expected, rtol, what=""):
    """||actual - expected|| <= rtol * max(||expected||, 0.01 sqrt(size)).

    Norm-wise relative error; arrays whose RMS is below 0.01 (inputs and upstream gradients here
    are O(1)) are compared absolutely at that scale instead, since a few-ulp difference in a
    saturated gate g makes a relative difference of g(1-g) far above eps in either engine."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
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


def run_engine(engine, xs, Wx, Wh, b, h0, c0, dhs):
    hs, hT, cT, cache = engine.forward(xs, Wx, Wh, b, h0, c0)
    hs = hs.copy()  # the engine may reuse nothing, but compare values as they were after forward
    grads = [np.full_like(Wx, np.nan), np.full_like(Wh, np.nan), np.full_like(b, np.nan)]
    dxs, dh0 = engine.backward(dhs, cache, grads)
    return dict(hs=hs, hT=hT, cT=cT, dxs=dxs, dh0=dh0, dWx=grads[0], dWh=grads[1], db=grads[2])


def compare(case, dtype):
    ref = run_engine(_numpy, *case)
    out = run_engine(_cython, *case)
    for k in ref:
        assert out[k].dtype == dtype, f"{k}: dtype {out[k].dtype}"
        assert_close(out[k], ref[k], TOL[dtype], k)
    return out


shapes = st.tuples(st.integers(1, 9), st.integers(1, 8), st.integers(1, 12), st.integers(1, 10))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, dtype=st.sampled_from([np.float32, np.float64]), zero_state=st.booleans(),
       scale=st.sampled_from([0.1, 1.0, 4.0]), seed=st.integers(0, 2**31 - 1))
def test_matches_numpy_random_shapes(shape, dtype, zero_state, scale, seed):
    rng = np.random.default_rng(seed)
    compare(make_case(rng, *shape, dtype, zero_state, scale), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(128, 7, 16, 128), (128, 4, 16, 128), (33, 5, 7, 77),
                                   (2, 3, 300, 5), (1, 1, 1, 1)])
@pytest.mark.parametrize("zero_state", [False, True])
def test_matches_numpy_larger(shape, dtype, zero_state):
    rng = np.random.default_rng(sum(shape))
    compare(make_case(rng, *shape, dtype, zero_state), dtype)


@pytest.fixture(params=["scipy", "auto"])
def blas(request):
    """Run with SciPy's BLAS (what the kernel is compiled against) and with the automatic choice
    (NumPy's OpenBLAS where it can be found); restore the automatic choice after."""
    used = _cython.use_blas(request.param)
    yield used
    _cython.use_blas("auto")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_sources_match(dtype, blas):
    rng = np.random.default_rng(2)
    for shape in [(1, 1, 1, 1), (5, 3, 4, 6), (128, 7, 16, 128), (40, 2, 300, 9)]:
        for zero_state in (False, True):
            compare(make_case(rng, *shape, dtype, zero_state), dtype)


def test_use_blas_rejects_unknown():
    with pytest.raises(ValueError):
        _cython.use_blas("mkl")
    assert _cython.BLAS == _cython.use_blas("auto")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_gates(dtype):
    """Huge pre-activations: gates saturate to 0/1 exactly like the reference, nothing non-finite."""
    rng = np.random.default_rng(4)
    case = make_case(rng, 6, 5, 4, 7, dtype, scale=200.0)
    compare(case, dtype)


def test_nan_propagates():
    rng = np.random.default_rng(5)
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, 3, 4, 2, 5, np.float32)
    xs[1, 2, 0] = np.nan
    hs, hT, cT, _ = _cython.forward(xs, Wx, Wh, b, h0, c0)
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


def _check_noncontiguous_dhs(seed, N, dtype):
    rng = np.random.default_rng(seed)
    T, D, H = 4, 3, 6
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, N, T, D, H, dtype)
    for name, dhs in dhs_variants(rng, N, T, H, dtype).items():
        ref = run_engine(_numpy, xs, Wx, Wh, b, h0, c0, np.ascontiguousarray(dhs, dtype))
        out = run_engine(_cython, xs, Wx, Wh, b, h0, c0, dhs)
        for k in ref:
            assert_close(out[k], ref[k], TOL[dtype], f"{name}: {k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noncontiguous_dhs(dtype):
    _check_noncontiguous_dhs(6, 5, dtype)


def test_noncontiguous_inputs_and_grads():
    rng = np.random.default_rng(7)
    dtype = np.float32
    xs, Wx, Wh, b, h0, c0, dhs = make_case(rng, 4, 3, 5, 6, dtype)
    ref = run_engine(_numpy, xs, Wx, Wh, b, h0, c0, dhs)
    xs_view = np.ascontiguousarray(xs.transpose(1, 0, 2)).transpose(1, 0, 2)
    hs, hT, cT, cache = _cython.forward(xs_view, np.asfortranarray(Wx), Wh, b,
                                        np.asfortranarray(h0), c0)
    grads = [np.asfortranarray(np.zeros_like(Wx)), np.zeros_like(Wh), np.zeros_like(b)]
    ids = [id(g) for g in grads]
    dxs, dh0 = _cython.backward(dhs, cache, grads)
    assert [id(g) for g in grads] == ids  # written in place
    got = dict(hs=hs, hT=hT, cT=cT, dxs=dxs, dh0=dh0, dWx=grads[0], dWh=grads[1], db=grads[2])
    for k in ref:
        assert_close(got[k], ref[k], TOL[dtype], k)


def test_grads_are_overwritten_not_accumulated():
    rng = np.random.default_rng(8)
    case = make_case(rng, 3, 2, 4, 5, np.float64)
    xs, Wx, Wh, b, h0, c0, dhs = case
    grads = [np.full_like(Wx, 7.0), np.full_like(Wh, 7.0), np.full_like(b, 7.0)]
    *_, cache = _cython.forward(xs, Wx, Wh, b, h0, c0)
    _cython.backward(dhs, cache, grads)
    ref = run_engine(_numpy, *case)
    for g, k in zip(grads, ("dWx", "dWh", "db")):
        assert_close(g, ref[k], 1e-10, k)


def test_cache_serves_one_backward():
    rng = np.random.default_rng(9)
    xs, Wx, Wh, b, h0, c0, dhs = make_case(rng, 2, 2, 3, 4, np.float32)
    *_, cache = _cython.forward(xs, Wx, Wh, b, h0, c0)
    grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
    _cython.backward(dhs, cache, grads)
    with pytest.raises(ValueError, match="one backward"):
        _cython.backward(dhs, cache, grads)


def test_rejects_bad_input():
    rng = np.random.default_rng(10)
    xs, Wx, Wh, b, h0, c0, dhs = make_case(rng, 2, 2, 3, 4, np.float32)
    with pytest.raises(TypeError):
        _cython.forward(xs, Wx, Wh.astype(np.float64), b, h0, c0)
    with pytest.raises(TypeError):
        _cython.forward(xs.astype(np.float16), Wx.astype(np.float16), Wh.astype(np.float16),
                        b.astype(np.float16), h0.astype(np.float16), c0.astype(np.float16))
    with pytest.raises(ValueError):
        _cython.forward(xs, Wx, Wh, b, h0[:1], c0)
    *_, cache = _cython.forward(xs, Wx, Wh, b, h0, c0)
    with pytest.raises(ValueError):
        _cython.backward(dhs[:, :1], cache, [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)])


def test_inputs_and_states_are_cast_to_the_weights_dtype():
    rng = np.random.default_rng(17)
    case = make_case(rng, 3, 4, 2, 5, np.float32)
    xs, Wx, Wh, b, h0, c0, dhs = case
    ref = run_engine(_cython, *case)
    out = run_engine(_cython, xs.astype(np.float64), Wx, Wh, b, h0.astype(np.float64),
                     c0.astype(np.float16), dhs.astype(np.float64))
    for k in ref:
        assert out[k].dtype == np.float32
        assert_close(out[k], ref[k], 1e-3, k)  # c0 went through float16


def test_empty_batch_falls_back():
    rng = np.random.default_rng(11)
    xs, Wx, Wh, b, h0, c0, dhs = make_case(rng, 0, 3, 2, 4, np.float32)
    out = run_engine(_cython, xs, Wx, Wh, b, h0, c0, dhs)
    assert out["hs"].shape == (0, 3, 4) and out["dxs"].shape == (0, 3, 2)
    assert np.all(out["dWx"] == 0) and np.all(out["db"] == 0)


# --- buffer pool ------------------------------------------------------------------------------

def test_pooled_buffers_are_not_shared_while_alive():
    """Two live caches of the same shape, backward in either order; earlier hs stay intact."""
    rng = np.random.default_rng(15)
    _cython.clear_pool()
    cases = [make_case(rng, 4, 3, 5, 6, np.float32) for _ in range(3)]
    Wx, Wh, b = cases[0][1:4]
    cases = [[c[0], Wx, Wh, b] + c[4:] for c in cases]
    refs = [run_engine(_numpy, *c) for c in cases]
    # a dropped cache hands its buffers to the pool...
    *_, cache = _cython.forward(*cases[2][:6])
    work = cache.work
    del cache
    # ...and the next forward of that shape reuses them
    hs0, hT0, cT0, cache0 = _cython.forward(*cases[0][:6])
    assert cache0.work is work
    hs1, hT1, cT1, cache1 = _cython.forward(*cases[1][:6])
    assert all(a is not b for a, b in zip(cache1.work, cache0.work))
    outs = []
    for cache, case in ((cache1, cases[1]), (cache0, cases[0])):
        grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        dxs, dh0 = _cython.backward(case[6], cache, grads)
        outs.append((dxs, dh0, grads))
    # a later forward (reusing the released buffers) must not touch the earlier outputs
    _cython.forward(*cases[2][:6])
    for (hs, hT, cT), (dxs, dh0, grads), ref in zip(((hs1, hT1, cT1), (hs0, hT0, cT0)), outs,
                                                    (refs[1], refs[0])):
        got = dict(hs=hs, hT=hT, cT=cT, dxs=dxs, dh0=dh0, dWx=grads[0], dWh=grads[1], db=grads[2])
        for k in ref:
            assert_close(got[k], ref[k], 1e-5, k)


def test_pool_is_bounded(monkeypatch):
    rng = np.random.default_rng(16)
    case = make_case(rng, 3, 2, 4, 5, np.float64)
    _cython.clear_pool()
    monkeypatch.setattr(_pool, "MAX_BYTES", 0)
    *_, cache = _cython.forward(*case[:6])
    del cache
    assert _pool._bytes == 0 and not _pool._sets
    monkeypatch.setattr(_pool, "MAX_BYTES", 1 << 20)
    for _ in range(3):
        *_, cache = _cython.forward(*case[:6])
        cache2 = _cython.forward(*case[:6])[3]
        del cache, cache2
    assert 0 < _pool._bytes <= 1 << 20
    _cython.clear_pool()
    assert _pool._bytes == 0 and not _pool._sets


# --- central differences (float64) ------------------------------------------------------------

@pytest.mark.parametrize("zero_state", [False, True])
def test_gradients_by_central_differences(zero_state):
    rng = np.random.default_rng(12)
    N, T, D, H = 2, 3, 3, 4
    xs, Wx, Wh, b, h0, c0, _ = make_case(rng, N, T, D, H, np.float64, zero_state)
    R = rng.standard_normal((N, T, H))

    def loss():
        hs, hT, cT, _ = _cython.forward(xs, Wx, Wh, b, h0, c0)
        return float(np.sum(hs * R))

    *_, cache = _cython.forward(xs, Wx, Wh, b, h0, c0)
    grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
    dxs, dh0 = _cython.backward(R, cache, grads)
    for name, x, g in (("xs", xs, dxs), ("Wx", Wx, grads[0]), ("Wh", Wh, grads[1]),
                       ("b", b, grads[2]), ("h0", h0, dh0)):
        num = numerical_grad(loss, x)
        err = np.linalg.norm(num - g) / max(np.linalg.norm(num) + np.linalg.norm(g), 1e-12)
        assert err < 1e-7, f"d{name}: relative error {err:.3g}"


# --- through TimeLSTM and set_kernel ------------------------------------------------------------

def make_layer(rng, D, H, dtype, stateful):
    Wx = (rng.standard_normal((D, 4 * H)) / np.sqrt(D)).astype(dtype)
    Wh = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(dtype)
    b = (rng.standard_normal(4 * H) * 0.1).astype(dtype)
    return lambda: __import__("fastseq.layers").layers.TimeLSTM(Wx.copy(), Wh.copy(), b.copy(), stateful=stateful)


def drive(layer, kernel, chunks, dchunks, h=None):
    lstm.set_kernel(kernel)
    if h is not None:
        layer.set_state(h.copy())
    outs = []
    for xs, dhs in zip(chunks, dchunks):
        hs = layer.forward(xs)
        outs.append(np.array(hs))
        assert layer._kernel is (_cython if kernel == "cython" else _numpy)
        dxs = layer.backward(dhs)
        outs += [np.array(dxs), layer.dh.copy()] + [g.copy() for g in layer.grads]
    outs += [layer.h.copy(), layer.c.copy()]
    return outs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stateful_continuation_through_timelstm(dtype):
    rng = np.random.default_rng(13)
    N, D, H = 4, 5, 6
    new = make_layer(rng, D, H, dtype, stateful=True)
    chunks = [rng.standard_normal((N, T, D)).astype(dtype) for T in (3, 5)]
    dchunks = [rng.standard_normal((N, T, H)).astype(dtype) for T in (3, 5)]
    ref = drive(new(), "numpy", chunks, dchunks)
    out = drive(new(), "cython", chunks, dchunks)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert_close(a, b, TOL[dtype], f"output {i}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_set_state_with_given_h(dtype):
    rng = np.random.default_rng(14)
    N, T, D, H = 3, 4, 2, 5
    h = np.tanh(rng.standard_normal((N, H))).astype(dtype)
    new = make_layer(rng, D, H, dtype, stateful=False)
    chunks = [rng.standard_normal((N, T, D)).astype(dtype)]
    dchunks = [rng.standard_normal((N, T, H)).astype(dtype)]
    ref = drive(new(), "numpy", chunks, dchunks, h=h)
    out = drive(new(), "cython", chunks, dchunks, h=h)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert_close(a, b, TOL[dtype], f"output {i}")
    assert np.abs(out[2]).sum() > 0  # dh (gradient of the given h) is not trivially zero


def test_set_kernel_selects_cython():
    x = np.zeros((1, 1, 1), np.float32)
    lstm.set_kernel("cython")
    assert lstm.kernel_name() == "cython" and lstm.get_kernel(x) is _cython
    lstm.set_kernel("numpy")
    assert lstm.get_kernel(x) is _numpy


def test_package_import_finds_the_extension():
    """A fresh `import fastseq.lstm` must pick up the built extension (automatic engine choice).

    (`_cython = None` before `from . import _cython` in fastseq/lstm/__init__.py makes the import
    statement return that None instead of importing the submodule.)"""
    code = ("import fastseq.lstm as l, sys; "
            "sys.exit(0 if l.cython_available() else 'cython engine not loaded: %s' % l._cython_error)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "FASTSEQ_KERNEL": ""})
    assert r.returncode == 0, r.stderr or r.stdout


# --- chunks: row chunks fixed by N, each with its own time loop, taken by up to n threads -------

@pytest.fixture(params=[1, 2, 3], ids=["1thread", "2threads", "3threads"])
def forced_split(request, monkeypatch):
    """Chunks of 2 rows or more (so small batches run chunked too), on 1, 2 or 3 threads."""
    _cython._lstm_cpu.set_min_chunk_rows(2)
    monkeypatch.setattr(_cython, "_threads", lambda: request.param)
    yield request.param
    _cython._lstm_cpu.set_min_chunk_rows(32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
def test_split_path_matches(dtype, zero_state, forced_split):
    rng = np.random.default_rng(11)
    for shape in [(6, 1, 1, 1), (7, 3, 4, 6), (65, 7, 16, 32), (128, 7, 16, 128), (131, 2, 300, 9)]:
        assert _cython._lstm_cpu.chunks(shape[0]) >= 2
        compare(make_case(rng, *shape, dtype, zero_state), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_path_noncontiguous_dhs(dtype, forced_split):
    _check_noncontiguous_dhs(12, 9, dtype)


def test_chunks_depend_on_the_batch_only():
    chunks = _cython._lstm_cpu.chunks
    assert chunks(63) == 1 and chunks(20) == 1
    assert chunks(64) == 2 and chunks(128) == 4
    assert chunks(5000) == 8  # bounded: each chunk keeps its own dWx, dWh shares


def test_chunks_bit_identical_for_any_thread_count(monkeypatch):
    """The chunks' shares are summed in chunk order: 1, 2 or 3 threads give the same bits."""
    rng = np.random.default_rng(12)
    case = make_case(rng, 131, 5, 8, 24, np.float32)
    runs = []
    for n in (1, 2, 3):
        monkeypatch.setattr(_cython, "_threads", lambda n=n: n)
        runs.append(run_engine(_cython, *case))
    for other in runs[1:]:
        for k in runs[0]:
            np.testing.assert_array_equal(other[k], runs[0][k], err_msg=k)


def test_split_path_with_global_thread_setter(monkeypatch):
    """Only a global BLAS thread setter known: set to 1 around the loop, restored after."""
    found = _blas.numpy_blas()
    if found is None or not found.set_global or not _cython._lstm_cpu.can_thread():
        pytest.skip("NumPy's OpenBLAS (with a global thread setter) not in use")
    import ctypes
    getter = ctypes.CFUNCTYPE(ctypes.c_int)(found.get_global)
    before = getter()
    monkeypatch.setattr(_cython, "_threads", lambda: 2)
    _cython._lstm_cpu.set_blas_threads(0, found.set_global, found.get_global)
    try:
        rng = np.random.default_rng(13)
        for dtype in (np.float32, np.float64):
            compare(make_case(rng, 70, 5, 8, 16, dtype), dtype)
        assert getter() == before
    finally:
        _cython._lstm_cpu.set_blas_threads(found.set_local, found.set_global, found.get_global)


# --- need_dh0=False: the product for dh0 is skipped, everything else unchanged ------------------

def run_engine_no_dh0(engine, xs, Wx, Wh, b, h0, c0, dhs):
    hs, hT, cT, cache = engine.forward(xs, Wx, Wh, b, h0, c0)
    grads = [np.full_like(Wx, np.nan), np.full_like(Wh, np.nan), np.full_like(b, np.nan)]
    dxs, dh0 = engine.backward(dhs, cache, grads, need_dh0=False)
    assert dh0 is None
    return dict(dxs=np.array(dxs), dWx=grads[0], dWh=grads[1], db=grads[2])


def compare_no_dh0(case, dtype):
    """Each engine without dh0 gives bit-identical gradients to itself with dh0, and the Cython
    engine agrees with the NumPy one."""
    full = {}
    for eng in (_numpy, _cython):
        ref = run_engine(eng, *case)
        out = run_engine_no_dh0(eng, *case)
        for k in out:
            assert out[k].dtype == dtype
            np.testing.assert_array_equal(out[k], ref[k], err_msg=f"{eng.__name__} {k}")
        full[eng] = out
    for k in full[_numpy]:
        assert_close(full[_cython][k], full[_numpy][k], TOL[dtype], k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
def test_no_dh0_matches(dtype, zero_state):
    rng = np.random.default_rng(21)
    for shape in [(1, 1, 1, 1), (3, 2, 5, 7), (9, 8, 12, 10), (65, 7, 16, 32), (128, 7, 16, 128)]:
        compare_no_dh0(make_case(rng, *shape, dtype, zero_state), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
def test_no_dh0_split_path_matches(dtype, zero_state, forced_split):
    rng = np.random.default_rng(22)
    for shape in [(4, 1, 1, 1), (5, 3, 4, 6), (128, 7, 16, 128)]:
        assert _cython._lstm_cpu.chunks(shape[0]) >= 2
        compare_no_dh0(make_case(rng, *shape, dtype, zero_state), dtype)


def test_no_dh0_empty_batch_falls_back():
    rng = np.random.default_rng(23)
    case = make_case(rng, 0, 3, 2, 4, np.float32)
    out = run_engine_no_dh0(_cython, *case)
    assert out["dxs"].shape == (0, 3, 2)


@pytest.mark.parametrize("kernel", ["numpy", "cython"])
def test_timelstm_need_dh(kernel):
    rng = np.random.default_rng(24)
    make = make_layer(rng, 5, 6, np.float64, stateful=False)
    xs = rng.standard_normal((4, 3, 5))
    dhs = rng.standard_normal((4, 3, 6))
    outs = []
    for need in (True, False):
        layer = make()
        assert layer.need_dh is True  # textbook default
        layer.need_dh = need
        lstm.set_kernel(kernel)
        layer.forward(xs)
        dxs = layer.backward(dhs)
        assert (layer.dh is None) == (not need)
        outs.append([np.array(dxs)] + [g.copy() for g in layer.grads])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


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


# --- one bias per row (b of shape (N, 4H)): PeekyDecoder folds h Wx_h into it -------------------

def _row_bias_case(rng, shape, dtype, zero_state):
    case = make_case(rng, *shape, dtype, zero_state)
    N, H = shape[0], shape[3]
    case[3] = (rng.standard_normal((N, 4 * H)) * 0.5).astype(dtype)
    return case


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 4, 6), (128, 4, 16, 128)])
def test_row_bias_matches_numpy(shape, dtype, zero_state):
    rng = np.random.default_rng(sum(shape))
    out = compare(_row_bias_case(rng, shape, dtype, zero_state), dtype)
    assert out["db"].shape == (shape[0], 4 * shape[3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_bias_split_path_matches(dtype, forced_split):
    rng = np.random.default_rng(5)
    for shape in [(6, 1, 1, 1), (7, 3, 4, 6), (65, 4, 16, 32)]:
        compare(_row_bias_case(rng, shape, dtype, False), dtype)


def test_row_bias_numpy_engine_gradient_numerically():
    """db per row from the reference engine against finite differences (float64)."""
    rng = np.random.default_rng(8)
    xs, Wx, Wh, b, h0, c0, dhs = _row_bias_case(rng, (3, 4, 2, 3), np.float64, False)

    def loss(bb):
        hs, _, _, _ = _numpy.forward(xs, Wx, Wh, bb, h0, c0)
        return float((hs * dhs).sum())

    _, _, _, cache = _numpy.forward(xs, Wx, Wh, b, h0, c0)
    grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
    _numpy.backward(dhs, cache, grads)
    num = np.zeros_like(b)
    for idx in np.ndindex(*b.shape):
        e = np.zeros_like(b)
        e[idx] = 1e-6
        num[idx] = (loss(b + e) - loss(b - e)) / 2e-6
    np.testing.assert_allclose(grads[2], num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [3, 128])
def test_time_lstm_context_same_on_both_engines(dtype, N):
    """TimeLSTM with a context (PeekyDecoder's shapes at N=128) gives the same outputs and
    gradients on the Cython engine as on the NumPy engine."""
    from fastseq.layers import TimeLSTM
    rng = np.random.default_rng(N)
    D, K, H, T = 16, 32, 24, 4
    params = [(rng.standard_normal(s) * 0.3).astype(dtype)
              for s in ((K + D, 4 * H), (H, 4 * H), (4 * H,))]
    x = rng.standard_normal((N, T, D)).astype(dtype)
    c = rng.standard_normal((N, K)).astype(dtype)
    h0 = rng.standard_normal((N, H)).astype(dtype)
    w = rng.standard_normal((N, T, H)).astype(dtype)
    results = []
    for name in ("numpy", "cython"):
        lstm.set_kernel(name)
        layer = TimeLSTM(*[p.copy() for p in params], stateful=True)
        layer.set_state(h0.copy())
        y = layer.forward(x, context=c)
        dx = layer.backward(w)
        results.append([y, dx, layer.dh, layer.dcontext] + [g.copy() for g in layer.grads])
    for what, a, b in zip(["hs", "dx", "dh", "dcontext", "dWx", "dWh", "db"], *results):
        assert_close(a, b, TOL[dtype] * 10, what)


# --- one-hot inputs given as ids (N, T): x_t Wx is a gather, dWx a scatter-add ----------------

def _ids_case(rng, N, T, V, H, dtype, zero_state):
    case = make_case(rng, N, T, V, H, dtype, zero_state)
    case[0] = rng.integers(0, V, (N, T))
    return case


def _compare_ids(case, dtype):
    """Ids against the same inputs as explicit one-hot float rows, on both engines."""
    ids, Wx = case[0], case[1]
    onehot = np.eye(Wx.shape[0], dtype=dtype)[ids]
    ref = run_engine(_numpy, onehot, *case[1:])
    for engine in (_numpy, _cython):
        out = run_engine(engine, *case)
        assert out["dxs"] is None
        for k in ref:
            if k != "dxs":
                assert_close(out[k], ref[k], TOL[dtype], f"{engine.__name__} {k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_state", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 4, 6), (128, 7, 13, 128)])
def test_ids_input_matches_one_hot_rows(shape, dtype, zero_state):
    rng = np.random.default_rng(sum(shape) + 1)
    _compare_ids(_ids_case(rng, *shape, dtype, zero_state), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ids_input_split_path(dtype, forced_split):
    rng = np.random.default_rng(6)
    for shape in [(6, 1, 2, 1), (7, 3, 4, 6), (65, 4, 13, 32)]:
        _compare_ids(_ids_case(rng, *shape, dtype, False), dtype)


@pytest.mark.parametrize("engine", ["numpy", "cython"])
def test_ids_out_of_range_rejected(engine):
    eng = _numpy if engine == "numpy" else _cython
    rng = np.random.default_rng(0)
    case = _ids_case(rng, 3, 2, 4, 5, np.float32, True)
    case[0][1, 1] = 4
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        eng.forward(*case[:6])


@pytest.mark.parametrize("model_name", ["Seq2seq", "PeekySeq2seq"])
def test_models_fused_embedding_same_results(model_name, monkeypatch):
    """Seq2seq / PeekySeq2seq at the addition task's sizes (where the embedding is fused into the
    LSTM) give the loss and gradients of the unfused computation, on the Cython engine."""
    import fastseq
    from fastseq.layers import TimeLSTM
    rng = np.random.default_rng(9)
    xs, ts = rng.integers(0, 13, (128, 7)), rng.integers(0, 13, (128, 5))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(TimeLSTM, "fuse_embedding", lambda self, e, i, f=fused: f)
        lstm.set_kernel("cython")
        model = getattr(fastseq, model_name)(13, 16, 128, seed=0)
        loss = model.forward(xs, ts)
        model.backward()
        results.append([np.array(loss)] + [g.copy() for g in model.grads])
    for what, a, b in zip(["loss"] + model.param_names, *results):
        assert_close(a, b, 1e-4, what)
