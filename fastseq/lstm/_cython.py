"""Cython LSTM engine (CPU, float32 and float64): fastseq/_ext/_lstm_cpu.pyx does the work.

Same interface as the NumPy reference engine (_numpy.py):
    forward(xs, Wx, Wh, b, h0, c0) -> hs, hT, cT, cache       xs (N, T, D), hs (N, T, H)
    backward(dhs, cache, grads, need_dh0=True) -> dxs, dh0     grads = [dWx, dWh, db], written in place
                                                                (dh0 None when need_dh0=False)
    b (4H,), or (N, 4H) for one bias per row (then db is (N, 4H) too; see _numpy)
    xs may be integer ids (N, T) standing for one-hot rows of width Wx.shape[0] (dxs is then None)

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
import ctypes
import os
import threading
from collections import OrderedDict

import numpy as np

from .. import backend
from . import _numpy

_lstm_cpu = backend.compiled("_lstm_cpu")
if _lstm_cpu is None:
    raise ImportError("fastseq._ext._lstm_cpu is not built")

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
TAKES_IDS = True  # xs may be integer ids standing for one-hot rows (see _numpy)


# --- which BLAS ----------------------------------------------------------------------------------
# The kernel is compiled against scipy.linalg.cython_blas. With pip wheels SciPy and NumPy each
# bundle their own OpenBLAS, each with its own thread pool whose workers spin for a while after
# every call; a training step alternating between NumPy products (affine layers) and SciPy products
# (the LSTM) keeps both pools' workers busy on the same cores and slows both down. So when NumPy's
# own OpenBLAS can be found among the loaded libraries, the kernel calls that one instead.
# backend.config.blas = 'scipy' keeps SciPy's; 'numpy' requires NumPy's.

_BLAS_NAMES = (("scipy_sgemm_64_", "scipy_dgemm_64_", True),  # NumPy >= 2 wheels (ILP64)
               ("sgemm_64_", "dgemm_64_", True),              # NumPy 1.2x wheels (openblas64_)
               ("scipy_sgemm_", "scipy_dgemm_", None),
               ("sgemm_", "dgemm_", None))
_CONFIG_NAMES = ("scipy_openblas_get_config64_", "openblas_get_config64_",
                 "scipy_openblas_get_config", "openblas_get_config")


def _numpy_blas():
    """(sgemm_ address, dgemm_ address, ilp64, library path) of the OpenBLAS that NumPy loaded,
    or None when it cannot be identified with certainty."""
    npdir = os.path.dirname(os.path.abspath(np.__file__))
    roots = (npdir + os.sep, npdir + ".libs" + os.sep)
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split(None, 5)[5].strip() for ln in f if len(ln.split(None, 5)) == 6})
    except OSError:
        return None
    for path in paths:
        if not path.startswith(roots) or "openblas" not in os.path.basename(path).lower():
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        config = ""
        for name in _CONFIG_NAMES:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                config = (fn() or b"").decode("ascii", "replace")
                break
        for sname, dname, ilp64 in _BLAS_NAMES:
            sfn, dfn = getattr(lib, sname, None), getattr(lib, dname, None)
            if sfn is None or dfn is None:
                continue
            if ilp64 is None:  # integer width from the build configuration
                if not config:
                    break
                ilp64 = "USE64BITINT" in config
            addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
            return addr(sfn), addr(dfn), ilp64, path
    return None


_LOCAL_SETTERS = ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local64_",
                  "scipy_openblas_set_num_threads_local")
_GLOBAL_SETTERS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                   ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                   ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                   ("openblas_set_num_threads", "openblas_get_num_threads"))


def _thread_setters(path):
    """(thread-local setter, global setter, global getter) addresses of the OpenBLAS at path, 0
    where missing: the split path (see SPLIT) makes each worker's products single-threaded."""
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return 0, 0, 0
    addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
    local = next((addr(getattr(lib, n)) for n in _LOCAL_SETTERS if hasattr(lib, n)), 0)
    for sname, gname in _GLOBAL_SETTERS:
        if hasattr(lib, sname) and hasattr(lib, gname):
            return local, addr(getattr(lib, sname)), addr(getattr(lib, gname))
    return local, 0, 0


