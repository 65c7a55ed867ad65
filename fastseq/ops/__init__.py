"""Every op with engine-specific code, one module per engine behind one registry.

    _numpy   NumPy (the LSTM in _numpy.py, the other ops in _numpy_math.py); CuPy arrays run
             through the same calls where the cupy engine has no code of its own
    _cython  the compiled CPU kernels (fastseq/_ext/_cpu), NumPy's code for what they do not take
    _cupy    fused CUDA kernels and cuBLAS (GPU): the LSTM in _cupy.py, the other ops in
             _cupy_math.py

``engine_for(*arrays)`` is the one way to pick the code that runs an op: CuPy arrays go to _cupy,
float32 and float64 host arrays to _cython when fastseq.backend's engine is cython, everything
else to _numpy. Every engine module has the same functions, with the same signatures and
results (up to rounding):

    LSTM      forward, backward, step, stepper, final_state    (protocol stated in _numpy.py)
    products  matmul(a, b, out=None)
    softmax   exp_rows(S), softmax_cross_entropy(scores, labels, ignore_label)
    embedding embed_gather(W, idx) -> (rows, ids), embed_scatter(dW, ids, dout, accumulate)
    training  adam_update(params, grads, ms, vs, lr, beta1, beta2, step, state) -> state,
              clip_grads(grads, max_norm) -> norm, dropout_mask(shape, dtype, keep, state),
              dropout(xs, keep, key, out=None) -> xs times the mask of the draw with
              that key

No engine knows about vocabularies, output layers or decoding: those are fastseq.decoding's.
"""
import functools
import importlib

import numpy as np

from .. import backend
from . import _numpy

_CYTHON_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # others: the numpy engine


@functools.cache
def engine(name):
    """The engine module called name ('numpy', 'cython' or 'cupy'), imported on first use (the
    numpy engine never loads _cython)."""
    return importlib.import_module(f"{__name__}._{name}")


def engine_for(*arrays):
    """The engine module that runs ops on these arrays (see the module docstring)."""
    if type(arrays[0]) is not np.ndarray and backend.get_array_module(*arrays) is not np:
        return engine("cupy")
    if backend.config.engine == "cython" and arrays[0].dtype in _CYTHON_DTYPES:
        return engine("cython")
    return _numpy
