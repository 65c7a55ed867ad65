"""TimeAttention and AttentionSeq2seq: float64 finite-difference gradients, padding masks, engines."""
import numpy as np
import pytest

from fastseq import backend
from fastseq.layers import TimeAttention
from fastseq.models.attention import AttentionSeq2seq, true_lengths

from conftest import numerical_grad, rel_error

TOL = 1e-6
PAD = 0


@pytest.fixture(autouse=True)
def restore_kernel():
    yield
    backend.use("auto")


def use_kernel(name):
    if name == "cython" and not backend.cython_available():
        pytest.skip("Cython LSTM kernel not built")
    backend.use(name)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_layer_gradients(masked):
    rng = np.random.default_rng(0)
    N, Te, Td, H = 3, 5, 4, 6
    hs_enc = rng.standard_normal((N, Te, H))
    hs_dec = rng.standard_normal((N, Td, H))
    w = rng.standard_normal((N, Td, H))
    mask = None
    if masked:
        mask = np.arange(Te)[None, :] < np.array([5, 2, 1])[:, None]
    layer = TimeAttention()

    def loss():
        return float((layer.forward(hs_enc, hs_dec, mask) * w).sum())

    loss()
    denc, ddec = layer.backward(w.copy())
    assert rel_error(numerical_grad(loss, hs_enc), denc) < TOL
    assert rel_error(numerical_grad(loss, hs_dec), ddec) < TOL
    a = layer.attention_weights
    np.testing.assert_allclose(a.sum(axis=2), 1.0)
    if masked:  # padded keys: zero weight, and no gradient flows into them
        assert np.all(a[~np.broadcast_to(mask[:, None, :], a.shape)] == 0)
        assert np.all(denc[~mask] == 0)


def test_attention_layer_matches_the_definition():
    rng = np.random.default_rng(1)
    hs_enc, hs_dec = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    c = TimeAttention().forward(hs_enc, hs_dec)
    for n in range(2):
        for t in range(5):
            s = hs_enc[n] @ hs_dec[n, t]
            a = np.exp(s - s.max())
            a /= a.sum()
            np.testing.assert_allclose(c[n, t], a @ hs_enc[n], rtol=1e-12)


def test_attention_layer_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="decoder states"):
        TimeAttention().forward(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="mask"):
        TimeAttention().forward(np.zeros((2, 3, 4)), np.zeros((2, 1, 4)), np.ones((2, 4), bool))


def small_model(pad_id=None, V=7, D=3, H=4, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed + 100)
    model = AttentionSeq2seq(V, D, H, seed=seed, dtype=dtype, pad_id=pad_id)
    for p in model.params:  # non-zero biases and larger embeddings exercise every path
        p[...] = rng.standard_normal(p.shape) * 0.5
    return model


def padded_batch(rng, V=7, N=4, Tq=6, Ta=5):
    """Questions and answers of varying true lengths, padded at the end with PAD."""
    xs = rng.integers(1, V, (N, Tq))
    ts = rng.integers(1, V, (N, Ta))
    for n, (lq, la) in enumerate([(6, 4), (3, 2), (1, 5), (4, 1)][:N]):
        xs[n, lq:] = PAD
        ts[n, la:] = PAD
    return xs, ts


def test_params_order_follows_the_textbook():
    model = AttentionSeq2seq(9, 16, 32, seed=0)
    assert model.param_names == [
        "encoder.embed.W", "encoder.lstm.Wx", "encoder.lstm.Wh", "encoder.lstm.b",
        "decoder.embed.W", "decoder.lstm.Wx", "decoder.lstm.Wh", "decoder.lstm.b",
        "decoder.affine.W", "decoder.affine.b"]
    assert model.params[-2].shape == (64, 9)  # Affine([c ; h])
    assert AttentionSeq2seq(**model.config()).config() == model.config()


@pytest.mark.parametrize("kernel", ["numpy", "cython"])
@pytest.mark.parametrize("pad_id", [None, PAD])
def test_model_gradients(kernel, pad_id):
    use_kernel(kernel)
    rng = np.random.default_rng(2)
    model = small_model(pad_id)
    xs, ts = padded_batch(rng)
    model.forward(xs, ts)
    model.backward()
    grads = [g.copy() for g in model.grads]
    for name, p, g in zip(model.param_names, model.params, grads):
        num = numerical_grad(lambda: model.forward(xs, ts), p)
        assert rel_error(num, g) < TOL, name


def test_model_gradients_with_fused_embedding(monkeypatch):
    """Batches big enough for TimeLSTM's embedding fusion take that path; same gradients."""
    backend.use("numpy")
    rng = np.random.default_rng(3)
    model = small_model(PAD, V=5)
    xs = rng.integers(1, 5, (6, 4))
    ts = rng.integers(1, 5, (6, 4))
    xs[1, 2:] = PAD
    ts[2, 1:] = PAD
    assert model.encoder.lstm.fuse_embedding(model.encoder.embed, xs)
    model.forward(xs, ts)
    model.backward()
    grads = [g.copy() for g in model.grads]
    for name, p, g in zip(model.param_names, model.params, grads):
        assert rel_error(numerical_grad(lambda: model.forward(xs, ts), p), g) < TOL, name


