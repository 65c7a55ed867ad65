"""Batched greedy and beam search (fastseq.decoding) for Seq2seq, PeekySeq2seq, AttentionSeq2seq."""
import numpy as np
import pytest

from fastseq import backend
from fastseq.decoding import beam_search, greedy_search, sequence_log_prob
from fastseq.models import PeekySeq2seq, Seq2seq
from fastseq.models.attention import AttentionSeq2seq

V, START, PAD = 9, 1, 0


def _engine(name):
    if name == "cupy":
        return pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(
            not backend.gpu_available(), reason="needs CuPy and a usable GPU")])
    if name == "cython":
        return pytest.param("cython", marks=pytest.mark.skipif(
            not backend.cython_available(), reason="the Cython engine is not built here"))
    return name


ENGINES = [_engine(n) for n in ("numpy", "cython", "cupy")]


def make(kind, seed=0, dtype=np.float32):
    """A small model with spread-out weights. AttentionSeq2seq with the textbook's initialisation:
    beam search does not promise a score >= greedy's on every row (greedy's prefix can fall out of
    the beam), and test_beam_scores_at_least_greedy relies on it holding for these models."""
    rng = np.random.default_rng(seed)
    if kind == "attention+pad":
        model = AttentionSeq2seq(V, 5, 8, seed=seed, pad_id=PAD, init="textbook", dtype=dtype)
    elif kind == "attention":
        model = AttentionSeq2seq(V, 5, 8, seed=seed, init="textbook", dtype=dtype)
    else:
        model = {"seq2seq": Seq2seq, "peeky": PeekySeq2seq}[kind](V, 5, 8, seed=seed, dtype=dtype)
    for p in model.params:  # spread-out scores, so that beams differ from greedy
        p[...] += backend.asarray(rng.standard_normal(p.shape).astype(p.dtype) * 1.5)
    return model


def questions(n=40, T=6, seed=1):
    rng = np.random.default_rng(seed)
    xs = rng.integers(1, V, (n, T))
    for i in range(0, n, 3):
        xs[i, rng.integers(1, T):] = PAD
    return xs


KINDS = ["seq2seq", "peeky", "attention", "attention+pad"]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_search_equals_generate(kind):
    model, xs = make(kind), questions()
    np.testing.assert_array_equal(greedy_search(model, xs, START, 5, batch_size=7),
                                  model.generate(xs, START, 5))


@pytest.mark.parametrize("kind", KINDS)
def test_beam_width_one_is_greedy(kind):
    model, xs = make(kind), questions()
    np.testing.assert_array_equal(beam_search(model, xs, START, 5, k=1),
                                  greedy_search(model, xs, START, 5))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 5])
def test_beam_scores_at_least_greedy(kind, k):
    model, xs = make(kind), questions()
    greedy = greedy_search(model, xs, START, 5)
    beam, scores = beam_search(model, xs, START, 5, k=k, return_scores=True)
    g = sequence_log_prob(model, xs, START, greedy)
    np.testing.assert_allclose(sequence_log_prob(model, xs, START, beam), scores, rtol=1e-5)
    assert np.all(scores >= g - 1e-5)
    assert np.any(scores > g + 1e-3)  # the search finds better sequences somewhere


@pytest.mark.parametrize("kind", ["peeky", "attention+pad"])
def test_beam_search_is_batched_over_questions(kind):
    """Answers do not depend on which other questions share the batch."""
    model, xs = make(kind), questions(12)
    together = beam_search(model, xs, START, 5, k=3)
    alone = np.concatenate([beam_search(model, xs[i:i + 1], START, 5, k=3) for i in range(12)])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(beam_search(model, xs, START, 5, k=3, batch_size=5), together)


def test_end_symbol_stops_and_pads():
    model, xs = make("attention+pad", seed=3), questions(60)
    for out in (beam_search(model, xs, START, 6, k=4), greedy_search(model, xs, START, 6),
                beam_search(model, xs, START, 6, k=4, length_penalty=1.0)):
        ended = np.cumsum(out == PAD, axis=1) > 0
        assert ended.any(), "no row ended: the test does not exercise the end symbol"
        assert np.all(out[ended] == PAD)


def test_length_penalty_prefers_longer_answers():
    model, xs = make("attention+pad", seed=3), questions(60)
    plain = beam_search(model, xs, START, 6, k=5)
    normed = beam_search(model, xs, START, 6, k=5, length_penalty=1.0)
    assert (normed != PAD).sum() >= (plain != PAD).sum()


def test_bad_arguments():
    model, xs = make("seq2seq"), questions(3)
    with pytest.raises(ValueError, match="beam width"):
        beam_search(model, xs, START, 4, k=0)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        beam_search(model, xs, START, 4, k=V + 1)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(model, xs, START, 4, k=2, length_penalty=-1)
    with pytest.raises(ValueError, match="vocabulary"):
        beam_search(model, xs + V, START, 4, k=2)


