"""The numpy engine's ops around the LSTM (NumPy, and CuPy arrays through the same calls where
the cupy engine has no code of its own): the reference the other engines are tested against.
Signatures are the same in every engine (see fastseq.ops)."""
import numpy as np

from .. import backend
from ..backend import get_array_module

SMALL_PRODUCT = 1 << 26  # multiply-adds: smaller products run on one BLAS thread (bits, load)


def matmul(a, b, out=None):
    """a @ b, written into out when given."""
    macs = (a.shape[-2] if a.ndim > 1 else 1) * a.shape[-1] * (b.shape[-1] if b.ndim > 1 else 1)
    if get_array_module(a) is np and macs < SMALL_PRODUCT:
        with backend.single_blas_thread():
            return _matmul(a, b, out)
    return _matmul(a, b, out)


def _matmul(a, b, out):
    if out is None:
        return a @ b
    out[...] = a @ b
    return out


def exp_rows(S):
    """S = exp(S) in place for scores already shifted to <= 0; returns the row sums."""
    xp = get_array_module(S)
    xp.exp(S, out=S)
    return S.sum(axis=1)


def softmax_cross_entropy(scores, labels, ignore_label=-1):
    """Fused softmax + mean cross-entropy over rows whose label != ignore_label (see
    fastseq.functions.softmax_cross_entropy); scores becomes the gradient."""
    xp = get_array_module(scores)
    M, V = scores.shape
    mask = labels != ignore_label
    wrong = mask & ((labels < 0) | (labels >= V))
    if bool(wrong.any()):  # a wrong label would silently pick another row's score
        bad = int(xp.flatnonzero(wrong)[0])
        raise ValueError(f"label {int(labels[bad])} at position {bad} is outside [0, {V}) "
                         f"(and is not the ignore label {ignore_label})")
    n_valid = int(mask.sum())
    all_valid = n_valid == M  # the common case: no masking arithmetic at all
    safe = labels if all_valid else xp.where(mask, labels, 0)
    # Stability shift: the global max (one fast reduction, where per-row maxima over short rows
    # are slow in NumPy). If a row then underflows to z ~ 0, redo with per-row maxima.
    shift = scores.max()
    flat = scores.reshape(-1)  # a view: scores is contiguous here
    at_label = xp.arange(M) * V + safe
    picked = flat[at_label] - shift  # log-softmax numerator
    e = xp.exp(scores - shift)
    ones = xp.ones(V, dtype=scores.dtype)
    z = matmul(e, ones)  # row sums as one matrix-vector product
    if float(z.min()) < 1e-30:
        row_max = scores.max(axis=1, keepdims=True)
        picked = flat[at_label] - row_max[:, 0]
        xp.exp(scores - row_max, out=e)
        z = matmul(e, ones)
    scores[...] = e
    denom = scores.dtype.type(max(n_valid, 1))
    logp = picked - xp.log(z)
    if all_valid:
        loss = -logp.sum() / denom
        scores /= (z * denom)[:, None]
        flat[at_label] -= 1 / denom
    else:
        w = mask.astype(scores.dtype) / denom
        loss = -(logp * w).sum()
        scores *= (w / z)[:, None]
        flat[at_label] -= w
    return float(loss), scores


def embed_gather(W, idx):
    """(W[idx], the ids kept for embed_scatter); ValueError naming the range for an id outside
    [0, V)."""
    if idx.size and not backend.skip_id_check(idx) and \
            (int(idx.min()) < 0 or int(idx.max()) >= W.shape[0]):
        _out_of_range(idx, W.shape[0])
    return W[idx], idx


def _out_of_range(idx, V):
    raise ValueError(f"token id out of range: ids must be in [0, {V}), "
                     f"got min {int(idx.min())}, max {int(idx.max())}")


def embed_scatter(dW, idx, dout, accumulate=False):
    """dW (+)= the rows of dout added at idx (zeroed first unless accumulate)."""
    xp = get_array_module(dW)
    D = dW.shape[1]
    if not accumulate and not (xp is np and dW.shape[0] <= 64):
        dW[...] = 0
    # scatter-add of rows: add.at is slow on NumPy, so sort and reduce, or one small product
    ids = idx.ravel()
    d = dout.reshape(-1, D)
    if xp is not np:
        xp.add.at(dW, ids, d)
        return
    V = dW.shape[0]
    if V <= 64:  # a small table: dW (+)= onehot(ids)^T d, one small product
        onehot = np.zeros((ids.size, V), dtype=d.dtype)
        onehot[np.arange(ids.size), ids] = 1
        if accumulate:
            dW += onehot.T @ d
        else:
            np.matmul(onehot.T, d, out=dW)
    elif ids.size * 4 < V:  # few ids, a big table: add.at over rows only
        xp.add.at(dW, ids, d)
    else:
        order = xp.argsort(ids, kind="stable")
        sids = ids[order]
        starts = xp.flatnonzero(xp.r_[True, sids[1:] != sids[:-1]])
        rows = sids[starts]
        sums = xp.add.reduceat(d[order], starts, axis=0)
        if accumulate:
            dW[rows] += sums  # rows are unique here
        else:
            dW[rows] = sums


