"""AttentionSeq2seq's textbook 8.5 extensions: bidirectional encoder, stacked layers, dropout.
Float64 finite-difference gradients on every CPU engine, the Cython engine against NumPy, padding
independence of the backward direction, decoding through start/step/select, state and files."""
import numpy as np
import pytest

import fastseq
from fastseq import backend
from fastseq.decoding import beam_search, greedy_search, sequence_log_prob
from fastseq.files import FastseqFileError
from fastseq.files.rebuild import _predict_shapes
from fastseq.functions import true_lengths
from fastseq.models.attention import AttentionSeq2seq, StackedState, flip_index

from conftest import numerical_grad, rel_error

TOL = 1e-6
EPS = 1e-5  # differences step: small encoder gradients (1e-5) stay above the rounding noise
PAD = 0
EXTENDED = [{"encoder": "bi"}, {"layers": 2}, {"encoder": "bi", "layers": 2},
            {"dropout_ratio": 0.3}, {"encoder": "bi", "layers": 2, "dropout_ratio": 0.3}]


@pytest.fixture(autouse=True)
def restore_kernel():
    yield
    backend.use("auto")


def use_kernel(name):
    if name == "cython" and not backend.cython_available():
        pytest.skip("the cython engine (fastseq._ext) is not importable here")
    backend.use(name)


def small_model(pad_id=PAD, V=7, D=3, H=4, dtype=np.float64, seed=0, **options):
    rng = np.random.default_rng(seed + 100)
    model = AttentionSeq2seq(V, D, H, seed=seed, dtype=dtype, pad_id=pad_id, **options)
    for p in model.params:  # non-zero biases and larger embeddings exercise every path
        p[...] = rng.standard_normal(p.shape) * 0.5
    return model


def padded_batch(rng, V=7, shape=((6, 4), (3, 2), (1, 5), (4, 1)), Tq=6, Ta=5):
    """Questions and answers with the true lengths ``shape``, padded at the end with PAD."""
    xs = rng.integers(1, V, (len(shape), Tq))
    ts = rng.integers(1, V, (len(shape), Ta))
    for n, (lq, la) in enumerate(shape):
        xs[n, lq:] = PAD
        ts[n, la:] = PAD
    return xs, ts


def fixed_masks(model):
    """A loss function of the model whose dropout masks are the same on every call."""
    def loss(xs, ts):
        for k, d in enumerate(model.dropout_layers):
            d.reseed(200 + k)
        return model.forward(xs, ts)
    return loss


def check_grads(model, xs, ts):
    loss = fixed_masks(model)
    loss(xs, ts)
    model.backward()
    grads = [g.copy() for g in model.grads]
    for name, p, g in zip(model.param_names, model.params, grads):
        assert rel_error(numerical_grad(lambda: loss(xs, ts), p, eps=EPS), g) < TOL, name


