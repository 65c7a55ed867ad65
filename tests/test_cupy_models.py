"""Models, optimisers, trainers, decoders and metrics on every engine present, against the NumPy
engine. The CuPy cases need CuPy and an NVIDIA GPU (``GPU=1 python -m pytest tests -m gpu``);
elsewhere they are skipped with the reason."""
import numpy as np
import pytest

import fastseq
from fastseq import backend, cuda_graph
from fastseq.functions import clip_grads
from fastseq.models.attention import AttentionSeq2seq


def _engine(name):
    if name == "cupy":
        reason = None if backend.gpu_available() else f"no usable GPU: {backend._cupy_error}"
        return pytest.param("cupy", marks=[pytest.mark.gpu,
                                           pytest.mark.skipif(reason is not None,
                                                              reason=str(reason))])
    if name == "cython":
        return pytest.param("cython", marks=pytest.mark.skipif(
            not backend.cython_available(), reason="the Cython engine is not built here"))
    return name


ENGINES = [_engine(n) for n in ("numpy", "cython", "cupy")]
GPU = [_engine("cupy")]


def _models():
    return {
        "seq2seq": lambda: fastseq.Seq2seq(13, 8, 16, seed=1, dtype=np.float64),
        "peeky": lambda: fastseq.PeekySeq2seq(13, 8, 16, seed=1, dtype=np.float64),
        "rnnlm": lambda: fastseq.Rnnlm(40, 8, 16, seed=1, dtype=np.float64),
        "better": lambda: fastseq.BetterRnnlm(40, 16, 16, 0.0, seed=1, dtype=np.float64),
        "better-dropout": lambda: fastseq.BetterRnnlm(40, 16, 16, 0.5, seed=1, dtype=np.float64),
        "attention": lambda: AttentionSeq2seq(13, 8, 16, seed=1, dtype=np.float64),
        "attention-pad": lambda: AttentionSeq2seq(13, 8, 16, seed=1, dtype=np.float64,
                                                  pad_id=12),
    }


def _data(name, seed=0, n=24):
    rng = np.random.default_rng(seed)
    if name.startswith(("rnnlm", "better")):
        return rng.integers(0, 40, (n, 6)), rng.integers(0, 40, (n, 6))
    x, t = rng.integers(0, 12, (n, 7)), rng.integers(0, 12, (n, 5))
    if name == "attention-pad":  # trailing pads of different lengths
        for k in range(n):
            x[k, 7 - k % 4:] = 12
            t[k, 5 - k % 3:] = 12
    return x, t


def _steps(engine, name, n_steps=2, max_grad=0.5):
    """Loss, grads and weights (host copies) after n_steps of Adam with clipping on engine."""
    with backend.using(engine):
        model = _models()[name]()
        opt = fastseq.Adam(0.01)
        x, t = _data(name)
        losses = []
        for k in range(n_steps):
            xb, tb = backend.asarray(x[k * 8:(k + 1) * 8]), backend.asarray(t[k * 8:(k + 1) * 8])
            losses.append(float(model.forward(xb, tb)))
            model.backward()
            grads = [backend.to_cpu(g).copy() for g in model.grads]
            clip_grads(model.grads, max_grad)
            opt.update(model.params, model.grads)
        return losses, grads, [backend.to_cpu(p) for p in model.params]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["seq2seq", "peeky", "rnnlm", "better", "attention",
                                  "attention-pad"])
def test_training_steps_match_numpy_engine(engine, name):
    """(With a pad id, AttentionSeq2seq on the GPU keeps the padded columns instead of trimming
    them, to avoid a host read per step: the same results.)"""
    want = _steps("numpy", name)
    got = _steps(engine, name)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
    for g, w in zip(got[1] + got[2], want[1] + want[2]):
        np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("engine", GPU)
@pytest.mark.parametrize("name", ["seq2seq", "peeky", "rnnlm", "better-dropout", "attention",
                                  "attention-pad"])
