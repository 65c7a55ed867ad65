"""Rnnlm / BetterRnnlm: gradients, weight tying, textbook layout, state, checkpoints, perplexity,
the truncated-BPTT trainer and a short real PTB run."""
import json
import math
import pickle
import types

import numpy as np
import pytest

from fastseq import BetterRnnlm, Rnnlm, RnnlmTrainer, SGD, eval_perplexity
from fastseq.files import load_textbook_params

from conftest import PTB_FILES, TEXTBOOK_DATA, needs_textbook, numerical_grad, rel_error

PTB_DIR = TEXTBOOK_DATA / "ptb"
needs_ptb = needs_textbook(*PTB_FILES)

TOL = 1e-6


def _ids(rng, V, shape):
    return rng.integers(0, V, shape)


def _check_model_grads(model, loss):
    loss()
    model.backward()
    analytic = [g.copy() for g in model.grads]
    for name, p, g in zip(model.param_names, model.params, analytic):
        err = rel_error(numerical_grad(loss, p), g)
        assert err < TOL, f"{name}: relative error {err}"


def test_rnnlm_gradients(numpy_kernel):
    rng = np.random.default_rng(0)
    model = Rnnlm(7, 3, 4, seed=1, dtype=np.float64)
    for p in model.params:  # non-trivial biases and larger embeddings than the 0.01 init
        p[...] = rng.standard_normal(p.shape) * 0.5
    xs, ts = _ids(rng, 7, (2, 5)), _ids(rng, 7, (2, 5))

    def loss():
        model.reset_state()
        return model.forward(xs, ts)

    _check_model_grads(model, loss)


def test_rnnlm_gradients_through_carried_state(numpy_kernel):
    rng = np.random.default_rng(5)
    model = Rnnlm(6, 3, 3, seed=2, dtype=np.float64)
    for p in model.params:
        p[...] = rng.standard_normal(p.shape) * 0.5
    h0, c0 = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    xs, ts = _ids(rng, 6, (2, 4)), _ids(rng, 6, (2, 4))

    def loss():
        model.set_state([(h0, c0)])
        return model.forward(xs, ts)

    _check_model_grads(model, loss)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_better_rnnlm_gradients(numpy_kernel, dropout):
    rng = np.random.default_rng(1)
    model = BetterRnnlm(7, 4, 4, dropout_ratio=dropout, seed=3, dtype=np.float64)
    for p in model.params:
        p[...] = rng.standard_normal(p.shape) * 0.5
    xs, ts = _ids(rng, 7, (2, 5)), _ids(rng, 7, (2, 5))

    def loss():
        model.reset_state()
        for k, d in enumerate(model.dropout_layers):  # the same masks on every call
            d.reseed(100 + k)
        return model.forward(xs, ts, train_flg=True)

    loss()
    if dropout:
        assert all(d.mask is not None and (d.mask == 0).any() for d in model.dropout_layers)
    _check_model_grads(model, loss)


def test_weight_tying_gradient_is_sum_of_both_paths(numpy_kernel):
    rng = np.random.default_rng(2)
    model = BetterRnnlm(6, 3, 3, dropout_ratio=0.0, seed=4, dtype=np.float64)
    for p in model.params:
        p[...] = rng.standard_normal(p.shape) * 0.5
    E = model.embed.params[0]
    # one array, held once
    assert model.affine.W is E
    assert sum(p is E for p in model.params) == 1 and len(model.params) == 8
    xs, ts = _ids(rng, 6, (2, 4)), _ids(rng, 6, (2, 4))

    def loss():
        model.reset_state()
        return model.forward(xs, ts)

    loss()
    model.backward()
    tied = model.grads[0].copy()
    # untie temporarily: the affine reads a separate copy E2
    E2 = E.copy()
    model.affine.embed = types.SimpleNamespace(params=[E2])
    g_embed = numerical_grad(loss, E)     # embedding path only
    g_affine = numerical_grad(loss, E2)   # output path only
    model.affine.embed = model.embed
    assert rel_error(g_embed + g_affine, tied) < TOL
    assert rel_error(g_embed, tied) > 1e-3 and rel_error(g_affine, tied) > 1e-3  # both matter


