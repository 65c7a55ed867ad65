"""Greedy and beam search for every seq2seq model (Seq2seq, PeekySeq2seq, AttentionSeq2seq),
over many questions at once, written once over the models' decoding interface
(models.seq2seq.EncoderDecoder):

    state = model.start(xs, k)               k rows per question, rows n k .. n k + k - 1
    scores, state = model.step(ids, state)   one step for every row: ids (B,) -> scores (B, V)
                                             (the state passed in is used up)
    state = model.select(state, rows)        rows reordered within each question's k rows
    state = model.keep(state, questions)     (optional) only the questions (N',) given, from now
                                             on; None where the model cannot drop questions
    model.end_id, model.length_order(xs), model.vocab_size, model.check_ids(ids, what)

    greedy_search(model, xs, start_id, sample_size)              -> (N, sample_size) ids
    beam_search(model, xs, start_id, sample_size, k=5)           -> (N, sample_size) ids
    beam_search(..., k=5, nbest=n)  -> (N, n, sample_size) ids, (N, n) log-probs, best first
    sequence_log_prob(model, xs, start_id, ys)                   -> (N,) sum of log p(y_t | ...)

The end symbol (model.end_id, e.g. AttentionSeq2seq's pad id): once a row or beam has emitted
it, it only emits end symbols at no cost, and decoding stops when every row has ended. Models
without one decode sample_size symbols.
"""
import numpy as np

from . import backend
from .backend import get_array_module

_AUTO = object()


def start_ids(start_id, N, xp):
    """The first input of each of N rows: start_id (one id, or N ids) as an int64 array (N,)."""
    s = backend.asarray(start_id)
    if s.ndim == 0:
        return xp.full((N,), int(s), dtype=np.int64)
    if s.size != N:
        raise ValueError(f"start_id needs one id or {N} ids (one per question), "
                         f"got shape {s.shape}")
    return s.reshape(N).astype(np.int64)


def _prepare(model, xs, start_id, sample_size=1):
    if isinstance(sample_size, bool) or not isinstance(sample_size, (int, np.integer)) \
            or sample_size < 0:
        raise ValueError(f"sample_size must be an integer >= 0, got {sample_size!r}")
    xs = model.check_ids(xs, "questions xs")
    xp = get_array_module(xs)
    starts = start_ids(start_id, xs.shape[0], xp)
    V = model.vocab_size
    if starts.size and (int(starts.min()) < 0 or int(starts.max()) >= V):
        raise ValueError(f"start id outside the model's vocabulary [0, {V})")
    return xs, starts, xp


def _end_id(model, end_id):
    return model.end_id if end_id is _AUTO else end_id


def _log_softmax(scores):
    xp = get_array_module(scores)
    s = scores.astype(np.float64)
    s -= s.max(axis=1, keepdims=True)
    s -= xp.log(xp.exp(s).sum(axis=1, keepdims=True))
    return s


def _batches(model, xs, batch_size):
    """Row sets of at most batch_size questions (None: all), in the model's length order where
    it has one (so that each batch is trimmed to its longest question); each as (rows for the
    NumPy result, rows for xs on its device)."""
    N = xs.shape[0]
    bs = batch_size or N
    order = model.length_order(xs) if N > bs else None
    if order is None:
        return [(slice(s, s + bs),) * 2 for s in range(0, N, bs)]
    return [(order[s:s + bs], backend.asarray(order[s:s + bs])) for s in range(0, N, bs)]


