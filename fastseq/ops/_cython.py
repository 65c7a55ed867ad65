"""The cython engine (CPU, float32 and float64): the compiled kernels of fastseq/_ext/_cpu, with
the numpy engine's code for operands they do not take (empty, or odd-strided).
Same signatures as the numpy engine (see fastseq.ops). Importing this module raises ImportError
when the extension is not built.

LSTM buffers are time-major (hs and dxs come back as transposed views of them) and backward
overwrites the cached gates with their gradients, so a cache serves one backward only. The
internal buffers (gates, cells, tanh(cells), time-major inputs, backward's scratch: never handed
to the caller) go back to the buffer pool (_pool.py) when their cache is used up or dropped.

Threads: the kernels cut their work into chunks fixed by the shapes and run them on up to
fastseq.backend's thread count; the results do not depend on it.
"""
import threading

import numpy as np

from .. import backend
from . import _numpy, _numpy_math, _pool
from ._numpy import dropout_mask  # noqa: F401  (dropout below applies it)

_cpu = backend.compiled()
if _cpu is None:
    raise ImportError("fastseq._ext._cpu is not built")

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
TAKES_IDS = True  # xs may be integer ids standing for one-hot rows (see _numpy)


def _threads():
    return backend.config.threads


def _check(name, a, dtype, shape, cast=False):
    """C-contiguous array of dtype and shape. Weights must already have the dtype (of Wx);
    inputs and states (cast=True) are converted, as the NumPy engine's arithmetic would."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != dtype and not cast:
        raise TypeError(f"{name} has dtype {a.dtype} but Wx has {dtype}: the weights must share one")
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    return np.ascontiguousarray(a, dtype=dtype)


def _inputs(xs, Wx, Wh, b, h0, c0, start=None):
    """forward's arguments checked and made C-contiguous in Wx's dtype: (xs, ids, Wx, Wh, b, h0,
    c0, row_bias), with xs (N, T, 0) and ids (N, T) int64 for one-hot inputs, ids None else.
    With start (final_state's), h0 and c0 may have any number of rows."""
    one_hot = xs.ndim == 2 and np.dtype(xs.dtype).kind in "iu"  # ids (see _numpy)
    if xs.ndim != 3 and not one_hot:
        raise ValueError(f"xs must be (N, T, D) or integer ids (N, T), got shape {xs.shape}")
    dtype = np.dtype(Wx.dtype)
    if dtype not in DTYPES:
        raise TypeError(f"the Cython LSTM engine supports float32 and float64, not {dtype}")
    H = Wh.shape[0]
    if one_hot:
        N, T = xs.shape
        D = Wx.shape[0]  # the one-hot width V
        ids = np.ascontiguousarray(xs, dtype=np.int64)
        xs = np.empty((N, T, 0), dtype)
    else:
        N, T, D = xs.shape
        ids = None
        xs = _check("xs", xs, dtype, (N, T, D), cast=True)
    Wx = _check("Wx", Wx, dtype, (D, 4 * H))
    Wh = _check("Wh", Wh, dtype, (H, 4 * H))
    row_bias = getattr(b, "ndim", 1) == 2  # one bias per row (see _numpy)
    b = _check("b", b, dtype, (N, 4 * H) if row_bias else (4 * H,))
    M = N if start is None else h0.shape[0]
    h0 = _check("h0", h0, dtype, (M, H), cast=True)
    c0 = _check("c0", c0, dtype, (M, H), cast=True)
    return xs, ids, Wx, Wh, b, h0, c0, row_bias


def forward(xs, Wx, Wh, b, h0, c0):
    xs, ids, Wx, Wh, b, h0, c0, row_bias = _inputs(xs, Wx, Wh, b, h0, c0)
    one_hot = ids is not None
    (N, T), D, H, dtype = xs.shape[:2], Wx.shape[0], Wh.shape[0], Wx.dtype
    if N == 0 or T == 0 or D == 0 or H == 0:  # degenerate: BLAS needs non-empty leading dims
        hs, hT, cT, cache = _numpy.forward(ids if one_hot else xs, Wx, Wh, b, h0, c0)
        return hs, hT, cT, ("numpy", cache)
    key = (T, N, D, H, dtype.str, one_hot)
    work = _pool.take(key)
    if work is None:
        work = (np.empty((T, N, 0 if one_hot else D), dtype), np.empty((T, N, 4 * H), dtype),
                np.empty((T + 1, N, H), dtype), np.empty((T, N, H), dtype),
                np.empty(_cpu.scratch_size(N, D, H), dtype))  # backward's
    X, A, Cb, TC, _ = work
    Hb = np.empty((T + 1, N, H), dtype)  # hs is a view of it: never pooled
    h0_zero = _cpu.forward(xs, Wx, Wh, b.reshape(-1), h0, c0, X, A, Hb, Cb, TC, _threads(),
                                row_bias, ids)
    cache = _Cache(key, work, Wx, Wh, Hb, h0_zero, row_bias, ids)
    return Hb[1:].transpose(1, 0, 2), Hb[T].copy(), Cb[T].copy(), cache


def backward(dhs, cache, grads, need_dh0=True):
    if isinstance(cache, tuple) and cache and cache[0] == "numpy":
        return _numpy.backward(dhs, cache[1], grads, need_dh0=need_dh0)
    if not isinstance(cache, _Cache) or cache.work is None:
        raise ValueError("backward() needs the cache of a forward() of the Cython engine, and "
                         "each cache serves one backward only")
    X, A, Cb, TC, scratch = cache.work
    Wx, Wh, Hb, h0_zero, row_bias = cache.Wx, cache.Wh, cache.Hb, cache.h0_zero, cache.row_bias
    ids = cache.ids
    T, N, _ = X.shape
    D = Wx.shape[0]
    H = Wh.shape[0]
    dtype = A.dtype
    dhs = np.asarray(dhs)
    if dhs.shape != (N, T, H):
        raise ValueError(f"dhs has shape {dhs.shape}, expected {(N, T, H)}")
    if dhs.dtype != dtype:
        dhs = dhs.astype(dtype)
    isz = dtype.itemsize
    if dhs.strides[2] != isz or dhs.strides[0] % isz or dhs.strides[1] % isz:
        dhs = np.ascontiguousarray(dhs)
    dWx, dWh, db = grads
    outs = []
    db_shape = (N, 4 * H) if row_bias else (4 * H,)
    for name, g, shape in (("dWx", dWx, (D, 4 * H)), ("dWh", dWh, (H, 4 * H)), ("db", db, db_shape)):
        if g.shape != shape:
            raise ValueError(f"{name} has shape {g.shape}, expected {shape}")
        # write straight into the gradient when it is a C-contiguous array of our dtype
        outs.append(g if (g.dtype == dtype and g.flags.c_contiguous and g.flags.writeable)
                    else np.empty(shape, dtype))
    dX = np.empty((T, N, 0 if ids is not None else D), dtype)
    dh0 = np.empty((N, H), dtype)
    try:
        # with per-row biases the kernel's shared db goes to a scratch vector
        db_shared = np.empty(4 * H, dtype) if row_bias else outs[2]
        _cpu.backward(dhs, X, Wx, Wh, A, Hb, Cb, TC, outs[0], outs[1], db_shared, dX, dh0,
                      scratch, h0_zero, _threads(), bool(need_dh0),
                      outs[2].reshape(-1) if row_bias else None, ids)
    finally:
        cache.release()  # A now holds dA: the cache is used up either way
    for g, o in zip(grads, outs):
        if g is not o:
            g[...] = o
    dxs = None if ids is not None else dX.transpose(1, 0, 2)
    return dxs, (dh0 if need_dh0 else None)


def step(x, Wx, Wh, b, h, c):
    """One step (see _numpy.step): final_state over a sequence of length 1 (nothing is kept for
    a backward pass). Generation calls it once a word, so arrays the kernel takes as they are
    (C-contiguous, all of one float dtype) go straight to it, and it checks their shapes; what
    it refuses goes through final_state, which converts it or says what is wrong."""
    try:
        N, H, dtype = x.shape[0], Wh.shape[0], Wx.dtype
        h_next, c_next = np.empty((N, H), dtype), np.empty((N, H), dtype)
        threads = _threads()
        _cpu.final_state(x[:, None, :], Wx, Wh, b.reshape(-1), h, c, h_next, c_next,
                         _scratch(N, H, dtype, threads), threads, b.ndim == 2)
        return h_next, c_next
    except (TypeError, ValueError, AttributeError, IndexError):
        return final_state(x[:, None, :], Wx, Wh, b, h, c)


def stepper(Wx, Wh, b):
    """step() over these weights (see _numpy.stepper): the kernel has no per-weights work."""
    return lambda x, h, c: step(x, Wx, Wh, b, h, c)


def final_state(xs, Wx, Wh, b, h0, c0, start=None, out=None):
    """forward's h_T, c_T alone (see _numpy.final_state), in blocks of rows kept in cache. The
    kernel writes into out's arrays where it takes them as they are."""
    xs, ids, Wx, Wh, b, h0, c0, row_bias = _inputs(xs, Wx, Wh, b, h0, c0, start)
    (N, T), D, H = xs.shape[:2], Wx.shape[0], Wh.shape[0]
    if N == 0 or T == 0 or D == 0 or H == 0 or h0.shape[0] == 0:
        return _numpy.final_state(ids if ids is not None else xs, Wx, Wh, b, h0, c0, start, out)
    if start is not None:
        start = np.ascontiguousarray(start, dtype=np.int64)
    h, c = (_out_array(a, (N, H), Wx.dtype) for a in (out or (None, None)))
    threads = _threads()
    _cpu.final_state(xs, Wx, Wh, b.reshape(-1), h0, c0, h, c,
                     _scratch(N, H, Wx.dtype, threads), threads, row_bias, ids, start)
    return (h, c) if out is None else _numpy.into(out, h, c)


def _out_array(a, shape, dtype):
    """a, where the kernel can write into it as it is, else a new array."""
    if (type(a) is np.ndarray and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous
            and a.flags.writeable):
        return a
    return np.empty(shape, dtype)


_local = threading.local()  # per thread: final_state's scratch, reused from call to call


def _scratch(N, H, dtype, threads):
    """Working memory of final_state over N rows: one small slot per thread. Nothing outlives
    the call, so each calling thread keeps its largest one (a fresh buffer of this size would
    cost page faults at every decoding step)."""
    size = _cpu.infer_scratch_size(N, H, threads)
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = _local.scratch = np.empty(size, dtype)
    return buf[:size]


class _Cache:
    """What backward needs; hands its internal buffers to the pool once used up or dropped."""

    __slots__ = ("key", "work", "Wx", "Wh", "Hb", "h0_zero", "row_bias", "ids")

    def __init__(self, key, work, Wx, Wh, Hb, h0_zero, row_bias=False, ids=None):
        self.key, self.work = key, work
        self.Wx, self.Wh, self.Hb, self.h0_zero = Wx, Wh, Hb, h0_zero
        self.row_bias, self.ids = row_bias, ids

    def release(self):
        work, self.work = self.work, None
        if work is not None:
            _pool.give(self.key, work)

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


clear_pool = _pool.clear


# --- the ops around the LSTM ----------------------------------------------------------------------

def matmul(a, b, out=None):
    """a @ b by the chunked kernel (chunks fixed by the shapes on fastseq's threads: the same
    bits for any thread count); NumPy's for operands it does not take."""
    if type(a) is np.ndarray and type(b) is np.ndarray and a.dtype in DTYPES \
            and b.dtype == a.dtype:
        done = _matmul_chunked(a, b, out)
        if done is not None:
            return done
    return _numpy.matmul(a, b, out)


def _matmul_chunked(a, b, out):
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] == b.shape[0] and a.shape[2] == b.shape[1]:
        res = out if out is not None else np.empty(a.shape[:2] + b.shape[2:], a.dtype)
        if (res.shape != a.shape[:2] + b.shape[2:] or res.dtype != a.dtype
                or not res.flags.c_contiguous):
            return None
        return res if _cpu.bmatmul(a, b, res, _threads()) else None
    if b.ndim != 2 or a.ndim not in (1, 2) or a.shape[-1] != b.shape[0]:
        return None
    shape = a.shape[:-1] + b.shape[1:]
    res = out if out is not None else np.empty(shape, a.dtype)
    if res.shape != shape or res.dtype != a.dtype or not res.flags.c_contiguous:
        return None
    if not _cpu.matmul(a if a.ndim == 2 else a[None], b, res if res.ndim == 2 else res[None],
                       _threads()):
        return None
    return res


