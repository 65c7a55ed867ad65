# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused LSTM kernel for the CPU (float32 and float64), used by fastseq.lstm._cython.

Layout (all buffers are allocated by the caller, time-major so that per-step slices are contiguous):

    X  (T, N, D)      time-major copy of the input xs (N, T, D)
    A  (T, N, 4H)     x_t Wx, then h_{t-1} Wh and b added, then overwritten in place by the
                      activated gates [f | g | i | o]; backward overwrites them by dA
    Hb (T+1, N, H)    Hb[0] = h0, Hb[t+1] = h_t     (Hb[:-1] is h_{t-1} for every t: one dWh product)
    Cb (T+1, N, H)    Cb[0] = c0, Cb[t+1] = c_t
    TC (T, N, H)      tanh(c_t)

Two input variants (see forward/backward): b may hold one bias per row (row_bias: (N, 4H)
flattened, for a per-sequence input term such as PeekyDecoder's h Wx[:H]; backward then also
sums dA_t per row), and the inputs may be one-hot rows given as ids (N, T), so that x_t Wx is a
gather of Wx's rows and dWx a scatter-add of dA's rows (no dX).

Products go through the BLAS that SciPy links (scipy.linalg.cython_blas), or through the Fortran
sgemm_/dgemm_ that set_blas() points at (fastseq.lstm._cython points it at NumPy's own OpenBLAS,
so that a process runs one BLAS thread pool, not two). BLAS is column-major: a
row-major C = A B is computed as the column-major C^T = B^T A^T, so every call below passes its
operands swapped. One product per sequence computes x Wx for all steps, dWx, dWh and dX; only
h_{t-1} Wh (forward) and dA_t Wh^T (backward) run inside the time loop.

