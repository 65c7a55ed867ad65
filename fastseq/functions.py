"""Stateless math shared by the layers (works on NumPy and CuPy arrays alike)."""
import numpy as np

from . import backend
from .backend import get_array_module
from .lstm import _blas

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def matmul(a, b, out=None):
    """a @ b, written into ``out`` when given. While a CUDA graph is captured the product goes to
    cuBLAS directly (fastseq.lstm._cupy.matmul): CuPy's own products cannot be captured."""
    if out is not None and out.ndim == 0:
        raise ValueError("matmul: out must be an array")
    if type(a) is np.ndarray and backend.config.kernel == "cython":  # the common case, first
        done = _matmul_chunked(a, b, out)
        if done is not None:
            return done
    elif _direct_products(a):
        from .lstm import _cupy
        return _cupy.matmul(a, b, out=out)
    if get_array_module(a) is not np:
        return _matmul(a, b, out)
    macs = (a.shape[-2] if a.ndim > 1 else 1) * a.shape[-1] * (b.shape[-1] if b.ndim > 1 else 1)
    with _blas.blas_threads(backend.blas_threads_for(macs)):
        return _matmul(a, b, out)


def _matmul(a, b, out):
    if out is None:
        return a @ b
    out[...] = a @ b
    return out


def _direct_products(a):
    """Whether a product goes to cuBLAS directly: CuPy arrays while a graph is captured."""
    if get_array_module(a) is np:
        return False
    from .lstm import _cupy
    return _cupy._direct.on


def _matmul_chunked(a, b, out):
    """a @ b by fastseq/_ext/_lstm_cpu.matmul (chunks fixed by the shapes on fastseq's threads:
    the same bits for any thread count, and no BLAS worker threads spinning next to ours), or
    None when the operands do not suit it."""
    kernel = _chunked_kernel()
    if kernel is None or type(b) is not np.ndarray or a.dtype not in _FLOATS or b.dtype != a.dtype:
        return None
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] == b.shape[0] and a.shape[2] == b.shape[1]:
        res = out if out is not None else np.empty(a.shape[:2] + b.shape[2:], a.dtype)
        if (res.shape != a.shape[:2] + b.shape[2:] or res.dtype != a.dtype
                or not res.flags.c_contiguous):
            return None
        return res if kernel.bmatmul(a, b, res, backend.config.blas_threads) else None
    if b.ndim != 2 or a.ndim not in (1, 2) or a.shape[-1] != b.shape[0]:
        return None
    shape = a.shape[:-1] + b.shape[1:]
    res = out if out is not None else np.empty(shape, a.dtype)
    if res.shape != shape or res.dtype != a.dtype or not res.flags.c_contiguous:
        return None
    if not kernel.matmul(a if a.ndim == 2 else a[None], b, res if res.ndim == 2 else res[None],
                         backend.config.blas_threads):
        return None
    return res


_kernel = []  # [the Cython kernel module, set up for products], once found


def _chunked_kernel():
    if not _kernel:
        if backend.compiled("_lstm_cpu") is None:
            return None
        from .lstm import _cython  # points the kernel at NumPy's BLAS
        _kernel.append(_cython._lstm_cpu)
    return _kernel[0]


def exp_rows(S):
    """S = exp(S) in place for scores already shifted to <= 0; returns the row sums.
    NumPy: np.exp(S, out=S); return S.sum(axis=1)"""
    xp = get_array_module(S)
    if (backend.config.kernel == "cython" and xp is np and S.dtype in _FLOATS and S.ndim == 2
            and S.flags.c_contiguous and S.flags.writeable and backend.ext("_lstm_cpu")):
        z = np.empty(S.shape[0], S.dtype)
        backend.ext("_lstm_cpu").exp_rows(S, z, backend.config.threads)
        return z
    xp.exp(S, out=S)
    return S.sum(axis=1)


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
    if xp is not np:
        return _softmax_cross_entropy_device(xp, scores, labels, ignore_label)
    ops = backend.ext("_ops_cpu")
    if (ops is not None and xp is np and scores.dtype in _FLOATS and scores.flags.c_contiguous
            and scores.flags.writeable and M and V):
        return _softmax_cross_entropy_fused(ops, scores, labels, ignore_label)
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


