"""Ended rows and settled questions leave the decoder's state (model.keep): the searches give
the same answers and scores as stepping every row to the end, on padded batches, both CPU
engines, greedy and beam."""
import numpy as np
import pytest

from fastseq import backend, decoding
from fastseq.decoding import _log_softmax, _top_k, beam_search, greedy_search, sequence_log_prob
from fastseq.models.attention import AttentionSeq2seq

V, START, PAD = 11, 1, 0
ENGINES = ["numpy", pytest.param("cython", marks=pytest.mark.skipif(
    not backend.cython_available(), reason="the Cython engine is not built here"))]


def make(seed=0, dtype=np.float64, encoder="bi", layers=1):
    """A random padded attention model whose answers end after a few steps, at varied lengths."""
    rng = np.random.default_rng(seed)
    model = AttentionSeq2seq(V, 6, 8, seed=seed, pad_id=PAD, dtype=dtype, encoder=encoder,
                             layers=layers)
    for p in model.params:
        p[...] += rng.standard_normal(p.shape).astype(dtype) * 0.8
    model.decoder.affine.params[1][PAD] += 1.5  # the end symbol: likely, never certain
    return model


def questions(n=60, T=7, seed=1):
    rng = np.random.default_rng(seed)
    xs = rng.integers(2, V, (n, T))
    for i in range(n):
        xs[i, rng.integers(1, T + 1):] = PAD
    return xs


class Whole:
    """The model without keep: every row is stepped to the end (the searches' plain path)."""

    def __init__(self, model):
        self.m = model

    def __getattr__(self, name):
        if name == "keep":
            raise AttributeError(name)
        return getattr(self.m, name)


def plain_beam(model, xs, steps, k, alpha=0.0, nbest=1):
    """Beam search written plainly: every hypothesis of every question stepped until all have
    ended; hypotheses ranked by score / length ** alpha, ties by position."""
    N, end = xs.shape[0], model.end_id
    state = model.start(xs, k)
    score = np.full((N, k), -np.inf)
    score[:, 0] = 0
    length, done = np.zeros((N, k)), np.zeros((N, k), dtype=bool)
    seqs = np.zeros((N, k, 0), dtype=np.int64)
    ids = np.full(N * k, START)
    for _ in range(steps):
        scores, state = model.step(ids, state)
        logp = _log_softmax(scores).reshape(N, k, V)
        logp[done] = -np.inf
        logp[done, end] = 0
        cand = (score[:, :, None] + logp).reshape(N, -1)
        rank = cand / ((length + ~done).repeat(V, axis=1) ** alpha) if alpha else cand
        top = _top_k(rank, k, np)
        beam, tok = top // V, top % V
        score = np.take_along_axis(cand, top, axis=1)
        length = np.take_along_axis(length + ~done, beam, axis=1)
        done = np.take_along_axis(done, beam, axis=1) | (tok == end)
        seqs = np.concatenate([np.take_along_axis(seqs, beam[:, :, None], axis=1),
                               tok[:, :, None]], axis=2)
        state = model.select(state, (np.arange(N)[:, None] * k + beam).reshape(-1))
        ids = tok.reshape(-1)
        if done.all():
            break
    final = score / np.maximum(length, 1) ** alpha if alpha else score
    best = _top_k(final, nbest, np)
    out = np.full((N, nbest, steps), end)
    out[:, :, :seqs.shape[2]] = seqs[np.arange(N)[:, None], best]
    return out, score[np.arange(N)[:, None], best]


@pytest.fixture(params=[0.0, 0.125, 1.0])
def keep_fraction(request, monkeypatch):
    """0: rows leave at every step where one ends; 1: never (the search stops first)."""
    monkeypatch.setattr(decoding, "KEEP_FRACTION", request.param)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("encoder,layers", [("bi", 1), ("uni", 2)])
def test_greedy_drops_ended_rows_with_the_same_answers(engine, encoder, layers, keep_fraction):
    model, xs = make(encoder=encoder, layers=layers), questions()
    with backend.using(engine):
        want = greedy_search(Whole(model), xs, START, 9, batch_size=25)
        got = greedy_search(model, xs, START, 9, batch_size=25)
    assert (want == PAD).any(axis=1).mean() > 0.5  # most rows end before the last step
    assert len({int(np.argmax(r == PAD)) for r in want if (r == PAD).any()}) > 2  # at varied steps
    np.testing.assert_array_equal(got, want)


