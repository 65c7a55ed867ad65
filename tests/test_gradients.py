"""Finite-difference gradient checks in float64 for every layer and model (rel. error < 1e-6)."""
import numpy as np
import pytest

from fastseq import backend
from fastseq.layers import TimeAffine, TimeDropout, TimeEmbedding, TimeLSTM, TimeSoftmaxWithLoss
from fastseq.models import PeekySeq2seq, Seq2seq

import reference_lstm
from conftest import numerical_grad, rel_error

TOL = 1e-6


def check_layer(layer, x, w, grad_input=True):
    """Loss = sum(w * layer(x)); compare analytic grads of params (and x) with differences."""
    def loss():
        return float((layer.forward(x) * w).sum())

    loss()
    dx = layer.backward(w.copy())
    analytic = [g.copy() for g in layer.grads]
    for p, g in zip(layer.params, analytic):
        assert rel_error(numerical_grad(loss, p), g) < TOL
    if grad_input:
        assert rel_error(numerical_grad(loss, x), dx) < TOL


def test_time_affine():
    rng = np.random.default_rng(0)
    layer = TimeAffine(rng.standard_normal((4, 5)), rng.standard_normal(5))
    check_layer(layer, rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 5)))


def test_time_embedding():
    rng = np.random.default_rng(1)
    layer = TimeEmbedding(rng.standard_normal((6, 3)))
    ids = np.array([[0, 2, 2, 5], [1, 2, 0, 0]])  # repeated ids: gradients must accumulate
    check_layer(layer, ids, rng.standard_normal((2, 4, 3)), grad_input=False)


@pytest.mark.parametrize("V,shape", [(500, (1, 2)),     # few ids, large vocabulary: add.at
                                     (100, (4, 10)),    # many ids: sort + reduceat
                                     (30, (3, 5))])     # small vocabulary: one-hot product
def test_time_embedding_scatter_paths(V, shape):
    rng = np.random.default_rng(2)
    layer = TimeEmbedding(rng.standard_normal((V, 3)))
    ids = rng.integers(0, V, shape)
    ids.flat[0] = ids.flat[-1]  # at least one repeated id
    check_layer(layer, ids, rng.standard_normal(shape + (3,)), grad_input=False)


@pytest.mark.parametrize("row_bias", [False, True])
def test_reference_lstm(row_bias):
    """The oracle of the engine-conformance tests (tests/reference_lstm.py) by central differences:
    every gradient its backward returns, one bias per row included."""
    rng = np.random.default_rng(10)
    N, T, D, H = 2, 3, 3, 4
    xs, h0, c0 = (rng.standard_normal(s) for s in ((N, T, D), (N, H), (N, H)))
    Wx, Wh = rng.standard_normal((D, 4 * H)), rng.standard_normal((H, 4 * H)) / 2
    b = rng.standard_normal((N, 4 * H) if row_bias else 4 * H)
    w = rng.standard_normal((N, T, H))

    def loss():
        return float((reference_lstm.forward(xs, Wx, Wh, b, h0, c0)[0] * w).sum())

    cache = reference_lstm.forward(xs, Wx, Wh, b, h0, c0)[3]
    grads = reference_lstm.backward(w, cache)
    assert grads[4].shape == b.shape
    for name, x, g in zip(("xs", "h0", "Wx", "Wh", "b"), (xs, h0, Wx, Wh, b), grads):
        assert rel_error(numerical_grad(loss, x), g) < TOL, name


@pytest.mark.parametrize("stateful", [False, True])
def test_time_lstm(numpy_kernel, stateful):
    rng = np.random.default_rng(3)
    D, H = 3, 4
    layer = TimeLSTM(rng.standard_normal((D, 4 * H)), rng.standard_normal((H, 4 * H)) / 2,
                     rng.standard_normal(4 * H), stateful=stateful)
    h0 = rng.standard_normal((2, H))
    x = rng.standard_normal((2, 5, D))
    w = rng.standard_normal((2, 5, H))

    def loss():
        layer.set_state(h0.copy() if stateful else None)
        return float((layer.forward(x) * w).sum())

    loss()
    dx = layer.backward(w.copy())
    assert rel_error(numerical_grad(loss, x), dx) < TOL
    for p, g in zip(layer.params, [g.copy() for g in layer.grads]):
        assert rel_error(numerical_grad(loss, p), g) < TOL
    if stateful:  # dh is the gradient of the initial state
        assert rel_error(numerical_grad(loss, h0), layer.dh) < TOL


