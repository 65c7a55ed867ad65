"""The compiled kernels' instruction-set paths: the level picked at import follows the CPU's
flags, and each level, built alone (setup.py's FASTSEQ_SIMD) and so forced, computes what the
reference computes. A level this CPU cannot run (AVX-512 on an AVX2 machine) is built but not run,
and the test says so."""
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastseq import backend

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("x86-64-v4", "x86-64-v3", "x86-64")
# the flags each level needs (GCC's x86-64-v3 / v4 sets, as /proc/cpuinfo names them)
NEEDS = {"x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma"},
         "x86-64-v3": {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c", "abm"},
         "x86-64": set()}

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="instruction-set clones are built on x86-64 Linux only")


def cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo lists no flags")


def best_level(flags):
    return next(level for level in LEVELS if NEEDS[level] <= flags)


def test_level_picked_at_import_follows_the_cpu_flags():
    kernel = backend.compiled()
    if kernel is None:
        pytest.skip("the compiled kernels are not built here")
    from fastseq._ext import _cpu
    assert _cpu.simd_level() == best_level(cpu_flags())


# Run in a fresh interpreter against a build of one level: the LSTM (forward, backward, the
# inference path), softmax cross-entropy and dropout against the reference and the NumPy
# engine, in float32 and float64; prints the level the module reports.
CHECK = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import reference_lstm as reference
from fastseq._ext import _cpu
assert _cpu.__file__.startswith(sys.argv[1]), _cpu.__file__
from fastseq import backend
from fastseq.ops import _cython, _numpy
rng = np.random.default_rng(0)
for dtype, tol in ((np.float32, 2e-4), (np.float64, 1e-10)):
    for N, T, D, H in ((5, 4, 3, 6), (128, 5, 16, 64), (20, 6, 64, 256)):
        xs = rng.standard_normal((N, T, D)).astype(dtype)
        Wx, Wh = (rng.standard_normal((k, 4 * H)).astype(dtype) * 0.3 for k in (D, H))
        b, h0, c0 = (rng.standard_normal(s).astype(dtype) for s in ((4 * H,), (N, H), (N, H)))
        dhs = rng.standard_normal((N, T, H)).astype(dtype)
        hs, hT, cT, cache = _cython.forward(xs, Wx, Wh, b, h0, c0)
        grads = [np.empty_like(a) for a in (Wx, Wh, b)]
        dxs, dh0 = _cython.backward(dhs, cache, grads)
        rhs, rhT, rcT, rcache = reference.forward(*(a.astype(np.float64) for a in (xs, Wx, Wh, b, h0, c0)))
        rdxs, rdh0, rdWx, rdWh, rdb = reference.backward(dhs.astype(np.float64), rcache)
        for got, want in ((hs, rhs), (hT, rhT), (cT, rcT), (dxs, rdxs), (dh0, rdh0),
                          (grads[0], rdWx), (grads[1], rdWh), (grads[2], rdb)):
            assert got.dtype == dtype
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        fh, fc = _cython.final_state(xs, Wx, Wh, b, h0, c0)
        np.testing.assert_allclose(fh, rhT, rtol=tol, atol=tol)
    scores = rng.standard_normal((300, 3000)).astype(dtype) * 5
    labels = rng.integers(0, 3000, 300)
    loss, d = _cython.softmax_cross_entropy(scores.copy(), labels)
    rloss, rd = _numpy.softmax_cross_entropy(scores.copy(), labels)
    assert abs(loss - rloss) <= 1e-5 * abs(rloss)
    np.testing.assert_allclose(d, rd, rtol=1e-5, atol=1e-7)
    x = rng.standard_normal(10000).astype(dtype)
    np.testing.assert_array_equal(_cython.dropout(x, 0.7, 12345), _numpy.dropout(x, 0.7, 12345))
print(_cpu.simd_level())
"""


def _copy_sources(dest):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "fastseq", dest / "fastseq",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.html"))


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_built_alone_matches_the_reference(level, tmp_path):
    if backend.compiled() is None:
        pytest.skip("the compiled kernels are not built here (no compiler or no Cython)")
    for module in ("Cython", "setuptools"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"building a level needs {module} in this environment "
                        f"(pip install -e '.[dev]' has it)")
    _copy_sources(tmp_path)
    env = {**os.environ, "FASTSEQ_SIMD": level, "FASTSEQ_REQUIRE_EXT": "1"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    if build.returncode and "for '-march=' switch" in build.stderr.replace("\u2018", "'").replace(
            "\u2019", "'"):
        pytest.skip(f"this C compiler does not know -march={level}")
    assert build.returncode == 0, build.stderr[-3000:]
    if not NEEDS[level] <= cpu_flags():
        pytest.skip(f"{level} built; this CPU lacks {sorted(NEEDS[level] - cpu_flags())} to run it")
    run = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path), str(ROOT / "tests")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == level
