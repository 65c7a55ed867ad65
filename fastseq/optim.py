"""Optimisers: update(params, grads) in place (textbook forms); state_dict() / load_state_dict()
carry everything a resumed run needs (the learning rate, Adam's moments and step count)."""
from . import backend, ops
from ._checks import check_count, check_fraction, check_positive
from .backend import get_array_module


class SGD:
    """p -= lr * g"""

    def __init__(self, lr=0.01):
        self.lr = check_positive("lr", lr)

    def update(self, params, grads):
        for p, g in zip(params, grads):
            p -= self.lr * g

    def count_step(self):
        """Account for one update that ran inside a replayed CUDA graph (SGD counts nothing)."""

    def state_dict(self):
        return {"lr": self.lr}

    def load_state_dict(self, state, params=None):
        self.lr = check_positive("lr", state["lr"])


class Adam:
    """lr_t = lr sqrt(1 - b2^t) / (1 - b1^t); m += (1-b1)(g-m); v += (1-b2)(g^2-v);
    p -= lr_t m / (sqrt(v) + 1e-7)"""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, fused=True):
        self.lr = check_positive("lr", lr)
        self.beta1, self.beta2 = check_fraction("beta1", beta1), check_fraction("beta2", beta2)
        self.fused = fused  # the engine's kernels (False: the numpy engine's code, for tests)
        self.iter = 0
        self.m = self.v = None
        # the engine's working state (fastseq.ops adam_update): on the GPU (counter [t, lr_t] on
        # the device, the step it belongs to), which a checkpoint keeps; elsewhere scratch memory
        self._work = None

    @property
    def device_state(self):
        """The GPU step counter (counter array, its step), or None off the GPU."""
        return self._work if isinstance(self._work, tuple) else None

    def count_step(self):
        """Account for one update that ran inside a replayed CUDA graph: the host's step count
        advances, and the device counter (advanced by the graph) belongs to the new step."""
        self.iter += 1
        if self.device_state is not None:
            self._work = (self._work[0], self.iter)

    def state_dict(self):
        """The settings, the step count and the moments (references: copy before training on);
        ``device_state``: the GPU step counter or None."""
        held = self.device_state
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "iter": self.iter,
                "m": self.m, "v": self.v,
                "device_state": None if held is None else {"counter": held[0], "iter": held[1]}}

    def load_state_dict(self, state, params=None):
        """Restore a state_dict(); with ``params``, the moments must match their shapes and
        dtypes. Everything is checked before anything changes; arrays go to the current device."""
        lr = check_positive("lr", state["lr"])
        beta1, beta2 = (check_fraction(b, state[b]) for b in ("beta1", "beta2"))
        step = check_count("iter", state["iter"], 0)
        moments = []
        for name in ("m", "v"):
            arrays = state[name]
            if arrays is not None and params is not None:
                _check_like(name, arrays, params)
            moments.append(None if arrays is None else [backend.asarray(a) for a in arrays])
        if (moments[0] is None) != (moments[1] is None):
            raise ValueError("Adam state: m and v must both be set or both be None")
        held = state["device_state"]
        self.lr, self.beta1, self.beta2, self.iter = lr, beta1, beta2, step
        self.m, self.v = moments
        self._work = None if held is None or not backend.is_gpu() else \
            (backend.asarray(held["counter"]), check_count("device iter", held["iter"], 0))

    def update(self, params, grads):
        if self.m is None:
            self.m = [get_array_module(p).zeros_like(p) for p in params]
            self.v = [get_array_module(p).zeros_like(p) for p in params]
        self.iter += 1
        if not params:
            return
        engine = ops.engine_for(params[0]) if self.fused else ops.engine("numpy")
        self._work = engine.adam_update(list(params), list(grads), self.m, self.v,
                                        self.lr, self.beta1, self.beta2, self.iter,
                                        self._work)


def _check_like(name, arrays, params):
    if len(arrays) != len(params):
        raise ValueError(f"Adam state: {name} holds {len(arrays)} arrays but there are "
                         f"{len(params)} parameters")
    for i, (a, p) in enumerate(zip(arrays, params)):
        if a.shape != p.shape or a.dtype != p.dtype:
            raise ValueError(f"Adam state: {name}[{i}] is {a.dtype}{a.shape} but the parameter "
                             f"is {p.dtype}{p.shape}")