def test_textbook_params_order_and_shapes():
    V, D, H = 11, 5, 6
    m = Rnnlm(V, D, H, seed=0)
    assert [p.shape for p in m.params] == [(V, D), (D, 4 * H), (H, 4 * H), (4 * H,), (H, V), (V,)]
    assert m.param_names == ["embed.W", "lstm.Wx", "lstm.Wh", "lstm.b", "affine.W", "affine.b"]
    assert all(p.dtype == np.float32 for p in m.params)
    assert not m.params[3].any() and not m.params[5].any()
    assert abs(m.params[0].std() - 0.01) < 0.004  # randn / 100
    b = BetterRnnlm(V, 6, 6, seed=0)
    assert [p.shape for p in b.params] == [(V, 6), (6, 24), (6, 24), (24,), (6, 24), (6, 24), (24,),
                                           (V,)]
    assert b.textbook_tied == [(0, 7)]
    assert len(b.grads) == 8 and all(g.shape == p.shape for g, p in zip(b.grads, b.params))


def test_init_scales_and_seed():
    m1, m2 = Rnnlm(50, 40, 30, seed=7), Rnnlm(50, 40, 30, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(m1.params, m2.params))
    assert abs(m1.params[1].std() - 1 / np.sqrt(40)) < 0.02
    assert abs(m1.params[2].std() - 1 / np.sqrt(30)) < 0.02
    assert abs(m1.params[4].std() - 1 / np.sqrt(30)) < 0.02
    m3 = Rnnlm(50, 40, 30, seed=8)
    assert not np.array_equal(m1.params[0], m3.params[0])


def test_constructor_validation():
    with pytest.raises(ValueError):
        Rnnlm(0, 3, 3)
    with pytest.raises(ValueError):
        Rnnlm(10, 3.5, 3)
    with pytest.raises(ValueError):
        Rnnlm(10, 3, 3, dtype=np.int32)
    with pytest.raises(ValueError, match="wordvec_size"):
        BetterRnnlm(10, 4, 5)
    with pytest.raises(ValueError, match="dropout"):
        BetterRnnlm(10, 4, 4, dropout_ratio=1.0)
    m = Rnnlm(10, 3, 3)
    with pytest.raises(ValueError, match="vocabulary"):
        m.forward(np.array([[1, 10]]), np.array([[1, 2]]))
    with pytest.raises(TypeError):
        m.forward(np.array([[1.0, 2.0]]), np.array([[1, 2]]))
    with pytest.raises(ValueError, match="shape"):
        m.forward(np.array([[1, 2]]), np.array([[1, 2, 3]]))


def test_load_textbook_pickle_with_tied_duplicate(tmp_path):
    V, H = 9, 4
    m = BetterRnnlm(V, H, H, seed=0)
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(p.shape).astype(np.float16) for p in m.params]
    textbook = arrays[:7] + [arrays[0].T.copy()] + arrays[7:]  # 9 arrays, W.T at index 7
    path = tmp_path / "BetterRnnlm.pkl"
    path.write_bytes(pickle.dumps(textbook, protocol=2))
    load_textbook_params(m, path)
    for p, a in zip(m.params, arrays):
        assert np.array_equal(p, a.astype(np.float32))
    assert m.affine.W is m.embed.params[0]
    r = Rnnlm(V, 3, H, seed=0)
    rarrays = [rng.standard_normal(p.shape).astype(np.float16) for p in r.params]
    (tmp_path / "Rnnlm.pkl").write_bytes(pickle.dumps(rarrays))
    load_textbook_params(r, tmp_path / "Rnnlm.pkl")
    assert np.array_equal(r.params[4], rarrays[4].astype(np.float32))


