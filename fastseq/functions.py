"""Stateless math shared by the layers (works on NumPy and CuPy arrays alike)."""
import os

import numpy as np

from .backend import get_array_module

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

try:
    from ._ext import _ops_cpu, _optim_cpu
except ImportError:  # not built: NumPy does it
    _ops_cpu = _optim_cpu = None


def sigmoid(x):
    xp = get_array_module(x)
    return 0.5 * (xp.tanh(0.5 * x) + 1.0)


def softmax(x):
    """Row-wise softmax over the last axis."""
    xp = get_array_module(x)
    y = x - x.max(axis=-1, keepdims=True)
    xp.exp(y, out=y)
    y /= y.sum(axis=-1, keepdims=True)
    return y


def softmax_cross_entropy(scores, labels, ignore_label=-1):
    """Fused softmax + mean cross-entropy over rows whose label != ignore_label.

    scores (M, V), labels (M,). Returns (loss, dscores) where dscores is the gradient of the
    mean loss: (softmax - onehot) / n_valid on valid rows, 0 on ignored rows. ``scores`` is
    overwritten (it becomes the gradient) to avoid a second (M, V) temporary.
    """
    xp = get_array_module(scores)
    M, V = scores.shape
    if (_ops_cpu is not None and xp is np and scores.dtype in _FLOATS and scores.flags.c_contiguous
            and scores.flags.writeable and M and V):
        return _softmax_cross_entropy_fused(scores, labels, ignore_label)
    mask = labels != ignore_label
    n_valid = int(mask.sum())
    all_valid = n_valid == M  # the common case: no masking arithmetic at all
    safe = labels if all_valid else xp.where(mask, labels, 0)
    # Stability shift: the global max (one fast reduction; per-row maxima over short rows cost
    # ~15x more in NumPy). If a row then underflows to z ~ 0, redo with per-row maxima.
    shift = scores.max()
    flat = scores.reshape(-1)  # a view: scores is contiguous here
    at_label = xp.arange(M) * V + safe
    picked = flat[at_label] - shift  # log-softmax numerator
    e = xp.exp(scores - shift)
    ones = xp.ones(V, dtype=scores.dtype)
    z = e @ ones  # row sums as one matrix-vector product
    if float(z.min()) < 1e-30:
        row_max = scores.max(axis=1, keepdims=True)
        picked = flat[at_label] - row_max[:, 0]
        xp.exp(scores - row_max, out=e)
        z = e @ ones
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


def _softmax_cross_entropy_fused(scores, labels, ignore_label):
    """The same on host arrays in three passes: row max and shift, exp (NumPy's SIMD), then sums,
    loss and gradient (fastseq/_ext/_ops_cpu)."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    has_ignore = ignore_label is not None
    ignore = int(ignore_label) if has_ignore else 0
    picked, n_valid = _ops_cpu.softmax_shift(scores, labels, ignore, has_ignore)
    np.exp(scores, out=scores)
    loss = _ops_cpu.softmax_finish(scores, labels, picked, ignore, n_valid, has_ignore)
    return float(loss), scores


def kernel_threads():
    """OpenMP threads for the fused kernels over whole parameter lists (Adam, clip_grads): every
    core while the Cython LSTM engine runs its split path, whose own OpenMP threads are then
    already awake; one otherwise. (Where OpenBLAS threads do the products, as with the NumPy
    engine or small batches such as the Rnnlm's 20 rows, OpenMP threads next to OpenBLAS's
    still-spinning workers made each Adam step ~15x slower on 2 cores.)
    FASTSEQ_OPTIM_THREADS=n overrides."""
    forced = os.environ.get("FASTSEQ_OPTIM_THREADS", "")
    if forced.strip():
        return max(1, int(forced))
    from .lstm import _cython, kernel_name
    if kernel_name() != "cython" or _cython is None or not _cython.split_in_use():
        return 1
    return _CPUS


try:
    _CPUS = len(os.sched_getaffinity(0))
except (AttributeError, OSError):
    _CPUS = os.cpu_count() or 1


def clip_grads(grads, max_norm):
    """Scale all grads in place by max_norm / (total_norm + 1e-6) when that is below 1.
    Returns the norm before clipping. (Host arrays go through one fused, threaded pass of
    fastseq/_ext/_optim_cpu for the norm and one for the scaling when it is built.)"""
    grads = list(grads)
    threads = kernel_threads() if _optim_cpu is not None else 1
    total = _optim_cpu.sum_squares(grads, threads) if _optim_cpu is not None else None
    if total is None:
        total = 0.0
        for g in grads:
            xp = get_array_module(g)
            flat = g.reshape(-1)  # a view for contiguous grads: no (g * g) temporary
            total += float(xp.dot(flat, flat))
    total = total ** 0.5
    rate = max_norm / (total + 1e-6)
    if rate < 1 and not (_optim_cpu is not None and _optim_cpu.scale(grads, rate, threads)):
        for g in grads:
            g *= rate
    return total


# ---------------------------------------------------------------------------------------------
# BLAS threads for small products

_blas_local = None  # ctypes function openblas_set_num_threads_local, False when unavailable


def _find_blas_local():
    global _blas_local
    if _blas_local is not None:
        return _blas_local
    _blas_local = False
    try:
        import ctypes
        import numpy as np  # noqa: F401  (loads its BLAS)
        with open("/proc/self/maps") as f:  # Linux: the shared libraries loaded in this process
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
        # NumPy's own copy first (SciPy may load another one)
        for path in sorted(paths, key=lambda p: "numpy" not in p):
            lib = ctypes.CDLL(path)
            fn = getattr(lib, "openblas_set_num_threads_local", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                _blas_local = fn
                break
    except (OSError, AttributeError, ImportError):
        _blas_local = False
    return _blas_local


class blas_threads:
    """Context manager: limit NumPy's OpenBLAS to n threads in the calling thread only.

    Tiny products (one row times a matrix, as in word-by-word generation) run faster on one thread
    and, on a busy machine, avoid OpenBLAS's multi-thread hand-off costing milliseconds per call.
    A no-op where NumPy's BLAS is not an OpenBLAS with ``openblas_set_num_threads_local``.
    """

    def __init__(self, n=1):
        self.n = int(n)
        self._old = None

    def __enter__(self):
        fn = _find_blas_local()
        if fn:
            self._old = fn(self.n)
        return self

    def __exit__(self, *exc):
        fn = _find_blas_local()
        if fn and self._old is not None and self._old > 0:
            fn(self._old)
        self._old = None
        return False
