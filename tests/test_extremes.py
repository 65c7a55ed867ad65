"""Softmax, the LSTM's sigmoid and tanh gates, and the loss stay finite at inputs of +-1e4 on
every engine present (a diverging run must be stopped by the trainer's guard with a clear message,
not turn into NaN inside a kernel first)."""
import numpy as np
import pytest

from fastseq import backend
from fastseq.functions import softmax, softmax_cross_entropy
from fastseq.layers import TimeAffine, TimeAffineSoftmaxWithLoss, TimeLSTM, TimeSoftmaxWithLoss

BIG = 1e4


@pytest.fixture(params=backend.ENGINES)
def xp(request):
    try:
        with backend.using(request.param):
            yield backend.xp
    except backend.BackendError as e:
        pytest.skip(f"{request.param} engine unavailable: {e}")


def finite(*arrays):
    return all(bool(np.isfinite(backend.to_cpu(a)).all()) for a in arrays)


def extremes(shape, dtype, seed=0):
    """+-1e4 in random places, small values elsewhere."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    a[rng.random(shape) < 0.3] = BIG
    a[rng.random(shape) < 0.3] = -BIG
    return backend.asarray(a.astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_loss_at_1e4(xp, dtype):
    s = extremes((6, 7), dtype)
    p = softmax(s.copy())
    assert finite(p) and np.allclose(backend.to_cpu(p).sum(axis=-1), 1, atol=1e-5)
    labels = backend.asarray(np.array([0, 1, 2, 3, 4, 5]))
    loss, ds = softmax_cross_entropy(s.copy(), labels)
    assert finite(loss, ds) and float(loss) >= 0
    layer = TimeSoftmaxWithLoss()
    loss = layer.forward(extremes((2, 3, 7), dtype), labels.reshape(2, 3))
    assert finite(loss, layer.backward())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_softmax_loss_at_1e4(xp, dtype):
    rng = np.random.default_rng(1)
    W = backend.asarray(rng.standard_normal((5, 9)).astype(dtype))
    b = backend.asarray(np.zeros(9, dtype))
    layer = TimeAffineSoftmaxWithLoss(TimeAffine(W, b))
    ts = backend.asarray(rng.integers(0, 9, (2, 4)))
    loss = layer.forward(extremes((2, 4, 5), dtype, seed=2), ts)
    assert finite(loss, layer.backward())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lstm_gates_at_1e4(xp, dtype):
    N, T, D, H = 3, 4, 5, 6
    rng = np.random.default_rng(3)
    Wx = extremes((D, 4 * H), dtype, seed=4)   # gate pre-activations of order +-1e4
    Wh = extremes((H, 4 * H), dtype, seed=5)
    b = extremes((4 * H,), dtype, seed=6)
    lstm = TimeLSTM(Wx, Wh, b, stateful=True)
    xs = backend.asarray(rng.choice([-1.0, 1.0], (N, T, D)).astype(dtype))
    hs = lstm.forward(xs)
    assert finite(hs) and float(abs(backend.to_cpu(hs)).max()) <= 1
    dxs = lstm.backward(backend.asarray(np.ones((N, T, H), dtype)))
    assert finite(dxs, *lstm.grads)
    h = lstm.step(xs[:, 0])
    assert finite(h, lstm.c) and float(abs(backend.to_cpu(h)).max()) <= 1
