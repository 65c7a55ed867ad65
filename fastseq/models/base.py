"""What every model shares: params/grads lists, initialisation, save/load as .npz."""
import numpy as np

from .. import backend
from ..io import load_npz_params, save_npz_params


def make_rng(seed):
    """A NumPy RandomState: seeded, or the global one (so np.random.seed(...) works as in the textbook)."""
    return np.random.RandomState(seed) if seed is not None else np.random.mtrand._rand


def randn(rng, *shape, scale=1.0, dtype=np.float32):
    """Gaussian weights created on the host (same numbers on every engine), moved to the device."""
    return backend.asarray((rng.standard_normal(shape) * scale).astype(dtype))


def zeros(*shape, dtype=np.float32):
    return backend.xp.zeros(shape, dtype=dtype)


class Model:
    """Subclasses set self.layers = [(name, layer), ...]; params/grads follow that order."""

    layers = ()

    @property
    def params(self):
        return [p for _, layer in self.layers for p in layer.params]

    @property
    def grads(self):
        return [g for _, layer in self.layers for g in layer.grads]

    @property
    def param_names(self):
        names = []
        for lname, layer in self.layers:
            for i, _ in enumerate(layer.params):
                pnames = getattr(layer, "param_names", None)
                names.append(f"{lname}.{pnames[i] if pnames else i}")
        return names

    def config(self):
        return {}

    def save_params(self, path, meta=None):
        """Write the weights to ``path`` (.npz, atomically) with names, shapes and a checksum."""
        m = {"model": type(self).__name__, "config": self.config()}
        if meta:
            m.update(meta)
        save_npz_params(path, self.param_names, [backend.to_cpu(p) for p in self.params], m)

    def load_params(self, path):
        """Read weights saved by save_params; count, names and shapes must match. Returns meta."""
        arrays, meta = load_npz_params(path, self.param_names, [p.shape for p in self.params])
        for p, a in zip(self.params, arrays):
            p[...] = backend.asarray(a.astype(p.dtype))
        return meta