@pytest.mark.parametrize("kernel", ["numpy", "cython"])
@pytest.mark.parametrize("options", EXTENDED,
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_gradients(kernel, options):
    use_kernel(kernel)
    model = small_model(**options)
    xs, ts = padded_batch(np.random.default_rng(1))
    if model.dropout_layers:  # the masks really drop units
        fixed_masks(model)(xs, ts)
        assert all(d.mask is not None and (d.mask == 0).any() for d in model.dropout_layers)
    check_grads(model, xs, ts)


@pytest.mark.parametrize("kernel", ["numpy", "cython"])
def test_gradients_without_padding(kernel):
    use_kernel(kernel)
    rng = np.random.default_rng(2)
    check_grads(small_model(None, encoder="bi", layers=2), rng.integers(0, 7, (3, 5)),
                rng.integers(0, 7, (3, 4)))


@pytest.mark.parametrize("kernel", ["numpy", "cython"])
def test_gradients_with_fused_embedding(kernel):
    """Batches big enough for TimeLSTM's embedding fusion: both directions of the first layer
    read E Wx's rows and each writes the one embedding's gradient; their sum is kept."""
    use_kernel(kernel)
    model = small_model(V=5, encoder="bi", layers=2)
    rng = np.random.default_rng(3)
    xs, ts = padded_batch(rng, V=5, shape=[(4, 3), (2, 4), (3, 1), (4, 4), (1, 2), (3, 3)],
                          Tq=4, Ta=4)
    assert model.encoder.lstm.fuse_embedding(model.encoder.embed, xs)
    check_grads(model, xs, ts)
    model.forward(xs, ts)
    assert model.encoder._fused


def loss_and_grads(model, xs, ts):
    loss = fixed_masks(model)(xs, ts)
    model.backward()
    return loss, [backend.to_cpu(g).copy() for g in model.grads]


def test_cython_engine_matches_numpy():
    """bi + 2 layers + dropout on padded float32 batches: loss, every gradient, greedy and
    beam answers agree."""
    if not backend.cython_available():
        pytest.skip("the cython engine (fastseq._ext) is not importable here")
    rng = np.random.default_rng(4)
    xs, ts = rng.integers(1, 13, (64, 9)), rng.integers(1, 13, (64, 6))
    xs[::3, 5:] = PAD
    xs[1::4, 2:] = PAD
    ts[::4, 3:] = PAD
    results = {}
    for kernel in ("numpy", "cython"):
        backend.use(kernel)
        model = AttentionSeq2seq(13, 16, 32, seed=1, pad_id=PAD, encoder="bi", layers=2,
                                 dropout_ratio=0.2)
        loss, grads = loss_and_grads(model, xs, ts)
        model.eval()
        results[kernel] = (loss, grads, model.generate(xs, 1, 5), beam_search(model, xs, 1, 5, k=3))
    want, got = results["numpy"], results["cython"]
    assert abs(want[0] - got[0]) < 1e-5 * abs(want[0])
    for name, a, b in zip(model.param_names, want[1], got[1]):
        assert rel_error(a, b) < 1e-4, name
    np.testing.assert_array_equal(want[2], got[2])
    np.testing.assert_array_equal(want[3], got[3])


def test_flip_index_reverses_within_the_true_length():
    idx = flip_index(3, 5, np.array([5, 2, 1]), np)
    np.testing.assert_array_equal(idx, [[4, 3, 2, 1, 0], [1, 0, 2, 3, 4], [0, 1, 2, 3, 4]])
    twice = np.take_along_axis(idx, idx, axis=1)
    np.testing.assert_array_equal(twice, np.tile(np.arange(5), (3, 1)))


@pytest.mark.parametrize("kernel", ["numpy", "cython"])
@pytest.mark.parametrize("layers", [1, 2])
def test_encoder_rows_do_not_depend_on_their_padding(kernel, layers):
    """A row's encoder states and final states are those of the row alone, unpadded, however
    many pads follow it (the encoder really runs the padded steps: trim=False)."""
    use_kernel(kernel)
    model = small_model(encoder="bi", layers=layers)
    xs, _ = padded_batch(np.random.default_rng(5))
    lengths = true_lengths(xs, PAD)
    for extra in (0, 4):
        padded = np.pad(xs, ((0, 0), (0, extra)), constant_values=PAD)
        hs, mask = model.encode(padded, trim=False)
        finals = [f.copy() for f in model.encoder.finals]
        for n, L in enumerate(lengths):
            alone = model.encoder.forward(xs[n:n + 1, :L])
            np.testing.assert_allclose(hs[n, :L], alone[0], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(hs[n, L:], np.broadcast_to(alone[0, -1], hs[n, L:].shape))
            for f, f_alone in zip(finals, model.encoder.finals):
                np.testing.assert_allclose(f[n], f_alone[0], rtol=1e-12, atol=1e-14)
            assert mask[n].sum() == L


def test_backward_direction_reads_the_row_reversed():
    """The backward LSTM of the first layer is an ordinary LSTM over the reversed true row: its
    outputs read back to front, its final state is the one after position 0."""
    model = small_model(encoder="bi")
    enc, H2 = model.encoder, 2
    x = np.array([[3, 1, 4, 1, 5, PAD, PAD]])
    hs = model.encode(x, trim=False)[0]
    back = enc.stack[0][1]
    back.h = back.c = None
    want = back.forward(enc.embed.forward(x[:, 4::-1]))                    # (1, 5, H/2)
    np.testing.assert_allclose(hs[0, :5, H2:], want[0, ::-1], rtol=1e-12)
    model.encode(x, trim=False)
    np.testing.assert_allclose(model.encoder.finals[0][0, H2:], want[0, -1], rtol=1e-12)
    np.testing.assert_allclose(model.encoder.finals[0][0, :H2], hs[0, 4, :H2], rtol=1e-12)


@pytest.mark.parametrize("options", EXTENDED[:3], ids=["bi", "layers2", "bi-layers2"])
def test_step_decoding_matches_teacher_forcing(options):
    """Scores of start/step fed the greedy answer equal the teacher-forced decoder's; beam
    search of width 1 is greedy search; sequence_log_prob sums the same scores."""
    backend.use("numpy")
    model = small_model(**options)
    xs, _ = padded_batch(np.random.default_rng(6))
    out = greedy_search(model, xs, 1, 5, end_id=None)
    np.testing.assert_array_equal(beam_search(model, xs, 1, 5, k=1, end_id=None), out)
    dec_in = np.concatenate([np.ones((len(xs), 1), dtype=np.int64), out[:, :-1]], axis=1)
    enc_hs, mask, h0 = model._encode(xs)
    forced = model.decoder.forward(dec_in, enc_hs, mask, h0)
    state, ids, logp = model.start(xs), np.ones(len(xs), dtype=np.int64), 0
    if options.get("layers", 1) > 1:
        assert isinstance(state, StackedState) and len(state.h) == options["layers"]
    for t in range(5):
        scores, state = model.step(ids, state)
        np.testing.assert_allclose(scores, forced[:, t], rtol=1e-10, atol=1e-12)
        s = scores - scores.max(axis=1, keepdims=True)
        s -= np.log(np.exp(s).sum(axis=1, keepdims=True))
        logp = logp + s[np.arange(len(xs)), out[:, t]]
        ids = out[:, t]
    np.testing.assert_allclose(sequence_log_prob(model, xs, 1, out, end_id=None), logp, rtol=1e-10)


def test_stacked_state_select_moves_every_layer():
    model = small_model(layers=3)
    xs, _ = padded_batch(np.random.default_rng(7))
    state = model.start(xs, k=2)
    _, state = model.step(np.ones(8, dtype=np.int64), state)
    rows = np.array([1, 0, 2, 3, 5, 4, 7, 6])
    moved = model.select(state, rows)
    assert isinstance(moved, StackedState) and moved.fixed is state.fixed
    for a, b in zip(state.h + state.c, moved.h + moved.c):
        np.testing.assert_array_equal(a[rows], b)
    with pytest.raises(ValueError, match="among its question's 2"):
        model.select(state, np.array([2, 0, 1, 3, 4, 5, 6, 7]))
    best = beam_search(model, xs, 1, 5, k=3)
    assert best.shape == (4, 5)


def test_dropout_only_while_training():
    """Same seed, same weights whatever the dropout; in eval() (and while decoding) the model is
    the one without dropout, and decoding draws no masks."""
    rng = np.random.default_rng(8)
    xs, ts = padded_batch(rng)
    plain = AttentionSeq2seq(7, 3, 4, seed=5, pad_id=PAD, dtype=np.float64, layers=2)
    dropped = AttentionSeq2seq(7, 3, 4, seed=5, pad_id=PAD, dtype=np.float64, layers=2,
                               dropout_ratio=0.5)
    assert len(dropped.dropout_layers) == 5 and plain.dropout_layers == []
    for a, b in zip(plain.params, dropped.params):
        np.testing.assert_array_equal(a, b)
    want = plain.forward(xs, ts)
    assert dropped.forward(xs, ts) != want  # training mode: masks
    state = [d.state_dict()["rng"]["pos"] for d in dropped.dropout_layers]
    np.testing.assert_array_equal(dropped.generate(xs, 1, 5), plain.generate(xs, 1, 5))
    assert [d.state_dict()["rng"]["pos"] for d in dropped.dropout_layers] == state
    dropped.eval()
    assert dropped.forward(xs, ts) == want
    dropped.train()
    assert dropped.forward(xs, ts) != want


def test_state_dict_round_trip_continues_the_same_masks():
    """Weights and the dropout generators restored from state_dict: the next training steps are
    bit for bit those of the original model."""
    rng = np.random.default_rng(9)
    xs, ts = padded_batch(rng)
    options = dict(pad_id=PAD, encoder="bi", layers=2, dropout_ratio=0.3)
    a = AttentionSeq2seq(7, 3, 4, seed=11, **options)
    a.forward(xs, ts)
    a.backward()
    saved = {"params": {k: v.copy() for k, v in a.state_dict()["params"].items()},
             "lstm_state": [], "dropout": [{"rng": dict(d.state_dict()["rng"]), "device": None}
                                           for d in a.dropout_layers]}
    b = AttentionSeq2seq(7, 3, 4, seed=12, **options)
    b.load_state_dict(saved)
    for _ in range(2):
        la, lb = loss_and_grads_unseeded(a, xs, ts), loss_and_grads_unseeded(b, xs, ts)
        assert la[0] == lb[0]
        for ga, gb in zip(la[1], lb[1]):
            np.testing.assert_array_equal(ga, gb)


def loss_and_grads_unseeded(model, xs, ts):
    loss = model.forward(xs, ts)
    model.backward()
    return loss, [g.copy() for g in model.grads]


def test_model_file_rebuilds_the_configuration(tmp_path):
    chars = list("_ abcdef")
    model = AttentionSeq2seq(len(chars), 4, 6, seed=3, pad_id=1, encoder="bi", layers=3,
                             dropout_ratio=0.25)
    path = tmp_path / "model.npz"
    model.save_params(path, meta={"chars": chars, "question_width": 5, "answer_width": 4})
    saved = fastseq.load(path)
    assert saved.model.config() == model.config()
    assert saved.model.param_names == model.param_names
    for a, b in zip(saved.model.params, model.params):
        np.testing.assert_array_equal(a, b)
    assert saved.answer(["abc", "fed"]) == saved.answer(["abc", "fed"], beam=1)


def test_shape_prediction_of_extended_configurations():
    def fail(problem):
        return FastseqFileError(problem)
    for config in ({"vocab_size": 11, "wordvec_size": 5, "hidden_size": 6, "pad_id": 2,
                    "encoder": "bi", "layers": 3, "dropout_ratio": 0.1},
                   {"vocab_size": 9, "wordvec_size": 9, "hidden_size": 9, "pad_id": None,
                    "encoder": "uni", "layers": 2, "dropout_ratio": 0.0}):
        names, shapes = _predict_shapes(AttentionSeq2seq, config, fail)
        real = AttentionSeq2seq(**config, seed=0)
        assert names == real.param_names
        assert shapes == [p.shape for p in real.params]
    with pytest.raises(FastseqFileError, match="fractional"):
        _predict_shapes(AttentionSeq2seq, {"vocab_size": 11, "wordvec_size": 5, "hidden_size": 7,
                                           "encoder": "bi", "layers": 1}, fail)
    with pytest.raises(FastseqFileError, match="layers must be at most"):
        _predict_shapes(AttentionSeq2seq, {"vocab_size": 11, "wordvec_size": 5, "hidden_size": 6,
                                           "layers": 10 ** 9}, fail)


@pytest.mark.parametrize("options,message", [
    ({"encoder": "both"}, "encoder must be one of"),
    ({"encoder": "bi", "hidden_size": 7}, "hidden_size must be even"),
    ({"layers": 0}, "layers must be an integer >= 1"),
    ({"layers": 33}, "layers must be at most 32"),
    ({"dropout_ratio": 1.0}, r"dropout_ratio must be a number in \[0, 1\)"),
    ({"dropout_ratio": True}, r"dropout_ratio must be a number"),
])
def test_bad_options_are_one_clear_error(options, message):
    kwargs = {"hidden_size": 8, **options}
    with pytest.raises(ValueError, match=message):
        AttentionSeq2seq(9, 4, **kwargs)


def test_train_flags_reach_the_model():
    from fastseq.run import build
    from fastseq.train import build_parser, resolve
    args = build_parser().parse_args(["--task", "date", "--encoder", "bi", "--layers", "2",
                                      "--dropout", "0.3", "--hidden-size", "8"])
    cfg = resolve(args)
    assert (cfg["encoder"], cfg["layers"], cfg["dropout_ratio"]) == ("bi", 2, 0.3)
    cfg.update(progress=False)
    model, _ = build(cfg, 13, pad_id=PAD)
    assert model.config() == {"vocab_size": 13, "wordvec_size": 16, "hidden_size": 8,
                              "pad_id": PAD, "encoder": "bi", "layers": 2, "dropout_ratio": 0.3}
    defaults = resolve(build_parser().parse_args(["--task", "date"]))
    assert (defaults["encoder"], defaults["layers"], defaults["dropout_ratio"]) == ("uni", 1, 0.0)


@pytest.mark.parametrize("argv,words", [
    (["--encoder", "bi"], ["--encoder", "addition"]),
    (["--layers", "2"], ["--layers", "addition"]),
])
def test_flags_refused_where_they_do_not_apply(argv, words, tmp_path, capsys, monkeypatch):
    from fastseq.train import main
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastseq:") and all(w in err for w in words)
    with pytest.raises(SystemExit):
        main(["--task", "date", "--encoder", "both"])
    assert "expected one of uni, bi" in capsys.readouterr().err


def test_train_cli_extended_model_and_a_run_saved_without_the_new_keys(tmp_path, capsys):
    """--task date --encoder bi --layers 2 --dropout 0.3 trains and saves a model file that
    rebuilds the same configuration; a checkpoint whose configuration predates these keys
    resumes with their defaults (the model it was built with)."""
    from fastseq.datasets.sequence import generate_date
    from fastseq.files import load_checkpoint
    from fastseq.files.envelope import write_npz
    from fastseq.train import main
    data = tmp_path / "date-small.txt"
    data.write_text("\n".join(generate_date(600, seed=3)) + "\n")
    small = ["--task", "date", "--data", str(data), "--hidden-size", "8", "--wordvec-size", "4",
             "--batch-size", "100", "--epochs", "1", "--no-progress"]
    out = tmp_path / "ext"
    assert main(small + ["--encoder", "bi", "--layers", "2", "--dropout", "0.3", "--mask",
                         "--out", str(out)]) == 0
    config = fastseq.load(out / "model.npz").model.config()
    assert (config["encoder"], config["layers"], config["dropout_ratio"]) == ("bi", 2, 0.3)
    old = tmp_path / "old"
    assert main(small + ["--out", str(old)]) == 0
    arrays, meta = load_checkpoint(old / "checkpoint.npz")
    for key in ("encoder", "layers", "dropout_ratio"):
        del meta["config"][key], meta["model_config"][key]
    meta["config"]["epochs"] = 2
    write_npz(old / "checkpoint.npz", arrays, meta)
    capsys.readouterr()
    assert main(["--resume", str(old), "--no-progress"]) == 0
    assert "epoch   2" in capsys.readouterr().out


@pytest.mark.gpu
def test_cupy_engine_matches_numpy():
    """bi + 2 layers on padded float64 batches on the GPU: loss, gradients and greedy answers
    as on NumPy (no dropout: the device draws its masks from its own generator)."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (GPU test)")
    if not backend.gpu_available():
        pytest.skip(f"no usable GPU: {backend._cupy_error}")
    rng = np.random.default_rng(10)
    xs, ts = rng.integers(1, 13, (32, 9)), rng.integers(1, 13, (32, 5))
    xs[::3, 5:] = PAD
    ts[::4, 3:] = PAD
    options = dict(seed=1, dtype=np.float64, pad_id=PAD, encoder="bi", layers=2)
    backend.use("numpy")
    ref = AttentionSeq2seq(13, 16, 32, **options)
    want, want_gen = loss_and_grads(ref, xs, ts), ref.generate(xs, 1, 4)
    backend.use("cupy")
    model = AttentionSeq2seq(13, 16, 32, **options)
    got = loss_and_grads(model, xs, ts)
    assert isinstance(model.params[0], cupy.ndarray)
    assert abs(float(got[0]) - want[0]) < 1e-9 * abs(want[0])
    for name, a, b in zip(model.param_names, got[1], want[1]):
        assert rel_error(a, b) < 1e-9, name
    np.testing.assert_array_equal(model.generate(xs, 1, 4), want_gen)
