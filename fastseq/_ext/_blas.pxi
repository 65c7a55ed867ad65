# BLAS products, and whether chunks may run on several threads.
#
# The BLAS is OpenBLAS as the scipy-openblas32 package ships it (the build NumPy and SciPy are
# made with): its header declares the scipy_-prefixed CBLAS functions, and importing the package
# (fastseq/_ext/__init__.py) loads the library into the process's global namespace, where this
# module's references to them are resolved when it is imported.
#
# Calls are column-major: a row-major C = A B is computed as the column-major C^T = B^T A^T, so
# every call in this module passes its operands swapped. Each chunk runs its products on one
# BLAS thread: fastseq.backend limits this BLAS to one thread through threadpoolctl and then
# calls set_blas_serial(True); until then every kernel runs its chunks on the calling thread.

cdef extern from "cblas.h" nogil:
    ctypedef int blasint
    cdef enum CBLAS_ORDER:
        CblasColMajor
    cdef enum CBLAS_TRANSPOSE:
        CblasNoTrans
        CblasTrans
    void scipy_cblas_sgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m,
                           blasint n, blasint k, float alpha, const float *a, blasint lda,
                           const float *b, blasint ldb, float beta, float *c, blasint ldc)
    void scipy_cblas_dgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m,
                           blasint n, blasint k, double alpha, const double *a, blasint lda,
                           const double *b, blasint ldb, double beta, double *c, blasint ldc)
    void scipy_cblas_sgemv(CBLAS_ORDER order, CBLAS_TRANSPOSE t, blasint m, blasint n,
                           float alpha, const float *a, blasint lda, const float *x,
                           blasint incx, float beta, float *y, blasint incy)
    void scipy_cblas_dgemv(CBLAS_ORDER order, CBLAS_TRANSPOSE t, blasint m, blasint n,
                           double alpha, const double *a, blasint lda, const double *x,
                           blasint incx, double beta, double *y, blasint incy)


cdef inline CBLAS_TRANSPOSE _op(char t) noexcept nogil:
    return CblasNoTrans if t == c'N' else CblasTrans

cdef bint _blas_serial = False


def set_blas_serial(bint serial):
    """Whether the kernels' BLAS runs each call on the calling thread alone (then, and only then,
    chunks run on fastseq's worker threads)."""
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
    cdef int rows = m, cols = k, inc = 1 if tb == c'N' else ldb
    if ta != c'N':  # op(A) = A^T: A is stored k x m
        rows, cols = k, m
    if beta == 0:  # gemv may scale y by beta (0 * NaN is NaN); gemm never reads C then
        memset(c, 0, m * sizeof(floating))
    if floating is float:
        scipy_cblas_sgemv(CblasColMajor, _op(ta), rows, cols, alpha, a, lda, b, inc, beta, c, 1)
    else:
        scipy_cblas_dgemv(CblasColMajor, _op(ta), rows, cols, alpha, a, lda, b, inc, beta, c, 1)


cdef inline void _gemm(char ta, char tb, int m, int n, int k, floating alpha, const floating *a,
                       int lda, const floating *b, int ldb, floating beta, floating *c,
                       int ldc) noexcept nogil:
    """Column-major C = alpha op(A) op(B) + beta C (one column of C: _gemv)."""
    if n == 1 and m > 0 and k > 0:
        _gemv(ta, tb, m, k, alpha, a, lda, b, ldb, beta, c)
    elif floating is float:
        scipy_cblas_sgemm(CblasColMajor, _op(ta), _op(tb), m, n, k, alpha, a, lda, b, ldb, beta,
                          c, ldc)
    else:
        scipy_cblas_dgemm(CblasColMajor, _op(ta), _op(tb), m, n, k, alpha, a, lda, b, ldb, beta,
                          c, ldc)