def clip_grads(grads, max_norm):
    """Scale all grads in place by max_norm / (total_norm + 1e-6) when that is below 1; returns
    the norm before clipping."""
    total = 0.0
    with backend.single_blas_thread():
        for g in grads:
            xp = get_array_module(g)
            flat = g.reshape(-1)  # a view for contiguous grads: no (g * g) temporary
            total += float(xp.dot(flat, flat))
    total = total ** 0.5
    rate = max_norm / (total + 1e-6)
    if rate < 1:
        for g in grads:
            g *= rate
    return total


def adam_update(params, grads, ms, vs, lr, beta1, beta2, step, state=None):
    """One Adam step (step: 1 for the first) in place; returns the engine's working state for
    the next call (here a scratch buffer, reused across parameters and steps)."""
    lr_t = lr * (1.0 - beta2 ** step) ** 0.5 / (1.0 - beta1 ** step)
    for p, g, m, v in zip(params, grads, ms, vs):
        xp = get_array_module(p)
        state = _scratch(state, p, params)
        d = state[:p.size].reshape(p.shape)  # in place: no temporaries
        xp.subtract(g, m, out=d)
        d *= 1 - beta1
        m += d
        xp.multiply(g, g, out=d)
        d -= v
        d *= 1 - beta2
        v += d
        xp.sqrt(v, out=d)
        d += 1e-7
        xp.divide(m, d, out=d)
        d *= lr_t
        p -= d
    return state


def _scratch(buf, p, params):
    """buf if it can hold p, else a new buffer for the largest parameter (buf may be another
    engine's state)."""
    xp = get_array_module(p)
    if type(buf) is not xp.ndarray or buf.dtype != p.dtype or buf.size < p.size:
        buf = xp.empty(max(q.size for q in params), p.dtype)
    return buf


# Inverted dropout masks from a counter-based hash. A draw has a key k < 2^53, split into
# a = k mod 2^32 and b = k div 2^32; element i (flat, C order, i < 2^32) gets the 32 bits
#     z = fmix(fmix(i * 0x9E3779B9 ^ a) + b)        (arithmetic mod 2^32)
# (fmix: MurmurHash3's 32-bit finaliser) and is kept when z >> 8, a uniform 24-bit number, is
# below ceil(keep * 2^24). Nothing is stored between forward and backward but the key.
KEY_BITS = 53  # keys below 2^53 (exact in float64)


def dropout_params(keep, key, dtype):
    """(a, b, threshold, scale) of a draw: the key's two halves, ceil(keep 2^24), 1/keep in
    dtype."""
    if not 0 <= int(key) < 1 << KEY_BITS:
        raise ValueError(f"a dropout key must be in [0, 2^{KEY_BITS}), got {key}")
    thr = -int(-keep * (1 << 24) // 1)  # exact: keep * 2^24 only shifts the exponent
    t = np.dtype(dtype).type
    return int(key) & 0xFFFFFFFF, int(key) >> 32, thr, t(1) / t(keep)


def _fmix32(z):
    """MurmurHash3's finaliser on a uint32 array, in place."""
    z ^= z >> np.uint32(16)
    z *= np.uint32(0x85EBCA6B)  # uint32 arrays wrap around: arithmetic mod 2^32
    z ^= z >> np.uint32(13)
    z *= np.uint32(0xC2B2AE35)
    z ^= z >> np.uint32(16)
    return z


def dropout_mask(shape, dtype, keep, key, xp=np):
    """The inverted-dropout mask of the draw with this key, an xp array: 1/keep where kept
    (probability keep), else 0 (see above)."""
    a, b, thr, scale = dropout_params(keep, key, dtype)
    n = int(np.prod(shape, dtype=np.int64))
    if n > 0xFFFFFFFF:
        raise ValueError(f"dropout takes fewer than 2^32 elements, got {n}")
    z = xp.arange(n, dtype=np.uint32)
    z *= np.uint32(0x9E3779B9)
    z ^= np.uint32(a)
    z = _fmix32(z)
    z += np.uint32(b)
    z = _fmix32(z)
    z >>= np.uint32(8)
    mask = (z < np.uint32(thr)).astype(dtype)
    mask *= scale
    return mask.reshape(shape)


def dropout(xs, keep, key, out=None):
    """xs * dropout_mask(xs.shape, xs.dtype, keep, key): a new array, or written into out (a
    C-contiguous array of xs's shape and dtype, which may be xs itself)."""
    xp = get_array_module(xs)
    mask = dropout_mask(xs.shape, xs.dtype, keep, key, xp)
    if out is None:
        return xs * mask
    if not dropout_out_ok(xs, out):
        raise ValueError(f"dropout's out must be a C-contiguous {xs.dtype}{xs.shape} array, got "
                         f"{out.dtype}{out.shape}")
    return xp.multiply(xs, mask, out=out)


def dropout_out_ok(xs, out):
    """Whether out can take dropout(xs)'s result."""
    return (out.shape == xs.shape and out.dtype == xs.dtype and out.flags.c_contiguous
            and getattr(out.flags, "writeable", True))  # (CuPy's flags have no writeable)