def exp_rows(S):
    """S = exp(S) in place for scores already shifted to <= 0; returns the row sums."""
    if (type(S) is np.ndarray and S.dtype in DTYPES and S.ndim == 2 and S.flags.c_contiguous
            and S.flags.writeable):
        z = np.empty(S.shape[0], S.dtype)
        _cpu.exp_rows(S, z, _threads())
        return z
    return _numpy.exp_rows(S)


def softmax_cross_entropy(scores, labels, ignore_label=-1):
    """The numpy engine's, one pass per row (max, shift, exp and its sum, loss, gradient), rows
    in chunks on fastseq's threads."""
    M, V = scores.shape
    if not (type(scores) is np.ndarray and scores.dtype in DTYPES and scores.flags.c_contiguous
            and scores.flags.writeable and M and V):
        return _numpy.softmax_cross_entropy(scores, labels, ignore_label)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    has_ignore = ignore_label is not None
    ignore = int(ignore_label) if has_ignore else 0
    loss = _cpu.softmax_xent(scores, labels, ignore, has_ignore, _threads())
    return float(loss), scores


def embed_gather(W, idx):
    """One pass that checks the ids and copies the rows (see _numpy_math.embed_gather)."""
    if not (type(W) is np.ndarray and W.flags.c_contiguous and W.dtype in DTYPES):
        return _numpy.embed_gather(W, idx)
    ids = np.ascontiguousarray(idx, dtype=np.int64)
    out = np.empty(ids.shape + (W.shape[1],), dtype=W.dtype)
    if _cpu.embed_gather(W, ids.reshape(-1), out.reshape(-1, W.shape[1])) >= 0:
        _numpy_math._out_of_range(ids, W.shape[0])
    return out, ids


