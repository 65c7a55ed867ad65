/* The small kernels around the LSTM (_ops.pxi): softmax cross-entropy by rows, and the
   embedding's gather and scatter-add; float32 suffix f, float64 d. */
#ifndef FS_OPS_H
#define FS_OPS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fs_lstm.h"   /* fs_exp_row: a row's exp and its sum, vectorised; FS_KERNEL, FS_SIMD */

/* Softmax cross-entropy of rows [r0, r1) of S (M x V), one row at a time (it stays in cache):
   the row minus its maximum, exp and its sum z (fs_exp_row), then S[i] becomes the gradient of
   the mean loss over the rows not ignored, exp / z / denom minus 1 / denom at the label (0 on
   ignored rows), and loss[i] = log(z) - (S[i, label] - max) (0 on ignored rows). Labels were
   checked before. The maximum and the sum run in 8 fixed lanes, so a row's bits do not depend
   on where it sits or which thread takes it. */
#define FS_SOFTMAX_ROWS(T, SFX) \
FS_KERNEL static void fs_softmax_rows##SFX(T *S, ptrdiff_t r0, ptrdiff_t r1, ptrdiff_t V, \
                                           const int64_t *labels, int64_t ignore, \
                                           int has_ignore, double denom, double *loss) \
{ \
    for (ptrdiff_t i = r0; i < r1; ++i) { \
        T *s = S + i * V; \
        int64_t lab = labels[i]; \
        if ((has_ignore && lab == ignore) || V == 0) { \
            memset(s, 0, V * sizeof(T)); \
            loss[i] = 0; \
            continue; \
        } \
        T lane[8]; \
        for (int k = 0; k < 8; ++k) lane[k] = s[0]; \
        ptrdiff_t j = 0; \
        for (; j + 8 <= V; j += 8) \
            for (int k = 0; k < 8; ++k) lane[k] = s[j + k] > lane[k] ? s[j + k] : lane[k]; \
        for (; j < V; ++j) lane[0] = s[j] > lane[0] ? s[j] : lane[0]; \
        T mx = lane[0]; \
        for (int k = 1; k < 8; ++k) mx = lane[k] > mx ? lane[k] : mx; \
        T picked = s[lab] - mx; \
        FS_SIMD \
        for (j = 0; j < V; ++j) s[j] = s[j] - mx; \
        double z = (double)fs_exp_row##SFX(s, V); \
        loss[i] = log(z) - (double)picked; \
        T r = (T)(1.0 / (z * denom)); \
        FS_SIMD \
        for (j = 0; j < V; ++j) s[j] = s[j] * r; \
        s[lab] = s[lab] - (T)(1.0 / denom); \
    } \
}

FS_SOFTMAX_ROWS(float, f)
FS_SOFTMAX_ROWS(double, d)

/* out[k] = W[ids[k]] (W is V x D); returns -1, or the position of the first id outside
   [0, V) (then nothing is written). */
#define FS_EMBED_GATHER(T, SFX) \
static ptrdiff_t fs_embed_gather##SFX(const T *W, ptrdiff_t V, ptrdiff_t D, \
                                      const int64_t *ids, ptrdiff_t n, T *out) \
{ \
    for (ptrdiff_t k = 0; k < n; ++k) \
        if (ids[k] < 0 || ids[k] >= V) \
            return k; \
    if (D) \
        for (ptrdiff_t k = 0; k < n; ++k) \
            memcpy(out + k * D, W + ids[k] * D, D * sizeof(T)); \
    return -1; \
}

/* dW (V x D) += the rows d[n, t] (N x T x D, strides in elements, the last 1) at ids[n, t]
   (strides in elements); ids outside [0, V) are skipped (never written out of bounds). */
#define FS_EMBED_SCATTER(T, SFX) \
static void fs_embed_scatter##SFX(T *dW, ptrdiff_t V, ptrdiff_t D, const int64_t *ids, \
                                  ptrdiff_t ids_s0, ptrdiff_t ids_s1, const T *d, \
                                  ptrdiff_t d_s0, ptrdiff_t d_s1, ptrdiff_t N, ptrdiff_t Tn) \
{ \
    for (ptrdiff_t n = 0; n < N; ++n) \
        for (ptrdiff_t t = 0; t < Tn; ++t) { \
            int64_t k = ids[n * ids_s0 + t * ids_s1]; \
            if (k < 0 || k >= V) \
                continue; \
            T *row = dW + k * D; \
            const T *src = d + n * d_s0 + t * d_s1; \
            for (ptrdiff_t j = 0; j < D; ++j) \
                row[j] += src[j]; \
        } \
}

FS_EMBED_GATHER(float, f)
FS_EMBED_GATHER(double, d)
FS_EMBED_SCATTER(float, f)
FS_EMBED_SCATTER(double, d)

#endif
