# The fused LSTM. Layout (all buffers are allocated by the caller, time-major so that per-step
# slices are contiguous):
#
#     X  (T, N, D)      time-major copy of the input xs (N, T, D)
#     A  (T, N, 4H)     x_t Wx, then h_{t-1} Wh and b added, then overwritten in place by the
#                       activated gates [f | g | i | o]; backward overwrites them by dA
#     Hb (T+1, N, H)    Hb[0] = h0, Hb[t+1] = h_t  (Hb[:-1] is h_{t-1} for every t: one dWh product)
#     Cb (T+1, N, H)    Cb[0] = c0, Cb[t+1] = c_t
#     TC (T, N, H)      tanh(c_t)
#
# Two input variants: b may hold one bias per row (row_bias: (N, 4H) flattened, for a per-sequence
# input term such as PeekyDecoder's h Wx[:H]; backward then also sums dA_t per row), and the inputs
# may be one-hot rows given as ids (N, T), so that x_t Wx is a gather of Wx's rows and dWx a
# scatter-add of dA's rows (no dX).
#
# Chunks: rows are independent in the recurrence, so a batch of N >= 2 * min_chunk_rows rows is cut
# into chunks(N) chunks (2, or about N / (2 * min_chunk_rows), at most 8), a number fixed by N
# alone, and each chunk runs the whole time loop (x_t Wx, h_{t-1} Wh, the gate math; backward also
# its dX rows and its own shares of dWx, dWh, db). Threads take chunks one at a time from a shared
# counter (fs_pool.h): a thread the OS deschedules just takes fewer chunks, and nobody waits at a
# barrier per step. The shares are added in chunk order. Smaller batches run as one chunk, with
# the once-per-sequence products (x Wx, dWx, dWh, dX) as single calls over all steps. The gate
# math is in fs_lstm.h.

cdef extern from "fs_lstm.h":
    void fs_fwd_rowsf(Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t H, float *A, const float *b,
                      Py_ssize_t b_rs,
                      const float *cprev, float *c, float *tc, float *h) noexcept nogil
    void fs_fwd_rowsd(Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t H, double *A, const double *b,
                      Py_ssize_t b_rs,
                      const double *cprev, double *c, double *tc, double *h) noexcept nogil
    void fs_bwd_rowsf(Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t H, float *A, const float *dy,
                      Py_ssize_t dy_rs, const float *dhn, float *dc, const float *cprev,
                      const float *tc, double *dbacc) noexcept nogil
    void fs_bwd_rowsd(Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t H, double *A, const double *dy,
                      Py_ssize_t dy_rs, const double *dhn, double *dc, const double *cprev,
                      const double *tc, double *dbacc) noexcept nogil
    float fs_exp_rowf(float *s, Py_ssize_t n) noexcept nogil
    double fs_exp_rowd(double *s, Py_ssize_t n) noexcept nogil


# --- chunks --------------------------------------------------------------------------------------

cdef Py_ssize_t _min_chunk_rows = 32
cdef enum:
    MAX_CHUNKS = 8  # bounds the backward's dWx, dWh shares: MAX_CHUNKS (D + H) 4H elements


def set_min_chunk_rows(Py_ssize_t rows):
    """Rows per chunk at least (default 32: fewer make the per-step products inefficient); the
    tests lower it to run small batches in chunks. Returns the previous value."""
    global _min_chunk_rows
    old = _min_chunk_rows
    _min_chunk_rows = rows if rows > 0 else 1
    return old


cdef inline Py_ssize_t _even(Py_ssize_t n) noexcept nogil:
    """A chunk count above 2 rounded down to even: an odd one leaves one of two threads a chunk
    short."""
    return n - n % 2 if n > 2 else n


cdef inline Py_ssize_t _nchunks(Py_ssize_t N) noexcept nogil:
    # two chunks as soon as each gets min rows, then chunks of about twice that: fewer, larger
    # per-step products (and fewer dWx, dWh shares to add) pay more than finer load balancing
    cdef Py_ssize_t n = N // (2 * _min_chunk_rows)
    if N < 2 * _min_chunk_rows:
        return 1
    if n < 2:
        return 2
    return _even(n if n < MAX_CHUNKS else MAX_CHUNKS)


def chunks(Py_ssize_t N):
    """How many chunks a batch of N rows is cut into (1: the whole batch at once)."""
    return _nchunks(N)


cdef inline int _team(int nthreads, Py_ssize_t nc) noexcept nogil:
    """Threads for nc chunks."""
    if nthreads < 2 or nc < 2 or not FS_HAVE_POOL or not _blas_serial:
        return 1
    return nthreads if nthreads < nc else <int>nc


# --- helpers -------------------------------------------------------------------------------------

