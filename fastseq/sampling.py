"""Sampling one id from a score vector (NumPy, length V): temperature, top-k, top-p, greedy.

    softmax_temperature(logits, temperature)  probabilities of logits / temperature
    top_k_filter(logits, k)                   keep the k largest logits, the rest -> -inf
    top_p_filter(logits, p)                   keep the smallest set of most likely words whose
                                              probability sums to >= p (nucleus), the rest -> -inf
    sample_from_logits(logits, ...)           one id (temperature / top-k / top-p / greedy)
    make_sampler(V, ...)                      the same as a fast closure (checks done once)
"""
import numpy as np

from ._checks import check_count


def make_rng(seed=None, rng=None):
    """A NumPy random generator: ``rng`` as given, else one seeded with ``seed``, else NumPy's
    global RandomState (so np.random.seed works as in the textbook)."""
    if rng is not None:
        if seed is not None:
            raise ValueError("give seed or rng, not both")
        return rng
    if seed is not None:
        return np.random.default_rng(seed)
    return np.random.mtrand._rand


MIN_TEMPERATURE = 1e-4  # below this, logits / temperature overflow or sampling is greedy anyway


def _check_temperature(temperature):
    t = float(temperature)
    if not t >= 0 or t == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    return t


def _check_top_k(top_k, V):
    return None if top_k is None else min(check_count("top_k", top_k), V)


def _check_top_p(top_p):
    if top_p is None:
        return None
    p = float(top_p)
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return p


def softmax_temperature(logits, temperature=1.0):
    """Probabilities (float64) of logits / temperature; temperature 0 puts all mass on the argmax
    (the first one on ties). -inf logits get probability 0."""
    z = np.asarray(logits, dtype=np.float64)
    t = _check_temperature(temperature)
    if t < MIN_TEMPERATURE:
        p = np.zeros(z.shape)
        p[int(np.argmax(z))] = 1.0
        return p
    z = z / t
    z -= z.max()
    np.exp(z, out=z)
    z /= z.sum()
    return z


def top_k_filter(logits, k):
    """A copy of logits with all but the k largest set to -inf (exactly k kept, ties broken by
    position)."""
    z = np.array(logits, dtype=np.float64)
    return _keep_top_k(z, _check_top_k(k, z.size))


def _keep_top_k(z, k):
    """z with all but its k largest entries set to -inf, in place (k None: all kept)."""
    if k is not None and k < z.size:
        z[np.argpartition(z, z.size - k)[:z.size - k]] = -np.inf
    return z


def top_p_filter(logits, p, temperature=1.0):
    """A copy of logits keeping only the nucleus: the most likely words (at ``temperature``) in
    order of probability until their total reaches p (at least one word); the rest -> -inf."""
    z = np.array(logits, dtype=np.float64)
    p = _check_top_p(p)
    probs = softmax_temperature(z, temperature if _check_temperature(temperature) > 0 else 1.0)
    z[_outside_nucleus(probs, p)] = -np.inf
    return z


def _outside_nucleus(w, p):
    """The indices outside the nucleus of the weights w: the largest ones, in order, until their
    total reaches p of the sum (at least one), are in it."""
    order = np.argsort(-w, kind="stable")
    cum = np.cumsum(w[order])
    return order[min(int(np.searchsorted(cum, p * cum[-1] * (1 - 1e-12))) + 1, w.size):]


_DRAW_BLOCK = 128


def _search(weights, u):
    """First index whose running sum of weights (in float64) exceeds u (the last positive weight
    when u reaches the total through rounding)."""
    cdf = np.cumsum(weights, dtype=np.float64)
    i = int(np.searchsorted(cdf, u, side="right"))
    return i if i < cdf.size else int(np.flatnonzero(weights)[-1])


def _draw(probs_unnorm, rng, starts=None):
    """Index drawn with probability proportional to the non-negative weights (float32 or
    float64; summed in float64). Two levels (the block of _DRAW_BLOCK weights, then the index
    in it) instead of one running sum over all of them: np.cumsum is a serial loop, vectorised
    sums are not. starts: np.arange(0, size, _DRAW_BLOCK), when the caller keeps it."""
    w = probs_unnorm
    if w.size <= 2 * _DRAW_BLOCK:
        return _search(w, rng.random() * w.sum(dtype=np.float64))
    if starts is None:
        starts = np.arange(0, w.size, _DRAW_BLOCK)
    cum = np.cumsum(np.add.reduceat(w, starts, dtype=np.float64))
    u = rng.random() * cum[-1]
    b = int(np.searchsorted(cum, u, side="right"))
    if b >= cum.size:  # u rounded up to the total: the last block with weight
        b = int(np.flatnonzero(np.diff(cum, prepend=0.0))[-1])
    start = b * _DRAW_BLOCK
    return start + _search(w[start:start + _DRAW_BLOCK], u - (cum[b - 1] if b else 0.0))


def make_sampler(vocab_size, skip_ids=None, temperature=1.0, top_k=None, top_p=None, greedy=False,
                 seed=None, rng=None):
    """A function logits (V,) -> sampled id, with every option checked once here."""
    V = int(vocab_size)
    t = _check_temperature(temperature)
    k = _check_top_k(top_k, V)
    p = _check_top_p(top_p)
    greedy = bool(greedy) or t < MIN_TEMPERATURE
    gen = make_rng(seed, rng)
    skip = None
    if skip_ids is not None:
        skip = np.unique(np.asarray(list(skip_ids), dtype=np.int64))
        if skip.size and (skip[0] < 0 or skip[-1] >= V):
            raise ValueError(f"skip_ids must be in [0, {V}), got {skip.tolist()}")
        if skip.size >= V:
            raise ValueError("skip_ids exclude the whole vocabulary")
        if not skip.size:
            skip = None

    starts = np.arange(0, V, _DRAW_BLOCK) if V > 2 * _DRAW_BLOCK else None
    plain = t == 1.0 and k is None and (p is None or p >= 1) and not greedy

    def sample(logits):
        # a fresh copy, in float64 unless plain sampling of float32 scores: then the shift and
        # exp stay in float32 (vectorised; NumPy's float64 exp is a scalar loop on CPUs without
        # AVX-512) and only the draw's sums are float64
        f32 = plain and getattr(logits, "dtype", None) == np.float32
        z = np.array(logits, dtype=np.float32 if f32 else np.float64).reshape(-1)
        if z.size != V:
            raise ValueError(f"expected {V} scores, got {z.size}")
        if skip is not None:
            z[skip] = -np.inf
        if greedy:
            return int(np.argmax(z))
        if t != 1.0:
            z *= 1.0 / t
        _keep_top_k(z, k)
        z -= z.max()
        np.exp(z, out=z)
        if p is not None and p < 1:
            z[_outside_nucleus(z, p)] = 0.0
        return _draw(z, gen, starts)

    return sample


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, rng=None,
                       seed=None, skip_ids=None):
    """One id sampled from softmax(logits / temperature) after top-k / top-p filtering and removing
    skip_ids; greedy (or temperature 0) returns the argmax."""
    logits = np.asarray(logits)
    return make_sampler(logits.size, skip_ids=skip_ids, temperature=temperature, top_k=top_k,
                        top_p=top_p, greedy=greedy, seed=seed, rng=rng)(logits)
