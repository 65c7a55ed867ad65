"""Optimisers: update(params, grads) in place (textbook forms)."""
import math
import numbers

import numpy as np

from . import backend
from .backend import get_array_module


def _check_lr(lr):
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    return float(lr)


def _check_beta(name, beta):
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {beta!r}")
    return float(beta)


class SGD:
    """p -= lr * g"""

    def __init__(self, lr=0.01):
        self.lr = _check_lr(lr)

    def update(self, params, grads):
        for p, g in zip(params, grads):
            p -= self.lr * g


class Adam:
    """lr_t = lr sqrt(1 - b2^t) / (1 - b1^t); m += (1-b1)(g-m); v += (1-b2)(g^2-v);
    p -= lr_t m / (sqrt(v) + 1e-7)"""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, fused=True):
        self.lr = _check_lr(lr)
        self.beta1, self.beta2 = _check_beta("beta1", beta1), _check_beta("beta2", beta2)
        self.fused = fused  # one pass of fastseq/_ext/_optim_cpu on the cython engine
        self.iter = 0
        self.m = self.v = None
        self._buf = None

    def update(self, params, grads):
        if self.m is None:
            self.m = [get_array_module(p).zeros_like(p) for p in params]
            self.v = [get_array_module(p).zeros_like(p) for p in params]
        self.iter += 1
        if params and get_array_module(params[0]) is not np:
            # CuPy: one fused kernel per parameter; lr_t comes from a step counter on the device,
            # so nothing is sent per step (and the update can be captured in a CUDA graph)
            from .lstm import _cupy
            return _cupy.adam_update(self, params, grads)
        lr_t = self.lr * (1.0 - self.beta2 ** self.iter) ** 0.5 / (1.0 - self.beta1 ** self.iter)
        kernel = backend.ext("_optim_cpu") if self.fused else None
        if kernel is not None and kernel.adam_update(list(params), list(grads), self.m, self.v,
                                                     lr_t, 1 - self.beta1, 1 - self.beta2, 1e-7,
                                                     backend.config.optim_threads):
            return  # all host arrays, contiguous: done in one fused pass
        for p, g, m, v in zip(params, grads, self.m, self.v):
            xp = get_array_module(p)
            d = self._scratch(p, params)  # in place: no temporaries
            xp.subtract(g, m, out=d)
            d *= 1 - self.beta1
            m += d
            xp.multiply(g, g, out=d)
            d -= v
            d *= 1 - self.beta2
            v += d
            xp.sqrt(v, out=d)
            d += 1e-7
            xp.divide(m, d, out=d)
            d *= lr_t
            p -= d

    def _scratch(self, p, params):
        """A buffer shaped like p, reused across parameters and steps."""
        buf = self._buf
        if buf is None or buf.dtype != p.dtype or get_array_module(buf) is not get_array_module(p) \
                or buf.size < p.size:
            buf = self._buf = get_array_module(p).empty(max(q.size for q in params), p.dtype)
        return buf[:p.size].reshape(p.shape)