cdef inline bint _all_zero(const floating *x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if x[i] != 0:
            return False
    return True


cdef inline void _gather_rows(floating *dst, const floating *table, const int64_t *ids,
                             Py_ssize_t ids_rs, Py_ssize_t r0, Py_ssize_t r1,
                             Py_ssize_t G) noexcept nogil:
    """dst[n - r0] = table[ids[n * ids_rs]] for rows n in [r0, r1): x_t Wx for one-hot x_t."""
    cdef Py_ssize_t n
    for n in range(r0, r1):
        memcpy(dst + (n - r0) * G, table + ids[n * ids_rs] * G, G * sizeof(floating))


cdef inline void _scatter_rows(floating *table, const floating *src, const int64_t *ids,
                              Py_ssize_t ids_rs, Py_ssize_t r0, Py_ssize_t r1,
                              Py_ssize_t G) noexcept nogil:
    """table[ids[n * ids_rs]] += src[n - r0] for rows n in [r0, r1): dWx += x_t^T dA_t for
    one-hot x_t."""
    cdef Py_ssize_t n, j
    cdef floating *row
    cdef const floating *d
    for n in range(r0, r1):
        row = table + ids[n * ids_rs] * G
        d = src + (n - r0) * G
        for j in range(G):
            row[j] = row[j] + d[j]


cdef inline void _add_into(floating *dst, const floating *src, Py_ssize_t n,
                           bint assign) noexcept nogil:
    """dst = src (assign) or dst += src, over n elements."""
    cdef Py_ssize_t k
    if assign:
        memcpy(dst, src, n * sizeof(floating))
    else:
        for k in range(n):
            dst[k] = dst[k] + src[k]


# --- products of a one-chunk batch, in panels --------------------------------------------------------
# A batch too small to cut into chunks (fewer than 2 * min_chunk_rows rows, e.g. a language model's
# 20) runs its time loop once; where its products are large (H in the hundreds), each product is
# cut into panels of its output instead: a number fixed by the shapes (never by the thread count),
# each panel one BLAS call over the whole sum, so the bits are the same on any number of threads.

cdef enum:
    PANEL_WORK = 1 << 21  # multiply-adds per panel at least: a hand-off costs a few microseconds
    MAX_PANELS = 4        # each panel's call packs the other operand again


cdef inline Py_ssize_t _panels(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """Panels of a column-major product C (m x n) over k: one per PANEL_WORK multiply-adds, at
    most MAX_PANELS, each at least 32 wide along the split side (the longer of m, n)."""
    cdef Py_ssize_t p = m * n * k // PANEL_WORK, wide = (m if m >= n else n) // 32
    if p > MAX_PANELS:
        p = MAX_PANELS
    if p > wide:
        p = wide
    return p if p > 1 else 1


cdef struct PanelJob:
    char ta, tb
    int m, n, k, lda, ldb, ldc, np
    bint split_m
    double alpha, beta
    const void *a
    const void *b
    void *c


cdef void _panel_task(floating *tag, void *ctx, Py_ssize_t q, int tid) noexcept nogil:
    """Panel q of a product (fs_pool.h task): rows [i0, i1) of op(A) and C (split_m), else
    columns [i0, i1) of op(B) and C."""
    cdef PanelJob *j = <PanelJob *>ctx
    cdef const floating *a = <const floating *>j.a
    cdef const floating *b = <const floating *>j.b
    cdef floating *c = <floating *>j.c
    cdef int X = j.m if j.split_m else j.n
    cdef int i0 = <int>(q * X // j.np), i1 = <int>((q + 1) * X // j.np)
    if j.split_m:
        _gemm(j.ta, j.tb, i1 - i0, j.n, j.k, <floating>j.alpha,
              a + (i0 * j.lda if j.ta == c'T' else i0), j.lda, b, j.ldb, <floating>j.beta,
              c + i0, j.ldc)
    else:
        _gemm(j.ta, j.tb, j.m, i1 - i0, j.k, <floating>j.alpha, a, j.lda,
              b + (i0 if j.tb == c'T' else i0 * j.ldb), j.ldb, <floating>j.beta,
              c + i0 * j.ldc, j.ldc)


cdef void _pgemm(int nthreads, char ta, char tb, int m, int n, int k, floating alpha,
                 const floating *a, int lda, const floating *b, int ldb, floating beta,
                 floating *c, int ldc) noexcept nogil:
    """_gemm in _panels(m, n, k) panels taken by up to nthreads threads."""
    cdef Py_ssize_t np = _panels(m, n, k)
    cdef PanelJob job
    if np == 1:
        _gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        return
    job = PanelJob(ta, tb, m, n, k, lda, ldb, ldc, <int>np, m >= n, alpha, beta, a, b, c)
    fs_pool_run(_team(nthreads, np), np, <fs_task>_panel_task[floating], &job)


# --- forward -------------------------------------------------------------------------------------

cdef void _fwd_rows(Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t T, Py_ssize_t N, Py_ssize_t H,
                    Py_ssize_t D, const floating *X, const floating *Wx, const floating *W,
                    const floating *bias, Py_ssize_t b_rs, floating *A, floating *Hb,
                    floating *Cb, floating *TC, bint h0_zero, bint xw, const int64_t *ids,
                    Py_ssize_t T_ids, int panels_threads=0) noexcept nogil:
    """The time loop of forward for rows [r0, r1). xw: compute x_t Wx for these rows per step
    (a chunk); ids (N, T_ids): gather it instead; neither: A already holds x Wx.
    panels_threads > 0 (the whole batch as one chunk): h_{t-1} Wh in panels on that many
    threads."""
    cdef Py_ssize_t t, G = 4 * H, NH = N * H, rows = r1 - r0
    cdef floating *a
    for t in range(T):
        a = A + t * N * G + r0 * G
        if ids != NULL:
            _gather_rows(a, Wx, ids + t, T_ids, r0, r1, G)
        elif xw:  # a_t = x_t Wx
            _gemm(c'N', c'N', <int>G, <int>rows, <int>D, <floating>1, Wx, <int>G,
                  X + t * N * D + r0 * D, <int>D, <floating>0, a, <int>G)
        if panels_threads and (t > 0 or not h0_zero):
            _pgemm(panels_threads, c'N', c'N', <int>G, <int>rows, <int>H, <floating>1, W,
                   <int>G, Hb + t * NH + r0 * H, <int>H, <floating>1, a, <int>G)
        elif t > 0 or not h0_zero:  # a_t += h_{t-1} Wh:  a^T (4H x rows) += Wh^T (4H x H) h^T
            _gemm(c'N', c'N', <int>G, <int>rows, <int>H, <floating>1, W, <int>G,
                  Hb + t * NH + r0 * H, <int>H, <floating>1, a, <int>G)
        if floating is float:
            fs_fwd_rowsf(r0, r1, H, A + t * N * G, bias, b_rs, Cb + t * NH, Cb + (t + 1) * NH,
                         TC + t * NH, Hb + (t + 1) * NH)
        else:
            fs_fwd_rowsd(r0, r1, H, A + t * N * G, bias, b_rs, Cb + t * NH, Cb + (t + 1) * NH,
                         TC + t * NH, Hb + (t + 1) * NH)


cdef struct FwdJob:
    Py_ssize_t nc, T, N, H, D, b_rs
    const void *X
    const void *Wx
    const void *W
    const void *bias
    void *A
    void *Hb
    void *Cb
    void *TC
    bint h0_zero
    const int64_t *ids


cdef void _fwd_task(floating *tag, void *ctx, Py_ssize_t k, int tid) noexcept nogil:
    """Chunk k of forward (fs_pool.h task)."""
    cdef FwdJob *j = <FwdJob *>ctx
    _fwd_rows(k * j.N // j.nc, (k + 1) * j.N // j.nc, j.T, j.N, j.H, j.D, <const floating *>j.X,
              <const floating *>j.Wx, <const floating *>j.W, <const floating *>j.bias, j.b_rs,
              <floating *>j.A, <floating *>j.Hb, <floating *>j.Cb, <floating *>j.TC, j.h0_zero,
              True, j.ids, j.T)


cdef void _check_ids(const int64_t[:, ::1] ids, Py_ssize_t N, Py_ssize_t T, Py_ssize_t D,
                     Py_ssize_t V) except *:
    cdef Py_ssize_t n
    if ids.shape[0] != N or ids.shape[1] != T or D != 0:
        raise ValueError(f"ids have shape {tuple(ids.shape)[:2]}, expected {(N, T)} "
                         f"(with xs of shape (N, T, 0))")
    for n in range(N * T):
        if ids[n // T, n % T] < 0 or ids[n // T, n % T] >= V:
            raise ValueError(f"input id {ids[n // T, n % T]} outside [0, {V})")


def forward(const floating[:, :, ::1] xs, const floating[:, ::1] Wx, const floating[:, ::1] Wh,
            const floating[::1] b, const floating[:, ::1] h0, const floating[:, ::1] c0,
            floating[:, :, ::1] X, floating[:, :, ::1] A, floating[:, :, ::1] Hb,
            floating[:, :, ::1] Cb, floating[:, :, ::1] TC, int nthreads=1,
            bint row_bias=False, const int64_t[:, ::1] ids=None):
    """Fill X, A, Hb, Cb, TC (see the module docstring). b is (4H,) or, with row_bias, the
    (N, 4H) biases of every row, flattened. ids (N, T): one-hot inputs, x_t = onehot(ids[:, t])
    of width V = Wx.shape[0]; xs is then (N, T, 0) and X unused. Chunks run on up to nthreads
    threads. Returns whether h0 was all zeros (then step 0 needs no h Wh product, and backward
    leaves step 0 out of dWh)."""
    cdef Py_ssize_t N = xs.shape[0], T = xs.shape[1], D = xs.shape[2], H = Wh.shape[0]
    cdef Py_ssize_t G = 4 * H, t, n, k, nc = _nchunks(N)
    cdef int team = _team(nthreads, nc)
    cdef bint h0_zero
    cdef const int64_t *idp = NULL
    cdef FwdJob job
    if b.shape[0] != (N * G if row_bias else G):
        raise ValueError(f"b has {b.shape[0]} elements, expected {N * G if row_bias else G}")
    if ids is not None:
        _check_ids(ids, N, T, D, Wx.shape[0])
        idp = &ids[0, 0] if N and T else NULL
    cdef const floating *W = &Wh[0, 0]
    cdef const floating *bias = &b[0]
    cdef Py_ssize_t b_rs = G if row_bias else 0
    with nogil:
        if ids is None:
            for n in range(N):
                for t in range(T):
                    memcpy(&X[t, n, 0], &xs[n, t, 0], D * sizeof(floating))
        memcpy(&Hb[0, 0, 0], &h0[0, 0], N * H * sizeof(floating))
        memcpy(&Cb[0, 0, 0], &c0[0, 0], N * H * sizeof(floating))
        h0_zero = _all_zero(&h0[0, 0], N * H)
        if nc == 1:
            if ids is None:  # A = X Wx for all steps:  A^T (4H x TN) = Wx^T (4H x D) X^T (D x TN)
                _pgemm(nthreads, c'N', c'N', <int>G, <int>(T * N), <int>D, <floating>1,
                       &Wx[0, 0], <int>G, &X[0, 0, 0], <int>D, <floating>0, &A[0, 0, 0], <int>G)
            _fwd_rows(0, N, T, N, H, D, &X[0, 0, 0], &Wx[0, 0], W, bias, b_rs, &A[0, 0, 0],
                      &Hb[0, 0, 0], &Cb[0, 0, 0], &TC[0, 0, 0], h0_zero, False, idp, T,
                      nthreads if nthreads > 0 else 1)
        else:
            job = FwdJob(nc, T, N, H, D, b_rs, &X[0, 0, 0], &Wx[0, 0], W, bias, &A[0, 0, 0],
                         &Hb[0, 0, 0], &Cb[0, 0, 0], &TC[0, 0, 0], h0_zero, idp)
            fs_pool_run(team, nc, <fs_task>_fwd_task[floating], &job)
    return h0_zero


# --- backward ------------------------------------------------------------------------------------

cdef struct Grads:
    # where one backward writes (float32 or float64 arrays, as void *)
    void *dX          # (T, N, D), or NULL: no dX (one-hot inputs, or computed after the loop)
    void *pdWx        # (D, 4H) share of dWx, or NULL: computed after the loop
    void *pdWh        # (H, 4H) share of dWh (with pdWx)
    double *dbacc     # 4H column sums of dA (accumulated)
    void *dbr         # (N, 4H) per-row bias gradients, or NULL


cdef void _bwd_rows(Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t T, Py_ssize_t N, Py_ssize_t H,
                    Py_ssize_t D, const floating *W, floating *A, const floating *dy0,
                    Py_ssize_t dy_ts, Py_ssize_t dy_rs, floating *dhn, floating *dc,
                    const floating *Cb, const floating *TC, const floating *X,
                    const floating *Wx, const floating *Hb, Grads g, bint h0_zero,
                    bint need_dh0, const int64_t *ids, int panels_threads=0) noexcept nogil:
    """The time loop of backward for rows [r0, r1): A's gates become dA, dhn ends as dh0 and dc
    as dc0 for these rows. With g.pdWx (a chunk), also these rows' dX (unless ids) and their
    shares of dWx and dWh, overwritten. need_dh0=False: no dA_0 Wh^T at t = 0.
    panels_threads > 0 (the whole batch as one chunk): dA_t Wh^T in panels."""
    cdef Py_ssize_t t, G = 4 * H, NH = N * H, rows = r1 - r0
    cdef floating *at
    cdef floating *pdWx = <floating *>g.pdWx
    cdef floating *pdWh = <floating *>g.pdWh
    # the shares are overwritten at t = T-1 (beta 0) and added to after; pdWh gets no step at
    # all when T == 1 and h0 == 0, and scatter-adds need a zeroed share
    if pdWx != NULL and T == 1 and h0_zero:
        memset(pdWh, 0, H * G * sizeof(floating))
    if pdWx != NULL and ids != NULL:
        memset(pdWx, 0, D * G * sizeof(floating))
    for t in range(T - 1, -1, -1):
        at = A + t * N * G + r0 * G
        if floating is float:
            fs_bwd_rowsf(r0, r1, H, A + t * N * G, dy0 + t * dy_ts, dy_rs, dhn, dc, Cb + t * NH,
                         TC + t * NH, g.dbacc)
        else:
            fs_bwd_rowsd(r0, r1, H, A + t * N * G, dy0 + t * dy_ts, dy_rs, dhn, dc, Cb + t * NH,
                         TC + t * NH, g.dbacc)
        if g.dbr != NULL:
            _add_into(<floating *>g.dbr + r0 * G, at, rows * G, t == T - 1)
        if panels_threads and (t > 0 or need_dh0):
            _pgemm(panels_threads, c'T', c'N', <int>H, <int>rows, <int>G, <floating>1, W,
                   <int>G, at, <int>G, <floating>0, dhn + r0 * H, <int>H)
        elif t > 0 or need_dh0:  # dh_{t-1} = dA_t Wh^T:  (H x rows) = Wh (H x 4H) dA_t^T
            _gemm(c'T', c'N', <int>H, <int>rows, <int>G, <floating>1, W, <int>G,
                  at, <int>G, <floating>0, dhn + r0 * H, <int>H)
        if pdWx == NULL:
            continue
        if ids != NULL:  # dWx += x_t^T dA_t for one-hot x_t: a scatter-add
            _scatter_rows(pdWx, at, ids + t, T, r0, r1, G)
        else:  # dX_t = dA_t Wx^T;  dWx += x_t^T dA_t
            _gemm(c'T', c'N', <int>D, <int>rows, <int>G, <floating>1, Wx, <int>G,
                  at, <int>G, <floating>0, <floating *>g.dX + t * N * D + r0 * D, <int>D)
            _gemm(c'N', c'T', <int>G, <int>D, <int>rows, <floating>1, at, <int>G,
                  X + t * N * D + r0 * D, <int>D, <floating>(t < T - 1), pdWx, <int>G)
        if t > 0 or not h0_zero:  # dWh += h_{t-1}^T dA_t
            _gemm(c'N', c'T', <int>G, <int>H, <int>rows, <floating>1, at, <int>G,
                  Hb + t * NH + r0 * H, <int>H, <floating>(t < T - 1), pdWh, <int>G)


cdef struct BwdJob:
    Py_ssize_t nc, T, N, H, D, dy_ts, dy_rs
    const void *W
    void *A
    const void *dy0
    void *dhn
    void *dc
    const void *Cb
    const void *TC
    const void *X
    const void *Wx
    const void *Hb
    Grads g
    void *shares
    bint h0_zero, need_dh0
    const int64_t *ids
    # the shares' sum (_sum_task): ns pieces of the PW elements [dWx, dWh]
    Py_ssize_t PW, ns
    void *dWx
    void *dWh


cdef void _bwd_task(floating *tag, void *ctx, Py_ssize_t k, int tid) noexcept nogil:
    """Chunk k of backward: its rows, its own dWx and dWh share (in shares) and db
    accumulators (fs_pool.h task)."""
    cdef BwdJob *j = <BwdJob *>ctx
    cdef Py_ssize_t G = 4 * j.H
    cdef Grads g = j.g
    cdef floating *shares = <floating *>j.shares
    g.pdWx = shares + k * (j.D + j.H) * G
    g.pdWh = shares + k * (j.D + j.H) * G + j.D * G
    g.dbacc = g.dbacc + k * G
    _bwd_rows(k * j.N // j.nc, (k + 1) * j.N // j.nc, j.T, j.N, j.H, j.D, <const floating *>j.W,
              <floating *>j.A, <const floating *>j.dy0, j.dy_ts, j.dy_rs, <floating *>j.dhn,
              <floating *>j.dc, <const floating *>j.Cb, <const floating *>j.TC,
              <const floating *>j.X, <const floating *>j.Wx, <const floating *>j.Hb, g,
              j.h0_zero, j.need_dh0, j.ids)


cdef void _sum_task(floating *tag, void *ctx, Py_ssize_t k, int tid) noexcept nogil:
    """Piece k of the sum of the chunks' dWx, dWh shares (fs_pool.h task)."""
    cdef BwdJob *j = <BwdJob *>ctx
    _sum_shares(<const floating *>j.shares, j.nc, j.PW, <floating *>j.dWx, j.D * 4 * j.H,
                <floating *>j.dWh, k * j.PW // j.ns, (k + 1) * j.PW // j.ns)


cdef void _sum_shares(const floating *shares, Py_ssize_t nc, Py_ssize_t PW, floating *dWx,
                      Py_ssize_t nx, floating *dWh, Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """Elements [j0, j1) of the concatenation [dWx (nx elements), dWh] = the sum of the chunks'
    shares shares[k*PW + j], added in chunk order."""
    cdef Py_ssize_t j, k
    cdef floating s
    for j in range(j0, j1):
        s = shares[j]
        for k in range(1, nc):
            s = s + shares[k * PW + j]
        if j < nx:
            dWx[j] = s
        else:
            dWh[j - nx] = s


cdef void _bwd_whole(Py_ssize_t T, Py_ssize_t N, Py_ssize_t H, Py_ssize_t D, floating *A,
                     const floating *X, const floating *Wx, const floating *Hb,
                     floating *dWx, floating *dWh, floating *dX, bint h0_zero,
                     const int64_t *ids, int nthreads) noexcept nogil:
    """One chunk: dWx, dWh and dX as products over all steps (in panels), after the time
    loop."""
    cdef Py_ssize_t G = 4 * H, t, K = (T - 1) * N if h0_zero else T * N
    if ids != NULL:  # one-hot inputs: dWx is a scatter-add of dA's rows
        memset(dWx, 0, D * G * sizeof(floating))
        for t in range(T):
            _scatter_rows(dWx, A + t * N * G, ids + t, T, 0, N, G)
    else:  # dWx = X^T dA:  dWx^T (4H x D) = dA^T (4H x TN) X (TN x D)
        _pgemm(nthreads, c'N', c'T', <int>G, <int>D, <int>(T * N), <floating>1, A, <int>G,
               X, <int>D, <floating>0, dWx, <int>G)
        # dX = dA Wx^T:  dX^T (D x TN) = Wx (D x 4H) dA^T (4H x TN)
        _pgemm(nthreads, c'T', c'N', <int>D, <int>(T * N), <int>G, <floating>1, Wx, <int>G,
               A, <int>G, <floating>0, dX, <int>D)
    # dWh = Hprev^T dA with Hprev = Hb[:-1]; the rows of step 0 add nothing when h0 == 0
    if K > 0:
        _pgemm(nthreads, c'N', c'T', <int>G, <int>H, <int>K, <floating>1, A + (T * N - K) * G,
               <int>G, Hb + (T * N - K) * H, <int>H, <floating>0, dWh, <int>G)
    else:
        memset(dWh, 0, H * G * sizeof(floating))


def backward(const floating[:, :, :] dhs, const floating[:, :, ::1] X,
             const floating[:, ::1] Wx, const floating[:, ::1] Wh,
             floating[:, :, ::1] A, const floating[:, :, ::1] Hb, const floating[:, :, ::1] Cb,
             const floating[:, :, ::1] TC, floating[:, ::1] dWx, floating[:, ::1] dWh,
             floating[::1] db, floating[:, :, ::1] dX, floating[:, ::1] dh0,
             floating[::1] scratch, bint h0_zero=False, int nthreads=1, bint need_dh0=True,
             floating[::1] dbrows=None, const int64_t[:, ::1] ids=None):
    """Backward through the buffers filled by forward. A is overwritten by dA (so one backward
    per forward). dhs (N, T, H) may have any strides as long as its last axis is contiguous.
    Writes dWx, dWh, db (overwritten, not accumulated), dX (T, N, D) and dh0 (N, H).
    need_dh0=False skips the product dA_0 Wh^T at t = 0: dh0 is then only working memory.
    dbrows (N*4H elements; for a forward with row_bias): the gradients of the rows' biases, sum
    over t of dA_t. scratch: working memory of scratch_size(N, D, H) elements (reused between
    calls: fresh memory costs a page fault per 4 KiB)."""
    cdef Py_ssize_t N = A.shape[1], T = A.shape[0], H = Wh.shape[0], D = Wx.shape[0]
    cdef Py_ssize_t G = 4 * H, j, k, nc = _nchunks(N), PW = (D + H) * G
    cdef Py_ssize_t isz = sizeof(floating)
    cdef int team = _team(nthreads, nc)
    if dhs.shape[0] != N or dhs.shape[1] != T or dhs.shape[2] != H:
        raise ValueError(f"dhs has shape {tuple(dhs.shape)[:3]}, expected {(N, T, H)}")
    if dhs.strides[2] != isz or dhs.strides[0] % isz or dhs.strides[1] % isz:
        raise ValueError("dhs must be contiguous along its last axis")
    if scratch.shape[0] < scratch_size(N, D, H):
        raise ValueError(f"scratch has {scratch.shape[0]} elements, needs {scratch_size(N, D, H)}")
    if ids is not None and (ids.shape[0] != N or ids.shape[1] != T):
        raise ValueError(f"ids have shape {tuple(ids.shape)[:2]}, expected {(N, T)}")
    if dbrows is not None and dbrows.shape[0] != N * G:
        raise ValueError(f"dbrows has {dbrows.shape[0]} elements, expected {N * G}")
    cdef Py_ssize_t dy_rs = dhs.strides[0] // isz, dy_ts = dhs.strides[1] // isz
    cdef const floating *dy0 = &dhs[0, 0, 0]
    cdef floating *dc = &scratch[0]
    cdef floating *shares = dc + N * H
    cdef Grads g
    cdef BwdJob job
    g.dX, g.pdWx, g.pdWh, g.dbr = NULL, NULL, NULL, NULL
    g.dbacc = <double *>calloc(nc * G, sizeof(double))
    if g.dbacc == NULL:
        raise MemoryError()
    if dbrows is not None and N and G:
        g.dbr = &dbrows[0]
    cdef const int64_t *idp = &ids[0, 0] if ids is not None and N and T else NULL
    if idp == NULL and D:
        g.dX = &dX[0, 0, 0]
    with nogil:
        memset(dc, 0, N * H * isz)
        memset(&dh0[0, 0], 0, N * H * isz)
        if nc == 1:
            _bwd_rows(0, N, T, N, H, D, &Wh[0, 0], &A[0, 0, 0], dy0, dy_ts, dy_rs, &dh0[0, 0], dc,
                      &Cb[0, 0, 0], &TC[0, 0, 0], &X[0, 0, 0], &Wx[0, 0], &Hb[0, 0, 0], g,
                      h0_zero, need_dh0, idp, nthreads if nthreads > 0 else 1)
            _bwd_whole(T, N, H, D, &A[0, 0, 0], &X[0, 0, 0], &Wx[0, 0], &Hb[0, 0, 0], &dWx[0, 0],
                       &dWh[0, 0], &dX[0, 0, 0], h0_zero, idp, nthreads)
        else:
            job = BwdJob(nc, T, N, H, D, dy_ts, dy_rs, &Wh[0, 0], &A[0, 0, 0], dy0, &dh0[0, 0],
                         dc, &Cb[0, 0, 0], &TC[0, 0, 0], &X[0, 0, 0], &Wx[0, 0], &Hb[0, 0, 0], g,
                         shares, h0_zero, need_dh0, idp, PW, 4 * team, &dWx[0, 0], &dWh[0, 0])
            fs_pool_run(team, nc, <fs_task>_bwd_task[floating], &job)
            fs_pool_run(team, job.ns, <fs_task>_sum_task[floating], &job)
            for k in range(1, nc):  # db accumulators in chunk order
                for j in range(G):
                    g.dbacc[j] += g.dbacc[k * G + j]
        for j in range(G):
            db[j] = <floating>g.dbacc[j]
    free(g.dbacc)


def scratch_size(Py_ssize_t N, Py_ssize_t D, Py_ssize_t H):
    """Elements of backward's working memory: dc (N, H), and each chunk's dWx, dWh shares."""
    cdef Py_ssize_t nc = _nchunks(N)
    return N * H + (nc * (D + H) * 4 * H if nc > 1 else 0)


# --- inference: the recurrence alone, nothing kept for backward ----------------------------------
# Rows are cut into blocks of INFER_ROWS (fixed, so the bits do not depend on the thread count);
# each block runs every step with its gates and state in a small per-thread scratch that stays in
# the core's cache, instead of (T, N, 4H) buffers that stream through memory.

cdef enum:
    INFER_ROWS = 128


cdef inline Py_ssize_t _blocks(Py_ssize_t N) noexcept nogil:
    return (N + INFER_ROWS - 1) // INFER_ROWS


cdef inline Py_ssize_t _block_rows(Py_ssize_t N) noexcept nogil:
    """Rows of the largest block (a slot of scratch holds one block)."""
    return N if 0 < N < INFER_ROWS else INFER_ROWS


def infer_rows():
    """Rows per block of final_state."""
    return INFER_ROWS


def infer_scratch_size(Py_ssize_t N, Py_ssize_t H, int nthreads):
    """Elements of scratch that final_state needs for N rows: per thread and row of a block, the
    gates (4H), the next c and tanh(c) (4H together). Sized by the rows a block really has: one
    row (a generation step) needs a few KiB, not a full block's worth that malloc would map and
    unmap per call."""
    cdef Py_ssize_t team = min(max(nthreads, 1), max(_blocks(N), 1))
    return team * _block_rows(N) * 8 * H


cdef void _cell_rows(Py_ssize_t rows, Py_ssize_t H, const floating *Wh, const floating *bias,
                     Py_ssize_t b_rs, floating *a, floating *h, const floating *c,
                     floating *c_next, floating *tc, bint h_zero) noexcept nogil:
    """One step for a block of rows whose a holds x_t Wx: a += h Wh, then the gates; h is
    overwritten by h_t, c_next receives c_t."""
    cdef int G = <int>(4 * H)
    if not h_zero:
        _gemm(c'N', c'N', G, <int>rows, <int>H, <floating>1, Wh, G, h, <int>H, <floating>1, a, G)
    if floating is float:
        fs_fwd_rowsf(0, rows, H, a, bias, b_rs, c, c_next, tc, h)
    else:
        fs_fwd_rowsd(0, rows, H, a, bias, b_rs, c, c_next, tc, h)


cdef void _final_block(Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t T, Py_ssize_t D, Py_ssize_t H,
                       const floating *xs, const int64_t *ids, const floating *Wx,
                       const floating *Wh, const floating *bias, Py_ssize_t b_rs,
                       const floating *h0, const floating *c0, const int64_t *start,
                       floating *h, floating *c, bint h0_zero, floating *work) noexcept nogil:
    """Rows [r0, r1) of final_state: from their rows of h0, c0 (rows start[n], with start)
    to h_T, c_T in h, c. Without start, h and c may be h0 and c0: each block reads its own rows
    before it writes them."""
    cdef Py_ssize_t t, rows = r1 - r0, G = 4 * H
    cdef floating *a = work
    cdef floating *cur = c + r0 * H
    cdef floating *nxt = work + rows * G
    cdef floating *tc = nxt + rows * H
    cdef floating *swap
    if start == NULL:
        if h != h0:  # (h0 itself: the state advances in place)
            memcpy(h + r0 * H, h0 + r0 * H, rows * H * sizeof(floating))
        if c != c0:
            memcpy(cur, c0 + r0 * H, rows * H * sizeof(floating))
    else:
        _gather_rows(h + r0 * H, h0, start, 1, r0, r1, H)
        _gather_rows(cur, c0, start, 1, r0, r1, H)
    for t in range(T):
        if ids != NULL:
            _gather_rows(a, Wx, ids + t, T, r0, r1, G)
        else:  # x_t for these rows: xs[n, t] with a row stride of T D
            _gemm(c'N', c'N', <int>G, <int>rows, <int>D, <floating>1, Wx, <int>G,
                  xs + r0 * T * D + t * D, <int>(T * D), <floating>0, a, <int>G)
        _cell_rows(rows, H, Wh, bias + r0 * b_rs, b_rs, a, h + r0 * H, cur, nxt, tc,
                   t == 0 and h0_zero)
        swap = cur
        cur = nxt
        nxt = swap
    if cur != c + r0 * H:
        memcpy(c + r0 * H, cur, rows * H * sizeof(floating))


cdef struct InferJob:
    # final_state (_final_task): block k, scratch slot tid
    Py_ssize_t N, T, D, H, b_rs, slot
    const void *xs
    const int64_t *ids
    const void *Wx
    const void *Wh
    const void *bias
    const void *h0
    const void *c0
    const int64_t *start
    void *h
    void *c
    bint h0_zero
    void *scratch


cdef void _final_task(floating *tag, void *ctx, Py_ssize_t k, int tid) noexcept nogil:
    cdef InferJob *j = <InferJob *>ctx
    _final_block(k * INFER_ROWS, min((k + 1) * INFER_ROWS, j.N), j.T, j.D, j.H,
                 <const floating *>j.xs, j.ids, <const floating *>j.Wx, <const floating *>j.Wh,
                 <const floating *>j.bias, j.b_rs, <const floating *>j.h0,
                 <const floating *>j.c0, j.start, <floating *>j.h, <floating *>j.c, j.h0_zero,
                 <floating *>j.scratch + tid * j.slot)


cdef void _check_final_state_shapes(Py_ssize_t N, Py_ssize_t T, Py_ssize_t D, Py_ssize_t H,
                                    Py_ssize_t Wx0, Py_ssize_t Wx1, Py_ssize_t Wh1,
                                    Py_ssize_t h0_0, Py_ssize_t h0_1, Py_ssize_t c0_0,
                                    Py_ssize_t c0_1, Py_ssize_t h_0, Py_ssize_t h_1,
                                    Py_ssize_t c_0, Py_ssize_t c_1, bint one_hot) except *:
    """final_state's operand shapes agree (rows of h0 against N: with start, checked there)."""
    if N == 0 or T == 0 or H == 0 or Wx0 == 0 or h0_0 == 0:
        raise ValueError("final_state: empty operands (the NumPy engine runs those)")
    if Wx1 != 4 * H or Wh1 != 4 * H or (not one_hot and Wx0 != D):
        raise ValueError(f"final_state: Wx ({Wx0}, {Wx1}) and Wh (., {Wh1}) do not fit "
                         f"inputs of width {D} and H = {H}")
    if h0_1 != H or c0_0 != h0_0 or c0_1 != H:
        raise ValueError(f"final_state: h0 ({h0_0}, {h0_1}) and c0 ({c0_0}, {c0_1}) must "
                         f"both be (M, {H})")
    if h_0 != N or h_1 != H or c_0 != N or c_1 != H:
        raise ValueError(f"final_state: h ({h_0}, {h_1}) and c ({c_0}, {c_1}) must both be "
                         f"({N}, {H})")


cdef inline bint _mem_overlap(const void *a, const void *b, Py_ssize_t n, Py_ssize_t m,
                          Py_ssize_t isz) noexcept nogil:
    """Whether n elements at a and m elements at b share memory."""
    cdef const char *p = <const char *>a
    cdef const char *q = <const char *>b
    return p < q + m * isz and q < p + n * isz


cdef void _check_outputs(const floating *h, const floating *c, const floating *h0,
                         const floating *c0, Py_ssize_t n, Py_ssize_t m, bint gather) except *:
    """final_state's h and c (n elements each) are disjoint from each other and from h0, c0
    (m each), except that h may be h0 and c may be c0 when no start rows are gathered."""
    cdef Py_ssize_t isz = sizeof(floating)
    if _mem_overlap(h, c, n, n, isz):
        raise ValueError("final_state: h and c overlap")
    for out, name in ((0, "h"), (1, "c")):
        for src, src_name in ((0, "h0"), (1, "c0")):
            if (not gather and out == src and (h if out == 0 else c) == (h0 if src == 0 else c0)
                    and n == m):
                continue  # in place
            if _mem_overlap(h if out == 0 else c, h0 if src == 0 else c0, n, m, isz):
                raise ValueError(f"final_state: {name} overlaps {src_name}" +
                                 (" (in place needs the same array, and no start rows)"
                                  if out == src else ""))


def final_state(const floating[:, :, ::1] xs, const floating[:, ::1] Wx,
                const floating[:, ::1] Wh, const floating[::1] b, const floating[:, ::1] h0,
                const floating[:, ::1] c0, floating[:, ::1] h, floating[:, ::1] c,
                floating[::1] scratch, int nthreads=1, bint row_bias=False,
                const int64_t[:, ::1] ids=None, const int64_t[::1] start=None):
    """h_T and c_T of forward over xs (N, T, D) (or one-hot ids (N, T), xs then (N, T, 0))
    from (h0, c0), written to h and c (N, H). start (N,): row n starts from row start[n] of
    h0 and c0 (M, H) instead of row n. Without start, h and c may be h0 and c0 themselves (the
    state then advances in place); they may overlap nothing else. scratch:
    infer_scratch_size(N, H, nthreads) elements."""
    cdef Py_ssize_t N = xs.shape[0], T = xs.shape[1], D = xs.shape[2], H = Wh.shape[0]
    cdef Py_ssize_t G = 4 * H, n, nb = _blocks(N), slot = _block_rows(N) * (2 * G)
    cdef int team = _team(nthreads, nb)
    cdef bint h0_zero
    cdef const int64_t *idp = NULL
    cdef const int64_t *stp = NULL
    cdef InferJob job
    _check_final_state_shapes(N, T, D, H, Wx.shape[0], Wx.shape[1], Wh.shape[1], h0.shape[0],
                              h0.shape[1], c0.shape[0], c0.shape[1], h.shape[0], h.shape[1],
                              c.shape[0], c.shape[1], ids is not None)
    if start is not None:
        if start.shape[0] != N:
            raise ValueError(f"start has {start.shape[0]} rows, expected {N}")
        for n in range(N):
            if start[n] < 0 or start[n] >= h0.shape[0]:
                raise ValueError(f"start row {start[n]} outside [0, {h0.shape[0]})")
        stp = &start[0] if N else NULL
    elif h0.shape[0] != N:
        raise ValueError(f"h0 has {h0.shape[0]} rows, expected {N}")
    if b.shape[0] != (N * G if row_bias else G):
        raise ValueError(f"b has {b.shape[0]} elements, expected {N * G if row_bias else G}")
    _check_outputs(&h[0, 0], &c[0, 0], &h0[0, 0], &c0[0, 0], N * H, h0.shape[0] * H,
                   start is not None)
    if ids is not None:
        _check_ids(ids, N, T, D, Wx.shape[0])
        idp = &ids[0, 0] if N and T else NULL
    if scratch.shape[0] < team * slot:
        raise ValueError(f"scratch has {scratch.shape[0]} elements, needs {team * slot}")
    cdef const floating *X = &xs[0, 0, 0] if idp == NULL else NULL
    with nogil:
        h0_zero = _all_zero(&h0[0, 0], h0.shape[0] * H)
        job.N, job.T, job.D, job.H, job.b_rs, job.slot = N, T, D, H, G if row_bias else 0, slot
        job.xs, job.ids, job.Wx, job.Wh, job.bias = X, idp, &Wx[0, 0], &Wh[0, 0], &b[0]
        job.h0, job.c0, job.start, job.h, job.c = &h0[0, 0], &c0[0, 0], stp, &h[0, 0], &c[0, 0]
        job.h0_zero, job.scratch = h0_zero, &scratch[0]
        fs_pool_run(team, nb, <fs_task>_final_task[floating], &job)  # team 1: this thread


