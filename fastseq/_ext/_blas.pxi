# BLAS products through SciPy's cython_blas, and whether chunks may run on several threads.
#
# BLAS is column-major: a row-major C = A B is computed as the column-major C^T = B^T A^T, so
# every call in this module passes its operands swapped. Each chunk runs its products on one
# BLAS thread: fastseq.backend limits SciPy's BLAS to one thread through threadpoolctl and then
# calls set_blas_serial(True); until then every kernel runs its chunks on the calling thread.

cdef bint _blas_serial = False


def set_blas_serial(bint serial):
    """Whether the BLAS behind cython_blas runs each call on the calling thread alone (then, and
    only then, chunks run on fastseq's worker threads)."""
    global _blas_serial
    _blas_serial = serial


def can_thread():
    """Whether chunks can run on several threads: POSIX threads (fs_pool.h) and a serial BLAS."""
    return bool(FS_HAVE_POOL) and _blas_serial


def chunks_helped():
    """How many chunks fastseq's worker threads (not the calling threads) have run so far."""
    return fs_pool_helped()


cdef inline void _gemv(char ta, char tb, int m, int k, floating alpha, const floating *a,
                       int lda, const floating *b, int ldb, floating beta,
                       floating *c) noexcept nogil:
    """_gemm for one column of C (one row of the row-major result: generation's step) as a
    matrix-vector product: gemm would first copy all of A into its packed layout, which for a
    single column costs several times the product."""
    cdef char t = ta
    cdef int rows = m, cols = k, inc = 1 if tb == c'N' else ldb, one = 1
    if ta != c'N':  # op(A) = A^T: A is stored k x m
        rows, cols = k, m
    if beta == 0:  # gemv may scale y by beta (0 * NaN is NaN); gemm never reads C then
        memset(c, 0, m * sizeof(floating))
    if floating is float:
        sgemv(&t, &rows, &cols, &alpha, <float *>a, &lda, <float *>b, &inc, &beta, c, &one)
    else:
        dgemv(&t, &rows, &cols, &alpha, <double *>a, &lda, <double *>b, &inc, &beta, c, &one)


cdef inline void _gemm(char ta, char tb, int m, int n, int k, floating alpha, const floating *a,
                       int lda, const floating *b, int ldb, floating beta, floating *c,
                       int ldc) noexcept nogil:
    """Column-major C = alpha op(A) op(B) + beta C (one column of C: _gemv)."""
    if n == 1 and m > 0 and k > 0:
        _gemv(ta, tb, m, k, alpha, a, lda, b, ldb, beta, c)
    elif floating is float:
        sgemm(&ta, &tb, &m, &n, &k, &alpha, <float *>a, &lda, <float *>b, &ldb, &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &m, &n, &k, &alpha, <double *>a, &lda, <double *>b, &ldb, &beta, c, &ldc)
