# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Fused optimiser updates: one pass over each parameter instead of a dozen NumPy passes.

NumPy equivalent of adam_update (fastseq.optim.Adam):
    m += (1 - beta1) * (g - m)
    v += (1 - beta2) * (g * g - v)
    p -= lr_t * m / (sqrt(v) + eps)
(Two plain functions rather than a fused type: a fused def dispatches slowly on every call.)
"""
from libc.math cimport sqrt, sqrtf


def adam_update_f32(float[::1] p, float[::1] g, float[::1] m, float[::1] v,
                    float lr_t, float a, float b, float eps):
    cdef Py_ssize_t i, n = p.shape[0]
    cdef float gi, mi, vi
    if g.shape[0] != n or m.shape[0] != n or v.shape[0] != n:
        raise ValueError("adam_update: p, g, m, v must have the same size")
    with nogil:
        for i in range(n):
            gi = g[i]
            mi = m[i] + a * (gi - m[i])
            vi = v[i] + b * (gi * gi - v[i])
            m[i] = mi
            v[i] = vi
            p[i] -= lr_t * mi / (sqrtf(vi) + eps)


def adam_update_f64(double[::1] p, double[::1] g, double[::1] m, double[::1] v,
                    double lr_t, double a, double b, double eps):
    cdef Py_ssize_t i, n = p.shape[0]
    cdef double gi, mi, vi
    if g.shape[0] != n or m.shape[0] != n or v.shape[0] != n:
        raise ValueError("adam_update: p, g, m, v must have the same size")
    with nogil:
        for i in range(n):
            gi = g[i]
            mi = m[i] + a * (gi - m[i])
            vi = v[i] + b * (gi * gi - v[i])
            m[i] = mi
            v[i] = vi
            p[i] -= lr_t * mi / (sqrt(vi) + eps)
