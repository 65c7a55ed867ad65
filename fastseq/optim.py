"""Optimisers: update(params, grads) in place (textbook forms)."""
from .backend import get_array_module

from .functions import kernel_threads

try:  # fused one-pass update (fastseq/_ext); the NumPy expressions below are the reference
    from ._ext import _optim_cpu
except ImportError:
    _optim_cpu = None


class SGD:
    """p -= lr * g"""

    def __init__(self, lr=0.01):
        self.lr = lr

    def update(self, params, grads):
        for p, g in zip(params, grads):
            p -= self.lr * g


class Adam:
    """lr_t = lr sqrt(1 - b2^t) / (1 - b1^t); m += (1-b1)(g-m); v += (1-b2)(g^2-v);
    p -= lr_t m / (sqrt(v) + 1e-7)"""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, fused=True):
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.fused = fused and _optim_cpu is not None
        self.iter = 0
        self.m = self.v = None

    def update(self, params, grads):
        if self.m is None:
            self.m = [get_array_module(p).zeros_like(p) for p in params]
            self.v = [get_array_module(p).zeros_like(p) for p in params]
        self.iter += 1
        lr_t = self.lr * (1.0 - self.beta2 ** self.iter) ** 0.5 / (1.0 - self.beta1 ** self.iter)
        if self.fused and _optim_cpu.adam_update(list(params), list(grads), self.m, self.v, lr_t,
                                                 1 - self.beta1, 1 - self.beta2, 1e-7,
                                                 kernel_threads()):
            return  # all host arrays, contiguous: done in one fused pass
        for p, g, m, v in zip(params, grads, self.m, self.v):
            xp = get_array_module(p)
            m += (1 - self.beta1) * (g - m)
            v += (1 - self.beta2) * (g * g - v)
            p -= lr_t * m / (xp.sqrt(v) + 1e-7)
