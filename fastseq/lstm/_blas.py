"""NumPy's own BLAS, found through threadpoolctl: its gemm and gemv entry points for the Cython
kernel and its thread-count setters.

With pip wheels NumPy and SciPy each bundle an OpenBLAS, each with a thread pool whose workers
spin for a while after every call; a process that alternates between the two keeps both pools
busy on the same cores. So the kernel calls NumPy's copy (found here) rather than the SciPy one
it is compiled against, and `blas_threads(n)` limits that copy in the calling thread only.
"""
import ctypes
import functools
import os
from dataclasses import dataclass

import numpy as np

# (sgemm, dgemm, ILP64?) as each OpenBLAS build names its Fortran entry points (its gemv ones are
# named alike); None: ask the build configuration
_GEMM_NAMES = (("scipy_sgemm_64_", "scipy_dgemm_64_", True),  # NumPy >= 2 wheels
               ("sgemm_64_", "dgemm_64_", True),              # NumPy 1.2x wheels (openblas64_)
               ("scipy_sgemm_", "scipy_dgemm_", None),
               ("sgemm_", "dgemm_", None))
_CONFIG_NAMES = ("scipy_openblas_get_config64_", "openblas_get_config64_",
                 "scipy_openblas_get_config", "openblas_get_config")
_LOCAL_SETTERS = ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local64_",
                  "scipy_openblas_set_num_threads_local")
_GLOBAL_SETTERS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                   ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                   ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                   ("openblas_set_num_threads", "openblas_get_num_threads"))


@dataclass(frozen=True)
class Blas:
    """Addresses of one OpenBLAS's functions (0 where missing)."""
    path: str
    sgemm: int
    dgemm: int
    ilp64: bool
    sgemv: int        # 0 where missing: the kernel then runs one-row products through gemm
    dgemv: int
    set_local: int    # int openblas_set_num_threads_local(int): this thread only, returns the old
    set_global: int   # void set_num_threads(int)
    get_global: int   # int get_num_threads()


def _addr(lib, name):
    fn = getattr(lib, name, None)
    return ctypes.cast(fn, ctypes.c_void_p).value if fn is not None else 0


def _describe(lib, path):
    config = ""
    for name in _CONFIG_NAMES:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            config = (fn() or b"").decode("ascii", "replace")
            break
    for sname, dname, ilp64 in _GEMM_NAMES:
        if not (hasattr(lib, sname) and hasattr(lib, dname)):
            continue
        if ilp64 is None:  # integer width from the build configuration
            if not config:
                return None
            ilp64 = "USE64BITINT" in config
        local = next((_addr(lib, n) for n in _LOCAL_SETTERS if hasattr(lib, n)), 0)
        sset, sget = next(((_addr(lib, s), _addr(lib, g)) for s, g in _GLOBAL_SETTERS
                           if hasattr(lib, s) and hasattr(lib, g)), (0, 0))
        sgemv, dgemv = (_addr(lib, n.replace("gemm", "gemv")) for n in (sname, dname))
        if not (sgemv and dgemv):
            sgemv = dgemv = 0
        return Blas(path, _addr(lib, sname), _addr(lib, dname), ilp64, sgemv, dgemv, local, sset,
                    sget)
    return None


@functools.lru_cache(maxsize=None)
def numpy_blas():
    """The OpenBLAS that NumPy loaded (a Blas), or None when it cannot be identified with
    certainty (another BLAS, or an unknown naming)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    npdir = os.path.dirname(os.path.abspath(np.__file__))
    roots = (npdir + os.sep, npdir + ".libs" + os.sep)
    for c in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        if c.filepath and os.path.abspath(c.filepath).startswith(roots):
            return _describe(c.dynlib, c.filepath)
    return None


@functools.lru_cache(maxsize=None)
def _local_setter():
    blas = numpy_blas()
    if blas is None or not blas.set_local:
        return None
    return ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(blas.set_local)


class blas_threads:
    """Context manager: at most n threads for NumPy's OpenBLAS, in the calling thread only.

    Small products (one row times a matrix, as in word-by-word generation) run faster on one
    thread, and on a busy machine they avoid a hand-off to workers that may not be running. A
    no-op where NumPy's BLAS is not an OpenBLAS with a thread-local setter."""

    def __init__(self, n=1):
        self.n = max(1, int(n))
        self._old = None

    def __enter__(self):
        fn = _local_setter()
        if fn is not None:
            self._old = fn(self.n)
        return self

    def __exit__(self, *exc):
        fn = _local_setter()
        if fn is not None and self._old is not None:
            fn(self._old)  # 0: the thread had no setting of its own, and goes back to none
        self._old = None
        return False
