"""Optimisers follow the textbook's formulas; the fused Adam matches the NumPy expressions."""
import numpy as np
import pytest

from fastseq import SGD, Adam, backend, clip_grads

OPTIM_EXT = backend.compiled()


def _params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(5, 7), (7,), (3, 4, 2)]]


def test_adam_matches_textbook_formula():
    p = _params(np.float64)
    g = _params(np.float64, 1)
    ref = [a.copy() for a in p]
    m = [np.zeros_like(a) for a in p]
    v = [np.zeros_like(a) for a in p]
    opt = Adam(lr=0.01, fused=False)
    for t in range(1, 4):
        opt.update(p, g)
        lr_t = 0.01 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        for i in range(3):
            m[i] += (1 - 0.9) * (g[i] - m[i])
            v[i] += (1 - 0.999) * (g[i] ** 2 - v[i])
            ref[i] -= lr_t * m[i] / (np.sqrt(v[i]) + 1e-7)
    for a, b in zip(p, ref):
        np.testing.assert_allclose(a, b, rtol=1e-13)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
def test_fused_adam_matches_numpy(cython_engine, dtype, rtol):
    p1, p2 = _params(dtype), _params(dtype)
    fused, plain = Adam(0.01), Adam(0.01, fused=False)
    assert fused.fused and not plain.fused
    for step in range(5):
        g = _params(dtype, step + 1)
        fused.update(p1, g)
        plain.update(p2, g)
    for a, b in zip(p1, p2):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


def test_adam_non_contiguous_falls_back():
    base = np.zeros((4, 6))
    p = [base[:, ::2]]  # a strided view: updated through the NumPy path, in place
    Adam(0.1).update(p, [np.ones((4, 3))])
    assert np.allclose(base[:, ::2], -0.1 * 1 / (1 + 1e-7 / 1), atol=1e-6) and np.all(base[:, 1::2] == 0)


def test_sgd_and_clip():
    p = [np.ones(3)]
    SGD(0.5).update(p, [np.array([1.0, 2.0, 3.0])])
    assert np.allclose(p[0], [0.5, 0.0, -0.5])
    g = [np.array([3.0, 4.0])]
    total = clip_grads(g, 1.0)
    assert abs(total - 5.0) < 1e-12 and np.allclose(g[0], [3 / (5 + 1e-6), 4 / (5 + 1e-6)])
    g = [np.array([0.3, 0.4])]
    clip_grads(g, 1.0)
    assert np.allclose(g[0], [0.3, 0.4])  # below the threshold: untouched


def _big(dtype, seed, sizes=((129, 511), (7,), (40_001,), (3, 5, 7), (1,))):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in sizes]


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def optim_threads(request, cython_engine):
    with backend.using(threads=request.param):
        yield request.param


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
def test_fused_adam_large_lists_any_thread_count(optim_threads, dtype, rtol):
    # ~106k elements: above the threshold for threads; shares split arrays at odd offsets
    p1, p2 = _big(dtype, 0), _big(dtype, 0)
    fused, plain = Adam(0.01), Adam(0.01, fused=False)
    for step in range(3):
        g = _big(dtype, step + 1)
        fused.update(p1, g)
        plain.update(p2, g)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_squares_and_scale_match_numpy(optim_threads, dtype):
    ops = OPTIM_EXT
    g = _big(dtype, 5)
    ref = sum(float((a.astype(np.float64) ** 2).sum()) for a in g)
    assert ops.sum_squares(g, optim_threads) == pytest.approx(ref, rel=1e-12)
    expect = [a * dtype(0.25) for a in g]
    assert ops.scale(g, 0.25, optim_threads) is True
    for a, b in zip(g, expect):
        np.testing.assert_array_equal(a, b)


def test_fused_kernels_refuse_what_they_cannot_do(cython_engine):
    ops = OPTIM_EXT
    mixed = [np.ones(3, np.float32), np.ones(3, np.float64)]
    strided = [np.ones((4, 4))[:, ::2]]
    ints = [np.ones(3, np.int64)]
    for bad in (mixed, strided, ints, []):
        assert ops.sum_squares(bad) is None
        assert ops.scale(bad, 0.5) is False
    assert ops.adam_update([np.ones(3)], [np.ones(4)], [np.ones(3)], [np.ones(3)],
                           0.1, 0.1, 0.001, 1e-7) is False


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grads_fast_path_matches_numpy(cython_engine, dtype):
    g1, g2 = _big(dtype, 9), _big(dtype, 9)
    n1 = clip_grads(g1, 5.0)
    with backend.using("numpy"):
        n2 = clip_grads(g2, 5.0)
    assert n1 == pytest.approx(n2, rel=1e-5) and n1 > 5.0
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert a.dtype == dtype


