# Products and softmax rows for the layers around the LSTM, in chunks fixed by the shapes.

cdef extern from "fs_bmm.h":
    void fs_mm_rowsf(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float *A, Py_ssize_t a_rs,
                     Py_ssize_t a_cs, const float *B, Py_ssize_t b_rs, float *out) noexcept nogil
    void fs_mm_rowsd(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const double *A, Py_ssize_t a_rs,
                     Py_ssize_t a_cs, const double *B, Py_ssize_t b_rs, double *out) noexcept nogil
    void fs_mm_dotsf(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float *A, Py_ssize_t a_rs,
                     const float *B, Py_ssize_t b_cs, float *out) noexcept nogil
    void fs_mm_dotsd(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const double *A, Py_ssize_t a_rs,
                     const double *B, Py_ssize_t b_cs, double *out) noexcept nogil


cdef enum:
    MATMUL_CHUNK_WORK = 1 << 18  # multiply-adds per chunk at least: hand-offs cost less
    MATMUL_MAX_CHUNKS = 4        # each chunk's BLAS call packs the whole other operand again


cdef void _matmul_chunk(Py_ssize_t q, Py_ssize_t nq, bint by_rows, Py_ssize_t M, Py_ssize_t N,
                        Py_ssize_t K, const floating *a, bint a_t, Py_ssize_t lda,
                        const floating *b, bint b_t, Py_ssize_t ldb,
                        floating *out) noexcept nogil:
    """Rows (by_rows) or columns [q*X/nq, (q+1)*X/nq) of out (M, N) = a (M, K) @ b (K, N), as
    the column-major out^T = b^T a^T; a_t / b_t: the operand is a transposed (F-ordered) view."""
    cdef Py_ssize_t X = M if by_rows else N
    cdef Py_ssize_t i0 = q * X // nq, i1 = (q + 1) * X // nq
    if by_rows:
        _gemm(c'T' if b_t else c'N', c'T' if a_t else c'N', <int>N, <int>(i1 - i0), <int>K,
              <floating>1, b, <int>ldb, a + (i0 if a_t else i0 * lda), <int>lda, <floating>0,
              out + i0 * N, <int>N)
    else:
        _gemm(c'T' if b_t else c'N', c'T' if a_t else c'N', <int>(i1 - i0), <int>M, <int>K,
              <floating>1, b + (i0 * ldb if b_t else i0), <int>ldb, a, <int>lda, <floating>0,
              out + i0, <int>N)


cdef struct MmJob:
    # matmul (_matmul_task), bmatmul (_bmatmul_task), exp_rows (_exp_rows_task): nq chunks
    Py_ssize_t nq, B, M, N, K, sa, sb
    bint by_rows, a_t, b_t
    Py_ssize_t lda, ldb
    const void *a
    const void *b
    void *out
    void *z


cdef void _matmul_task(floating *tag, void *ctx, Py_ssize_t q, int tid) noexcept nogil:
    cdef MmJob *j = <MmJob *>ctx
    _matmul_chunk(q, j.nq, j.by_rows, j.M, j.N, j.K, <const floating *>j.a, j.a_t, j.lda,
                  <const floating *>j.b, j.b_t, j.ldb, <floating *>j.out)


cdef inline bint _operand(const floating[:, :] x, bint *trans, Py_ssize_t *ld) noexcept:
    """Whether x (rows, cols) is C-ordered (trans False, ld = its row stride) or an F-ordered
    transposed view (trans True, ld = its column stride), as BLAS can read it."""
    cdef Py_ssize_t isz = sizeof(floating)
    if x.strides[1] == isz and x.strides[0] % isz == 0 and x.strides[0] >= x.shape[1] * isz:
        trans[0], ld[0] = False, x.strides[0] // isz if x.shape[0] > 1 else max(x.shape[1], 1)
        return True
    if x.strides[0] == isz and x.strides[1] % isz == 0 and x.strides[1] >= x.shape[0] * isz:
        trans[0], ld[0] = True, x.strides[1] // isz if x.shape[1] > 1 else max(x.shape[0], 1)
        return True
    return False