def greedy_search(model, xs, start_id, sample_size, end_id=_AUTO, batch_size=500):
    """The most likely symbol at every step, for all questions xs (N, T) at once (in batches of
    ``batch_size``; None: one batch) -> (N, sample_size) NumPy array; stops early once every row
    has ended. Rows that have ended leave the model's state (model.keep) once they are
    KEEP_FRACTION of those still stepped."""
    xs, starts, xp = _prepare(model, xs, start_id, sample_size)
    end = _end_id(model, end_id)
    out = np.full((xs.shape[0], sample_size), -1 if end is None else end, dtype=np.int64)
    for rows, dev_rows in _batches(model, xs, batch_size):
        state = model.start(xs[dev_rows])
        ids = starts[dev_rows]
        B = ids.shape[0]
        res = xp.full((B, sample_size), -1 if end is None else end, dtype=np.int64)
        live = None  # the batch rows still stepped (None: all of them)
        shrink = hasattr(model, "keep")  # whether the model can drop rows
        done = xp.zeros(B, dtype=bool)
        steps = 0
        for t in range(sample_size):
            scores, state = model.step(ids, state)
            ids = scores.argmax(axis=1)
            steps = t + 1
            if end is None:
                res[:, t] = ids
                continue
            ids = xp.where(done, end, ids)
            if live is None:
                res[:, t] = ids
            else:
                res[live, t] = ids
            done |= ids == end
            ended = int(done.sum())
            if ended == done.shape[0]:
                break
            if shrink and ended and ended >= KEEP_FRACTION * done.shape[0]:
                kept = xp.flatnonzero(~done)
                smaller = model.keep(state, kept)
                shrink = smaller is not None
                if shrink:
                    state, ids, done = smaller, ids[kept], done[kept]
                    live = kept if live is None else live[kept]
        if steps:
            out[rows, :steps] = backend.to_cpu(res[:, :steps])
    return out


KEEP_FRACTION = 0.125  # rows (or questions) that have ended, as a share of those still stepped,
#                        at which they leave the state (each time costs a copy of the state;
#                        0: at every step where one ends)


