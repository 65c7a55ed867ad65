/* The small kernels around the LSTM (_ops.pxi): the two passes of softmax cross-entropy around
   NumPy's exp, and the embedding's gather and scatter-add; float32 suffix f, float64 d. */
#ifndef FS_OPS_H
#define FS_OPS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Each row of S (M x V) minus its maximum, in place; picked[i] = the shifted S[i, labels[i]]
   (left alone on ignored rows). Returns the number of rows not ignored, or -(i + 1) for the
   first row i whose label is outside [0, V) and not ignored (rows before it are shifted). */
#define FS_SOFTMAX_SHIFT(T, SFX) \
static ptrdiff_t fs_softmax_shift##SFX(T *S, ptrdiff_t M, ptrdiff_t V, const int64_t *labels, \
                                       int64_t ignore, int has_ignore, double *picked) \
{ \
    ptrdiff_t n_valid = 0; \
    for (ptrdiff_t i = 0; i < M; ++i) { \
        int64_t lab = labels[i]; \
        int skip = has_ignore && lab == ignore; \
        if (!skip && (lab < 0 || lab >= V)) \
            return -(i + 1); \
        if (V == 0) \
            continue; \
        T *s = S + i * V; \
        T mx = s[0]; \
        for (ptrdiff_t j = 1; j < V; ++j) \
            if (s[j] > mx) \
                mx = s[j]; \
        for (ptrdiff_t j = 0; j < V; ++j) \
            s[j] = s[j] - mx; \
        if (!skip) { \
            picked[i] = s[lab]; \
            n_valid++; \
        } \
    } \
    return n_valid; \
}

/* E = exp(shifted S) in, the gradient of the mean loss out: E / z / n_valid per row (z its
   sum), minus 1 / n_valid at the label; ignored rows 0. Returns the mean of log(z) - picked
   over the rows not ignored (labels already checked by fs_softmax_shift). */
#define FS_SOFTMAX_FINISH(T, SFX) \
static double fs_softmax_finish##SFX(T *E, ptrdiff_t M, ptrdiff_t V, const int64_t *labels, \
                                     const double *picked, int64_t ignore, int has_ignore, \
                                     ptrdiff_t n_valid) \
{ \
    double loss = 0, denom = n_valid > 0 ? (double)n_valid : 1; \
    for (ptrdiff_t i = 0; i < M; ++i) { \
        T *e = E + i * V; \
        int64_t lab = labels[i]; \
        if (has_ignore && lab == ignore) { \
            for (ptrdiff_t j = 0; j < V; ++j) \
                e[j] = 0; \
            continue; \
        } \
        double z = 0; \
        for (ptrdiff_t j = 0; j < V; ++j) \
            z += e[j]; \
        loss += log(z) - picked[i]; \
        T r = (T)(1.0 / (z * denom)); \
        for (ptrdiff_t j = 0; j < V; ++j) \
            e[j] = e[j] * r; \
        e[lab] = e[lab] - (T)(1.0 / denom); \
    } \
    return loss / denom; \
}

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

FS_SOFTMAX_SHIFT(float, f)
FS_SOFTMAX_SHIFT(double, d)
FS_SOFTMAX_FINISH(float, f)
FS_SOFTMAX_FINISH(double, d)
FS_EMBED_GATHER(float, f)
FS_EMBED_GATHER(double, d)
FS_EMBED_SCATTER(float, f)
FS_EMBED_SCATTER(double, d)

#endif
