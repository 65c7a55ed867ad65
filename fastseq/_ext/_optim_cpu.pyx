# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Fused optimiser update: one pass over each parameter, one call for the whole parameter list.

NumPy equivalent of adam_update (fastseq.optim.Adam), for each (p, g, m, v):
    m += (1 - beta1) * (g - m)
    v += (1 - beta2) * (g * g - v)
    p -= lr_t * m / (sqrt(v) + eps)
"""
from libc.math cimport sqrt, sqrtf

cimport numpy as cnp

cnp.import_array()


cdef bint _ok(object a, int typenum, Py_ssize_t n):
    return (type(a) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a) and cnp.PyArray_SIZE(<cnp.ndarray>a) == n
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a))


def adam_update(list ps, list gs, list ms, list vs, double lr_t, double a, double b, double eps):
    """Update every parameter in place; returns False (touching nothing) unless all arrays are
    C-contiguous float32 or float64 with matching sizes and dtypes."""
    cdef Py_ssize_t k, i, n, K = len(ps)
    cdef int typenum
    if len(gs) != K or len(ms) != K or len(vs) != K:
        return False
    for k in range(K):
        if type(ps[k]) is not cnp.ndarray:
            return False
        typenum = cnp.PyArray_TYPE(<cnp.ndarray>ps[k])
        if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
            return False
        n = cnp.PyArray_SIZE(<cnp.ndarray>ps[k])
        if not (_ok(ps[k], typenum, n) and _ok(gs[k], typenum, n) and _ok(ms[k], typenum, n)
                and _ok(vs[k], typenum, n)):
            return False
    cdef float *pf
    cdef float *gf
    cdef float *mf
    cdef float *vf
    cdef double *pd
    cdef double *gd
    cdef double *md
    cdef double *vd
    cdef float af = <float>a, bf = <float>b, lf = <float>lr_t, ef = <float>eps, x, mi, vi
    cdef double xd, mdi, vdi
    for k in range(K):
        n = cnp.PyArray_SIZE(<cnp.ndarray>ps[k])
        if cnp.PyArray_TYPE(<cnp.ndarray>ps[k]) == cnp.NPY_FLOAT32:
            pf = <float *>cnp.PyArray_DATA(<cnp.ndarray>ps[k])
            gf = <float *>cnp.PyArray_DATA(<cnp.ndarray>gs[k])
            mf = <float *>cnp.PyArray_DATA(<cnp.ndarray>ms[k])
            vf = <float *>cnp.PyArray_DATA(<cnp.ndarray>vs[k])
            with nogil:
                for i in range(n):
                    x = gf[i]
                    mi = mf[i] + af * (x - mf[i])
                    vi = vf[i] + bf * (x * x - vf[i])
                    mf[i] = mi
                    vf[i] = vi
                    pf[i] -= lf * mi / (sqrtf(vi) + ef)
        else:
            pd = <double *>cnp.PyArray_DATA(<cnp.ndarray>ps[k])
            gd = <double *>cnp.PyArray_DATA(<cnp.ndarray>gs[k])
            md = <double *>cnp.PyArray_DATA(<cnp.ndarray>ms[k])
            vd = <double *>cnp.PyArray_DATA(<cnp.ndarray>vs[k])
            with nogil:
                for i in range(n):
                    xd = gd[i]
                    mdi = md[i] + a * (xd - md[i])
                    vdi = vd[i] + b * (xd * xd - vd[i])
                    md[i] = mdi
                    vd[i] = vdi
                    pd[i] -= lr_t * mdi / (sqrt(vdi) + eps)
    return True