def teacher_forced_scores(model, xs, ys):
    """The training forward's scores (N, S, V) for decoder inputs ys (N, S)."""
    if isinstance(model, AttentionSeq2seq):
        return model.decoder.forward(ys, *model.encode(xs))
    return model.decoder.forward(ys, model.encoder.forward(xs))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3])
def test_decoding_interface_gives_the_teacher_forced_scores(kind, k, engine):
    """start / step / select (k rows per question, reordered within each question after two
    steps) score as the training forward over each row's history of inputs."""
    rng = np.random.default_rng(12)
    with backend.using(engine):
        model, xs = make(kind, dtype=np.float64), questions(12)
        ys = rng.integers(0, V, (12 * k, 4))
        perm = (np.arange(12)[:, None] * k + rng.permuted(np.tile(np.arange(k), (12, 1)),
                                                          axis=1)).reshape(-1)
        state = model.start(xs, k)
        stepped = []
        for t in range(4):
            if t == 2:
                state = model.select(state, backend.asarray(perm))
            scores, state = model.step(backend.asarray(ys[:, t]), state)
            stepped.append(backend.to_cpu(scores))
        history = np.concatenate([ys[perm, :2], ys[:, 2:]], axis=1)  # the inputs after select
        x_rows = backend.asarray(xs.repeat(k, axis=0))
        before = backend.to_cpu(teacher_forced_scores(model, x_rows, backend.asarray(ys)))
        after = backend.to_cpu(teacher_forced_scores(model, x_rows, backend.asarray(history)))
    for t in range(4):
        want = before[:, t] if t < 2 else after[:, t]
        np.testing.assert_allclose(stepped[t], want, rtol=1e-10, atol=1e-12, err_msg=f"step {t}")
    if k > 1:
        with pytest.raises(ValueError, match="among its question's"):
            model.select(state, np.arange(12 * k)[::-1].copy())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["seq2seq", "peeky", "attention"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_generate_feeds_back_the_argmax(kind, engine, dtype):
    """generate's answers (greedy_search), fed back through the training forward, are its
    scores' argmax at every step (up to near-ties, where rounding may pick either); 600
    questions: several blocks of rows in the engines."""
    with backend.using(engine):
        model, xs = make(kind, dtype=dtype), questions(600)
        ys = model.generate(xs, START, 5)
        dec_in = np.concatenate([np.full((600, 1), START), ys[:, :-1]], 1)
        scores = backend.to_cpu(teacher_forced_scores(model, backend.asarray(xs),
                                                      backend.asarray(dec_in)))
    top2 = np.sort(scores, axis=2)[:, :, -2:]
    tol = 1e-3 if dtype == np.float32 else 1e-9
    sure = np.cumprod(top2[:, :, 1] - top2[:, :, 0] > tol, axis=1).astype(bool)
    assert sure.mean() > 0.9, "the test problem has too many near-ties"
    np.testing.assert_array_equal(np.where(sure, scores.argmax(axis=2), -1), np.where(sure, ys, -1))


@pytest.mark.parametrize("kind", ["seq2seq", "peeky"])
def test_a_used_up_state_is_refused(kind):
    """A step advances the decoder's state in its own arrays: the state it was given is used
    up, and stepping from it again is refused; the state of a caller's h is not overwritten."""
    model, xs = make(kind, dtype=np.float64), questions(4)
    ids = np.full(4, START)
    state = model.start(xs)
    _, nxt = model.step(ids, state)  # the encoder's state: the decoder's own
    with pytest.raises(ValueError, match="used up"):
        model.step(ids, state)
    _, after = model.step(ids, nxt)
    assert after.h is not None
    h = model.encoder.infer(xs)
    kept = h.copy()
    s0 = model.decoder.start(h)  # a caller's h: copied by the first step, never overwritten
    s1 = model.decoder.step(ids, s0)[1]
    model.decoder.step(ids, s0)  # still usable
    model.decoder.step(ids, s1)
    np.testing.assert_array_equal(h, kept)


@pytest.mark.parametrize("kind", ["seq2seq", "peeky"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.skipif(not backend.cython_available(), reason="the Cython engine is not built here")
def test_cython_decodes_the_numpy_engines_answers(kind, dtype):
    """Greedy answers to 5,000 addition-sized questions (13 symbols, 7 per question, 4 answer
    steps, D=16, H=128: the decoding benchmark's shapes), on the Cython engine (the table of
    E Wx, steps in place, blocks of rows over the threads) and the NumPy engine: the same
    answers (float32: up to the few near-ties that rounding may settle either way)."""
    rng = np.random.default_rng(21)
    cls = {"seq2seq": Seq2seq, "peeky": PeekySeq2seq}[kind]
    model = cls(13, 16, 128, seed=3, dtype=dtype)
    for p in model.params:
        p[...] += rng.standard_normal(p.shape).astype(dtype) * 0.3
    xs = rng.integers(0, 13, (5000, 7))
    starts = rng.integers(0, 13, 5000)
    with backend.using("numpy"):
        want = model.generate(xs, starts, 4)
    with backend.using("cython"):
        got = model.generate(xs, starts, 4)
    if dtype == np.float64:
        np.testing.assert_array_equal(got, want)
    else:
        assert (got == want).all(axis=1).mean() > 0.999


def test_start_ids_are_checked():
    model, xs = make("seq2seq"), questions(3)
    with pytest.raises(ValueError, match="start id outside"):
        greedy_search(model, xs, V, 4)
    with pytest.raises(ValueError, match="one id or 3 ids"):
        greedy_search(model, xs, [1, 2], 4)
    np.testing.assert_array_equal(greedy_search(model, xs, [START] * 3, 4),
                                  greedy_search(model, xs, START, 4))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("context", [False, True])
def test_lstm_cell_is_forward_one_step_at_a_time(engine, context):
    """TimeLSTM.cell, reading the table E Wx (rows >= V) or gathering E's rows (rows < V), with
    and without a context, gives the states of forward over the embedded ids; the layer's own
    state is left alone."""
    from fastseq.layers import TimeEmbedding, TimeLSTM
    rng = np.random.default_rng(13)
    N, T, V, D, K, H = 6, 3, 5, 4, 3, 7
    with backend.using(engine):
        dev = backend.asarray
        E = dev(rng.standard_normal((V, D)))
        lstm = TimeLSTM(dev(rng.standard_normal((D + K * context, 4 * H))),
                        dev(rng.standard_normal((H, 4 * H)) / 3), dev(rng.standard_normal(4 * H)),
                        stateful=True)
        ids = rng.integers(0, V, (N, T))
        c = dev(rng.standard_normal((N, K))) if context else None
        h0 = dev(rng.standard_normal((N, H)))
        lstm.set_state(h0, dev(np.zeros((N, H))))
        want = backend.to_cpu(lstm.forward(E[dev(ids)], context=c))
        lstm.set_state(None)
        for rows in (N, 1):  # the table (V <= N) and the gather
            run = lstm.cell(TimeEmbedding(E), context=c, rows=rows)
            h, cc = h0, dev(np.zeros((N, H)))
            hi, ci = h0.copy(), dev(np.zeros((N, H)))  # advanced in place
            for t in range(T):
                h, cc = run(dev(ids[:, t]), h, cc)
                np.testing.assert_allclose(backend.to_cpu(h), want[:, t], rtol=1e-10, atol=1e-12)
                got = run(dev(ids[:, t]), hi, ci, out=(hi, ci))
                assert got[0] is hi and got[1] is ci
                np.testing.assert_array_equal(backend.to_cpu(hi), backend.to_cpu(h))
                np.testing.assert_array_equal(backend.to_cpu(ci), backend.to_cpu(cc))
        assert lstm.h is None
    with pytest.raises(ValueError, match="embedding width"):
        lstm.cell(TimeEmbedding(E[:, :2]), context=c)


class TableModel:
    """The decoding interface and nothing else, over fixed tables: after symbol u, question n
    scores symbol v with log-probability logp[n, u, v]."""

    def __init__(self, logp, end_id=None):
        self.logp, self.vocab_size, self.end_id = logp, logp.shape[1], end_id

    def check_ids(self, ids, what):
        return np.asarray(ids)

    def length_order(self, xs):
        return None

    def start(self, xs, k=1):
        return xs[:, 0].repeat(k)  # each row's question

    def step(self, ids, state):
        return self.logp[state, ids], state

    def select(self, state, rows):
        return state[rows]


def test_searches_need_only_the_interface():
    """Greedy follows the argmax; beam search of width V over two steps finds the best pair of
    symbols (every first symbol stays in the beam); sequence_log_prob sums the tables."""
    rng = np.random.default_rng(14)
    N, V = 20, 4
    s = rng.standard_normal((N, V, V)) * 2
    logp = s - np.log(np.exp(s).sum(axis=2, keepdims=True))
    model, xs = TableModel(logp), np.arange(N)[:, None]
    pairs = logp[:, START][:, :, None] + logp[np.arange(N)[:, None], np.arange(V)]  # (N, V, V)
    best = pairs.reshape(N, -1).argmax(axis=1)
    beam, score = beam_search(model, xs, START, 2, k=V, return_scores=True)
    np.testing.assert_array_equal(beam, np.stack([best // V, best % V], axis=1))
    np.testing.assert_allclose(score, pairs.reshape(N, -1).max(axis=1))
    first = logp[:, START].argmax(axis=1)
    greedy = greedy_search(model, xs, START, 2)
    np.testing.assert_array_equal(greedy[:, 0], first)
    np.testing.assert_array_equal(greedy[:, 1], logp[np.arange(N), first].argmax(axis=1))
    np.testing.assert_allclose(sequence_log_prob(model, xs, START, beam), score)
    assert np.any(beam != greedy)  # the tables make greedy miss the best pair somewhere
