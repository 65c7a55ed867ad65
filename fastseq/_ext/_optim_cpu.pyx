# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Fused optimiser updates: one pass over each parameter instead of a dozen NumPy passes.

NumPy equivalent of adam_update (fastseq.optim.Adam):
    m += (1 - beta1) * (g - m)
    v += (1 - beta2) * (g * g - v)
    p -= lr_t * m / (sqrt(v) + eps)
"""
from libc.math cimport sqrt

ctypedef fused real:
    float
    double


def adam_update(real[::1] p, real[::1] g, real[::1] m, real[::1] v,
                double lr_t, double one_minus_beta1, double one_minus_beta2, double eps):
    cdef Py_ssize_t i, n = p.shape[0]
    cdef real a = <real>one_minus_beta1
    cdef real b = <real>one_minus_beta2
    cdef real lr = <real>lr_t
    cdef real e = <real>eps
    cdef real gi
    if g.shape[0] != n or m.shape[0] != n or v.shape[0] != n:
        raise ValueError("adam_update: p, g, m, v must have the same size")
    with nogil:
        for i in range(n):
            gi = g[i]
            m[i] += a * (gi - m[i])
            v[i] += b * (gi * gi - v[i])
            p[i] -= lr * m[i] / (sqrt(v[i]) + e)
