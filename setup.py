"""Builds the optional compiled CPU kernels (fastseq/_ext/_cpu). If it cannot be compiled the package
still installs and runs on the NumPy engine, unless FASTSEQ_REQUIRE_EXT=1 (CI sets it)."""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

REQUIRE = os.environ.get("FASTSEQ_REQUIRE_EXT", "0") == "1"
# FASTSEQ_SIMD: by default every kernel is compiled for three instruction-set levels and the
# CPU's best is picked at import (fs_simd.h, FS_KERNEL); x86-64-v4 (AVX-512), x86-64-v3 (AVX2,
# FMA) or x86-64 (SSE2) builds that level alone (for one machine, or to test one path).
SIMD = os.environ.get("FASTSEQ_SIMD", "")
SIMD_LEVELS = ("x86-64-v4", "x86-64-v3", "x86-64")


def extensions():
    try:
        import numpy
        import scipy_openblas32  # the kernels' BLAS: its header here, its library loaded at import
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError as e:
        if REQUIRE:
            raise
        print(f"fastseq: not building the compiled kernels ({e}); the NumPy engine will be used",
              file=sys.stderr)
        return []
    # OpenMP's simd directives only (no OpenMP runtime: threads come from fastseq/_ext/fs_pool.h).
    # No -ffast-math: the kernels' exp/tanh rely on IEEE evaluation order (reassociating
    # 2^k*p + (2^k - 1) would destroy the accuracy of tanh and sigmoid near 0);
    # -fno-trapping-math lets the branch-free clamps of the gate math vectorise.
    if SIMD and SIMD not in SIMD_LEVELS:
        raise SystemExit(f"FASTSEQ_SIMD={SIMD!r}: expected one of {', '.join(SIMD_LEVELS)}")
    simd_args = ["-march=" + SIMD] if SIMD else []
    simd_macros = [("FS_NO_CLONES", "1")] if SIMD else []
    ext = Extension(
        "fastseq._ext._cpu",
        ["fastseq/_ext/_cpu.pyx"],
        include_dirs=[numpy.get_include(), "fastseq/_ext", scipy_openblas32.get_include_dir()],
        depends=[os.path.join("fastseq/_ext", f) for f in sorted(os.listdir("fastseq/_ext"))
                 if f.endswith((".h", ".pxi"))],
        extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd",
                            "-pthread", *simd_args],
        extra_link_args=["-pthread"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("FS_OMP_SIMD", "1"),
                       *simd_macros],
    )
    return cythonize([ext], language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True, "initializedcheck": False})


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:
            if REQUIRE:
                raise
            print(f"fastseq: compiled kernels' build failed ({e}); the NumPy engine will be used",
                  file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            if REQUIRE:
                raise
            print(f"fastseq: could not compile {ext.name} ({e}); the NumPy engine will be used",
                  file=sys.stderr)


ext_modules = extensions() if os.path.exists("fastseq/_ext/_cpu.pyx") else []
setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
