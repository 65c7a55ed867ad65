"""Builds the optional compiled CPU kernels (fastseq/_ext/_cpu). If it cannot be compiled the package
still installs and runs on the NumPy engine, unless FASTSEQ_REQUIRE_EXT=1 (CI sets it)."""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

REQUIRE = os.environ.get("FASTSEQ_REQUIRE_EXT", "0") == "1"


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
    ext = Extension(
        "fastseq._ext._cpu",
        ["fastseq/_ext/_cpu.pyx"],
        include_dirs=[numpy.get_include(), "fastseq/_ext", scipy_openblas32.get_include_dir()],
        depends=[os.path.join("fastseq/_ext", f) for f in sorted(os.listdir("fastseq/_ext"))
                 if f.endswith((".h", ".pxi"))],
        extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd",
                            "-pthread"],
        extra_link_args=["-pthread"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("FS_OMP_SIMD", "1")],
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