@pytest.mark.parametrize("cls,args", [(Rnnlm, (12, 5, 6)), (BetterRnnlm, (12, 6, 6))])
def test_get_set_state(cls, args):
    rng = np.random.default_rng(4)
    m = cls(*args, seed=0)
    assert all(h is None and c is None for h, c in m.get_state())
    m.predict(_ids(rng, 12, (3, 4)))
    state = m.get_state()
    assert len(state) == len(m.lstm_layers) and state[0][0].shape == (3, args[2])
    nxt = _ids(rng, 12, (3, 4))
    a = m.predict(nxt)
    m.set_state(state)
    b = m.predict(nxt)
    assert np.array_equal(a, b)
    m.reset_state()
    c = m.predict(nxt)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError):
        m.set_state(state + state)


@pytest.mark.parametrize("cls,args", [(Rnnlm, (12, 5, 6)), (BetterRnnlm, (12, 6, 6))])
def test_save_load(tmp_path, cls, args):
    m = cls(*args, seed=0)
    path = tmp_path / "m.npz"
    m.save_params(path, meta={"vocab": [str(i) for i in range(12)]})
    m2 = cls(*args, seed=1)
    meta = m2.load_params(path)
    assert meta["model"] == cls.__name__ and meta["config"]["hidden_size"] == args[2]
    assert meta["vocab"][3] == "3"
    xs = np.array([[1, 2, 3, 4]])
    assert np.array_equal(m.predict(xs), m2.predict(xs))
    with pytest.raises(ValueError):
        cls(13, *args[1:]).load_params(path)


def test_predict_eval_mode_has_no_dropout():
    m = BetterRnnlm(12, 6, 6, dropout_ratio=0.5, seed=0)
    xs = np.array([[1, 2, 3]])
    m.reset_state()
    a = m.predict(xs)
    m.reset_state()
    b = m.predict(xs, train_flg=False)
    assert np.array_equal(a, b)
    m.reset_state()
    c = m.predict(xs, train_flg=True)
    assert not np.allclose(a, c)


def _reference_perplexity(model, corpus, B, T):
    """The textbook's formula, written out element by element."""
    n = len(corpus)
    iters = (n - 1) // (B * T)
    jump = (n - 1) // B
    model.reset_state()
    total = 0.0
    for k in range(iters):
        xs = np.zeros((B, T), dtype=np.int64)
        ts = np.zeros((B, T), dtype=np.int64)
        for i in range(B):
            off = k * T + i * jump
            for t in range(T):
                xs[i, t] = corpus[(off + t) % n]
                ts[i, t] = corpus[(off + t + 1) % n]
        total += model.forward(xs, ts, train_flg=False)
    return math.exp(total / iters)


@pytest.mark.parametrize("cls", [Rnnlm, BetterRnnlm])
def test_eval_perplexity_matches_formula(cls):
    rng = np.random.default_rng(6)
    corpus = rng.integers(0, 13, 173)
    m = cls(13, 6, 6, seed=0)
    ref = _reference_perplexity(m, corpus, 4, 7)
    m.reset_state()
    m.predict(np.zeros((2, 3), dtype=np.int64))  # some other state: restored afterwards
    before = m.get_state()
    ppl = eval_perplexity(m, corpus, batch_size=4, time_size=7)
    assert ppl == pytest.approx(ref, rel=1e-6)
    assert np.array_equal(m.get_state()[0][0], before[0][0])
    assert 1 < ppl < 13 * 3  # an untrained model is near uniform


class _Recorder:
    """A fake model that records the batches it is given."""

    def __init__(self):
        self.batches = []
        self.params, self.grads = [], []

    def forward(self, xs, ts):
        self.batches.append((np.array(xs), np.array(ts)))
        return 1.0

    def backward(self, dout=1):
        pass