def test_time_lstm_need_dh_false(numpy_kernel):
    """need_dh=False (the Encoder's setting): same parameter and input gradients, dh is None."""
    rng = np.random.default_rng(3)
    D, H = 3, 4
    layer = TimeLSTM(rng.standard_normal((D, 4 * H)), rng.standard_normal((H, 4 * H)) / 2,
                     rng.standard_normal(4 * H))
    layer.need_dh = False
    x = rng.standard_normal((2, 5, D))
    w = rng.standard_normal((2, 5, H))

    def loss():
        return float((layer.forward(x) * w).sum())

    loss()
    dx = layer.backward(w.copy())
    assert layer.dh is None
    assert rel_error(numerical_grad(loss, x), dx) < TOL
    for p, g in zip(layer.params, [g.copy() for g in layer.grads]):
        assert rel_error(numerical_grad(loss, p), g) < TOL


@pytest.mark.parametrize("with_ignore", [False, True])
def test_time_softmax_with_loss(with_ignore):
    rng = np.random.default_rng(4)
    layer = TimeSoftmaxWithLoss()
    xs = rng.standard_normal((3, 4, 5))
    ts = rng.integers(0, 5, (3, 4))
    if with_ignore:
        ts[0, 1] = ts[2, 3] = -1
    loss = layer.forward(xs, ts)
    dx = layer.backward()
    assert rel_error(numerical_grad(lambda: layer.forward(xs, ts), xs), dx) < TOL
    if with_ignore:
        assert np.all(dx[0, 1] == 0) and np.all(dx[2, 3] == 0)
        # loss is the mean over the 10 labelled positions only
        p = np.exp(xs - xs.max(2, keepdims=True))
        p /= p.sum(2, keepdims=True)
        mask = ts != -1
        expect = -np.log(p[mask, ts[mask]]).mean()
        assert abs(loss - expect) < 1e-12


def test_time_dropout_fixed_mask():
    rng = np.random.default_rng(5)
    layer = TimeDropout(0.4, seed=0)
    x = rng.standard_normal((2, 3, 4))
    layer.forward(x)
    mask = layer.mask.copy()
    assert set(np.unique(mask)) <= {0.0, 1 / 0.6}
    w = rng.standard_normal(x.shape)

    def loss():  # fixed mask: same one as the forward above
        return float((x * mask * w).sum())

    assert rel_error(numerical_grad(loss, x), layer.backward(w)) < TOL
    layer.train_flg = False
    assert layer.forward(x) is x


@pytest.mark.parametrize("model_cls", [Seq2seq, PeekySeq2seq])
@pytest.mark.parametrize("with_ignore", [False, True])
def test_seq2seq_models(numpy_kernel, model_cls, with_ignore):
    rng = np.random.default_rng(6)
    V, D, H = 6, 3, 4
    model = model_cls(V, D, H, seed=0, dtype=np.float64)
    assert model.encoder.lstm.need_dh is False
    for p in model.params:  # non-zero biases and larger embeddings exercise every path
        p[...] = rng.standard_normal(p.shape) * 0.5
    xs = rng.integers(0, V, (3, 5))
    ts = rng.integers(0, V, (3, 4))
    if with_ignore:
        ts[0, 3] = ts[1, 2] = ts[1, 3] = -1
    model.forward(xs, ts)
    model.backward()
    grads = [g.copy() for g in model.grads]
    for name, p, g in zip(model.param_names, model.params, grads):
        num = numerical_grad(lambda: model.forward(xs, ts), p)
        assert rel_error(num, g) < TOL, name


