/* Inverted dropout from a counter-based hash (_dropout.pxi): element i of a draw with key k is
   kept when the top 53 bits of splitmix64's finaliser of
       k * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9 + 0x632BE59BD9B4E019   (mod 2^64)
   are below thr = ceil(keep * 2^53), i.e. when that uniform number in [0, 1) is below keep: the
   cupy engine's mask kernel with state [k, 0]. Kept elements are multiplied by scale = 1 / keep
   (in the array's precision), dropped ones become 0. Elements [i0, i1), suffix f / d. */
#ifndef FS_DROPOUT_H
#define FS_DROPOUT_H

#include <stddef.h>
#include <stdint.h>

#include "fs_simd.h"

static inline uint64_t fs_dropout_bits(uint64_t base, uint64_t i)
{
    uint64_t z = base + i * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return (z ^ (z >> 31)) >> 11;
}

/* base = k * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019 (the key's part of the sum) */
#define FS_DROPOUT(T, SFX) \
FS_KERNEL static void fs_dropout_##SFX(ptrdiff_t i0, ptrdiff_t i1, const T *FS_RESTRICT x, \
                                       T *FS_RESTRICT out, uint64_t base, uint64_t thr, T scale) \
{ \
    FS_SIMD \
    for (ptrdiff_t i = i0; i < i1; ++i) \
        out[i] = fs_dropout_bits(base, (uint64_t)i) < thr ? x[i] * scale : (T)0; \
}

FS_DROPOUT(float, f)
FS_DROPOUT(double, d)

#endif