def _self_test():
    """A small forward/backward against the NumPy engine, float32 and float64."""
    rng = np.random.default_rng(0)
    for dtype, tol in ((np.float32, 1e-4), (np.float64, 1e-10)):
        N, T, D, H = 3, 2, 5, 7
        args = [rng.standard_normal(s).astype(dtype) for s in
                ((N, T, D), (D, 4 * H), (H, 4 * H), (4 * H,), (N, H), (N, H))]
        dhs = rng.standard_normal((N, T, H)).astype(dtype)
        outs = []
        for eng in (_numpy, __import__(__name__, fromlist=["x"])):
            hs, hT, cT, cache = eng.forward(*args)
            g = [np.zeros_like(args[1]), np.zeros_like(args[2]), np.zeros_like(args[3])]
            dxs, dh0 = eng.backward(dhs, cache, g)
            outs.append([hs, hT, dxs, dh0] + g)
        for a, b in zip(*outs):
            if not np.allclose(a, b, rtol=tol, atol=tol):
                return False
    return True


def use_blas(which):
    """'numpy': NumPy's OpenBLAS (error if it cannot be found), 'scipy': SciPy's, 'auto': NumPy's
    when found and passing a self-test, else SciPy's. Returns the source in use."""
    global BLAS
    if which not in ("auto", "numpy", "scipy"):
        raise ValueError(f"unknown BLAS choice {which!r}; expected auto, numpy or scipy")
    _lstm_cpu.set_blas(0, 0)
    _lstm_cpu.set_blas_threads(0, 0, 0)  # SciPy's BLAS: its thread count is not ours to set
    BLAS = "scipy"
    if which == "scipy":
        return BLAS
    found = _numpy_blas()
    if found is None:
        if which == "numpy":
            raise RuntimeError("NumPy's OpenBLAS could not be identified among the loaded libraries")
        return BLAS
    s, d, ilp64, path = found
    _lstm_cpu.set_blas(s, d, ilp64)
    _lstm_cpu.set_blas_threads(*_thread_setters(path))
    if not _self_test():
        _lstm_cpu.set_blas(0, 0)
        _lstm_cpu.set_blas_threads(0, 0, 0)
        if which == "numpy":
            raise RuntimeError(f"NumPy's BLAS ({path}) gave wrong products")
        return BLAS
    BLAS = f"numpy ({os.path.basename(path)})"
    return BLAS


BLAS = "scipy"

# OpenMP threads for the per-step gate math, used where a step has at least
# PARALLEL_MIN_ELEMENTS = N*H elements. Default 1: the products (most of the time) already run on
# every core in OpenBLAS, and on a 2-core machine shared with other work, OpenMP threads next to
# OpenBLAS's spinning workers made batched inference slower (5000 questions: 151 ms vs 125 ms).
# backend.config.lstm_threads (or setting NUM_THREADS) turns it on.
NUM_THREADS = max(1, backend.config.lstm_threads)
PARALLEL_MIN_ELEMENTS = 1 << 17


# Split path: for N >= SPLIT_MIN_ROWS the rows are cut into groups that each run the whole time
# loop (h Wh product and gate math; backward: gate derivatives and dA Wh^T) on their own OpenMP
# thread with single-threaded BLAS, with no synchronisation between steps (rows are independent
# in the recurrence); the once-per-sequence products (x Wx, dWx, dWh, dX) stay single threaded
# BLAS calls on every core, unless the kernel's set_split_xw/set_split_grads knobs (default on)
# move them into the groups too (x_t Wx, dX_t and shares of dWx, dWh per step; the shares are
# summed), so that no threaded BLAS call (whose pool workers keep spinning afterwards next to
# the OpenMP threads) happens inside the kernel at all. Many small threaded products per step
# cost OpenBLAS a hand-off each; on 2 shared cores, (128, 7, 16) H=128 forward+backward went from
# ~3.9-4.6 ms to ~2.6-3.0 ms (best of 400), the addition Seq2seq epoch from ~2.8 s to ~2.0-2.5 s,
# and a (5000, 7) forward from ~44 ms to ~29-33 ms.
# SPLIT = "0" turns it off (backend.config.lstm_split False, e.g. FASTSEQ_THREADS=1), "1" uses it
# for any N that gives each group SPLIT_MIN_GROUP rows (default: N >= SPLIT_MIN_ROWS). Needs
# NumPy's OpenBLAS (use_blas) and an OpenMP build.
SPLIT = "auto" if backend.config.lstm_split else "0"
SPLIT_MIN_ROWS = 64
SPLIT_MIN_GROUP = 2
SPLIT_WAYS = max(1, backend.config.threads)


