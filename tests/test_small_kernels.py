"""The fused CPU kernels around the LSTM (fastseq/_ext/_cpu, the cython engine) against the
NumPy code they replace (the numpy engine): softmax + cross-entropy, the embedding's gather and
scatter-add. Also TimeAffine on a strided view against a contiguous copy."""
import numpy as np
import pytest

from fastseq import backend
from fastseq.functions import softmax_cross_entropy
from fastseq.layers import TimeEmbedding


@pytest.fixture
def numpy_only(cython_engine):
    """Starts on the cython engine; calling it switches the rest of the test to the numpy one."""
    stack = []

    def off():
        cm = backend.using("numpy")
        cm.__enter__()
        stack.append(cm)
    yield off
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("ignore", [-1, None, 3])
@pytest.mark.parametrize("M,V", [(1, 1), (7, 13), (512, 13), (40, 1000), (300, 3000)])
def test_softmax_cross_entropy_matches_numpy(cython_engine, dtype, tol, ignore, M, V):
    rng = np.random.default_rng(M * V)
    scores = (rng.standard_normal((M, V)) * 5).astype(dtype)
    scores[0, 0] = 80  # a large score: the shift must keep exp finite
    labels = rng.integers(0, V, M)
    if ignore is not None and M > 2:
        labels[::3] = ignore
    fast_loss, fast_d = softmax_cross_entropy(scores.copy(), labels, ignore)
    with backend.using("numpy"):
        ref_loss, ref_d = softmax_cross_entropy(scores.copy(), labels, ignore)
    assert fast_d.dtype == dtype
    assert fast_loss == pytest.approx(ref_loss, rel=tol, abs=tol)
    np.testing.assert_allclose(fast_d, ref_d, rtol=tol, atol=tol)


def test_softmax_all_rows_ignored_gives_zero():
    loss, d = softmax_cross_entropy(np.ones((4, 5), np.float32), np.full(4, -1), -1)
    assert loss == 0 and not d.any()


@pytest.mark.parametrize("engine", ["cython", "numpy"])
def test_softmax_label_out_of_range_is_named(engine):
    if engine == "cython" and not backend.cython_available():
        pytest.skip("the cython engine (fastseq._ext) is not importable here")
    with backend.using(engine):
        for labels, bad in (([0, 9, 2], "label 9 at position 1"), ([0, 1, -2], "label -2 at position 2")):
            with pytest.raises(ValueError, match=f"{bad} is outside"):
                softmax_cross_entropy(np.zeros((3, 5), np.float32), np.array(labels), -1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("V,shape", [(13, (128, 7)), (1000, (20, 35)), (5, (1, 1))])
def test_embedding_matches_numpy(numpy_only, dtype, V, shape):
    rng = np.random.default_rng(V)
    W = rng.standard_normal((V, 16)).astype(dtype)
    ids = rng.integers(0, V, shape)
    # the gradient as the LSTM hands it back: a transposed view, last axis contiguous
    dout = rng.standard_normal((shape[1], shape[0], 16)).astype(dtype).transpose(1, 0, 2)
    base = rng.standard_normal((V, 16)).astype(dtype)
    results = []
    for fast in (True, False):
        if not fast:
            numpy_only()
        e = TimeEmbedding(W.copy())
        y = e.forward(ids)
        e.backward(dout)
        g = e.grads[0].copy()
        e.grads[0][...] = base
        e.backward(dout, accumulate=True)
        results.append((y, g, e.grads[0].copy()))
    for a, b in zip(*results):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_embedding_rejects_out_of_range_ids_on_both_paths(numpy_only):
    e = TimeEmbedding(np.zeros((4, 3), np.float32))
    for _ in range(2):
        with pytest.raises(ValueError, match=r"must be in \[0, 4\), got min -1, max 4"):
            e.forward(np.array([[0, 4], [-1, 2]]))
        numpy_only()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_on_strided_view_matches_contiguous_input(dtype):
    from fastseq.layers import TimeAffine
    rng = np.random.default_rng(3)
    W, b = rng.standard_normal((6, 5)).astype(dtype), rng.standard_normal(5).astype(dtype)
    tm = rng.standard_normal((4, 3, 6)).astype(dtype)  # (T, N, H) as the LSTM engines keep hs
    dout = rng.standard_normal((3, 4, 5)).astype(dtype)
    outs = []
    for x in (tm.transpose(1, 0, 2), np.ascontiguousarray(tm.transpose(1, 0, 2))):
        layer = TimeAffine(W, b)
        y = layer.forward(x)
        outs.append((y, layer.backward(dout), *layer.grads))
    for a, c in zip(*outs):
        assert a.shape == c.shape
        np.testing.assert_allclose(a, c, rtol=1e-5)
