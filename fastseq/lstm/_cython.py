"""Cython LSTM engine (CPU, float32 and float64): fastseq/_ext/_lstm_cpu.pyx does the work.

Same interface as the NumPy reference engine (_numpy.py):
    forward(xs, Wx, Wh, b, h0, c0) -> hs, hT, cT, cache       xs (N, T, D), hs (N, T, H)
    backward(dhs, cache, grads)    -> dxs, dh0                 grads = [dWx, dWh, db], written in place

Importing this module raises ImportError when the extension is not built; fastseq.lstm then uses
the NumPy engine. Buffers are time-major (hs and dxs come back as transposed views of them) and
backward overwrites the cached gates with their gradients, so a cache serves one backward only
(as in TimeLSTM, which drops it after backward).

The internal buffers (gates, cells, tanh(cells), time-major inputs: never handed to the caller)
go back to a small pool when their cache is used up or dropped, and the next forward of the same
shape reuses them: fresh memory costs the kernel a page fault and a page clear per 4 KiB, which
is a third of a large-batch forward. The pool keeps at most POOL_MAX_BYTES (clear_pool() empties
it).
"""
import threading
from collections import OrderedDict

import numpy as np

from .._ext import _lstm_cpu
from . import _numpy

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# OpenMP threads for the per-step gate math; used only where a step has at least
# PARALLEL_MIN_ELEMENTS = N*H elements (below that, thread start-up costs more than it saves,
# and OpenBLAS already runs its products on every core).
NUM_THREADS = _lstm_cpu.max_threads()
PARALLEL_MIN_ELEMENTS = 1 << 17


def _check(name, a, dtype, shape):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}, expected {dtype} (all LSTM arrays share one)")
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    return np.ascontiguousarray(a)


def forward(xs, Wx, Wh, b, h0, c0):
    if xs.ndim != 3:
        raise ValueError(f"xs must be (N, T, D), got shape {xs.shape}")
    N, T, D = xs.shape
    dtype = np.dtype(Wx.dtype)
    if dtype not in DTYPES:
        raise TypeError(f"the Cython LSTM engine supports float32 and float64, not {dtype}")
    H = Wh.shape[0]
    xs = _check("xs", xs, dtype, (N, T, D))
    Wx = _check("Wx", Wx, dtype, (D, 4 * H))
    Wh = _check("Wh", Wh, dtype, (H, 4 * H))
    b = _check("b", b, dtype, (4 * H,))
    h0 = _check("h0", h0, dtype, (N, H))
    c0 = _check("c0", c0, dtype, (N, H))
    if N == 0 or T == 0 or D == 0 or H == 0:  # degenerate: BLAS needs non-empty leading dims
        hs, hT, cT, cache = _numpy.forward(xs, Wx, Wh, b, h0, c0)
        return hs, hT, cT, ("numpy", cache)
    key = (T, N, D, H, dtype.str)
    work = _pool_take(key)
    if work is None:
        work = (np.empty((T, N, D), dtype), np.empty((T, N, 4 * H), dtype),
                np.empty((T + 1, N, H), dtype), np.empty((T, N, H), dtype))
    X, A, Cb, TC = work
    Hb = np.empty((T + 1, N, H), dtype)  # hs is a view of it: never pooled
    threads = NUM_THREADS if N * H >= PARALLEL_MIN_ELEMENTS else 1
    h0_zero = _lstm_cpu.forward(xs, Wx, Wh, b, h0, c0, X, A, Hb, Cb, TC, threads)
    cache = _Cache(key, work, Wx, Wh, Hb, h0_zero)
    return Hb[1:].transpose(1, 0, 2), Hb[T].copy(), Cb[T].copy(), cache


def backward(dhs, cache, grads):
    if isinstance(cache, tuple) and cache and cache[0] == "numpy":
        return _numpy.backward(dhs, cache[1], grads)
    if not isinstance(cache, _Cache) or cache.work is None:
        raise ValueError("backward() needs the cache of a forward() of the Cython engine, and "
                         "each cache serves one backward only")
    X, A, Cb, TC = cache.work
    Wx, Wh, Hb, h0_zero = cache.Wx, cache.Wh, cache.Hb, cache.h0_zero
    T, N, D = X.shape
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
    for name, g, shape in (("dWx", dWx, (D, 4 * H)), ("dWh", dWh, (H, 4 * H)), ("db", db, (4 * H,))):
        if g.shape != shape:
            raise ValueError(f"{name} has shape {g.shape}, expected {shape}")
        # write straight into the gradient when it is a C-contiguous array of our dtype
        outs.append(g if (g.dtype == dtype and g.flags.c_contiguous and g.flags.writeable)
                    else np.empty(shape, dtype))
    dX = np.empty((T, N, D), dtype)
    dh0 = np.empty((N, H), dtype)
    threads = NUM_THREADS if N * H >= PARALLEL_MIN_ELEMENTS else 1
    try:
        _lstm_cpu.backward(dhs, X, Wx, Wh, A, Hb, Cb, TC, outs[0], outs[1], outs[2], dX, dh0,
                           h0_zero, threads)
    finally:
        cache.release()  # A now holds dA: the cache is used up either way
    for g, o in zip(grads, outs):
        if g is not o:
            g[...] = o
    return dX.transpose(1, 0, 2), dh0


# --- cache and buffer pool -------------------------------------------------------------------

POOL_MAX_BYTES = 256 << 20

_pool = OrderedDict()  # key -> list of buffer tuples, least recently returned first
_pool_bytes = 0
_pool_lock = threading.Lock()


def _nbytes(work):
    return sum(a.nbytes for a in work)


def _pool_take(key):
    global _pool_bytes
    with _pool_lock:
        sets = _pool.get(key)
        if not sets:
            return None
        work = sets.pop()
        if not sets:
            del _pool[key]
        _pool_bytes -= _nbytes(work)
        return work


def _pool_give(key, work):
    global _pool_bytes
    size = _nbytes(work)
    if size > POOL_MAX_BYTES:
        return
    with _pool_lock:
        _pool.setdefault(key, []).append(work)
        _pool.move_to_end(key)
        _pool_bytes += size
        while _pool_bytes > POOL_MAX_BYTES:  # drop the least recently returned sets
            old_key, sets = next(iter(_pool.items()))
            _pool_bytes -= _nbytes(sets.pop(0))
            if not sets:
                del _pool[old_key]


def clear_pool():
    """Free the pooled buffers."""
    global _pool_bytes
    with _pool_lock:
        _pool.clear()
        _pool_bytes = 0


class _Cache:
    """What backward needs; hands its internal buffers to the pool once used up or dropped."""

    __slots__ = ("key", "work", "Wx", "Wh", "Hb", "h0_zero")

    def __init__(self, key, work, Wx, Wh, Hb, h0_zero):
        self.key, self.work = key, work
        self.Wx, self.Wh, self.Hb, self.h0_zero = Wx, Wh, Hb, h0_zero

    def release(self):
        work, self.work = self.work, None
        if work is not None:
            _pool_give(self.key, work)

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass
