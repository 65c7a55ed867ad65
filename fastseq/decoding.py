"""Batched decoding for the seq2seq models (Seq2seq, PeekySeq2seq, AttentionSeq2seq): greedy and
beam search over many questions at once.

    greedy_search(model, xs, start_id, sample_size)              -> (N, sample_size) ids
    beam_search(model, xs, start_id, sample_size, k=5)           -> (N, sample_size) ids
    sequence_log_prob(model, xs, start_id, ys)                   -> (N,) sum of log p(y_t | ...)

The end symbol: a model with a pad id (AttentionSeq2seq(pad_id=...)) ends an answer with its
first pad; once a row or beam has emitted it, it only emits pads at no cost, and decoding stops
when every row has ended. Models without one decode sample_size symbols.
"""
import numpy as np

from . import backend
from .backend import get_array_module
from .functions import matmul
from .models.seq2seq import _as_start_ids, embed_lstm_forward

_AUTO = object()


class _Stepper:
    """One decoder step at a time for B = N * k rows (k copies of each of N questions, rows
    n * k .. n * k + k - 1), with the LSTM state reordered between steps by ``select``."""

    def __init__(self, model, xs, k):
        self.dec = dec = model.decoder
        self.k = k
        self.attention = hasattr(model, "encode")
        if self.attention:  # k rows attend to one copy of their question's states
            enc_hs, mask = model.encode(xs)
            self.attend = dec.stepper(enc_hs, mask)
            h = enc_hs[:, -1]
        else:
            h = model.encoder.infer(xs)
            self.h = h if k == 1 else h.repeat(k, axis=0)
        xp = get_array_module(h)
        dec.lstm.set_state(h if k == 1 else h.repeat(k, axis=0),
                           xp.zeros((h.shape[0] * k, h.shape[1]), dtype=h.dtype))
        self.peeky = hasattr(dec, "_proj")
        if self.peeky:  # h's share of the LSTM input, once per call (fixed weights)
            dec._proj = (self.h, matmul(self.h, dec.lstm.params[0][:dec.H]))

    def step(self, ids):
        """Scores (B, V) after feeding ids (B,)."""
        if self.attention:
            return self.attend(ids.reshape(-1))
        return self.dec._step(ids.reshape(-1, 1), self.h)[:, 0]

    def select(self, rows):
        lstm = self.dec.lstm
        lstm.set_state(lstm.h[rows], lstm.c[rows])

    def close(self):
        if self.peeky:
            self.dec._proj = None


def _end_id(model, end_id):
    if end_id is _AUTO:
        return getattr(model, "pad_id", None)
    return end_id


def _log_softmax(scores):
    xp = get_array_module(scores)
    s = scores.astype(np.float64)
    s -= s.max(axis=1, keepdims=True)
    s -= xp.log(xp.exp(s).sum(axis=1, keepdims=True))
    return s


def _prepare(model, xs, start_id):
    xs = model._check_ids(xs, "questions xs")
    xp = get_array_module(xs)
    starts = _as_start_ids(backend.asarray(start_id), xs.shape[0], xp)[:, 0]
    return xs, starts, xp


def _chunks(model, xs, batch_size):
    """Row sets of at most batch_size questions; with a pad id, in order of question length (so
    that each batch is trimmed to its longest question)."""
    N = xs.shape[0]
    bs = batch_size or N
    order = model.length_order(xs) if hasattr(model, "length_order") else None
    if order is None or N <= bs:
        return [slice(s, min(s + bs, N)) for s in range(0, N, bs)]
    return [order[s:s + bs] for s in range(0, N, bs)]


def greedy_search(model, xs, start_id, sample_size, end_id=_AUTO, batch_size=500):
    """The most likely symbol at every step, for all questions xs (N, T) at once (in batches of
    ``batch_size``) -> (N, sample_size) NumPy array; stops early once every row has ended."""
    xs, starts, xp = _prepare(model, xs, start_id)
    end = _end_id(model, end_id)
    out = np.full((xs.shape[0], sample_size), -1 if end is None else end, dtype=np.int64)
    for sl in _chunks(model, xs, batch_size):
        r = sl if isinstance(sl, slice) else backend.asarray(sl)
        if end is None and not hasattr(model, "encode"):  # Seq2seq, Peeky: the engine decodes
            h = model.encoder.infer(xs[r])
            out[sl] = backend.to_cpu(model.decoder.generate(h, starts[r], sample_size))
            continue
        st = _Stepper(model, xs[r], 1)
        try:
            ids = starts[r]
            done = xp.zeros(ids.shape[0], dtype=bool)
            cols = []
            for _ in range(sample_size):
                ids = st.step(ids).argmax(axis=1)
                if end is not None:
                    ids = xp.where(done, end, ids)
                    done |= ids == end
                cols.append(ids)
                if end is not None and bool(done.all()):
                    break
        finally:
            st.close()
        out[sl, :len(cols)] = backend.to_cpu(xp.stack(cols, axis=1))
    return out


