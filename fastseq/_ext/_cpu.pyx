# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""fastseq's compiled CPU kernels (float32 and float64), one module: the cython engine of
fastseq.ops calls them; nothing else imports this module but fastseq.backend.

    _blas.pxi       BLAS products (the scipy-openblas32 library) and the threads that may run them
    _lstm.pxi       the fused LSTM: forward, backward, final_state (the recurrence alone)
    _products.pxi   chunked products and exp_rows for the layers around the LSTM
    _ops.pxi        softmax cross-entropy passes, embedding gather and scatter-add
    _optim.pxi      Adam, the gradients' sum of squares and scaling (clipping)
    _dropout.pxi    inverted dropout masks from a counter-based hash, generated and applied

The element-wise math is C in the fs_*.h headers. Work is cut into chunks whose number and
bounds depend on the shapes alone; fastseq's worker threads (fs_pool.h, one set per process)
take them from a shared counter, and partial sums are added in chunk order, so every result has
the same bits whatever the thread count or the machine's load.
"""
import numpy as np

cimport numpy as cnp
from libc.math cimport log
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

cnp.import_array()


ctypedef fused floating:
    float
    double


cdef extern from "fs_pool.h":
    ctypedef void (*fs_task)(void *tag, void *ctx, Py_ssize_t k, int tid) noexcept nogil
    void fs_pool_run(int team, Py_ssize_t ntask, fs_task fn, void *ctx) noexcept nogil
    int FS_HAVE_POOL
    long fs_pool_helped() noexcept nogil


cdef extern from "fs_simd.h":
    const char *fs_simd_level() noexcept nogil


def simd_level():
    """The instruction-set level the kernels run at here: 'x86-64-v4' (AVX-512), 'x86-64-v3'
    (AVX2 + FMA) or 'x86-64' (SSE2), picked for this CPU at import from the clones compiled (or
    the single level a FASTSEQ_SIMD build was compiled for)."""
    return fs_simd_level().decode()


include "_blas.pxi"
include "_lstm.pxi"
include "_products.pxi"
include "_ops.pxi"
include "_optim.pxi"
include "_dropout.pxi"
