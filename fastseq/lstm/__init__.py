"""LSTM engines, one module each, all with the protocol stated in _numpy.py:

    _numpy   the reference (NumPy; also runs CuPy arrays through the same calls)
    _cython  fastseq/_ext/_lstm_cpu (CPU, float32/float64)
    _cupy    fused CuPy kernels (GPU)

get_kernel(x) picks the engine for an array from ``fastseq.backend.config``: CuPy arrays go to
_cupy; host arrays to _cython when the engine is cython, else to _numpy. The layer that uses
them, TimeLSTM, lives in fastseq.layers.
"""
import importlib

import numpy as np

from .. import backend
from . import _numpy

_engines = {}  # name -> module, imported on first use (the numpy engine never loads _cython)


def _engine(name):
    mod = _engines.get(name)
    if mod is None:
        mod = _engines[name] = importlib.import_module(f"{__name__}._{name}")
    return mod


def get_kernel(x):
    """The engine module that runs an LSTM over arrays like x (x's array module and dtype)."""
    if backend.get_array_module(x) is not np:
        return _engine("cupy")
    if backend.config.kernel == "cython" and x.dtype in (np.float32, np.float64):
        return _engine("cython")
    return _numpy