def test_a_gpu_step_reads_nothing_back(engine, name):
    """A whole step (forward, backward, clipping, Adam) records into a CUDA graph: any host
    read inside it would make the capture fail."""
    with backend.using(engine):
        model = _models()[name]()
        opt = fastseq.Adam(0.01)
        x, t = (backend.asarray(a[:8]) for a in _data(name))

        def step():
            loss = model.forward(x, t)
            model.backward()
            clip_grads(model.grads, 0.5)
            opt.update(model.params, model.grads)
            return loss

        with backend.ids_checked():
            step()  # eager first (kernels compiled, device counter made)
            api = cuda_graph.CupyGraphApi()
            with api.capture() as captured:
                step()
        assert captured["graph"] is not None


@pytest.mark.parametrize("engine", GPU)
@pytest.mark.parametrize("name", ["seq2seq", "peeky", "attention-pad"])
def test_graph_steps_equal_eager_steps(engine, name):
    x, t = _data(name, seed=4, n=64)
    out = {}
    for graphs in (False, True):
        with backend.using(engine):
            model = _models()[name]()
            trainer = fastseq.Trainer(model, fastseq.Adam(0.01), seed=0, progress=False,
                                      cuda_graphs=graphs)
            trainer.fit(x, t, max_epoch=2, batch_size=16, max_grad=1.0, eval_interval=2)
            out[graphs] = (trainer.loss_list, [backend.to_cpu(p) for p in model.params],
                           trainer.optimizer.iter)
            step = trainer.device_step(1.0)
            if graphs:
                assert step.reason is None, step.reason
                assert step.counts["replayed"] >= 5, step.counts
    assert out[True][2] == out[False][2] == 8
    assert all(isinstance(v, float) for v in out[True][0])
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-9)
    for a, b in zip(out[True][1], out[False][1]):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("engine", GPU)
@pytest.mark.parametrize("name", ["rnnlm", "better-dropout"])
def test_language_model_graph_steps_equal_eager_steps(engine, name):
    """Truncated BPTT replayed from a graph (state carried through the graph's buffers, dropout
    masks drawn on the device) gives the eager steps' results, also across an evaluation that
    resets and restores the state between epochs."""
    rng = np.random.default_rng(8)
    corpus = rng.integers(0, 40, 2000)
    out = {}
    for graphs in (False, True):
        with backend.using(engine):
            model = _models()[name]()
            tr = fastseq.RnnlmTrainer(model, fastseq.SGD(0.5), progress=False, cuda_graphs=graphs)
            ppl = []
            for _ in range(2):
                tr.fit(corpus[:-1], corpus[1:], max_epoch=1, batch_size=4, time_size=5,
                       max_grad=0.25, eval_interval=10, max_iters=40)
                ppl.append(fastseq.trainer.eval_perplexity(model, corpus[:400], 4, 5))
            out[graphs] = (tr.ppl_list, ppl, [backend.to_cpu(p) for p in model.params])
            if graphs:
                step = tr.device_step(0.25)
                assert step.reason is None, step.reason
                assert step.counts["replayed"] >= 70, step.counts
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-9)
    np.testing.assert_allclose(out[True][1], out[False][1], rtol=1e-9)
    for a, b in zip(out[True][2], out[False][2]):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("engine", ENGINES)
