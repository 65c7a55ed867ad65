/* Inverted dropout from a counter-based hash (_dropout.pxi). A draw has a 53-bit key k, split
   into a = k mod 2^32 and b = k div 2^32; element i (flat, C order, i < 2^32) gets the 32 bits
       z = fmix(fmix(i * 0x9E3779B9 ^ a) + b)        (arithmetic mod 2^32)
   with fmix MurmurHash3's 32-bit finaliser, and is kept when z >> 8, a uniform 24-bit number,
   is below thr = ceil(keep * 2^24). Kept elements are multiplied by scale = 1 / keep (in the
   array's precision), dropped ones become 0. 32-bit products only, so the loop vectorises on
   AVX2. Elements [i0, i1), suffix f / d. */
#ifndef FS_DROPOUT_H
#define FS_DROPOUT_H

#include <stddef.h>
#include <stdint.h>

#include "fs_simd.h"

static inline uint32_t fs_fmix32(uint32_t z)
{
    z ^= z >> 16;
    z *= 0x85EBCA6BU;
    z ^= z >> 13;
    z *= 0xC2B2AE35U;
    return z ^ (z >> 16);
}

#define FS_DROPOUT(T, SFX) \
FS_KERNEL static void fs_dropout_##SFX(ptrdiff_t i0, ptrdiff_t i1, const T *x, \
                                       T *out, uint32_t a, uint32_t b, uint32_t thr, T scale) \
{ \
    FS_SIMD \
    for (ptrdiff_t i = i0; i < i1; ++i) { \
        uint32_t z = fs_fmix32(fs_fmix32((uint32_t)i * 0x9E3779B9U ^ a) + b); \
        out[i] = (z >> 8) < thr ? x[i] * scale : (T)0; \
    } \
}

FS_DROPOUT(float, f)
FS_DROPOUT(double, d)

#endif