def test_softmax_loss_survives_rows_far_below_the_global_max():
    """The fast path shifts by the global max; a row that would underflow takes the per-row path."""
    from fastseq.functions import softmax_cross_entropy
    x = np.array([[0.0, 1.0, 2.0], [-200.0, -199.0, -201.0]], dtype=np.float32)
    labels = np.array([2, 1])
    loss, d = softmax_cross_entropy(x.copy(), labels)
    x64 = x.astype(np.float64)
    p = np.exp(x64 - x64.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.isfinite(loss) and abs(loss - (-np.log(p[[0, 1], [2, 1]]).mean())) < 1e-6
    assert np.abs(d - (p - np.eye(3)[[2, 1]]) / 2).max() < 1e-6


@pytest.mark.parametrize("stateful", [False, True])
def test_time_lstm_context(numpy_kernel, stateful):
    """A context c (N, K) held over the sequence: gradients of x, c, h0 and every parameter."""
    rng = np.random.default_rng(4)
    D, K, H = 3, 2, 4
    layer = TimeLSTM(rng.standard_normal((K + D, 4 * H)), rng.standard_normal((H, 4 * H)) / 2,
                     rng.standard_normal(4 * H), stateful=stateful)
    h0 = rng.standard_normal((2, H))
    x = rng.standard_normal((2, 5, D))
    c = rng.standard_normal((2, K))
    w = rng.standard_normal((2, 5, H))

    def loss():
        layer.set_state(h0.copy() if stateful else None)
        return float((layer.forward(x, context=c) * w).sum())

    loss()
    dx = layer.backward(w.copy())
    dc = layer.dcontext.copy()
    assert rel_error(numerical_grad(loss, x), dx) < TOL
    assert rel_error(numerical_grad(loss, c), dc) < TOL
    for p, g in zip(layer.params, [g.copy() for g in layer.grads]):
        assert rel_error(numerical_grad(loss, p), g) < TOL
    if stateful:
        assert rel_error(numerical_grad(loss, h0), layer.dh) < TOL


def test_time_lstm_context_equals_concatenated_input(numpy_kernel):
    rng = np.random.default_rng(5)
    D, K, H = 3, 2, 4
    params = (rng.standard_normal((K + D, 4 * H)), rng.standard_normal((H, 4 * H)) / 2,
              rng.standard_normal(4 * H))
    x, c = rng.standard_normal((2, 5, D)), rng.standard_normal((2, K))
    w = rng.standard_normal((2, 5, H))
    a, b = TimeLSTM(*[p.copy() for p in params]), TimeLSTM(*[p.copy() for p in params])
    ya = a.forward(x, context=c)
    yb = b.forward(np.concatenate([np.broadcast_to(c[:, None], (2, 5, K)), x], axis=2))
    np.testing.assert_allclose(ya, yb, rtol=1e-12)
    dxa, dxb = a.backward(w), b.backward(w)
    np.testing.assert_allclose(dxa, dxb[:, :, K:], rtol=1e-10)
    np.testing.assert_allclose(a.dcontext, dxb[:, :, :K].sum(axis=1), rtol=1e-10)
    for ga, gb in zip(a.grads, b.grads):
        np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="context"):
        a.forward(x, context=c[:1])


@pytest.mark.parametrize("model_cls", [Seq2seq, PeekySeq2seq])
@pytest.mark.parametrize("fused", [True, False])
def test_seq2seq_models_embedding_fused_into_lstm(numpy_kernel, monkeypatch, model_cls, fused):
    """The same checks with the embedding computed inside the LSTM (table E Wx, ids in) or not."""
    calls = []

    def decide(self, embed, ids):
        calls.append(fused)
        return fused

    monkeypatch.setattr(TimeLSTM, "fuse_embedding", decide)
    rng = np.random.default_rng(7)
    V, D, H = 5, 3, 4
    model = model_cls(V, D, H, seed=0, dtype=np.float64)
    for p in model.params:
        p[...] = rng.standard_normal(p.shape) * 0.5
    xs = rng.integers(0, V, (3, 5))
    ts = rng.integers(0, V, (3, 4))
    ts[1, 3] = -1
    model.forward(xs, ts)
    model.backward()
    assert calls and all(c == fused for c in calls)
    grads = [g.copy() for g in model.grads]
    for name, p, g in zip(model.param_names, model.params, grads):
        num = numerical_grad(lambda: model.forward(xs, ts), p)
        assert rel_error(num, g) < TOL, name


def test_time_lstm_context_proj_is_the_same_computation(numpy_kernel):
    rng = np.random.default_rng(8)
    D, K, H = 3, 2, 4
    params = (rng.standard_normal((K + D, 4 * H)), rng.standard_normal((H, 4 * H)),
              rng.standard_normal(4 * H))
    x, c = rng.standard_normal((2, 5, D)), rng.standard_normal((2, K))
    a, b = TimeLSTM(*params), TimeLSTM(*params)
    np.testing.assert_allclose(a.forward(x, context=c),
                               b.forward(x, context=c, context_proj=c @ params[0][:K]), rtol=1e-12)
    with pytest.raises(ValueError, match="context_proj"):
        b.forward(x, context=c, context_proj=np.zeros((2, 3)))


@pytest.mark.parametrize("engine", ["numpy", "cython"])
def test_peeky_generate_matches_stepwise_decoding(engine):
    """generate (greedy decoding, h's shares of the LSTM input and of the scores computed once
    per call) answers as beam search of width 1 does."""
    from fastseq.decoding import beam_search
    if engine == "cython" and not backend.cython_available():
        pytest.skip("Cython kernel not built")
    backend.use(engine)
    try:
        rng = np.random.default_rng(9)
        model = PeekySeq2seq(13, 16, 32, seed=3, dtype=np.float64)  # float64: no near-ties
        for p in model.params:
            p[...] += rng.standard_normal(p.shape) * 0.3
        xs = rng.integers(0, 13, (300, 7))
        np.testing.assert_array_equal(model.generate(xs, 6, 4), beam_search(model, xs, 6, 4, k=1))
    finally:
        backend.use("auto")