def beam_search(model, xs, start_id, sample_size, k=5, length_penalty=0.0, end_id=_AUTO,
                batch_size=200, return_scores=False):
    """Beam search of width k for every question of xs (N, T), all questions' beams advanced
    together (in batches of ``batch_size`` questions) -> (N, sample_size) NumPy array of the best
    sequence per question (and, with return_scores, its summed log-probability (N,)).

    Hypotheses are ranked by their summed log-probability divided by length ** length_penalty
    (0: no length normalisation; the length counts symbols up to and including the end symbol).
    A hypothesis that has emitted the end symbol is finished: it keeps its score and only emits
    end symbols; the search stops early when every beam of every question has finished.
    With k = 1 this is greedy decoding.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"beam width k must be a positive integer, got {k!r}")
    if not length_penalty >= 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty!r}")
    xs, starts, xp = _prepare(model, xs, start_id)
    end = _end_id(model, end_id)
    N = xs.shape[0]
    out = np.full((N, sample_size), -1 if end is None else end, dtype=np.int64)
    best_scores = np.empty(N)
    for sl in _chunks(model, xs, batch_size):
        r = sl if isinstance(sl, slice) else backend.asarray(sl)
        seqs, scores = _beam_batch(model, xs[r], starts[r], sample_size, int(k),
                                   float(length_penalty), end, xp)
        out[sl, :seqs.shape[1]] = seqs
        best_scores[sl] = scores
    return (out, best_scores) if return_scores else out


def _beam_batch(model, xs, starts, sample_size, k, alpha, end, xp):
    N = xs.shape[0]
    st = _Stepper(model, xs, k)
    try:
        V = model.vocab_size
        if k > V:
            raise ValueError(f"beam width {k} is larger than the vocabulary ({V})")
        score = xp.full((N, k), -xp.inf)
        score[:, 0] = 0  # one live hypothesis per question at the start
        length = xp.zeros((N, k))
        done = xp.zeros((N, k), dtype=bool)
        seqs = xp.zeros((N, k, 0), dtype=np.int64)
        ids = starts.repeat(k)
        if end is not None:
            after_end = xp.full(V, -xp.inf)  # a finished hypothesis: end symbols at no cost
            after_end[end] = 0
        for _ in range(sample_size):
            logp = _log_softmax(st.step(ids)).reshape(N, k, V)
            if end is not None:
                logp = xp.where(done[:, :, None], after_end, logp)
            cand = (score[:, :, None] + logp).reshape(N, k * V)
            rank = cand
            if alpha:
                n = (length + ~done).repeat(V, axis=1)  # length if this candidate is taken
                rank = cand / n ** alpha
            top = _top_k(rank, k, xp)                                        # (N, k)
            beam, tok = top // V, top % V
            score = xp.take_along_axis(cand, top, axis=1)
            length = xp.take_along_axis(length + ~done, beam, axis=1)
            done = xp.take_along_axis(done, beam, axis=1)
            seqs = xp.concatenate([xp.take_along_axis(seqs, beam[:, :, None], axis=1),
                                   tok[:, :, None]], axis=2)
            st.select((xp.arange(N)[:, None] * k + beam).reshape(-1))
            ids = tok.reshape(-1)
            if end is not None:
                done |= tok == end
                if bool(done.all()):
                    break
        final = score / xp.maximum(length, 1) ** alpha if alpha else score
        best = final.argmax(axis=1)
        rows = xp.arange(N)
        return backend.to_cpu(seqs[rows, best]), backend.to_cpu(score[rows, best])
    finally:
        st.close()


def _top_k(a, k, xp):
    """Indices of the k largest entries of each row of a, largest first."""
    if k == 1:
        return a.argmax(axis=1)[:, None]
    part = xp.argpartition(-a, k - 1, axis=1)[:, :k]
    vals = xp.take_along_axis(a, part, axis=1)
    # by value (descending), ties by index: two stable sorts, the minor key first
    order = xp.argsort(part, axis=1)
    order = xp.take_along_axis(order, xp.argsort(-xp.take_along_axis(vals, order, axis=1),
                                                  axis=1, kind="stable"), axis=1)
    return xp.take_along_axis(part, order, axis=1)


def sequence_log_prob(model, xs, start_id, ys, end_id=_AUTO):
    """Summed log-probability of the answers ys (N, S) given questions xs (teacher forcing);
    symbols after a row's first end symbol count 0, as in the searches."""
    xs, starts, xp = _prepare(model, xs, start_id)
    ys = model._check_ids(ys, "answers ys")
    end = _end_id(model, end_id)
    st = _Stepper(model, xs, 1)
    try:
        total = xp.zeros(xs.shape[0])
        done = xp.zeros(xs.shape[0], dtype=bool)
        ids = starts
        for t in range(ys.shape[1]):
            logp = _log_softmax(st.step(ids))
            y = ys[:, t]
            total += xp.where(done, 0, logp[xp.arange(len(y)), y])
            if end is not None:
                done |= y == end
            ids = y
    finally:
        st.close()
    return backend.to_cpu(total)