def test_greedy_keeps_rows_in_place():
    """keep is asked for the rows still decoding, and the steps after it see only those."""
    model, xs = make(), questions(30)
    seen = []
    step = model.step

    def counting(ids, state):
        seen.append(ids.shape[0])
        return step(ids, state)
    model.step = counting
    out = greedy_search(model, xs, START, 9, batch_size=None)
    ended = np.array([(out[:, :t + 1] == PAD).any(axis=1).sum() for t in range(len(seen))])
    assert seen[0] == 30 and min(seen) < 30
    assert all(s >= 30 - e for s, e in zip(seen[1:], ended))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k,nbest,alpha", [(1, 1, 0.0), (3, 1, 0.0), (4, 2, 0.0), (4, 4, 0.0),
                                           (5, 1, 0.0), (3, 2, 0.7)])
def test_beam_drops_settled_questions_with_the_same_answers(engine, k, nbest, alpha,
                                                            keep_fraction):
    model, xs = make(seed=2), questions(seed=3)
    with backend.using(engine):
        want, want_scores = plain_beam(model, xs, 9, k, alpha, nbest)
        got, got_scores = beam_search(model, xs, START, 9, k=k, length_penalty=alpha,
                                      nbest=nbest, batch_size=20)
        whole, whole_scores = beam_search(Whole(model), xs, START, 9, k=k,
                                          length_penalty=alpha, nbest=nbest, batch_size=20)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-12)
    np.testing.assert_array_equal(whole, want)
    np.testing.assert_allclose(whole_scores, want_scores, rtol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_beam_width_one_is_greedy_and_scores_are_the_answers_log_probs(engine):
    model, xs = make(seed=4), questions(seed=5)
    with backend.using(engine):
        greedy = greedy_search(model, xs, START, 9, batch_size=16)
        np.testing.assert_array_equal(beam_search(model, xs, START, 9, k=1, batch_size=16),
                                      greedy)
        ids, scores = beam_search(model, xs, START, 9, k=4, nbest=3, batch_size=16)
        assert (np.diff(scores, axis=1) <= 0).all()  # best first
        for j in range(3):
            np.testing.assert_allclose(sequence_log_prob(model, xs, START, ids[:, j]),
                                       scores[:, j], rtol=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
def test_float32_decodes_as_float64(engine):
    """The float32 model decodes the float64 model's answers (up to rare near-ties)."""
    m64, xs = make(seed=6), questions(200, seed=7)
    m32 = make(seed=6, dtype=np.float32)
    with backend.using(engine):
        a = greedy_search(m64, xs, START, 9)
        b = greedy_search(m32, xs, START, 9)
        c = beam_search(m64, xs, START, 9, k=3)
        d = beam_search(m32, xs, START, 9, k=3)
    assert (a == b).all(axis=1).mean() > 0.98 and (c == d).all(axis=1).mean() > 0.98


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("encoder,layers", [("bi", 1), ("uni", 2)])
def test_a_widened_state_steps_as_one_started_wide(engine, encoder, layers):
    """start(xs, 1) then widen(state, 3): the state start(xs, 3) gives, step for step."""
    model, xs = make(seed=8, encoder=encoder, layers=layers), questions(12, seed=9)
    rng = np.random.default_rng(10)
    with backend.using(engine):
        first = np.full(12, START)
        s1, one = model.step(first, model.start(xs, 1))
        s3, wide = model.step(first.repeat(3), model.start(xs, 3))
        np.testing.assert_allclose(s1.repeat(3, axis=0), s3, rtol=1e-12)
        one = model.widen(one, 3)
        for _ in range(3):
            ids = rng.integers(0, V, 36)
            a, one = model.step(ids, one)
            b, wide = model.step(ids, wide)
            np.testing.assert_allclose(a, b, rtol=1e-12)
        with pytest.raises(ValueError, match="one row per question"):
            model.widen(one, 2)