def loss_and_grads(model, xs, ts):
    loss = model.forward(xs, ts)
    model.backward()
    return loss, [g.copy() for g in model.grads]


def test_masking_changes_nothing_where_nothing_is_padded():
    rng = np.random.default_rng(4)
    xs = rng.integers(1, 7, (5, 6))
    ts = rng.integers(1, 7, (5, 4))
    plain = loss_and_grads(small_model(None), xs, ts)
    masked = loss_and_grads(small_model(PAD), xs, ts)
    assert plain[0] == masked[0]
    for a, b in zip(plain[1], masked[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("trim", [False, True])
def test_padded_steps_influence_nothing(trim):
    """Extra trailing pads (in questions, and in answers that already end in a pad) change
    neither the loss nor any gradient, and the pad-aware loss equals the loss of each row on its
    own, unpadded."""
    rng = np.random.default_rng(5)
    model = small_model(PAD)
    # trim=False: the encoder really runs the padded steps (forward trims them away by default)
    model.encode = lambda xs, trim=trim: AttentionSeq2seq.encode(model, xs, trim)
    xs, ts = padded_batch(rng)
    ts = ts[[0, 1, 3]]
    xs = xs[[0, 1, 3]]
    base = loss_and_grads(model, xs, ts)
    more = loss_and_grads(model, np.pad(xs, ((0, 0), (0, 3)), constant_values=PAD),
                          np.pad(ts, ((0, 0), (0, 2)), constant_values=PAD))
    assert abs(base[0] - more[0]) < 1e-12
    for a, b in zip(base[1], more[1]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # row by row without padding: the answer keeps one pad as its end symbol
    total, count = 0.0, 0
    for x, t in zip(xs, ts):
        lq, la = int(true_lengths(x[None], PAD)[0]), int(true_lengths(t[None], PAD)[0])
        tt = t[:min(la + 1, len(t))][None]
        total += model.forward(x[None, :lq], tt) * (tt.shape[1] - 1)
        count += tt.shape[1] - 1
    assert abs(base[0] - total / count) < 1e-12


def test_encoder_state_taken_at_the_true_end():
    rng = np.random.default_rng(6)
    model = small_model(PAD)
    xs, _ = padded_batch(rng)
    enc_hs, mask = model.encode(xs)
    for n, L in enumerate(true_lengths(xs, PAD)):
        alone = model.encoder.forward(xs[n:n + 1, :L])
        np.testing.assert_allclose(enc_hs[n, -1], alone[0, -1], rtol=1e-12)
        np.testing.assert_allclose(enc_hs[n, L:], np.broadcast_to(alone[0, -1], enc_hs[n, L:].shape))
        assert mask[n].sum() == L


def test_true_lengths():
    ids = np.array([[3, 0, 2, 0, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(true_lengths(ids, 0), [3, 1, 5])


def test_pad_id_outside_vocabulary():
    with pytest.raises(ValueError, match="pad_id"):
        AttentionSeq2seq(5, 3, 4, pad_id=5)


def test_generate_fills_after_the_end_symbol():
    rng = np.random.default_rng(7)
    model = small_model(PAD, dtype=np.float32)
    for p in model.params:  # make the pad likely, so that some rows end early
        p[...] = rng.standard_normal(p.shape) * 2
    xs, _ = padded_batch(rng, N=4)
    out = model.generate(np.repeat(xs, 10, axis=0), 1, 6)
    ended = np.cumsum(out == PAD, axis=1) > 0
    assert np.all(out[ended] == PAD)
    assert model.generate(xs[:1], 1, 6) == [int(i) for i in out[0]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cython_engine_matches_numpy(dtype):
    if not backend.cython_available():
        pytest.skip("Cython LSTM kernel not built")
    rng = np.random.default_rng(8)
    results = {}
    for kernel in ("numpy", "cython"):
        backend.use(kernel)
        model = AttentionSeq2seq(13, 16, 32, seed=1, dtype=dtype, pad_id=PAD)
        xs = rng.integers(1, 13, (64, 9)) if kernel == "numpy" else results["numpy"][3]
        ts = rng.integers(1, 13, (64, 5)) if kernel == "numpy" else results["numpy"][4]
        if kernel == "numpy":
            xs[::3, 5:] = PAD
            ts[::4, 3:] = PAD
        loss, grads = loss_and_grads(model, xs, ts)
        results[kernel] = (loss, grads, model.generate(xs, 1, 4), xs, ts)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert abs(results["numpy"][0] - results["cython"][0]) < tol * abs(results["numpy"][0])
    for a, b in zip(results["numpy"][1], results["cython"][1]):
        assert rel_error(a, b) < tol * 10
    np.testing.assert_array_equal(results["numpy"][2], results["cython"][2])


@pytest.mark.gpu
def test_cupy_engine_matches_numpy():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (GPU test)")
    if not backend.gpu_available():
        pytest.skip(f"no usable GPU: {backend._cupy_error}")
    rng = np.random.default_rng(9)
    xs = rng.integers(1, 13, (32, 9))
    ts = rng.integers(1, 13, (32, 5))
    xs[::3, 5:] = PAD
    ts[::4, 3:] = PAD
    backend.use("numpy")
    ref = AttentionSeq2seq(13, 16, 32, seed=1, dtype=np.float64, pad_id=PAD)
    want = loss_and_grads(ref, xs, ts)
    want_gen = ref.generate(xs, 1, 4)
    backend.use("cupy")
    try:
        backend.use("auto")
        model = AttentionSeq2seq(13, 16, 32, seed=1, dtype=np.float64, pad_id=PAD)
        got = loss_and_grads(model, xs, ts)
        assert isinstance(model.params[0], cupy.ndarray)
        assert abs(got[0] - want[0]) < 1e-9 * abs(want[0])
        for a, b in zip(got[1], want[1]):
            assert rel_error(backend.to_cpu(a), b) < 1e-9
        np.testing.assert_array_equal(model.generate(xs, 1, 4), want_gen)
    finally:
        backend.use("numpy")


def test_attention_map_matches_step_by_step_decoding(tmp_path):
    rng = np.random.default_rng(10)
    model = small_model(PAD, dtype=np.float64)
    xs, _ = padded_batch(rng)
    out, w = model.attention_map(xs, 1, 5)
    np.testing.assert_array_equal(out, model.generate(xs, 1, 5))
    enc_hs, mask = model.encode(xs)
    state, ids = model.start(xs), np.ones(len(xs), dtype=np.int64)
    for t in range(5):  # the weights each step used while decoding greedily
        scores, state = model.step(ids, state)
        np.testing.assert_array_equal(scores.argmax(axis=1), out[:, t])
        np.testing.assert_allclose(w[:, t], model.decoder.attention.attention_weights[:, 0],
                                   rtol=1e-10, atol=1e-14)
        ids = out[:, t]
    assert np.all(w[~np.broadcast_to(mask[:, None, :], w.shape)] == 0)
    pytest.importorskip("matplotlib", reason="matplotlib not installed (attention-map PNG)")
    from fastseq.plot import plot_attention_maps
    path = plot_attention_maps([(w[0], "abcdef", "vwxyz")], str(tmp_path / "map.png"))
    assert (tmp_path / "map.png").stat().st_size > 1000 and path.endswith("map.png")


@pytest.fixture(scope="module")
def reversal_task():
    """Reverse strings of 1-5 letters: questions and answers padded with spaces at the end; an
    AttentionSeq2seq (pad-aware, reversed input) trained on it."""
    from fastseq.datasets.sequence import build, pad_id, parse_lines, reverse_padded
    from fastseq.optim import Adam
    from fastseq.trainer import Trainer
    rng = np.random.RandomState(0)
    words = ["".join(rng.choice(list("abcde"), rng.randint(1, 6))) for _ in range(1200)]
    d = build(*parse_lines([w.ljust(5) + ("_" + w[::-1]).ljust(7) for w in words]), seed=1984)
    pad = pad_id(d.vocab)
    model = AttentionSeq2seq(len(d.vocab), 8, 24, seed=0, pad_id=pad)
    Trainer(model, Adam(0.01), seed=0, progress=False).fit(
        reverse_padded(d.x_train, pad), d.t_train, max_epoch=6, batch_size=32, max_grad=5.0)
    return d, model, reverse_padded(d.x_test, pad)


def test_variable_length_task_trains_without_pad_leaking_into_answers(reversal_task):
    from fastseq.trainer import eval_seq2seq
    d, model, x_test = reversal_task
    assert eval_seq2seq(model, x_test, d.t_test) >= 0.95
    for a in model.generate(x_test, d.t_test[:, 0], 6):
        answer = d.vocab.decode(a).rstrip(" ")
        assert answer and " " not in answer  # letters, then pads only


@pytest.mark.parametrize("beam", [None, "3"])
def test_generate_cli_answers_with_a_padding_aware_model(reversal_task, tmp_path, capsys, beam):
    from fastseq.generate import main
    d, model, _ = reversal_task
    v = d.vocab
    model.save_params(tmp_path / "model.npz", meta={
        "chars": [v.id_to_char[i] for i in range(len(v))], "question_width": v.question_width,
        "answer_width": v.answer_width, "reverse": True})
    argv = ["--model", str(tmp_path / "model.npz"), "--question", "abcde", "--question", "ec"]
    assert main(argv + (["--beam", beam] if beam else [])) == 0
    assert capsys.readouterr().out.split() == ["edcba", "ce"]
    assert main(argv + ["--beam", "0"]) == 2
    assert "--beam must be >= 1" in capsys.readouterr().err