Split path (nsplit >= 2, when can_split()): the batch rows are cut into nsplit groups, and each
group runs the whole time loop on its own OpenMP thread with the BLAS made single-threaded for
that thread (OpenBLAS's thread-local setter, or the global one around the loop). Rows are
independent in the recurrence, so the groups never wait for each other. By default the groups
also compute x_t Wx and (backward) dX_t and their shares of dWx, dWh per step, summed at the end,
so the kernel makes no threaded BLAS call at all (see set_split_xw, set_split_grads).

The gate nonlinearities, the cell update and their derivatives run as one pass per time step
(C functions below, vectorised by the compiler; on x86-64 Linux with GCC they are compiled for
x86-64-v4 (AVX-512), v3 (AVX2+FMA) and baseline SSE2 and the best is picked when the module loads;
optionally split over OpenMP threads). sigmoid and tanh are
computed from an accurate expm1 (Cody-Waite reduction plus a Taylor polynomial), because libm's
scalar calls would not vectorise; error is a few ulp in either precision.
"""
cimport cython
from cython.parallel cimport prange
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, calloc, free
from libc.stdint cimport int64_t
from scipy.linalg.cython_blas cimport sgemm, dgemm


ctypedef fused floating:
    float
    double


cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>

    #include "fs_simd.h"   /* FS_KERNEL (instruction-set clones), FS_SIMD, FS_RESTRICT */

    /* The clamps in tanh/sigmoid only if-convert (and so vectorise) when FP operations may be
       speculated (FP exception flags are never looked at here), and the rounding trick
       (t + 1.5 2^23) - 1.5 2^23 must not be reassociated away. */
    #if defined(__GNUC__) && !defined(__clang__)
    #  pragma GCC push_options
    #  pragma GCC optimize("no-trapping-math", "no-associative-math")
    #endif
    #if defined(__GNUC__)
    #  define FS_INLINE static inline __attribute__((always_inline))
    #else
    #  define FS_INLINE static inline
    #endif

    /* ---- float32 ------------------------------------------------------------------------ */

    /* exp and expm1 of x, -87 <= x <= 0 (NaN propagates): x = k ln2 + r, |r| <= ln2/2, then
       expm1(x) = 2^k expm1(r) + (2^k - 1) and exp(x) = 2^k expm1(r) + 2^k; for k = 0 expm1(x) is
       expm1(r) itself, so tiny |x| keep their full relative accuracy in tanh. */
    FS_INLINE void fs_exp_redf(float x, float *ps, float *pp)
    {
        float t = x * 1.44269504088896341f;
        float sh = t + 12582912.0f;                    /* 1.5 * 2^23: rounds t to an integer k, */
        float kf = sh - 12582912.0f;                   /* whose low bits are those of sh */
        float r = (x - kf * 0.693145751953125f) - kf * 1.428606820309417232e-6f;
        float p = r + r * r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f
                  + r * (8.33333377e-3f + r * (1.38888892e-3f + r * 1.98412701e-4f)))));
        uint32_t bits;
        memcpy(&bits, &sh, sizeof bits);
        bits = (bits + 127u) << 23;                    /* 2^k */
        memcpy(ps, &bits, sizeof bits);
        *pp = p;
    }

    FS_INLINE float fs_expm1_negf(float x)
    {
        float s, p;
        fs_exp_redf(x, &s, &p);
        return s * p + (s - 1.0f);
    }

    FS_INLINE float fs_exp_negf(float x)
    {
        float s, p;
        fs_exp_redf(x, &s, &p);
        return s * p + s;
    }

    FS_INLINE float fs_tanhf(float x)
    {
        float ax = fabsf(x);
        ax = ax > 9.0f ? 9.0f : ax;                    /* tanh(9) rounds to 1 */
        float u = fs_expm1_negf(-2.0f * ax);          /* e^{-2|x|} - 1 */
        return copysignf(-u / (u + 2.0f), x);
    }

    FS_INLINE float fs_sigmoidf(float x)
    {
        float ax = fabsf(x);
        ax = ax > 87.0f ? 87.0f : ax;
        float e = fs_exp_negf(-ax);                    /* e^{-|x|} in (0, 1] */
        float d = 1.0f / (1.0f + e);
        float ed = e * d;                              /* both computed: the select vectorises */
        return x >= 0.0f ? d : ed;                     /* NaN: d and ed are NaN */
    }

    /* ---- float64 ------------------------------------------------------------------------ */

    FS_INLINE void fs_exp_redd(double x, double *ps, double *pp)
    {
        double t = x * 1.4426950408889634074;
        double sh = t + 6755399441055744.0;            /* 1.5 * 2^52 */
        double kd = sh - 6755399441055744.0;
        double r = (x - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10;
        double p = r + r * r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120
                   + r * (1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880
                   + r * (1.0 / 3628800 + r * (1.0 / 39916800 + r * (1.0 / 479001600
                   + r * (1.0 / 6227020800.0))))))))))));
        uint64_t bits;
        memcpy(&bits, &sh, sizeof bits);
        bits = (bits + 1023u) << 52;
        memcpy(ps, &bits, sizeof bits);
        *pp = p;
    }

    FS_INLINE double fs_expm1_negd(double x)
    {
        double s, p;
        fs_exp_redd(x, &s, &p);
        return s * p + (s - 1.0);
    }

    FS_INLINE double fs_exp_negd(double x)
    {
        double s, p;
        fs_exp_redd(x, &s, &p);
        return s * p + s;
    }

    FS_INLINE double fs_tanhd(double x)
    {
        double ax = fabs(x);
        ax = ax > 20.0 ? 20.0 : ax;
        double u = fs_expm1_negd(-2.0 * ax);
        return copysign(-u / (u + 2.0), x);
    }

    FS_INLINE double fs_sigmoidd(double x)
    {
        double ax = fabs(x);
        ax = ax > 700.0 ? 700.0 : ax;
        double e = fs_exp_negd(-ax);
        double d = 1.0 / (1.0 + e);
        double ed = e * d;
        return x >= 0.0 ? d : ed;
    }

    /* ---- fused per-step kernels over rows [n0, n1) ----------------------------------------- */

    /* forward: A holds x_t Wx + h_{t-1} Wh for one step (N, 4H); adds b (row n's bias at
       b + n * b_rs: b_rs = 0 for one shared bias, 4H for one per row), activates the gates in
       place and writes c_t, tanh(c_t) and h_t. */
    #define FS_FWD(T, SFX) \
    FS_KERNEL static void fs_fwd_rows##SFX(Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t H, \
            T *FS_RESTRICT A, const T *FS_RESTRICT b, Py_ssize_t b_rs, \
            const T *FS_RESTRICT cprev, T *FS_RESTRICT c, T *FS_RESTRICT tc, T *FS_RESTRICT h) \
    { \
        for (Py_ssize_t n = n0; n < n1; ++n) { \
            const T *FS_RESTRICT bf = b + n * b_rs; \
            const T *FS_RESTRICT bg = bf + H; \
            const T *FS_RESTRICT bi = bf + 2 * H; \
            const T *FS_RESTRICT bo = bf + 3 * H; \
            T *FS_RESTRICT af = A + n * 4 * H; \
            T *FS_RESTRICT ag = af + H; \
            T *FS_RESTRICT ai = af + 2 * H; \
            T *FS_RESTRICT ao = af + 3 * H; \
            const T *FS_RESTRICT cp = cprev + n * H; \
            T *FS_RESTRICT cn = c + n * H; \
            T *FS_RESTRICT tn = tc + n * H; \
            T *FS_RESTRICT hn = h + n * H; \
            FS_SIMD \
            for (Py_ssize_t j = 0; j < H; ++j) { \
                T f = fs_sigmoid##SFX(af[j] + bf[j]); \
                T g = fs_tanh##SFX(ag[j] + bg[j]); \
                T i = fs_sigmoid##SFX(ai[j] + bi[j]); \
                T o = fs_sigmoid##SFX(ao[j] + bo[j]); \
                T cc = f * cp[j] + g * i; \
                T th = fs_tanh##SFX(cc); \
                af[j] = f; ag[j] = g; ai[j] = i; ao[j] = o; \
                cn[j] = cc; tn[j] = th; hn[j] = o * th; \
            } \
        } \
    }

    /* backward: A holds the activated gates of step t; overwritten in place by dA_t.
       dy: dL/dh_t from above (row stride dy_rs), dhn: dA_{t+1} Wh^T, dc: dL/dc_t in, dL/dc_{t-1}
       out. The column sums of dA_t are added to dbacc (4H accumulators, ACC precision). */
    #define FS_BWD(T, SFX, ACC) \
    FS_KERNEL static void fs_bwd_rows##SFX(Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t H, \
            T *FS_RESTRICT A, const T *FS_RESTRICT dy, Py_ssize_t dy_rs, \
            const T *FS_RESTRICT dhn, T *FS_RESTRICT dc, const T *FS_RESTRICT cprev, \
            const T *FS_RESTRICT tc, ACC *FS_RESTRICT dbacc) \
    { \
        ACC *FS_RESTRICT sf = dbacc; \
        ACC *FS_RESTRICT sg = dbacc + H; \
        ACC *FS_RESTRICT si = dbacc + 2 * H; \
        ACC *FS_RESTRICT so = dbacc + 3 * H; \
        for (Py_ssize_t n = n0; n < n1; ++n) { \
            T *FS_RESTRICT af = A + n * 4 * H; \
            T *FS_RESTRICT ag = af + H; \
            T *FS_RESTRICT ai = af + 2 * H; \
            T *FS_RESTRICT ao = af + 3 * H; \
            const T *FS_RESTRICT dyn = dy + n * dy_rs; \
            const T *FS_RESTRICT dnn = dhn + n * H; \
            T *FS_RESTRICT dcn = dc + n * H; \
            const T *FS_RESTRICT cp = cprev + n * H; \
            const T *FS_RESTRICT tn = tc + n * H; \
            FS_SIMD \
            for (Py_ssize_t j = 0; j < H; ++j) { \
                T f = af[j], g = ag[j], i = ai[j], o = ao[j], th = tn[j]; \
                T dh = dyn[j] + dnn[j]; \
                T ds = dcn[j] + dh * o * (1 - th * th); \
                T df = ds * cp[j] * f * (1 - f); \
                T dg = ds * i * (1 - g * g); \
                T di = ds * g * i * (1 - i); \
                T dO = dh * th * o * (1 - o); \
                af[j] = df; ag[j] = dg; ai[j] = di; ao[j] = dO; \
                dcn[j] = ds * f; \
                sf[j] += df; sg[j] += dg; si[j] += di; so[j] += dO; \
            } \
        } \
    }

    FS_FWD(float, f)
    FS_FWD(double, d)
    FS_BWD(float, f, double)
    FS_BWD(double, d, double)

    #if defined(__GNUC__) && !defined(__clang__)
    #  pragma GCC pop_options
    #endif
    """
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


# Optional external BLAS (the library NumPy itself uses; see fastseq/lstm/_cython.py): Fortran
# sgemm_/dgemm_ entry points with 32-bit (LP64) or 64-bit (ILP64) integers. None set: SciPy's.
ctypedef void (*sgemm32_t)(char *, char *, int *, int *, int *, float *, float *, int *, float *,
                           int *, float *, float *, int *) noexcept nogil
ctypedef void (*dgemm32_t)(char *, char *, int *, int *, int *, double *, double *, int *, double *,
                           int *, double *, double *, int *) noexcept nogil
ctypedef void (*sgemm64_t)(char *, char *, int64_t *, int64_t *, int64_t *, float *, float *,
                           int64_t *, float *, int64_t *, float *, float *, int64_t *) noexcept nogil
ctypedef void (*dgemm64_t)(char *, char *, int64_t *, int64_t *, int64_t *, double *, double *,
                           int64_t *, double *, int64_t *, double *, double *, int64_t *) noexcept nogil

cdef void *_ext_sgemm = NULL
cdef void *_ext_dgemm = NULL
cdef bint _ext_ilp64 = False


def set_blas(size_t sgemm_addr=0, size_t dgemm_addr=0, bint ilp64=False):
    """Route the products to Fortran sgemm_/dgemm_ at these addresses (0, 0: SciPy's BLAS).
    The caller vouches for the signature: reference BLAS, LP64 or (ilp64=True) ILP64."""
    global _ext_sgemm, _ext_dgemm, _ext_ilp64
    if (sgemm_addr == 0) != (dgemm_addr == 0):
        raise ValueError("give both sgemm and dgemm, or neither")
    _ext_sgemm, _ext_dgemm, _ext_ilp64 = <void *>sgemm_addr, <void *>dgemm_addr, ilp64


def blas_source():
    """'scipy', or 'external (LP64)' / 'external (ILP64)' after set_blas."""
    if _ext_sgemm == NULL:
        return "scipy"
    return "external (ILP64)" if _ext_ilp64 else "external (LP64)"


# BLAS thread count for the split path (see forward/backward, nsplit): OpenBLAS's
# openblas_set_num_threads_local(n) (returns the calling thread's previous setting, 0 = none) when
# set_blas_threads() got it; otherwise a global setter/getter pair. Both belong to the BLAS that
# _gemm calls.
ctypedef int (*set_local_t)(int) noexcept nogil
ctypedef void (*set_global_t)(int) noexcept nogil
ctypedef int (*get_global_t)() noexcept nogil

cdef void *_set_local = NULL
cdef void *_set_global = NULL
cdef void *_get_global = NULL


def set_blas_threads(size_t set_local_addr=0, size_t set_global_addr=0, size_t get_global_addr=0):
    """Functions that set the BLAS's thread count: int openblas_set_num_threads_local(int) and/or
    void set_num_threads(int) with int get_num_threads(). All 0: none known (no split path)."""
    global _set_local, _set_global, _get_global
    if (set_global_addr == 0) != (get_global_addr == 0):
        raise ValueError("give both the global setter and getter, or neither")
    _set_local, _set_global, _get_global = (<void *>set_local_addr, <void *>set_global_addr,
                                            <void *>get_global_addr)


cdef extern from "fs_simd.h":
    int FS_HAVE_OPENMP


def can_split():
    """Whether the split path can run: built with OpenMP, and a way to make the BLAS
    single-threaded per worker is known."""
    return bool(FS_HAVE_OPENMP) and (_set_local != NULL or _set_global != NULL)


cdef int _blas_one_thread() noexcept nogil:
    """Make the BLAS single-threaded for the calling thread (thread-local setter); returns the
    previous setting to give to _blas_restore."""
    if _set_local != NULL:
        return (<set_local_t>_set_local)(1)
    return 0


cdef void _blas_restore(int old) noexcept nogil:
    if _set_local != NULL:
        (<set_local_t>_set_local)(old)


cdef inline void _gemm(char ta, char tb, int m, int n, int k, floating alpha, const floating *a,
                       int lda, const floating *b, int ldb, floating beta, floating *c,
                       int ldc) noexcept nogil:
    """Column-major C = alpha op(A) op(B) + beta C."""
    cdef int64_t m8 = m, n8 = n, k8 = k, lda8 = lda, ldb8 = ldb, ldc8 = ldc
    if floating is float:
        if _ext_sgemm == NULL:
            sgemm(&ta, &tb, &m, &n, &k, &alpha, <float *>a, &lda, <float *>b, &ldb, &beta, c, &ldc)
        elif _ext_ilp64:
            (<sgemm64_t>_ext_sgemm)(&ta, &tb, &m8, &n8, &k8, &alpha, <float *>a, &lda8,
                                    <float *>b, &ldb8, &beta, c, &ldc8)
        else:
            (<sgemm32_t>_ext_sgemm)(&ta, &tb, &m, &n, &k, &alpha, <float *>a, &lda, <float *>b,
                                    &ldb, &beta, c, &ldc)
    else:
        if _ext_dgemm == NULL:
            dgemm(&ta, &tb, &m, &n, &k, &alpha, <double *>a, &lda, <double *>b, &ldb, &beta, c, &ldc)
        elif _ext_ilp64:
            (<dgemm64_t>_ext_dgemm)(&ta, &tb, &m8, &n8, &k8, &alpha, <double *>a, &lda8,
                                    <double *>b, &ldb8, &beta, c, &ldc8)
        else:
            (<dgemm32_t>_ext_dgemm)(&ta, &tb, &m, &n, &k, &alpha, <double *>a, &lda, <double *>b,
                                    &ldb, &beta, c, &ldc)


cdef inline bint _all_zero(const floating *x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if x[i] != 0:
            return False
    return True


cdef Py_ssize_t _block_bytes = 0


def set_block_bytes(Py_ssize_t nbytes):
    """Split each time step into row blocks of about nbytes of gates, product then gate pass per
    block (tuning knob; 0, the default: whole steps). Blocks keep the gates in L2 for large N,
    but cost one threaded BLAS call per block: on a loaded 2-core machine 20 calls per step made
    batched inference of 5000 rows several times slower, so it is off."""
    global _block_bytes
    _block_bytes = nbytes


cdef inline Py_ssize_t _block_rows(Py_ssize_t N, Py_ssize_t H, Py_ssize_t isz) noexcept nogil:
    """Rows per block of a time step: the block's gates (rows x 4H) stay in L2 between the h Wh
    product that fills them and the gate pass that reads them (matters for large N)."""
    if _block_bytes <= 0:
        return N
    cdef Py_ssize_t nb = _block_bytes // (4 * H * isz)
    if nb < 64:
        nb = 64
    return N if nb >= N else nb


cdef void _fwd_gates(Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t H, floating *a, const floating *b,
                     Py_ssize_t b_rs, const floating *cprev, floating *c, floating *tc,
                     floating *h, int nth) noexcept nogil:
    """Gate pass of forward over rows [r0, r1) of one step, on nth OpenMP threads."""
    cdef Py_ssize_t p, n = r1 - r0
    if nth <= 1 or n < 2 * nth:
        if floating is float:
            fs_fwd_rowsf(r0, r1, H, a, b, b_rs, cprev, c, tc, h)
        else:
            fs_fwd_rowsd(r0, r1, H, a, b, b_rs, cprev, c, tc, h)
        return
    for p in prange(nth, num_threads=nth, schedule='static'):
        if floating is float:
            fs_fwd_rowsf(r0 + p * n // nth, r0 + (p + 1) * n // nth, H, a, b, b_rs, cprev, c,
                         tc, h)
        else:
            fs_fwd_rowsd(r0 + p * n // nth, r0 + (p + 1) * n // nth, H, a, b, b_rs, cprev, c,
                         tc, h)


cdef void _bwd_gates(Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t H, floating *a, const floating *dy,
                     Py_ssize_t dy_rs, const floating *dhn, floating *dc, const floating *cprev,
                     const floating *tc, double *dbacc, int nth) noexcept nogil:
    """Gate pass of backward over rows [r0, r1) of one step; thread p adds its column sums of
    dA to dbacc[p*4H : (p+1)*4H]."""
    cdef Py_ssize_t p, n = r1 - r0
    if nth <= 1 or n < 2 * nth:
        if floating is float:
            fs_bwd_rowsf(r0, r1, H, a, dy, dy_rs, dhn, dc, cprev, tc, dbacc)
        else:
            fs_bwd_rowsd(r0, r1, H, a, dy, dy_rs, dhn, dc, cprev, tc, dbacc)
        return
    for p in prange(nth, num_threads=nth, schedule='static'):
        if floating is float:
            fs_bwd_rowsf(r0 + p * n // nth, r0 + (p + 1) * n // nth, H, a, dy, dy_rs, dhn, dc,
                         cprev, tc, dbacc + p * 4 * H)
        else:
            fs_bwd_rowsd(r0 + p * n // nth, r0 + (p + 1) * n // nth, H, a, dy, dy_rs, dhn, dc,
                         cprev, tc, dbacc + p * 4 * H)


cdef bint _split_xw = True


def set_split_xw(bint on):
    """Split path: compute x_t Wx per step inside each row group (True, default) or as one
    threaded product before the loop (False). Tuning knob."""
    global _split_xw
    _split_xw = on


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
    """table[ids[n * ids_rs]] += src[n - r0] for rows n in [r0, r1): dWx += x_t^T dA_t for one-hot
    x_t."""
    cdef Py_ssize_t n, j
    cdef floating *row
    cdef const floating *d
    for n in range(r0, r1):
        row = table + ids[n * ids_rs] * G
        d = src + (n - r0) * G
        for j in range(G):
            row[j] = row[j] + d[j]


cdef void _fwd_seq(Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t T, Py_ssize_t N, Py_ssize_t H,
                   Py_ssize_t D, const floating *X, const floating *Wx,
                   const floating *W, const floating *bias, Py_ssize_t b_rs, floating *A,
                   floating *Hb, floating *Cb, floating *TC, bint h0_zero,
                   bint xw, const int64_t *ids, Py_ssize_t T_ids) noexcept nogil:
    """The whole time loop of forward for rows [r0, r1), single-threaded BLAS (split path): rows
    are independent in the recurrence, so the halves need no synchronisation."""
    cdef Py_ssize_t t, G = 4 * H, NH = N * H
    cdef int old
    if r1 <= r0:
        return
    old = _blas_one_thread()
    for t in range(T):
        if ids != NULL:  # one-hot inputs: a_t = the rows of Wx at the ids (ids (N, T_ids))
            _gather_rows(A + t * N * G + r0 * G, Wx, ids + t, T_ids, r0, r1, G)
        elif xw:  # a_t = x_t Wx for these rows
            _gemm(c'N', c'N', <int>G, <int>(r1 - r0), <int>D, <floating>1, Wx, <int>G,
                  X + t * N * D + r0 * D, <int>D, <floating>0, A + t * N * G + r0 * G, <int>G)
        if t > 0 or not h0_zero:
            _gemm(c'N', c'N', <int>G, <int>(r1 - r0), <int>H, <floating>1, W, <int>G,
                  Hb + t * NH + r0 * H, <int>H, <floating>1, A + t * N * G + r0 * G, <int>G)
        if floating is float:
            fs_fwd_rowsf(r0, r1, H, A + t * N * G, bias, b_rs, Cb + t * NH, Cb + (t + 1) * NH,
                         TC + t * NH, Hb + (t + 1) * NH)
        else:
            fs_fwd_rowsd(r0, r1, H, A + t * N * G, bias, b_rs, Cb + t * NH, Cb + (t + 1) * NH,
                         TC + t * NH, Hb + (t + 1) * NH)
    _blas_restore(old)


cdef bint _split_grads = True


def set_split_grads(bint on):
    """Split path of backward: compute dX and partial dWx, dWh per step inside each row group
    (True, default; the partials are summed at the end) or as threaded products after the loop
    (False). Tuning knob."""
    global _split_grads
    _split_grads = on


cdef inline void _add_into(floating *dst, const floating *src, Py_ssize_t n,
                           bint assign) noexcept nogil:
    """dst = src (assign) or dst += src, over n elements."""
    cdef Py_ssize_t k
    if assign:
        memcpy(dst, src, n * sizeof(floating))
    else:
        for k in range(n):
            dst[k] = dst[k] + src[k]


cdef void _bwd_seq(Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t T, Py_ssize_t N, Py_ssize_t H,
                   const floating *W, floating *A, const floating *dy0, Py_ssize_t dy_ts,
                   Py_ssize_t dy_rs, floating *dhn, floating *dc, const floating *Cb,
                   const floating *TC, double *dbacc, Py_ssize_t D, const floating *X,
                   const floating *Wx, const floating *Hb, floating *dX, floating *pdWx,
                   floating *pdWh, bint h0_zero, bint need_dh0, floating *dbr,
                   const int64_t *ids, Py_ssize_t T_ids) noexcept nogil:
    """The whole time loop of backward for rows [r0, r1) (split path, see _fwd_seq). With pdWx
    (D x 4H) and pdWh (H x 4H; their contents are overwritten), also this group's dX rows and
    its share of dWx and dWh, per step. need_dh0=False: no dA_0 Wh^T at t = 0 (dhn then holds
    dh_1 at the end). dbr (N x 4H, or NULL): per-row bias gradients, the sum over t of these
    rows of dA_t. ids (N x T_ids, or NULL): one-hot inputs (see forward); no dX then, and the
    dWx share is a scatter-add of dA_t's rows."""
    cdef Py_ssize_t t, G = 4 * H, NH = N * H, rows = r1 - r0
    cdef floating *at
    cdef int old
    if r1 <= r0:
        return
    # the shares are overwritten at the first step (t = T-1, beta 0) and added to after; pdWh
    # gets no step at all when T == 1 and h0 == 0
    if pdWh != NULL and T == 1 and h0_zero:
        memset(pdWh, 0, H * G * sizeof(floating))
    if pdWx != NULL and ids != NULL:  # scatter-adds need a zeroed share
        memset(pdWx, 0, D * G * sizeof(floating))
    old = _blas_one_thread()
    for t in range(T - 1, -1, -1):
        at = A + t * N * G + r0 * G
        if floating is float:
            fs_bwd_rowsf(r0, r1, H, A + t * N * G, dy0 + t * dy_ts, dy_rs, dhn, dc, Cb + t * NH,
                         TC + t * NH, dbacc)
        else:
            fs_bwd_rowsd(r0, r1, H, A + t * N * G, dy0 + t * dy_ts, dy_rs, dhn, dc, Cb + t * NH,
                         TC + t * NH, dbacc)
        if dbr != NULL:
            _add_into(dbr + r0 * G, at, rows * G, t == T - 1)
        if t > 0 or need_dh0:
            _gemm(c'T', c'N', <int>H, <int>rows, <int>G, <floating>1, W, <int>G,
                  at, <int>G, <floating>0, dhn + r0 * H, <int>H)
        if pdWx != NULL and ids != NULL:  # one-hot x_t: dWx += x_t^T dA_t is a scatter-add
            _scatter_rows(pdWx, at, ids + t, T_ids, r0, r1, G)
        elif pdWx != NULL:
            # dX_t rows = dA_t Wx^T;  dWx += x_t^T dA_t;  dWh += h_{t-1}^T dA_t  (these rows)
            _gemm(c'T', c'N', <int>D, <int>rows, <int>G, <floating>1, Wx, <int>G,
                  at, <int>G, <floating>0, dX + t * N * D + r0 * D, <int>D)
            _gemm(c'N', c'T', <int>G, <int>D, <int>rows, <floating>1, at, <int>G,
                  X + t * N * D + r0 * D, <int>D, <floating>(t < T - 1), pdWx, <int>G)
        if pdWx != NULL:
            if t > 0 or not h0_zero:
                _gemm(c'N', c'T', <int>G, <int>H, <int>rows, <floating>1, at, <int>G,
                      Hb + t * NH + r0 * H, <int>H, <floating>(t < T - 1), pdWh, <int>G)
    _blas_restore(old)


cdef inline int _split_ways(int nsplit, Py_ssize_t N) noexcept nogil:
    """How many row groups the split path uses (0: not used)."""
    if nsplit < 2 or not FS_HAVE_OPENMP or (_set_local == NULL and _set_global == NULL):
        return 0
    if N < 2 * nsplit:
        return 0
    return nsplit


def forward(const floating[:, :, ::1] xs, const floating[:, ::1] Wx, const floating[:, ::1] Wh,
            const floating[::1] b, const floating[:, ::1] h0, const floating[:, ::1] c0,
            floating[:, :, ::1] X, floating[:, :, ::1] A, floating[:, :, ::1] Hb,
            floating[:, :, ::1] Cb, floating[:, :, ::1] TC, int nthreads=1, int nsplit=0,
            bint row_bias=False, const int64_t[:, ::1] ids=None):
    """Fill X, A, Hb, Cb, TC (see the module docstring). b is (4H,) or, with row_bias, the
    (N, 4H) biases of every row, flattened. ids (N, T): one-hot inputs, x_t = onehot(ids[:, t])
    of width V = Wx.shape[0], so x_t Wx is a gather of Wx's rows; xs is then (N, T, 0) and X
    unused. nthreads > 1 runs the gate math on
    OpenMP threads. nsplit >= 2 (when can_split()): the rows are cut into nsplit groups, each
    running the whole time loop (h Wh product and gate math) on its own OpenMP thread with
    single-threaded BLAS; the x Wx product stays one threaded product. Returns whether h0 was
    all zeros (then step 0 needs no h Wh product, and backward leaves step 0 out of dWh)."""
    cdef Py_ssize_t N = xs.shape[0], T = xs.shape[1], D = xs.shape[2], H = Wh.shape[0]
    cdef Py_ssize_t G = 4 * H, t, n, r0, r1, NB, p
    cdef bint h0_zero
    cdef int ways = _split_ways(nsplit, N), gold = 0
    cdef const floating *W = &Wh[0, 0]
    cdef const floating *bias = &b[0]
    cdef Py_ssize_t b_rs = 4 * H if row_bias else 0
    cdef const int64_t *idp = NULL
    cdef Py_ssize_t V = Wx.shape[0], bad = -1
    if b.shape[0] != (N * 4 * H if row_bias else 4 * H):
        raise ValueError(f"b has {b.shape[0]} elements, expected {N * 4 * H if row_bias else 4 * H}")
    if ids is not None:
        if ids.shape[0] != N or ids.shape[1] != T or D != 0:
            raise ValueError(f"ids have shape {tuple(ids.shape)[:2]}, expected {(N, T)} "
                             f"(with xs of shape (N, T, 0))")
        if N and T:
            idp = &ids[0, 0]
            for n in range(N * T):
                if idp[n] < 0 or idp[n] >= V:
                    bad = n
                    break
        if bad >= 0:
            raise ValueError(f"input id {idp[bad]} outside [0, {V})")
    with nogil:
        if idp == NULL:
            for n in range(N):
                for t in range(T):
                    memcpy(&X[t, n, 0], &xs[n, t, 0], D * sizeof(floating))
        memcpy(&Hb[0, 0, 0], &h0[0, 0], N * H * sizeof(floating))
        memcpy(&Cb[0, 0, 0], &c0[0, 0], N * H * sizeof(floating))
        h0_zero = _all_zero(&h0[0, 0], N * H)
        # A = X Wx for all steps at once:  A^T (4H x TN) = Wx^T (4H x D) X^T (D x TN)
        # (the split path computes it per step in each row group: no threaded BLAS call here)
        if idp != NULL and not (ways and _split_xw):  # one-hot inputs: gather Wx's rows
            for t in range(T):
                _gather_rows(&A[t, 0, 0], &Wx[0, 0], idp + t, T, 0, N, G)
        elif not (ways and _split_xw):
            _gemm(c'N', c'N', <int>G, <int>(T * N), <int>D, <floating>1, &Wx[0, 0], <int>G,
                  &X[0, 0, 0], <int>D, <floating>0, &A[0, 0, 0], <int>G)
        if ways:
            if _set_local == NULL:  # only a global setter: one BLAS thread around the loop
                gold = (<get_global_t>_get_global)()
                (<set_global_t>_set_global)(1)
            for p in prange(ways, num_threads=ways, schedule='static'):
                _fwd_seq(p * N // ways, (p + 1) * N // ways, T, N, H, D, &X[0, 0, 0],
                         &Wx[0, 0], W, bias, b_rs, &A[0, 0, 0], &Hb[0, 0, 0], &Cb[0, 0, 0],
                         &TC[0, 0, 0], h0_zero, _split_xw and idp == NULL,
                         idp if _split_xw else NULL, T)
            if _set_local == NULL:
                (<set_global_t>_set_global)(gold)
        NB = _block_rows(N, H, sizeof(floating))
        for t in range(0 if ways else T):  # the per-step path (not split)
            r0 = 0
            while r0 < N:
                r1 = r0 + NB if r0 + NB < N else N
                if t > 0 or not h0_zero:
                    # a += h_{t-1} Wh:  a^T (4H x rows) += Wh^T (4H x H) h^T (H x rows)
                    _gemm(c'N', c'N', <int>G, <int>(r1 - r0), <int>H, <floating>1, W, <int>G,
                          &Hb[t, r0, 0], <int>H, <floating>1, &A[t, r0, 0], <int>G)
                _fwd_gates(r0, r1, H, &A[t, 0, 0], bias, b_rs, &Cb[t, 0, 0], &Cb[t + 1, 0, 0],
                           &TC[t, 0, 0], &Hb[t + 1, 0, 0], nthreads)
                r0 = r1
    return h0_zero


cdef inline void _sum_range(const floating *part, int ways, Py_ssize_t PW, floating *dst,
                            Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """dst[j - j0] = the sum over p of part[p*PW + j], for j in [j0, j1)."""
    cdef Py_ssize_t j, n = j1 - j0
    cdef int p
    cdef const floating *a = part + j0
    cdef const floating *b = part + PW + j0
    if n <= 0:
        return
    if ways == 2:  # the common case, as one vectorisable loop
        for j in range(n):
            dst[j] = a[j] + b[j]
        return
    for j in range(n):
        dst[j] = a[j]
    for p in range(1, ways):
        b = part + p * PW + j0
        for j in range(n):
            dst[j] = dst[j] + b[j]


cdef void _sum_parts(const floating *part, int ways, Py_ssize_t PW, floating *dWx,
                     Py_ssize_t nx, floating *dWh, Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """Element j of the concatenation [dWx (nx elements), dWh] = the sum over the row groups of
    their shares part[p*PW + j], for j in [j0, j1)."""
    cdef Py_ssize_t a0 = j0 if j0 < nx else nx, a1 = j1 if j1 < nx else nx
    cdef Py_ssize_t b0 = j0 if j0 > nx else nx, b1 = j1 if j1 > nx else nx
    _sum_range(part, ways, PW, dWx + a0, a0, a1)
    _sum_range(part, ways, PW, dWh + (b0 - nx), b0, b1)


def backward(const floating[:, :, :] dhs, const floating[:, :, ::1] X,
             const floating[:, ::1] Wx, const floating[:, ::1] Wh,
             floating[:, :, ::1] A, const floating[:, :, ::1] Hb, const floating[:, :, ::1] Cb,
             const floating[:, :, ::1] TC, floating[:, ::1] dWx, floating[:, ::1] dWh,
             floating[::1] db, floating[:, :, ::1] dX, floating[:, ::1] dh0,
             bint h0_zero=False, int nthreads=1, int nsplit=0, floating[::1] scratch=None,
             bint need_dh0=True, floating[::1] dbrows=None, const int64_t[:, ::1] ids=None):
    """Backward through the buffers filled by forward. A is overwritten by dA (so one backward
    per forward). dhs (N, T, H) may have any strides as long as its last axis is contiguous.
    Writes dWx, dWh, db (overwritten, not accumulated), dX (T, N, D) and dh0 (N, H).
    need_dh0=False skips the product dA_0 Wh^T at t = 0: dh0 is then only working memory (its
    contents are not the gradient of h0). dbrows (N*4H elements; for a forward with row_bias):
    the gradients of the rows' biases, sum over t of dA_t, are written there too.
    scratch (optional, at least N*H + nsplit*(D + H)*4H elements): working memory for dc and the
    row groups' dWx, dWh shares instead of calloc'd memory (which, at ~0.6 MB, costs page faults
    on every call whenever malloc hands it back to the system in between)."""
    cdef Py_ssize_t N = A.shape[1], T = A.shape[0], H = Wh.shape[0], D = Wx.shape[0]
    cdef Py_ssize_t G = 4 * H, t, p, j, K, r0, r1, NB
    cdef Py_ssize_t isz = sizeof(floating)
    cdef int nth = nthreads if nthreads > 1 else 1
    cdef int ways = _split_ways(nsplit, N), gold = 0
    if ways > nth:
        nth = ways  # one set of db accumulators per row group
    if dhs.shape[0] != N or dhs.shape[1] != T or dhs.shape[2] != H:
        raise ValueError(f"dhs has shape {tuple(dhs.shape)[:3]}, expected {(N, T, H)}")
    if dhs.strides[2] != isz or dhs.strides[0] % isz or dhs.strides[1] % isz:
        raise ValueError("dhs must be contiguous along its last axis")
    cdef Py_ssize_t dy_rs = dhs.strides[0] // isz, dy_ts = dhs.strides[1] // isz
    cdef const floating *dy0 = &dhs[0, 0, 0]
    cdef const floating *W = &Wh[0, 0]
    cdef floating *dhn = &dh0[0, 0]
    cdef Py_ssize_t PW = (D + H) * G  # split path: one (dWx, dWh) share per row group
    cdef bint own = True  # dc and part calloc'd here (else they live in scratch)
    cdef floating *dc = NULL
    cdef floating *part = NULL
    cdef const int64_t *idp = NULL
    if ids is not None:
        if ids.shape[0] != N or ids.shape[1] != T:
            raise ValueError(f"ids have shape {tuple(ids.shape)[:2]}, expected {(N, T)}")
        if N and T:
            idp = &ids[0, 0]  # checked by forward
    cdef floating *dbr = NULL
    if dbrows is not None:
        if dbrows.shape[0] != N * G:
            raise ValueError(f"dbrows has {dbrows.shape[0]} elements, expected {N * G}")
        if N and G:
            dbr = &dbrows[0]
    cdef double *dbacc = <double *>calloc(nth * G, sizeof(double))
    if scratch is not None and scratch.shape[0] >= N * H + (ways * PW if ways and _split_grads else 0):
        own = False
        dc = &scratch[0]
        memset(dc, 0, N * H * isz)
        if ways and _split_grads:
            part = dc + N * H  # zeroed by each row group (_bwd_seq)
    else:
        dc = <floating *>calloc(N * H, isz)
        if ways and _split_grads:
            part = <floating *>calloc(ways * PW, isz)
    if dc == NULL or dbacc == NULL or (ways and _split_grads and part == NULL):
        if own:
            free(dc)
            free(part)
        free(dbacc)
        raise MemoryError()
    try:
        with nogil:
            memset(dhn, 0, N * H * isz)
            NB = _block_rows(N, H, isz)
            if ways:
                if _set_local == NULL:
                    gold = (<get_global_t>_get_global)()
                    (<set_global_t>_set_global)(1)
                for p in prange(ways, num_threads=ways, schedule='static'):
                    _bwd_seq(p * N // ways, (p + 1) * N // ways, T, N, H, W, &A[0, 0, 0], dy0,
                             dy_ts, dy_rs, dhn, dc, &Cb[0, 0, 0], &TC[0, 0, 0], dbacc + p * G,
                             D, &X[0, 0, 0], &Wx[0, 0], &Hb[0, 0, 0], &dX[0, 0, 0],
                             part + p * PW if part != NULL else NULL,
                             part + p * PW + D * G if part != NULL else NULL, h0_zero,
                             need_dh0, dbr, idp, T)
                if _set_local == NULL:
                    (<set_global_t>_set_global)(gold)
                if part != NULL:  # dWx, dWh = the sums of the groups' shares, split by columns
                    for p in prange(ways, num_threads=ways, schedule='static'):
                        _sum_parts(part, ways, PW, &dWx[0, 0], D * G, &dWh[0, 0],
                                   p * PW // ways, (p + 1) * PW // ways)
            for t in range((0 if ways else T) - 1, -1, -1):  # the per-step path (not split)
                r0 = 0
                while r0 < N:
                    r1 = r0 + NB if r0 + NB < N else N
                    _bwd_gates(r0, r1, H, &A[t, 0, 0], dy0 + t * dy_ts, dy_rs, dhn, dc,
                               &Cb[t, 0, 0], &TC[t, 0, 0], dbacc, nth)
                    # dh_{t-1} (through the gates) = dA_t Wh^T:
                    #   (H x rows) = Wh (H x 4H) dA_t^T (4H x rows)
                    if t > 0 or need_dh0:
                        _gemm(c'T', c'N', <int>H, <int>(r1 - r0), <int>G, <floating>1, W,
                              <int>G, &A[t, r0, 0], <int>G, <floating>0, dhn + r0 * H, <int>H)
                    r0 = r1
            if dbr != NULL and not ways:  # per-row bias gradients: sum of dA_t over t
                for t in range(T - 1, -1, -1):
                    _add_into(dbr, &A[t, 0, 0], N * G, t == T - 1)
            if part == NULL and idp != NULL:  # one-hot inputs: dWx is a scatter-add of dA's rows
                memset(&dWx[0, 0], 0, D * G * isz)
                for t in range(T):
                    _scatter_rows(&dWx[0, 0], &A[t, 0, 0], idp + t, T, 0, N, G)
            elif part == NULL:
                # dWx = X^T dA:  dWx^T (4H x D) = dA^T (4H x TN) X (TN x D)
                _gemm(c'N', c'T', <int>G, <int>D, <int>(T * N), <floating>1, &A[0, 0, 0], <int>G,
                      &X[0, 0, 0], <int>D, <floating>0, &dWx[0, 0], <int>G)
            if part == NULL:  # (the split path has computed them)
                # dWh = Hprev^T dA with Hprev = Hb[:-1]; the rows of step 0 add nothing when h0 == 0
                K = (T - 1) * N if h0_zero else T * N
                if K > 0:
                    _gemm(c'N', c'T', <int>G, <int>H, <int>K, <floating>1,
                          &A[0, 0, 0] + (T * N - K) * G, <int>G, &Hb[0, 0, 0] + (T * N - K) * H,
                          <int>H, <floating>0, &dWh[0, 0], <int>G)
                else:
                    memset(&dWh[0, 0], 0, H * G * isz)
                # dX = dA Wx^T:  dX^T (D x TN) = Wx (D x 4H) dA^T (4H x TN)
                if idp == NULL:
                    _gemm(c'T', c'N', <int>D, <int>(T * N), <int>G, <floating>1, &Wx[0, 0],
                          <int>G, &A[0, 0, 0], <int>G, <floating>0, &dX[0, 0, 0], <int>D)
            for p in range(1, nth):
                for j in range(G):
                    dbacc[j] += dbacc[p * G + j]
            for j in range(G):
                db[j] = <floating>dbacc[j]
    finally:
        if own:
            free(dc)
            free(part)
        free(dbacc)
