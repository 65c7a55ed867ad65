# Inverted dropout, the mask generated and applied in one pass (C in fs_dropout.h): no random
# numbers stored, no float64 temporaries, and the same mask again for backward from the key.
#
# NumPy equivalent (fastseq.ops._numpy_math.dropout_mask):
#     dropout(x, out, a, b, thr, scale):  out = x * mask, mask[i] = scale if bits(i) < thr else 0
#
# Chunks of DROP_CHUNK elements fixed by the size; each element depends on its index alone, so the
# result is the same whatever the thread count.

from libc.stdint cimport uint32_t

cdef extern from "fs_dropout.h":
    void fs_dropout_f(Py_ssize_t i0, Py_ssize_t i1, const float *x, float *out, uint32_t a,
                      uint32_t b, uint32_t thr, float scale) noexcept nogil
    void fs_dropout_d(Py_ssize_t i0, Py_ssize_t i1, const double *x, double *out, uint32_t a,
                      uint32_t b, uint32_t thr, double scale) noexcept nogil


cdef enum:
    DROP_CHUNK = 1 << 16


cdef struct DropJob:
    const void *x
    void *out
    Py_ssize_t n
    uint32_t a, b, thr
    double scale
    bint f32


cdef void _dropout_task(void *tag, void *ctx, Py_ssize_t q, int tid) noexcept nogil:
    cdef DropJob *j = <DropJob *>ctx
    cdef Py_ssize_t i0 = q * DROP_CHUNK
    cdef Py_ssize_t i1 = i0 + DROP_CHUNK if i0 + DROP_CHUNK < j.n else j.n
    if j.f32:
        fs_dropout_f(i0, i1, <const float *>j.x, <float *>j.out, j.a, j.b, j.thr, <float>j.scale)
    else:
        fs_dropout_d(i0, i1, <const double *>j.x, <double *>j.out, j.a, j.b, j.thr, j.scale)


def dropout(const floating[::1] x, floating[::1] out, uint32_t a, uint32_t b, uint32_t thr,
            double scale, int nthreads=1):
    """out = x * mask over flat arrays (out may be x), mask as in fs_dropout.h (fewer than
    2^32 elements); scale is rounded to the arrays' precision first."""
    cdef DropJob job
    cdef Py_ssize_t n = x.shape[0], chunks
    if out.shape[0] != n:
        raise ValueError(f"out has {out.shape[0]} elements, x has {n}")
    if n > <Py_ssize_t>0xFFFFFFFF:
        raise ValueError(f"dropout takes fewer than 2^32 elements, got {n}")
    if n == 0:
        return
    chunks = (n + DROP_CHUNK - 1) // DROP_CHUNK
    job.x, job.out, job.n = &x[0], &out[0], n
    job.a, job.b, job.thr, job.scale, job.f32 = a, b, thr, scale, floating is float
    with nogil:
        fs_pool_run(nthreads if chunks > 1 else 1, chunks, _dropout_task, &job)