def test_rnnlm_trainer_batch_layout_continues_across_fit_calls():
    data = np.arange(1000)
    xs, ts = data[:-1], data[1:]
    rec = _Recorder()
    trainer = RnnlmTrainer(rec, SGD(1.0), progress=False)
    B, T = 4, 5
    trainer.fit(xs, ts, max_epoch=1, batch_size=B, time_size=T, max_iters=3)
    trainer.fit(xs, ts, max_epoch=2, batch_size=B, time_size=T, max_iters=2)
    jump = len(xs) // B
    assert len(rec.batches) == 7
    for k, (bx, bt) in enumerate(rec.batches):
        for i in range(B):
            expect = [(i * jump + k * T + t) % len(xs) for t in range(T)]
            assert bx[i].tolist() == [xs[e] for e in expect]
            assert bt[i].tolist() == [ts[e] for e in expect]
    assert trainer.time_idx == 7 * T
    assert len(trainer.epoch_losses) == 3 and trainer.current_epoch == 3


def test_rnnlm_trainer_wraps_around_and_full_epoch():
    xs = np.arange(50)
    rec = _Recorder()
    trainer = RnnlmTrainer(rec, SGD(1.0), progress=False)
    trainer.fit(xs, xs, max_epoch=3, batch_size=2, time_size=10, eval_interval=2)
    # 50 // 20 = 2 iterations per epoch; the time index runs past jump = 25 and wraps modulo 50
    assert len(rec.batches) == 6
    last = rec.batches[-1][0]
    assert last[0].tolist() == [(50 + t) % 50 for t in range(10)]
    assert last[1].tolist() == [(25 + 50 + t) % 50 for t in range(10)]
    assert trainer.ppl_list == pytest.approx([math.e] * 3)


def test_rnnlm_trainer_rejects_bad_input():
    trainer = RnnlmTrainer(_Recorder(), SGD(1.0), progress=False)
    with pytest.raises(ValueError):
        trainer.fit(np.arange(10), np.arange(9))
    with pytest.raises(ValueError, match="shorter"):
        trainer.fit(np.arange(10), np.arange(10), batch_size=4, time_size=5)


@needs_ptb
def test_ptb_loads_the_textbook_files():
    from fastseq.datasets import ptb
    corpus, w2i, i2w = ptb.load_data("train", data_dir=PTB_DIR)
    assert len(w2i) == 10000 and len(corpus) == 929589
    assert i2w[w2i["<eos>"]] == "<eos>"


@needs_ptb
def test_short_ptb_training_lowers_perplexity():
    from fastseq.datasets import ptb
    corpus, w2i, _ = ptb.load_data("train", data_dir=PTB_DIR)
    val, _, _ = ptb.load_data("val", data_dir=PTB_DIR)
    corpus, val = corpus[:30000], val[:3000]
    model = Rnnlm(len(w2i), 32, 32, seed=0)
    before = eval_perplexity(model, val, batch_size=10, time_size=20)
    trainer = RnnlmTrainer(model, SGD(20.0), progress=False)
    trainer.fit(corpus[:-1], corpus[1:], max_epoch=1, batch_size=10, time_size=20, max_grad=0.25,
                eval_interval=20, max_iters=120)
    after = eval_perplexity(model, val, batch_size=10, time_size=20)
    assert before > 5000  # about uniform over 10,000 words
    assert after < 0.15 * before
    assert trainer.ppl_list[-1] < trainer.ppl_list[0]