_last_split = False  # whether the latest forward ran the split path (see split_in_use)


def split_in_use():
    """Whether the latest forward ran the split path, i.e. the engine's work is on OpenMP threads
    (not OpenBLAS's): then other kernels may use OpenMP threads too (fastseq.functions.kernel_threads)."""
    return _last_split


def _split_ways(N):
    """Row groups for a batch of N rows (0: the per-step path)."""
    if SPLIT in ("0", "off", "false", "no") or SPLIT_WAYS < 2 or not _lstm_cpu.can_split():
        return 0
    if SPLIT not in ("1", "on", "true", "yes") and N < SPLIT_MIN_ROWS:
        return 0
    ways = min(SPLIT_WAYS, N // SPLIT_MIN_GROUP)
    return ways if ways >= 2 else 0


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


def forward(xs, Wx, Wh, b, h0, c0):
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
    h0 = _check("h0", h0, dtype, (N, H), cast=True)
    c0 = _check("c0", c0, dtype, (N, H), cast=True)
    if N == 0 or T == 0 or D == 0 or H == 0:  # degenerate: BLAS needs non-empty leading dims
        hs, hT, cT, cache = _numpy.forward(ids if one_hot else xs, Wx, Wh, b, h0, c0)
        return hs, hT, cT, ("numpy", cache)
    key = (T, N, D, H, dtype.str, one_hot)
    work = _pool_take(key)
    if work is None:
        work = (np.empty((T, N, 0 if one_hot else D), dtype), np.empty((T, N, 4 * H), dtype),
                np.empty((T + 1, N, H), dtype), np.empty((T, N, H), dtype),
                np.empty(N * H + _split_ways(N) * (D + H) * 4 * H, dtype))  # backward's scratch
    X, A, Cb, TC, _ = work
    Hb = np.empty((T + 1, N, H), dtype)  # hs is a view of it: never pooled
    threads = NUM_THREADS if N * H >= PARALLEL_MIN_ELEMENTS else 1
    global _last_split
    _last_split = _split_ways(N) > 0
    h0_zero = _lstm_cpu.forward(xs, Wx, Wh, b.reshape(-1), h0, c0, X, A, Hb, Cb, TC, threads,
                                _split_ways(N), row_bias, ids)
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
    threads = NUM_THREADS if N * H >= PARALLEL_MIN_ELEMENTS else 1
    try:
        # with per-row biases the kernel's shared db goes to a scratch vector
        db_shared = np.empty(4 * H, dtype) if row_bias else outs[2]
        _lstm_cpu.backward(dhs, X, Wx, Wh, A, Hb, Cb, TC, outs[0], outs[1], db_shared, dX, dh0,
                           h0_zero, threads, _split_ways(N), scratch, bool(need_dh0),
                           outs[2].reshape(-1) if row_bias else None, ids)
    finally:
        cache.release()  # A now holds dA: the cache is used up either way
    for g, o in zip(grads, outs):
        if g is not o:
            g[...] = o
    dxs = None if ids is not None else dX.transpose(1, 0, 2)
    return dxs, (dh0 if need_dh0 else None)


def step(x, Wx, Wh, b, h, c):
    """One step (see _numpy.step): forward over a sequence of length 1, its cache dropped."""
    _, h, c, _ = forward(x[:, None, :], Wx, Wh, b, h, c)
    return h, c


# --- cache and buffer pool -------------------------------------------------------------------

POOL_MAX_BYTES = 256 << 20

_pool = OrderedDict()  # key -> list of buffer tuples, least recently returned first
_pool_bytes = 0
_pool_lock = threading.RLock()  # re-entered if a GC pass inside drops a cache


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

    __slots__ = ("key", "work", "Wx", "Wh", "Hb", "h0_zero", "row_bias", "ids")

    def __init__(self, key, work, Wx, Wh, Hb, h0_zero, row_bias=False, ids=None):
        self.key, self.work = key, work
        self.Wx, self.Wh, self.Hb, self.h0_zero = Wx, Wh, Hb, h0_zero
        self.row_bias, self.ids = row_bias, ids

    def release(self):
        work, self.work = self.work, None
        if work is not None:
            _pool_give(self.key, work)

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


use_blas(backend.config.blas)
