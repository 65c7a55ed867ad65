/* The LSTM's per-step math for fastseq/_ext/_lstm.pxi: gate nonlinearities, cell update and
   their derivatives, one pass over a block of rows per time step (float32 suffix f, float64 d).

   Gate layout [f | g | i | o]: f, i, o = sigmoid, g = tanh; c = f c_prev + g i; h = o tanh(c).
   sigmoid and tanh come from an accurate expm1 (Cody-Waite reduction and a Taylor polynomial)
   because libm's scalar calls would not vectorise; the error is a few ulp in either precision. */
#ifndef FS_LSTM_H
#define FS_LSTM_H

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

/* softmax helper: s[j] = exp(s[j]) for one row of scores already shifted to <= 0; returns the
   row's sum (exp of anything below the clamp is at most 2^-125, not 0). The sum runs in 8 fixed
   lanes, so its order, and its bits, do not depend on where the row sits in memory. */
#define FS_EXPROW(T, SFX, LOW) \
FS_KERNEL static T fs_exp_row##SFX(T *FS_RESTRICT s, Py_ssize_t n) \
{ \
    T lane[8] = {0, 0, 0, 0, 0, 0, 0, 0}; \
    FS_SIMD \
    for (Py_ssize_t j = 0; j < n; ++j) { \
        T x = s[j] < LOW ? LOW : s[j]; \
        s[j] = fs_exp_neg##SFX(x > 0 ? 0 : x); \
    } \
    Py_ssize_t j = 0; \
    for (; j + 8 <= n; j += 8) \
        for (int k = 0; k < 8; ++k) lane[k] += s[j + k]; \
    for (int k = 0; j < n; ++j, ++k) lane[k] += s[j]; \
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])); \
}

FS_EXPROW(float, f, -86.0f)
FS_EXPROW(double, d, -700.0)
FS_FWD(float, f)
FS_FWD(double, d)
FS_BWD(float, f, double)
FS_BWD(double, d, double)

#if defined(__GNUC__) && !defined(__clang__)
#  pragma GCC pop_options
#endif

#endif
