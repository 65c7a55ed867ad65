# Fused optimiser kernels over a whole parameter list: one call, one pass per array, vectorised
# (AVX-512 / AVX2 clones) and, for large lists, split over fastseq's worker threads.
#
# NumPy equivalents:
#     adam_update:   for each (p, g, m, v):
#                        m += (1 - beta1) * (g - m)
#                        v += (1 - beta2) * (g * g - v)
#                        p -= lr_t * m / (sqrt(v) + eps)
#     sum_squares:   sum(float((g.astype(float64) ** 2).sum()) for g in gs)
#     scale:         for g in gs: g *= rate
#
# The elements of a list, concatenated, are cut into chunks of CHUNK elements. Each function takes
# nthreads (default 1): threads, used for lists of at least PARALLEL_MIN elements, take the chunks
# one at a time (a descheduled thread just takes fewer), and sum_squares adds the chunks' sums in
# chunk order, so every result is the same whatever the thread count. Each touches nothing
# and returns False (sum_squares: None) unless all arrays are C-contiguous, writeable float32 or
# float64 NumPy arrays with matching sizes and dtypes; the caller then uses NumPy.

cdef extern from "fs_optim.h":
    void fs_adam_f(Py_ssize_t i0, Py_ssize_t i1, float *p, const float *g, float *m, float *v,
                   float a, float b, float lr, float eps) noexcept nogil
    void fs_adam_d(Py_ssize_t i0, Py_ssize_t i1, double *p, const double *g, double *m,
                   double *v, double a, double b, double lr, double eps) noexcept nogil
    double fs_sumsq_f(Py_ssize_t i0, Py_ssize_t i1, const float *g) noexcept nogil
    double fs_sumsq_d(Py_ssize_t i0, Py_ssize_t i1, const double *g) noexcept nogil
    void fs_scale_f(Py_ssize_t i0, Py_ssize_t i1, float *g, float r) noexcept nogil
    void fs_scale_d(Py_ssize_t i0, Py_ssize_t i1, double *g, double r) noexcept nogil


cdef enum:
    CHUNK = 1 << 15
    PARALLEL_MIN = 2 * CHUNK


cdef bint _ok(object a, int typenum, Py_ssize_t n):
    return (type(a) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a) and cnp.PyArray_SIZE(<cnp.ndarray>a) == n
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a))


cdef int _common_type(list arrays):
    """NPY_FLOAT32 or NPY_FLOAT64 when every array is a C-contiguous writeable ndarray of that
    type, else -1."""
    cdef int typenum = -1
    for a in arrays:
        if type(a) is not cnp.ndarray:
            return -1
        if typenum == -1:
            typenum = cnp.PyArray_TYPE(<cnp.ndarray>a)
            if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
                return -1
        if not _ok(a, typenum, cnp.PyArray_SIZE(<cnp.ndarray>a)):
            return -1
    return typenum


cdef struct Lists:
    Py_ssize_t K           # arrays per list
    Py_ssize_t total       # elements in all
    Py_ssize_t *start      # start[k]: index of array k's first element in the concatenation
    void **ptr             # ptr[j * K + k]: data of array k of list j


cdef int _lists(Lists *L, list lists, int *typenum) except -1:
    """Fill L from lists of equally many, equally sized arrays of one dtype. Returns 0, or 1
    when they do not qualify (L is then empty)."""
    cdef Py_ssize_t K = len(lists[0]), k, j, n
    L.K, L.total, L.start, L.ptr = K, 0, NULL, NULL
    typenum[0] = -1
    for lst in lists:
        if len(lst) != K:
            return 1
    if K == 0:
        return 1
    cdef int t = _common_type(lists[0])
    if t < 0:
        return 1
    for j in range(1, len(lists)):
        if _common_type(lists[j]) != t:
            return 1
        for k in range(K):
            if cnp.PyArray_SIZE(<cnp.ndarray>lists[j][k]) != cnp.PyArray_SIZE(<cnp.ndarray>lists[0][k]):
                return 1
    L.start = <Py_ssize_t *>malloc((K + 1) * sizeof(Py_ssize_t))
    L.ptr = <void **>malloc(K * len(lists) * sizeof(void *))
    if L.start == NULL or L.ptr == NULL:
        _free(L)
        raise MemoryError()
    for k in range(K):
        L.start[k] = L.total
        L.total += cnp.PyArray_SIZE(<cnp.ndarray>lists[0][k])
        for j in range(len(lists)):
            L.ptr[j * K + k] = cnp.PyArray_DATA(<cnp.ndarray>lists[j][k])
    L.start[K] = L.total
    typenum[0] = t
    return 0


cdef void _free(Lists *L) noexcept:
    free(L.start)
    free(L.ptr)
    L.start, L.ptr = NULL, NULL


cdef inline Py_ssize_t _list_chunks(Lists *L) noexcept nogil:
    return (L.total + CHUNK - 1) // CHUNK


cdef inline Py_ssize_t _end(Lists *L, Py_ssize_t q) noexcept nogil:
    """End of chunk q."""
    return (q + 1) * CHUNK if (q + 1) * CHUNK < L.total else L.total


cdef struct Job:
    Lists *L
    bint f32
    double a, b, lr, eps, rate
    double *parts


cdef void _run(Lists *L, int nthreads, fs_task fn, Job *job) noexcept nogil:
    fs_pool_run(nthreads if L.total >= PARALLEL_MIN else 1, _list_chunks(L), fn, job)


