"""The one place that decides which array module (NumPy or CuPy) fastseq computes with.

Every other module asks here: ``backend.xp`` for creating new arrays, ``get_array_module(x)`` for
math on arrays it was given. CuPy is optional; when it cannot be used the reason is recorded and
raised, in one line, the moment a GPU is asked for.

    GPU=1 python -m fastseq.train          # choose CuPy at import
    fastseq.backend.use("cupy")            # or at run time
"""
import os
import sys

import numpy as np

xp = np  # the array module new arrays are created with

_cupy = None
_cupy_error = None


class BackendError(RuntimeError):
    """The requested engine cannot run here (message says what is missing)."""


def _load_cupy():
    global _cupy, _cupy_error
    if _cupy is not None or _cupy_error is not None:
        return _cupy
    try:
        import cupy
    except Exception as e:  # ImportError, or a CUDA library failing to load
        _cupy_error = f"CuPy is not installed or failed to import ({type(e).__name__}: {e}); " \
                      f"install it with `pip install fastseq[gpu]`"
        return None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            raise RuntimeError("no CUDA device found")
        # compile and run one tiny kernel: catches missing NVRTC / CUDA headers up front
        float((cupy.arange(2, dtype=cupy.float32) * 2).sum())
    except Exception as e:
        _cupy_error = f"CuPy is installed but no usable NVIDIA GPU was found ({type(e).__name__}: {e})"
        return None
    _cupy = cupy
    return _cupy


def use(name):
    """Select the engine for new arrays: "numpy" or "cupy". Raises BackendError if unusable."""
    global xp
    if name == "numpy":
        xp = np
    elif name == "cupy":
        cp = _load_cupy()
        if cp is None:
            raise BackendError(f"GPU requested but unavailable: {_cupy_error}")
        xp = cp
    else:
        raise ValueError(f"unknown engine {name!r}; expected 'numpy' or 'cupy'")
    return xp


def gpu_available():
    return _load_cupy() is not None


def is_gpu():
    return xp is not np


def _imported_cupy():
    """cupy if anything has imported it (arrays may come from user code), else None."""
    return _cupy if _cupy is not None else sys.modules.get("cupy")


def get_array_module(*arrays):
    """numpy or cupy, whichever owns the given arrays (numpy for plain Python values)."""
    cp = _imported_cupy()
    if cp is not None:
        return cp.get_array_module(*arrays)
    return np


def to_cpu(a):
    """A NumPy array (copied from the GPU when needed)."""
    cp = _imported_cupy()
    if cp is not None and isinstance(a, cp.ndarray):
        return cp.asnumpy(a)
    return np.asarray(a)


def to_gpu(a):
    """A CuPy array (raises BackendError when no GPU is usable)."""
    cp = _load_cupy()
    if cp is None:
        raise BackendError(f"GPU requested but unavailable: {_cupy_error}")
    return cp.asarray(a)


def asarray(a, dtype=None):
    """An array on the current engine's device."""
    if xp is np:
        return np.asarray(to_cpu(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def check_same_device(*arrays, what="arrays"):
    """Raise a clear TypeError when NumPy and CuPy arrays are mixed."""
    cp = _imported_cupy()
    if cp is None:
        return
    host = any(isinstance(a, np.ndarray) for a in arrays)
    device = any(isinstance(a, cp.ndarray) for a in arrays)
    if host and device:
        raise TypeError(f"{what} mix host (NumPy) and device (CuPy) arrays; "
                        "move them with fastseq.backend.to_gpu / to_cpu")


def info():
    """Which engines are in use: {'array': 'numpy'|'cupy', 'lstm': 'numpy'|'cython'|'cupy', ...}."""
    from .lstm import kernel_name
    d = {"array": "cupy" if is_gpu() else "numpy", "lstm": kernel_name()}
    if is_gpu():
        dev = xp.cuda.Device()
        d["device"] = xp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    return d


def describe():
    d = info()
    s = f"engine: {d['array']} arrays, {d['lstm']} LSTM kernel"
    if "device" in d:
        s += f" on {d['device']}"
    return s


if os.environ.get("GPU", "0") not in ("", "0", "false", "False", "no"):
    try:
        use("cupy")
    except BackendError:
        # Recorded; re-raised by require_requested_engine() / use("cupy") with the reason.
        pass


def requested_gpu():
    return os.environ.get("GPU", "0") not in ("", "0", "false", "False", "no")


def require_requested_engine():
    """Raise BackendError if GPU=1 was set but CuPy cannot run (the CLI turns it into exit 2)."""
    if requested_gpu() and not is_gpu():
        raise BackendError(f"GPU=1 was set but the GPU engine is unavailable: {_cupy_error}")