def beam_search(model, xs, start_id, sample_size, k=5, length_penalty=0.0, end_id=_AUTO,
                batch_size=200, return_scores=False, nbest=None):
    """Beam search of width k for every question of xs (N, T), all questions' beams advanced
    together (in batches of ``batch_size`` questions) -> (N, sample_size) NumPy array of the best
    sequence per question (and, with return_scores, its summed log-probability (N,)).
    nbest=n (1 <= n <= k): the n best final hypotheses of each question instead, best first,
    as (N, n, sample_size) ids and their summed log-probabilities (N, n) (always returned).

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
    if k > model.vocab_size:
        raise ValueError(f"beam width {k} is larger than the vocabulary ({model.vocab_size})")
    n = 1 if nbest is None else nbest
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= k:
        raise ValueError(f"nbest must be an integer in [1, k={k}], got {nbest!r}")
    xs, starts, xp = _prepare(model, xs, start_id, sample_size)
    end = _end_id(model, end_id)
    N = xs.shape[0]
    out = np.full((N, n, sample_size), -1 if end is None else end, dtype=np.int64)
    best_scores = np.zeros((N, n))
    for rows, dev_rows in _batches(model, xs, batch_size):
        seqs, scores = _beam_batch(model, xs[dev_rows], starts[dev_rows], sample_size, int(k),
                                   float(length_penalty), end, xp, int(n))
        out[rows, :, :seqs.shape[2]] = seqs
        best_scores[rows] = scores
    if nbest is not None:
        return out, best_scores
    return (out[:, 0], best_scores[:, 0]) if return_scores else out[:, 0]


def _beam_batch(model, xs, starts, sample_size, k, alpha, end, xp, nbest=1):
    """The nbest best hypotheses of each question: ids (N, nbest, steps) and summed
    log-probabilities (N, nbest).

    A question is settled once all its k hypotheses have finished, or (without length
    normalisation, where a score can only fall) once its nbest best hypotheses have finished
    with scores above every unfinished one's: its answer is then taken, and it leaves the
    model's state (model.keep) when the settled questions are KEEP_FRACTION of those still
    stepped."""
    N, V = xs.shape[0], model.vocab_size
    widen = getattr(model, "widen", None) if k > 1 else None
    # the first step: every question's k rows are the same, with one live hypothesis; where the
    # model can widen a state, it runs on one row per question (k rows from the second)
    state = model.start(xs, 1 if widen else k)
    score = xp.full((N, k), -xp.inf)
    score[:, 0] = 0  # one live hypothesis per question at the start
    length = xp.zeros((N, k))
    done = xp.zeros((N, k), dtype=bool)
    seqs = xp.zeros((N, k, sample_size), dtype=np.int64)
    out_seqs = xp.full((N, nbest, sample_size), 0 if end is None else end, dtype=np.int64)
    out_scores = xp.zeros((N, nbest))
    live = xp.arange(N)  # the questions still stepped, in the state's order
    settled = xp.zeros(N, dtype=bool)  # of those, the ones whose answer is taken
    shrink = end is not None and hasattr(model, "keep")  # whether settled questions may leave
    ids = starts if widen else starts.repeat(k)
    if end is not None:
        after_end = xp.full(V, -xp.inf)  # a finished hypothesis: end symbols at no cost
        after_end[end] = 0
    steps = 0
    for t in range(sample_size):
        n = live.shape[0]
        scores, state = model.step(ids, state)
        if widen and t == 0:  # rows 1 .. k - 1 of each question: -inf scores, never taken
            scores = xp.repeat(scores, k, axis=0)
            state = widen(state, k)
        logp = _log_softmax(scores).reshape(n, k, V)
        if end is not None:
            logp = xp.where(done[:, :, None], after_end, logp)
        cand = (score[:, :, None] + logp).reshape(n, k * V)
        rank = cand
        if alpha:
            m = (length + ~done).repeat(V, axis=1)  # length if this candidate is taken
            rank = cand / m ** alpha
        top = _top_k(rank, k, xp)                                            # (n, k)
        beam, tok = top // V, top % V
        score = xp.take_along_axis(cand, top, axis=1)
        length = xp.take_along_axis(length + ~done, beam, axis=1)
        done = xp.take_along_axis(done, beam, axis=1)
        seqs[:, :, :t] = xp.take_along_axis(seqs[:, :, :t], beam[:, :, None], axis=1)
        seqs[:, :, t] = tok
        steps = t + 1
        state = model.select(state, (xp.arange(n)[:, None] * k + beam).reshape(-1))
        ids = tok.reshape(-1)
        if end is None:
            continue
        done |= tok == end
        if bool(done.all()):
            break
        if not shrink:
            continue
        now = done.all(axis=1)
        if not alpha and nbest < k:  # the nbest best have finished above every live score
            head = done[:, :nbest].all(axis=1)
            beaten = xp.where(done, -xp.inf, score).max(axis=1) < score[:, nbest - 1]
            now |= head & beaten
        now &= ~settled
        if bool(now.any()):
            q = xp.flatnonzero(now)
            best = _final(score[q], length[q], alpha, nbest, xp)
            out_seqs[live[q], :, :steps] = seqs[q[:, None], best, :steps]
            out_scores[live[q]] = xp.take_along_axis(score[q], best, axis=1)
            settled |= now
        if bool(settled.all()):
            break
        gone = int(settled.sum())
        if gone and gone >= KEEP_FRACTION * n:
            kept = xp.flatnonzero(~settled)
            smaller = model.keep(state, kept)
            shrink = smaller is not None
            if shrink:
                state = smaller
                ids = ids.reshape(n, k)[kept].reshape(-1)
                score, length, done, seqs = score[kept], length[kept], done[kept], seqs[kept]
                live, settled = live[kept], settled[kept]
    rest = xp.flatnonzero(~settled)
    if rest.size:
        best = _final(score[rest], length[rest], alpha, nbest, xp)
        out_seqs[live[rest], :, :steps] = seqs[rest[:, None], best, :steps]
        out_scores[live[rest]] = xp.take_along_axis(score[rest], best, axis=1)
    return backend.to_cpu(out_seqs[:, :, :steps]), backend.to_cpu(out_scores)


def _final(score, length, alpha, nbest, xp):
    """The beam positions of each question's nbest best hypotheses (n, nbest), best first."""
    final = score / xp.maximum(length, 1) ** alpha if alpha else score
    return _top_k(final, nbest, xp)


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
    ys = model.check_ids(ys, "answers ys")
    if ys.shape[0] != xs.shape[0]:
        raise ValueError(f"xs has {xs.shape[0]} rows but ys has {ys.shape[0]}")
    end = _end_id(model, end_id)
    state = model.start(xs)
    total = xp.zeros(xs.shape[0])
    done = xp.zeros(xs.shape[0], dtype=bool)
    ids = starts
    for t in range(ys.shape[1]):
        scores, state = model.step(ids, state)
        y = ys[:, t]
        total += xp.where(done, 0, _log_softmax(scores)[xp.arange(len(y)), y])
        if end is not None:
            done |= y == end
        ids = y
    return backend.to_cpu(total)