def test_optimiser_threads_come_from_the_configuration(monkeypatch, cython_engine):
    """Whatever ran before (an LSTM split or not), Adam and clip_grads use
    backend.config.threads."""
    from fastseq import Seq2seq
    from fastseq.ops import _cython
    seen = []

    class Spy:
        def adam_update(self, *args):
            seen.append(args[-1])
            return False

        def sum_squares(self, grads, threads):
            seen.append(threads)
            return None

        def scale(self, grads, rate, threads):
            seen.append(threads)
            return False

    rng = np.random.default_rng(0)
    with backend.using(threads=3):
        for N in (4, 256):  # below and above the Cython engine's split threshold
            m = Seq2seq(13, 8, 16, seed=0)
            m.forward(rng.integers(0, 13, (N, 5)), rng.integers(0, 13, (N, 4)))
            m.backward()
            monkeypatch.setattr(_cython, "_cpu", Spy())
            Adam(0.01).update(m.params, m.grads)
            clip_grads(m.grads, 1e-9)
            monkeypatch.undo()
    assert seen and set(seen) == {3}


@pytest.mark.parametrize("make,arg", [
    (lambda: Adam(float("nan")), "lr"), (lambda: Adam(-1), "lr"), (lambda: Adam(0), "lr"),
    (lambda: Adam(float("inf")), "lr"), (lambda: Adam("0.1"), "lr"), (lambda: Adam(True), "lr"),
    (lambda: Adam(0.1, beta1=1.0), "beta1"), (lambda: Adam(0.1, beta1=-0.1), "beta1"),
    (lambda: Adam(0.1, beta2=float("nan")), "beta2"), (lambda: SGD(0), "lr"),
    (lambda: SGD(-0.5), "lr"), (lambda: SGD(float("nan")), "lr")])
def test_optimisers_refuse_bad_arguments(make, arg):
    with pytest.raises(ValueError, match=f"^{arg} must be"):
        make()


def test_optimisers_accept_numpy_scalars():
    assert Adam(np.float32(0.01), beta1=np.float64(0.5)).lr == pytest.approx(0.01)
    assert SGD(np.int64(20)).lr == 20.0


def test_fused_kernels_same_bits_for_any_thread_count(cython_engine):
    """Lists are cut into fixed chunks whose sums are added in chunk order: 1, 2 or 3 threads
    give the same norm and the same updated parameters."""
    rng = np.random.default_rng(5)
    shapes = [(700, 500), (333,), (10000, 31)]  # above the kernels' threshold for threads
    gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    sums = [OPTIM_EXT.sum_squares(gs, n) for n in (1, 2, 3)]
    assert sums[0] == sums[1] == sums[2]
    assert sums[0] == pytest.approx(sum(float((g.astype(np.float64) ** 2).sum()) for g in gs))
    results = []
    for n in (1, 2, 3):
        ps = [np.ones(s, np.float32) for s in shapes]
        ms = [np.zeros(s, np.float32) for s in shapes]
        vs = [np.zeros(s, np.float32) for s in shapes]
        assert OPTIM_EXT.adam_update(ps, gs, ms, vs, 1e-3, 0.1, 0.001, 1e-7, n)
        assert OPTIM_EXT.scale(ps, 0.5, n)
        results.append(ps)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


# --- state_dict / load_state_dict -----------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: SGD(0.1), lambda: Adam(0.01, beta1=0.8)])
def test_optimiser_state_round_trip_continues_bit_for_bit(make):
    rng = np.random.default_rng(3)
    params = [rng.standard_normal((3, 4)), rng.standard_normal(4)]
    steps = [[rng.standard_normal(p.shape) for p in params] for _ in range(5)]
    a, ref = make(), [p.copy() for p in params]
    for g in steps:
        a.update(ref, g)
    b, got = make(), [p.copy() for p in params]
    for g in steps[:2]:
        b.update(got, g)
    state = {k: ([x.copy() for x in v] if isinstance(v, list) else v)
             for k, v in b.state_dict().items()}
    c = make()
    c.load_state_dict(state, params=got)
    for g in steps[2:]:
        c.update(got, g)
    assert all(np.array_equal(x, y) for x, y in zip(ref, got))


def test_adam_state_refuses_moments_that_do_not_fit_before_changing_anything():
    p = [np.ones((2, 3))]
    opt = Adam(0.01)
    opt.update(p, [np.ones((2, 3))])
    state = opt.state_dict()
    fresh = Adam(0.5)
    with pytest.raises(ValueError, match=r"m\[0\] is float64\(3, 2\)"):
        fresh.load_state_dict(dict(state, m=[np.zeros((3, 2))]), params=p)
    with pytest.raises(ValueError, match="iter"):
        fresh.load_state_dict(dict(state, iter=-1), params=p)
    assert fresh.lr == 0.5 and fresh.iter == 0 and fresh.m is None
