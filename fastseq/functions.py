"""Stateless math shared by the layers (works on NumPy and CuPy arrays alike)."""
import numpy as np

from . import ops
from .backend import get_array_module


def matmul(a, b, out=None):
    """a @ b, written into ``out`` when given (the engine's product: see fastseq.ops)."""
    if out is not None and out.ndim == 0:
        raise ValueError("matmul: out must be an array")
    return ops.engine_for(a).matmul(a, b, out)


def exp_rows(S):
    """S = exp(S) in place for scores already shifted to <= 0; returns the row sums.
    NumPy: np.exp(S, out=S); return S.sum(axis=1)"""
    return ops.engine_for(S).exp_rows(S)


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
    overwritten (it becomes the gradient) to avoid a second (M, V) temporary. On the GPU the loss
    is a 0-d device array (nothing is read back to the host).
    """
    return ops.engine_for(scores).softmax_cross_entropy(scores, labels, ignore_label)


def clip_grads(grads, max_norm):
    """Scale all grads in place by max_norm / (total_norm + 1e-6) when that is below 1.
    Returns the norm before clipping (a 0-d array for CuPy grads)."""
    grads = list(grads)
    if not grads:
        return 0.0
    return ops.engine_for(grads[0]).clip_grads(grads, max_norm)


def true_lengths(ids, pad_id):
    """(N,) lengths of the rows of ids (N, T) without their trailing pads (at least 1)."""
    xp = get_array_module(ids)
    real = xp.asarray(ids) != pad_id
    last = real.shape[1] - xp.argmax(real[:, ::-1], axis=1)  # one past the last real id
    return xp.where(real.any(axis=1), last, 1).astype(np.int64)