# Each kernel below runs over a share [e0, e1) of the concatenated elements: it walks the arrays
# that overlap the share and calls the per-array C loop on the overlapping part.

cdef inline bint _overlap(Lists *L, Py_ssize_t k, Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t *i0,
                          Py_ssize_t *i1) noexcept nogil:
    """[i0, i1): the part of array k inside the share [e0, e1), in the array's own indices;
    False when empty."""
    i0[0] = (e0 if e0 > L.start[k] else L.start[k]) - L.start[k]
    i1[0] = (e1 if e1 < L.start[k + 1] else L.start[k + 1]) - L.start[k]
    return i1[0] > i0[0]

cdef void _adam_share(Lists *L, bint f32, Py_ssize_t e0, Py_ssize_t e1, double a, double b,
                      double lr, double eps) noexcept nogil:
    cdef Py_ssize_t k, i0, i1, K = L.K
    for k in range(K):
        if not _overlap(L, k, e0, e1, &i0, &i1):
            continue
        if f32:
            fs_adam_f(i0, i1, <float *>L.ptr[k], <float *>L.ptr[K + k], <float *>L.ptr[2 * K + k],
                      <float *>L.ptr[3 * K + k], <float>a, <float>b, <float>lr, <float>eps)
        else:
            fs_adam_d(i0, i1, <double *>L.ptr[k], <double *>L.ptr[K + k],
                      <double *>L.ptr[2 * K + k], <double *>L.ptr[3 * K + k], a, b, lr, eps)


cdef void _adam_task(void *tag, void *ctx, Py_ssize_t q, int tid) noexcept nogil:
    cdef Job *j = <Job *>ctx
    _adam_share(j.L, j.f32, q * CHUNK, _end(j.L, q), j.a, j.b, j.lr, j.eps)


def adam_update(list ps, list gs, list ms, list vs, double lr_t, double a, double b, double eps,
                int nthreads=1):
    """Update every parameter in place (a = 1 - beta1, b = 1 - beta2) on up to nthreads
    threads; returns True, or False (touching nothing) when the arrays do not qualify."""
    cdef Lists L
    cdef int typenum
    cdef Job job
    if not ps or _lists(&L, [ps, gs, ms, vs], &typenum):
        return False
    job.L, job.f32, job.a, job.b, job.lr, job.eps = &L, typenum == cnp.NPY_FLOAT32, a, b, lr_t, eps
    try:
        with nogil:
            _run(&L, nthreads, _adam_task, &job)
    finally:
        _free(&L)
    return True


cdef double _sumsq_share(Lists *L, bint f32, Py_ssize_t e0, Py_ssize_t e1) noexcept nogil:
    cdef Py_ssize_t k, i0, i1
    cdef double total = 0
    for k in range(L.K):
        if _overlap(L, k, e0, e1, &i0, &i1):
            total += (fs_sumsq_f(i0, i1, <float *>L.ptr[k]) if f32
                      else fs_sumsq_d(i0, i1, <double *>L.ptr[k]))
    return total


cdef void _sumsq_task(void *tag, void *ctx, Py_ssize_t q, int tid) noexcept nogil:
    cdef Job *j = <Job *>ctx
    j.parts[q] = _sumsq_share(j.L, j.f32, q * CHUNK, _end(j.L, q))


def sum_squares(list gs, int nthreads=1):
    """Sum of the squares of every element of every array (accumulated in float64), or None
    when the arrays do not qualify."""
    cdef Lists L
    cdef int typenum
    cdef Py_ssize_t q
    cdef double total = 0
    cdef double *parts
    cdef Job job
    if not gs or _lists(&L, [gs], &typenum):
        return None
    parts = <double *>malloc(_list_chunks(&L) * sizeof(double))
    job.L, job.f32, job.parts = &L, typenum == cnp.NPY_FLOAT32, parts
    try:
        if parts == NULL:
            raise MemoryError()
        with nogil:
            _run(&L, nthreads, _sumsq_task, &job)
            for q in range(_list_chunks(&L)):  # in chunk order
                total += parts[q]
    finally:
        free(parts)
        _free(&L)
    return total


cdef void _scale_share(Lists *L, bint f32, Py_ssize_t e0, Py_ssize_t e1, double r) noexcept nogil:
    cdef Py_ssize_t k, i0, i1
    for k in range(L.K):
        if _overlap(L, k, e0, e1, &i0, &i1):
            if f32:
                fs_scale_f(i0, i1, <float *>L.ptr[k], <float>r)
            else:
                fs_scale_d(i0, i1, <double *>L.ptr[k], r)


cdef void _scale_task(void *tag, void *ctx, Py_ssize_t q, int tid) noexcept nogil:
    cdef Job *j = <Job *>ctx
    _scale_share(j.L, j.f32, q * CHUNK, _end(j.L, q), j.rate)


def scale(list gs, double rate, int nthreads=1):
    """Multiply every array in place by rate; True, or False when they do not qualify."""
    cdef Lists L
    cdef int typenum
    cdef Job job
    if not gs or _lists(&L, [gs], &typenum):
        return False
    job.L, job.f32, job.rate = &L, typenum == cnp.NPY_FLOAT32, rate
    try:
        with nogil:
            _run(&L, nthreads, _scale_task, &job)
    finally:
        _free(&L)
    return True