def _softmax_cross_entropy_device(xp, scores, labels, ignore_label):
    """The same on device arrays without reading anything back to the host: the loss is a 0-d
    device array; per-row maxima always (the global shift's underflow test would be a host
    read); the masked formula always. Labels are range-checked unless the ids were checked
    already (backend.ids_checked)."""
    M, V = scores.shape
    mask = labels != ignore_label if ignore_label is not None else xp.ones(M, dtype=bool)
    if M and not backend.skip_id_check(labels):
        wrong = mask & ((labels < 0) | (labels >= V))
        if bool(wrong.any()):
            bad = int(xp.flatnonzero(wrong)[0])
            raise ValueError(f"label {int(labels[bad])} at position {bad} is outside [0, {V}) "
                             f"(and is not the ignore label {ignore_label})")
    safe = xp.where(mask, labels, 0)
    scores -= scores.max(axis=1, keepdims=True)
    flat = scores.reshape(-1)
    at_label = xp.arange(M) * V + safe
    picked = flat[at_label]                  # log-softmax numerator
    xp.exp(scores, out=scores)
    z = scores.sum(axis=1)
    w = mask.astype(scores.dtype) / xp.maximum(mask.sum(), 1).astype(scores.dtype)
    loss = ((xp.log(z) - picked) * w).sum()
    scores *= (w / z)[:, None]
    flat[at_label] -= w
    return loss, scores


def _softmax_cross_entropy_fused(ops, scores, labels, ignore_label):
    """The same on host arrays in three passes: row max and shift, exp (NumPy's SIMD), then sums,
    loss and gradient (fastseq/_ext/_ops_cpu)."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    has_ignore = ignore_label is not None
    ignore = int(ignore_label) if has_ignore else 0
    picked, n_valid = ops.softmax_shift(scores, labels, ignore, has_ignore)
    np.exp(scores, out=scores)
    loss = ops.softmax_finish(scores, labels, picked, ignore, n_valid, has_ignore)
    return float(loss), scores


def clip_grads(grads, max_norm):
    """Scale all grads in place by max_norm / (total_norm + 1e-6) when that is below 1.
    Returns the norm before clipping (a 0-d array for CuPy grads). (On the cython engine host arrays go through one fused pass
    of fastseq/_ext/_optim_cpu for the norm and one for the scaling.)"""
    grads = list(grads)
    if grads and get_array_module(grads[0]) is not np:
        # on the device: norm and rate never come back to the host; the norm is a 0-d array
        from .lstm import _cupy
        return _cupy.clip_grads(grads, max_norm)
    optim = backend.ext("_optim_cpu")
    threads = backend.config.optim_threads
    total = optim.sum_squares(grads, threads) if optim is not None else None
    if total is None:
        total = 0.0
        with _blas.blas_threads(backend.config.small_blas_threads):
            for g in grads:
                xp = get_array_module(g)
                flat = g.reshape(-1)  # a view for contiguous grads: no (g * g) temporary
                total += float(xp.dot(flat, flat))
    total = total ** 0.5
    rate = max_norm / (total + 1e-6)
    if rate < 1 and not (optim is not None and optim.scale(grads, rate, threads)):
        for g in grads:
            g *= rate
    return total


def true_lengths(ids, pad_id):
    """(N,) lengths of the rows of ids (N, T) without their trailing pads (at least 1)."""
    xp = get_array_module(ids)
    real = xp.asarray(ids) != pad_id
    last = real.shape[1] - xp.argmax(real[:, ::-1], axis=1)  # one past the last real id
    return xp.where(real.any(axis=1), last, 1).astype(np.int64)