@needs_ptb
def test_train_cli_ptb_lr_decay_and_outputs(tmp_path, monkeypatch, capsys):
    import fastseq.trainer as trainer_mod
    from fastseq.train import main
    vals = iter([500.0, 600.0, 450.0, 470.0, 420.0])  # val, val (worse), val, val (worse), test

    def fake_eval(model, corpus, batch_size=10, time_size=35, max_iters=None, progress_bar=False):
        return next(vals)

    monkeypatch.setattr(trainer_mod, "eval_perplexity", fake_eval)
    out = tmp_path / "ptb"
    rc = main(["--task", "ptb", "--model", "rnnlm", "--data-dir", str(PTB_DIR),
               "--epochs", "4", "--max-iters", "3", "--hidden-size", "8", "--wordvec-size", "8",
               "--batch-size", "4", "--time-size", "5", "--out", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [e["lr"] for e in m["epochs"]] == [20.0, 20.0, 5.0, 5.0]
    assert [e["val_perplexity"] for e in m["epochs"]] == [500.0, 600.0, 450.0, 470.0]
    assert m["test_perplexity"] == 420.0
    assert m["config"]["model"] == "rnnlm" and m["config"]["max_grad"] == 0.25
    for e in m["epochs"]:
        assert set(e) == {"epoch", "train_seconds", "checkpoint_seconds", "eval_seconds", "loss",
                          "train_perplexity", "val_perplexity", "lr"}
        assert e["train_perplexity"] == pytest.approx(math.exp(e["loss"]), rel=1e-4)
    meta = Rnnlm(10000, 8, 8).load_params(out / "model.npz")
    assert meta["epoch"] == 3 and len(meta["vocab"]) == 10000  # the best epoch's weights
    text = capsys.readouterr().out
    assert "val perplexity" in text and "test perplexity" in text


@needs_ptb
def test_train_cli_ptb_real_eval_better(tmp_path):
    from fastseq.train import main
    out = tmp_path / "better"
    rc = main(["--task", "ptb", "--model", "better", "--data-dir", str(PTB_DIR),
               "--epochs", "1", "--max-iters", "2", "--eval-max-iters", "2", "--hidden-size", "8",
               "--wordvec-size", "8", "--batch-size", "4", "--time-size", "5", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["dropout_ratio"] == 0.5 and m["config"]["epochs"] == 1
    assert 1000 < m["test_perplexity"] < 20000
    b = BetterRnnlm(10000, 8, 8, dropout_ratio=0.5)
    b.load_params(out / "model.npz")


def test_train_cli_ptb_rejects_seq2seq_model(tmp_path, capsys):
    from fastseq.train import main
    rc = main(["--task", "ptb", "--model", "peeky", "--data-dir", str(tmp_path / "no-ptb"),
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 2
    assert "rnnlm" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [0.3, 30.0])  # shift by the bound / by the exact row maximum
def test_fused_affine_softmax_matches_separate_layers(scale):
    from fastseq.layers import TimeAffine, TimeAffineSoftmaxWithLoss, TimeSoftmaxWithLoss
    rng = np.random.default_rng(8)
    N, T, H, V = 3, 4, 5, 9
    W, b = rng.standard_normal((H, V)) * scale, rng.standard_normal(V)
    x = rng.standard_normal((N, T, H))
    ts = rng.integers(0, V, (N, T))
    ts[0, 1] = ts[2, 3] = -1          # ignored positions
    ts[1, :] = 4                      # repeated labels accumulate
    a1, s1 = TimeAffine(W.copy(), b.copy()), TimeSoftmaxWithLoss()
    l1 = s1.forward(a1.forward(x), ts)
    dx1 = a1.backward(s1.backward(0.5))
    a2 = TimeAffine(W.copy(), b.copy())
    fused = TimeAffineSoftmaxWithLoss(a2)
    l2 = fused.forward(x, ts)
    assert fused.used_bound == (scale < 1)
    dx2 = fused.backward(0.5)
    assert l2 == pytest.approx(l1, rel=1e-12)
    assert rel_error(dx1, dx2) < 1e-12
    for g1, g2 in zip(a1.grads, a2.grads):
        assert rel_error(g1, g2) < 1e-12

    def loss():
        return fused.forward(x, ts)

    loss()
    dx = fused.backward()
    grads = [g.copy() for g in a2.grads]
    assert rel_error(numerical_grad(loss, x), dx) < TOL
    for p, g in zip(a2.params, grads):
        assert rel_error(numerical_grad(loss, p), g) < TOL
    # predict() path: the affine layer alone still sees the same (view) parameters
    assert np.allclose(a2.forward(x), a1.forward(x))