def test_trainers_and_metrics_match_numpy_engine(engine):
    rng = np.random.default_rng(5)
    x, t = rng.integers(0, 13, (48, 7)), rng.integers(0, 13, (48, 5))
    corpus = rng.integers(0, 40, 600)
    res = {}
    for eng in ("numpy", engine):
        with backend.using(eng):
            model = fastseq.PeekySeq2seq(13, 8, 16, seed=3, dtype=np.float64)
            tr = fastseq.Trainer(model, fastseq.Adam(0.01), seed=0, progress=False)
            tr.fit(x, t, max_epoch=2, batch_size=16, max_grad=1.0, eval_interval=3)
            acc = fastseq.trainer.eval_seq2seq(model, x, t)
            guesses = model.generate(x[:5], t[:5, 0], 4)
            lm = fastseq.Rnnlm(40, 8, 16, seed=3, dtype=np.float64)
            lt = fastseq.RnnlmTrainer(lm, fastseq.SGD(1.0), progress=False)
            lt.fit(corpus[:-1], corpus[1:], max_epoch=1, batch_size=4, time_size=5,
                   max_grad=0.25, eval_interval=5)
            ppl = fastseq.trainer.eval_perplexity(lm, corpus, batch_size=4, time_size=5)
            lm.reset_state()
            words = lm.generate([3, 5], sample_size=8, greedy=True)  # the engine's LSTM step
            res[eng] = (tr.epoch_losses, tr.loss_list, acc, np.asarray(guesses),
                        lt.ppl_list, ppl, words)
    a, b = res["numpy"], res[engine]
    for i in (0, 1, 4):
        assert all(isinstance(v, float) for v in b[i])
        np.testing.assert_allclose(b[i], a[i], rtol=1e-9)
    assert b[2] == a[2]
    np.testing.assert_array_equal(b[3], a[3])
    assert isinstance(b[5], float)
    np.testing.assert_allclose(b[5], a[5], rtol=1e-9)
    assert b[6] == a[6]


@pytest.mark.parametrize("engine", GPU)
def test_weights_saved_on_either_engine_load_on_the_other(engine, tmp_path):
    for src, dst in (("numpy", engine), (engine, "numpy")):
        with backend.using(src):
            a = fastseq.PeekySeq2seq(13, 8, 16, seed=5)
            a.save_params(tmp_path / f"{src}.npz")
        with backend.using(dst):
            b = fastseq.PeekySeq2seq(13, 8, 16, seed=6)
            b.load_params(tmp_path / f"{src}.npz")
            assert all(backend.get_array_module(p) is backend.get_array_module(b.params[0])
                       for p in b.params)
            for p, q in zip(a.params, b.params):
                np.testing.assert_array_equal(backend.to_cpu(p), backend.to_cpu(q))


@pytest.mark.parametrize("engine", GPU)
def test_decoding_on_gpu_matches_cpu(engine):
    from fastseq import decoding
    rng = np.random.default_rng(6)
    x = rng.integers(0, 13, (6, 7))
    out = {}
    for eng in ("numpy", engine):
        with backend.using(eng):
            model = fastseq.PeekySeq2seq(13, 8, 16, seed=7, dtype=np.float64)
            out[eng] = (np.asarray(backend.to_cpu(decoding.greedy_search(model, x, 1, 4))),
                        np.asarray(backend.to_cpu(decoding.beam_search(model, x, 1, 4, k=3))))
    for a, b in zip(out["numpy"], out[engine]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_gives_the_uninterrupted_run(engine, tmp_path):
    """A BetterRnnlm run (dropout masks drawn on the device) stopped after one epoch, saved and
    restored into new objects continues exactly as the run that was not stopped."""
    from fastseq import checkpoint, files
    corpus = np.random.default_rng(9).integers(0, 40, 1500)
    kw = dict(max_epoch=1, batch_size=4, time_size=5, max_grad=0.25, eval_interval=10,
              max_iters=30)

    def make():
        model = _models()["better-dropout"]()
        return fastseq.RnnlmTrainer(model, fastseq.SGD(0.5), progress=False)

    with backend.using(engine):
        straight = make()
        for _ in range(2):
            straight.fit(corpus[:-1], corpus[1:], **kw)
        first = make()
        first.fit(corpus[:-1], corpus[1:], **kw)
        checkpoint.save(tmp_path / "ck.npz", first)
        second = make()
        checkpoint.restore(second, *files.load_checkpoint(tmp_path / "ck.npz"))
        second.fit(corpus[:-1], corpus[1:], **kw)
        np.testing.assert_allclose(second.ppl_list, straight.ppl_list, rtol=1e-9)
        for a, b in zip(second.model.params, straight.model.params):
            np.testing.assert_allclose(backend.to_cpu(a), backend.to_cpu(b), rtol=1e-8,
                                       atol=1e-11)
