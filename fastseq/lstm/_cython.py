"""Cython LSTM engine (CPU, float32 and float64): fastseq/_ext/_lstm_cpu.pyx does the work.

Same interface as the NumPy reference engine (_numpy.py):
    forward(xs, Wx, Wh, b, h0, c0) -> hs, hT, cT, cache       xs (N, T, D), hs (N, T, H)
    backward(dhs, cache, grads)    -> dxs, dh0                 grads = [dWx, dWh, db], written in place

Importing this module raises ImportError when the extension is not built; fastseq.lstm then uses
the NumPy engine. Buffers are time-major (hs and dxs come back as transposed views of them) and
backward overwrites the cached gates with their gradients, so a cache serves one backward only
(as in TimeLSTM, which drops it after backward).
"""
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
    X = np.empty((T, N, D), dtype)
    A = np.empty((T, N, 4 * H), dtype)
    Hb = np.empty((T + 1, N, H), dtype)
    Cb = np.empty((T + 1, N, H), dtype)
    TC = np.empty((T, N, H), dtype)
    threads = NUM_THREADS if N * H >= PARALLEL_MIN_ELEMENTS else 1
    h0_zero = _lstm_cpu.forward(xs, Wx, Wh, b, h0, c0, X, A, Hb, Cb, TC, threads)
    cache = ["cython", X, Wx, Wh, A, Hb, Cb, TC, h0_zero]
    return Hb[1:].transpose(1, 0, 2), Hb[T].copy(), Cb[T].copy(), cache


def backward(dhs, cache, grads):
    if cache[0] == "numpy":
        return _numpy.backward(dhs, cache[1], grads)
    if cache[0] != "cython":
        raise ValueError("backward() needs the cache of a forward() of the Cython engine, and "
                         "each cache serves one backward only")
    _, X, Wx, Wh, A, Hb, Cb, TC, h0_zero = cache
    cache[0] = "used"  # backward overwrites A with dA
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
    _lstm_cpu.backward(dhs, X, Wx, Wh, A, Hb, Cb, TC, outs[0], outs[1], outs[2], dX, dh0,
                       h0_zero, threads)
    for g, o in zip(grads, outs):
        if g is not o:
            g[...] = o
    return dX.transpose(1, 0, 2), dh0
