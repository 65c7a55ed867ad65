"""Cython LSTM engine (CPU, float32 and float64): fastseq/_ext/_lstm_cpu.pyx does the work.

Same interface as the NumPy reference engine (_numpy.py), where the protocol is stated. Importing
this module raises ImportError when the extension is not built.

Buffers are time-major (hs and dxs come back as transposed views of them) and backward overwrites
the cached gates with their gradients, so a cache serves one backward only. The internal buffers
(gates, cells, tanh(cells), time-major inputs, backward's scratch: never handed to the caller)
go back to the buffer pool (_pool.py) when their cache is used up or dropped.

Threads: batches of at least 2 * 32 rows run in chunks (of about 64 rows) fixed by the batch size, on up to
fastseq.backend's thread count (see the kernel's docstring); the results do not depend on it.
"""
import os

import numpy as np

from .. import backend
from . import _blas, _numpy, _pool

_lstm_cpu = backend.compiled("_lstm_cpu")
if _lstm_cpu is None:
    raise ImportError("fastseq._ext._lstm_cpu is not built")

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
TAKES_IDS = True  # xs may be integer ids standing for one-hot rows (see _numpy)


def use_blas(which):
    """Which BLAS the kernel calls: 'numpy' (NumPy's OpenBLAS; RuntimeError when it cannot be
    identified), 'scipy' (the one the kernel is compiled against) or 'auto' (NumPy's when
    found). Returns the choice in use."""
    global BLAS
    if which not in ("auto", "numpy", "scipy"):
        raise ValueError(f"unknown BLAS choice {which!r}; expected auto, numpy or scipy")
    found = _blas.numpy_blas() if which != "scipy" else None
    if found is None and which == "numpy":
        raise RuntimeError("NumPy's OpenBLAS could not be identified among the loaded libraries")
    if found is None:  # SciPy's BLAS: its thread count is not ours to set
        _lstm_cpu.set_blas(0, 0)
        _lstm_cpu.set_blas_threads(0, 0, 0)
        BLAS = "scipy"
    else:
        _lstm_cpu.set_blas(found.sgemm, found.dgemm, found.ilp64, found.sgemv, found.dgemv)
        _lstm_cpu.set_blas_threads(found.set_local, found.set_global, found.get_global)
        BLAS = f"numpy ({os.path.basename(found.path)})"
    return BLAS


def _threads():
    """Threads for the chunks (fastseq.backend's thread policy)."""
    return backend.config.lstm_threads


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
                np.empty(_lstm_cpu.scratch_size(N, D, H), dtype))  # backward's
    X, A, Cb, TC, _ = work
    Hb = np.empty((T + 1, N, H), dtype)  # hs is a view of it: never pooled
    h0_zero = _lstm_cpu.forward(xs, Wx, Wh, b.reshape(-1), h0, c0, X, A, Hb, Cb, TC, _threads(),
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
        _lstm_cpu.backward(dhs, X, Wx, Wh, A, Hb, Cb, TC, outs[0], outs[1], db_shared, dX, dh0,
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
        _lstm_cpu.final_state(x[:, None, :], Wx, Wh, b.reshape(-1), h, c, h_next, c_next,
                              _scratch(N, H, 0, dtype, threads), threads, b.ndim == 2)
        return h_next, c_next
    except (TypeError, ValueError, AttributeError, IndexError):
        return final_state(x[:, None, :], Wx, Wh, b, h, c)


def stepper(Wx, Wh, b):
    """step() over these weights (see _numpy.stepper): the kernel has no per-weights work."""
    return lambda x, h, c: step(x, Wx, Wh, b, h, c)


def final_state(xs, Wx, Wh, b, h0, c0, start=None):
    """forward's h_T, c_T alone (see _numpy.final_state), in blocks of rows kept in cache."""
    xs, ids, Wx, Wh, b, h0, c0, row_bias = _inputs(xs, Wx, Wh, b, h0, c0, start)
    (N, T), D, H = xs.shape[:2], Wx.shape[0], Wh.shape[0]
    if N == 0 or T == 0 or D == 0 or H == 0 or h0.shape[0] == 0:
        return _numpy.final_state(ids if ids is not None else xs, Wx, Wh, b, h0, c0, start)
    if start is not None:
        start = np.ascontiguousarray(start, dtype=np.int64)
    h, c = np.empty((N, H), Wx.dtype), np.empty((N, H), Wx.dtype)
    threads = _threads()
    _lstm_cpu.final_state(xs, Wx, Wh, b.reshape(-1), h0, c0, h, c,
                          _scratch(N, H, 0, Wx.dtype, threads), threads, row_bias, ids, start)
    return h, c


def greedy(ids, Wx, Wh, b, h, c, Wout, bout, steps):
    """Greedy decoding (see _numpy.greedy), in blocks of rows kept in cache."""
    dtype = np.dtype(Wx.dtype)
    if dtype not in DTYPES:
        raise TypeError(f"the Cython LSTM engine supports float32 and float64, not {dtype}")
    N, H, V = h.shape[0], Wh.shape[0], Wout.shape[1]
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.shape != (N,):
        raise ValueError(f"ids has shape {ids.shape}, expected {(N,)}")
    Wx = _check("Wx", Wx, dtype, (Wx.shape[0], 4 * H))
    Wh = _check("Wh", Wh, dtype, (H, 4 * H))
    b = _check("b", b, dtype, (N, 4 * H) if b.ndim == 2 else (4 * H,))
    h = _check("h", h, dtype, (N, H), cast=True)
    c = _check("c", c, dtype, (N, H), cast=True)
    Wout = _check("Wout", Wout, dtype, (H, V))
    bout = _check("bout", bout, dtype, (N, V) if bout.ndim == 2 else (V,))
    out = np.empty((N, steps), np.int64)
    if H == 0:
        return _numpy.greedy(ids, Wx, Wh, b, h, c, Wout, bout, steps)
    threads = _threads()
    _lstm_cpu.greedy(ids, Wx, Wh, b.reshape(-1), h, c, Wout, bout.reshape(-1), out,
                     _scratch(N, H, V, dtype, threads), threads, b.ndim == 2, bout.ndim == 2)
    return out


def _scratch(N, H, V, dtype, threads):
    """Working memory of final_state and greedy over N rows: one small slot per thread."""
    return np.empty(_lstm_cpu.infer_scratch_size(N, H, V, threads), dtype)


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
use_blas(backend.config.blas)
