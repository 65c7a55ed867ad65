/* Small matrix products for the stacks of fastseq/_ext/_products.pxi's bmatmul (attention's
   scores and contexts): out (M x N, row-major) = A (M x K) B (K x N) for one matrix of a stack,
   in plain loops, because a BLAS call costs microseconds of set-up that a product this small
   (one decoder query against a few dozen keys) does not amortise.

   A's element (m, k) is at A[m * a_rs + k * a_cs]; B's element (k, n) at B[k * b_rs + n * b_cs].
   Two forms, each with a fixed summation order over k:
     rows:  out[m, :] = sum_k A[m, k] B[k, :]  for B with contiguous rows (b_cs = 1);
     dots:  out[m, n] = A[m, :] . B[:, n]       for A with contiguous rows and B with contiguous
            columns (a_cs = 1, b_rs = 1), as for scores q K^T. */
#ifndef FS_BMM_H
#define FS_BMM_H

#include <stddef.h>

#include "fs_simd.h"

#define FS_DEFINE_SMALL_MM(T, S)                                                               \
FS_KERNEL static void fs_mm_rows##S(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,                     \
                                    const T *A, ptrdiff_t a_rs, ptrdiff_t a_cs,                \
                                    const T *B, ptrdiff_t b_rs, T *FS_RESTRICT out)           \
{                                                                                              \
    for (ptrdiff_t m = 0; m < M; m++) {                                                        \
        T *FS_RESTRICT o = out + m * N;                                                        \
        FS_SIMD for (ptrdiff_t n = 0; n < N; n++) o[n] = 0;                                    \
        for (ptrdiff_t k = 0; k < K; k++) {                                                    \
            const T s = A[m * a_rs + k * a_cs];                                                \
            const T *FS_RESTRICT b = B + k * b_rs;                                             \
            FS_SIMD for (ptrdiff_t n = 0; n < N; n++) o[n] += s * b[n];                        \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
FS_KERNEL static void fs_mm_dots##S(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,                     \
                                    const T *A, ptrdiff_t a_rs, const T *B, ptrdiff_t b_cs,    \
                                    T *FS_RESTRICT out)                                        \
{                                                                                              \
    for (ptrdiff_t m = 0; m < M; m++)                                                          \
        for (ptrdiff_t n = 0; n < N; n++) {                                                    \
            const T *a = A + m * a_rs, *b = B + n * b_cs;                                      \
            T s = 0;                                                                           \
            FS_SIMD_SUM(s) for (ptrdiff_t k = 0; k < K; k++) s += a[k] * b[k];                 \
            out[m * N + n] = s;                                                                \
        }                                                                                      \
}

FS_DEFINE_SMALL_MM(float, f)
FS_DEFINE_SMALL_MM(double, d)

#endif
