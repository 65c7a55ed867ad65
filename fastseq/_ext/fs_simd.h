/* Compiler helpers shared by fastseq's C kernels.

   FS_KERNEL: compile a function for several instruction sets and pick the best when the module
   loads (GCC function multi-versioning through ifunc, x86-64 Linux only). Clones are chosen by
   instruction-set level (x86-64-v4: AVX-512, v3: AVX2+FMA); clones named after a CPU model
   ("arch=haswell") would be chosen by model, so newer CPUs would get the baseline one. */
#ifndef FS_SIMD_H
#define FS_SIMD_H

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(FS_NO_CLONES) && __GNUC__ >= 12
#  define FS_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#  define FS_CLONES_LEVELS 1
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(FS_NO_CLONES)
#  define FS_KERNEL __attribute__((target_clones("avx2", "default")))
#  define FS_CLONES_AVX2 1
#else
#  define FS_KERNEL
#endif

/* The instruction-set level the FS_KERNEL functions run at in this process: the clone the
   loader picks for this CPU, or the one level the module was compiled for (setup.py's
   FASTSEQ_SIMD builds a single level, with FS_NO_CLONES). */
static const char *fs_simd_level(void)
{
#if defined(FS_CLONES_LEVELS)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
        return "x86-64-v4";
    if (__builtin_cpu_supports("x86-64-v3"))
        return "x86-64-v3";
    return "x86-64";
#elif defined(FS_CLONES_AVX2)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? "avx2" : "x86-64";
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) \
    && defined(__AVX512VL__) && defined(__AVX512CD__)
    return "x86-64-v4";
#elif defined(__AVX2__) && defined(__FMA__)
    return "x86-64-v3";
#elif defined(__x86_64__)
    return "x86-64";
#else
    return "portable";
#endif
}

#if defined(__GNUC__)
#  define FS_RESTRICT __restrict__
#else
#  define FS_RESTRICT
#endif

/* OpenMP's simd directives only (setup.py compiles with -fopenmp-simd and defines FS_OMP_SIMD):
   no OpenMP runtime is linked, threads come from fs_pool.h */
#if defined(_OPENMP) || defined(FS_OMP_SIMD)
#  define FS_SIMD _Pragma("omp simd")
#  define FS_PRAGMA(x) _Pragma(#x)
#  define FS_SIMD_SUM(var) FS_PRAGMA(omp simd reduction(+:var))
#else
#  define FS_SIMD
#  define FS_SIMD_SUM(var)
#endif

#endif