def embed_scatter(dW, idx, dout, accumulate=False):
    """dW (+)= the rows of dout added at idx (ids checked by embed_gather)."""
    if (type(dW) is np.ndarray and dout.ndim == 3 and idx.ndim == 2 and dout.dtype == dW.dtype
            and dW.dtype in DTYPES and dW.flags.c_contiguous and idx.dtype == np.int64
            and dout.strides[2] == dout.itemsize):
        _cpu.embed_scatter(dW, idx, dout, accumulate)
    else:
        _numpy.embed_scatter(dW, idx, dout, accumulate)


def clip_grads(grads, max_norm):
    """One fused pass for the norm and one for the scaling (see _numpy_math.clip_grads)."""
    total = _cpu.sum_squares(grads, _threads())
    if total is None:
        return _numpy.clip_grads(grads, max_norm)
    total = total ** 0.5
    rate = max_norm / (total + 1e-6)
    if rate < 1 and not _cpu.scale(grads, rate, _threads()):
        for g in grads:
            g *= rate
    return total


def adam_update(params, grads, ms, vs, lr, beta1, beta2, step, state=None):
    """One fused pass over every parameter (see _numpy_math.adam_update)."""
    lr_t = lr * (1.0 - beta2 ** step) ** 0.5 / (1.0 - beta1 ** step)
    if _cpu.adam_update(params, grads, ms, vs, lr_t, 1 - beta1, 1 - beta2, 1e-7, _threads()):
        return state
    return _numpy.adam_update(params, grads, ms, vs, lr, beta1, beta2, step, state)


def dropout(xs, keep, key, out=None):
    """xs times the dropout mask of the draw with this key, generated and applied in one
    pass (see _numpy_math.dropout_mask)."""
    if type(xs) is not np.ndarray or xs.dtype not in DTYPES or not (
            out is None or _numpy_math.dropout_out_ok(xs, out)):
        return _numpy.dropout(xs, keep, key, out)
    a, b, thr, scale = _numpy_math.dropout_params(keep, key, xs.dtype)
    x = np.ascontiguousarray(xs)
    if out is None:  # a copy made here takes the result itself
        out = x if x is not xs else np.empty(x.shape, x.dtype)
    _cpu.dropout(x.reshape(-1), out.reshape(-1), a, b, thr, float(scale), _threads())
    return out
