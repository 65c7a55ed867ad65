"""Optimisers: update(params, grads) in place (textbook forms)."""
import math
import numbers

from . import ops
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
        self.fused = fused  # the engine's kernels (False: the numpy engine's code, for tests)
        self.iter = 0
        self.m = self.v = None
        self._device_state = None  # the engine's working state (fastseq.ops adam_update)

    def update(self, params, grads):
        if self.m is None:
            self.m = [get_array_module(p).zeros_like(p) for p in params]
            self.v = [get_array_module(p).zeros_like(p) for p in params]
        self.iter += 1
        if not params:
            return
        engine = ops.engine_for(params[0]) if self.fused else ops.engine("numpy")
        self._device_state = engine.adam_update(list(params), list(grads), self.m, self.v,
                                                self.lr, self.beta1, self.beta2, self.iter,
                                                self._device_state)
