"""Batched greedy and beam search (fastseq.decoding) for Seq2seq, PeekySeq2seq, AttentionSeq2seq."""
import numpy as np
import pytest

from fastseq import backend
from fastseq.decoding import beam_search, greedy_search, sequence_log_prob
from fastseq.models import PeekySeq2seq, Seq2seq
from fastseq.models.attention import AttentionSeq2seq

V, START, PAD = 9, 1, 0


def make(kind, seed=0):
    """A small model with spread-out weights. AttentionSeq2seq with the textbook's initialisation:
    beam search does not promise a score >= greedy's on every row (greedy's prefix can fall out of
    the beam), and test_beam_scores_at_least_greedy relies on it holding for these models."""
    rng = np.random.default_rng(seed)
    if kind == "attention+pad":
        model = AttentionSeq2seq(V, 5, 8, seed=seed, pad_id=PAD, init="textbook")
    elif kind == "attention":
        model = AttentionSeq2seq(V, 5, 8, seed=seed, init="textbook")
    else:
        model = {"seq2seq": Seq2seq, "peeky": PeekySeq2seq}[kind](V, 5, 8, seed=seed)
    for p in model.params:  # spread-out scores, so that beams differ from greedy
        p[...] += rng.standard_normal(p.shape).astype(p.dtype) * 1.5
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


@pytest.mark.parametrize("engine", ["numpy", "cython"])
@pytest.mark.parametrize("kind", ["seq2seq", "peeky"])
def test_generate_is_the_argmax_of_teacher_forcing(kind, engine):
    """generate's answers, fed back through the training forward, are its scores' argmax at
    every step (up to near-ties, where rounding may pick either)."""
    if not backend.cython_available() and engine == "cython":
        pytest.skip("fastseq._ext is not importable here")
    with backend.using(engine):
        model, xs = make(kind), questions(200)
        ys = model.generate(xs, START, 5)
        h = model.encoder.forward(xs)
        scores = model.decoder.forward(np.concatenate([np.full((200, 1), START), ys[:, :-1]], 1), h)
    top2 = np.sort(scores, axis=2)[:, :, -2:]
    sure = np.cumprod(top2[:, :, 1] - top2[:, :, 0] > 1e-4, axis=1).astype(bool)
    assert sure.mean() > 0.9
    np.testing.assert_array_equal(np.where(sure, scores.argmax(axis=2), -1), np.where(sure, ys, -1))


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