def matmul(const floating[:, :] a, const floating[:, :] b, floating[:, ::1] out, int nthreads=1):
    """out = a @ b in chunks of rows (or of columns, for a wide out) fixed by the shapes, taken by
    up to nthreads threads with single-threaded BLAS: the sum over K is never split, so the
    result is the same whatever the thread count. a and b may be C-ordered or transposed views.
    Returns False (nothing written) when an operand's strides do not suit BLAS."""
    cdef Py_ssize_t M = a.shape[0], K = a.shape[1], N = b.shape[1], q, nq
    cdef bint a_t, b_t, by_rows = a.shape[0] >= b.shape[1]
    cdef Py_ssize_t lda, ldb
    if b.shape[0] != K or out.shape[0] != M or out.shape[1] != N:
        raise ValueError(f"matmul: shapes {(M, K)} @ {tuple(b.shape)[:2]} -> {tuple(out.shape)[:2]}")
    if M == 0 or N == 0:
        return True
    if K == 0:
        memset(&out[0, 0], 0, M * N * sizeof(floating))
        return True
    if not _operand(a, &a_t, &lda) or not _operand(b, &b_t, &ldb):
        return False
    nq = min(M * N * K // MATMUL_CHUNK_WORK + 1, MATMUL_MAX_CHUNKS, M if by_rows else N)
    nq = _even(nq)
    cdef int team = _team(nthreads, nq)
    cdef MmJob job
    job.nq, job.M, job.N, job.K, job.by_rows = nq, M, N, K, by_rows
    job.a, job.a_t, job.lda, job.b, job.b_t, job.ldb = &a[0, 0], a_t, lda, &b[0, 0], b_t, ldb
    job.out = &out[0, 0]
    with nogil:
        fs_pool_run(team, nq, <fs_task>_matmul_task[floating], &job)
    return True


cdef enum:
    BMATMUL_CHUNK_WORK = 1 << 19  # stacked products are small and memory-bound: split them sooner
    SMALL_MM_WORK = 1 << 15       # multiply-adds per matrix below which plain loops beat a BLAS call


cdef void _bmatmul_chunk(Py_ssize_t q, Py_ssize_t nq, Py_ssize_t B, int M, int N, int K,
                         const floating *a, Py_ssize_t sa, bint a_t, int lda,
                         const floating *b, Py_ssize_t sb, bint b_t, int ldb,
                         floating *out) noexcept nogil:
    """Matrices [q*B/nq, (q+1)*B/nq) of the stack out[i] = a[i] @ b[i] (a[i] starts sa elements
    after a[i-1], b[i] sb after b[i-1]), each as the column-major out^T = b^T a^T."""
    cdef Py_ssize_t i, a_rs = 1 if a_t else lda, a_cs = lda if a_t else 1
    cdef int form = 0  # 0: BLAS, 1: rows, 2: dots (fs_bmm.h)
    if <Py_ssize_t>M * N * K < SMALL_MM_WORK:
        form = 1 if not b_t else (2 if not a_t else 0)
    for i in range(q * B // nq, (q + 1) * B // nq):
        if form == 1:
            if floating is float:
                fs_mm_rowsf(M, N, K, a + i * sa, a_rs, a_cs, b + i * sb, ldb, out + i * M * N)
            else:
                fs_mm_rowsd(M, N, K, a + i * sa, a_rs, a_cs, b + i * sb, ldb, out + i * M * N)
        elif form == 2:
            if floating is float:
                fs_mm_dotsf(M, N, K, a + i * sa, lda, b + i * sb, ldb, out + i * M * N)
            else:
                fs_mm_dotsd(M, N, K, a + i * sa, lda, b + i * sb, ldb, out + i * M * N)
        else:
            _gemm(c'T' if b_t else c'N', c'T' if a_t else c'N', N, M, K, <floating>1, b + i * sb,
                  ldb, a + i * sa, lda, <floating>0, out + i * M * N, N)


cdef void _bmatmul_task(floating *tag, void *ctx, Py_ssize_t q, int tid) noexcept nogil:
    cdef MmJob *j = <MmJob *>ctx
    _bmatmul_chunk(q, j.nq, j.B, <int>j.M, <int>j.N, <int>j.K, <const floating *>j.a, j.sa,
                   j.a_t, <int>j.lda, <const floating *>j.b, j.sb, j.b_t, <int>j.ldb,
                   <floating *>j.out)


def bmatmul(const floating[:, :, :] a, const floating[:, :, :] b, floating[:, :, ::1] out,
            int nthreads=1):
    """out[i] = a[i] @ b[i] for a stack of B matrices, in chunks of whole matrices fixed by the
    shapes on up to nthreads threads (so the same bits for any thread count). Each a[i], b[i] may
    be C-ordered or a transposed view. NumPy: np.matmul(a, b, out=out). Returns False (nothing
    written) when an operand's strides do not suit BLAS."""
    cdef Py_ssize_t B = a.shape[0], M = a.shape[1], K = a.shape[2], N = b.shape[2], q, nq
    cdef Py_ssize_t isz = sizeof(floating)
    cdef bint a_t, b_t
    cdef Py_ssize_t lda, ldb
    if b.shape[0] != B or b.shape[1] != K or out.shape[0] != B or out.shape[1] != M \
            or out.shape[2] != N:
        raise ValueError(f"bmatmul: shapes {(B, M, K)} @ {tuple(b.shape)[:3]} -> "
                         f"{tuple(out.shape)[:3]}")
    if B == 0 or M == 0 or N == 0:
        return True
    if K == 0:
        memset(&out[0, 0, 0], 0, B * M * N * isz)
        return True
    if a.strides[0] % isz or b.strides[0] % isz:
        return False
    if not _operand(a[0], &a_t, &lda) or not _operand(b[0], &b_t, &ldb):
        return False
    nq = min(B * M * N * K // BMATMUL_CHUNK_WORK + 1, MATMUL_MAX_CHUNKS, B)
    nq = _even(nq)
    cdef int team = _team(nthreads, nq)
    cdef MmJob job
    job.nq, job.B, job.M, job.N, job.K = nq, B, M, N, K
    job.a, job.sa, job.a_t, job.lda = &a[0, 0, 0], a.strides[0] // isz, a_t, lda
    job.b, job.sb, job.b_t, job.ldb = &b[0, 0, 0], b.strides[0] // isz, b_t, ldb
    job.out = &out[0, 0, 0]
    with nogil:
        fs_pool_run(team, nq, <fs_task>_bmatmul_task[floating], &job)
    return True


cdef void _exp_rows_chunk(Py_ssize_t q, Py_ssize_t nq, floating *S, Py_ssize_t M, Py_ssize_t V,
                          floating *z) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(q * M // nq, (q + 1) * M // nq):
        if floating is float:
            z[i] = fs_exp_rowf(S + i * V, V)
        else:
            z[i] = fs_exp_rowd(S + i * V, V)


cdef void _exp_rows_task(floating *tag, void *ctx, Py_ssize_t q, int tid) noexcept nogil:
    cdef MmJob *j = <MmJob *>ctx
    _exp_rows_chunk(q, j.nq, <floating *>j.out, j.M, j.N, <floating *>j.z)


def exp_rows(floating[:, ::1] S, floating[::1] z, int nthreads=1):
    """S = exp(S) in place and z = S.sum(1), for scores shifted to <= 0 (a softmax's numerator
    and denominator), in row chunks fixed by the shape on up to nthreads threads."""
    cdef Py_ssize_t M = S.shape[0], V = S.shape[1], q
    cdef Py_ssize_t nq = min(M * V // MATMUL_CHUNK_WORK + 1, MATMUL_MAX_CHUNKS, M)
    nq = _even(nq)
    if z.shape[0] != M:
        raise ValueError(f"z has {z.shape[0]} elements, expected {M}")
    if M == 0 or V == 0:
        for q in range(M):
            z[q] = 0
        return
    cdef MmJob job
    job.nq, job.M, job.N, job.out, job.z = nq, M, V, &S[0, 0], &z[0]
    with nogil:
        fs_pool_run(nthreads, nq, <fs_task>_exp_rows_task[floating], &job)

