/* fastseq's optimiser kernels (_optim.pxi): elements [i0, i1) of one array, one function per
   precision (suffix f, d); the loops are written for the vectoriser. */
#ifndef FS_OPTIM_H
#define FS_OPTIM_H

#include <math.h>
#include <stddef.h>

#include "fs_simd.h"

#define FS_ADAM(T, SFX, SQRT) \
FS_KERNEL static void fs_adam_##SFX(ptrdiff_t i0, ptrdiff_t i1, T *FS_RESTRICT p, \
        const T *FS_RESTRICT g, T *FS_RESTRICT m, T *FS_RESTRICT v, T a, T b, T lr, T eps) \
{ \
    for (ptrdiff_t i = i0; i < i1; ++i) { \
        T x = g[i]; \
        T mi = m[i] + a * (x - m[i]); \
        T vi = v[i] + b * (x * x - v[i]); \
        m[i] = mi; \
        v[i] = vi; \
        p[i] -= lr * mi / (SQRT(vi) + eps); \
    } \
}

/* sum of squares, accumulated in double in 8 fixed lanes (vectorised), so that the order of
   the additions, and the result's bits, do not depend on where the array sits in memory */
#define FS_SUMSQ(T, SFX) \
FS_KERNEL static double fs_sumsq_##SFX(ptrdiff_t i0, ptrdiff_t i1, const T *FS_RESTRICT g) \
{ \
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0}; \
    ptrdiff_t i = i0; \
    for (; i + 8 <= i1; i += 8) \
        for (int k = 0; k < 8; ++k) lane[k] += (double)g[i + k] * (double)g[i + k]; \
    for (int k = 0; i < i1; ++i, ++k) lane[k] += (double)g[i] * (double)g[i]; \
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])); \
}

#define FS_SCALE(T, SFX) \
FS_KERNEL static void fs_scale_##SFX(ptrdiff_t i0, ptrdiff_t i1, T *FS_RESTRICT g, T r) \
{ \
    for (ptrdiff_t i = i0; i < i1; ++i) g[i] *= r; \
}

FS_ADAM(float, f, sqrtf)
FS_ADAM(double, d, sqrt)
FS_SUMSQ(float, f)
FS_SUMSQ(double, d)
FS_SCALE(float, f)
FS_SCALE(double, d)

#endif
