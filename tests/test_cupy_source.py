"""CPU checks of the cupy engine (fastseq/ops/_cupy.py, _cupy_math.py) without CuPy or a GPU.

The very kernel strings that the engine hands to ``cupy.ElementwiseKernel`` are wrapped in a
host C++ harness that mirrors the code CuPy generates around them:

    typedef float T;                                     (or double)
    for (ptrdiff_t i = 0; i < n; ++i) {                  (CUPY_FOR, i = C-order index)
        const T &c_prev = _raw_c_prev[i];                (non-raw input: const reference)
        T &c_next = _raw_c_next[i];                      (non-raw output: reference)
        <operation>
    }

Raw parameters become bounds-checked arrays (read-only for inputs, as CuPy passes them
``const``), so an index outside a buffer is reported instead of reading garbage. The compiled
kernels are then driven by the engine's own ``_forward`` / ``_backward`` with NumPy as the array
module, and compared with the NumPy reference engine. Skipped when no C++ compiler is found.
"""
import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

from fastseq.ops import _cupy, _cupy_math, _numpy

_CXX = (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        or shutil.which("clang++"))
_CTYPES = {"float32": "float", "float64": "double"}

_PRELUDE = r"""
#include <cmath>
#include <cstddef>
// CUDA declares float/double overloads of the math functions in the global namespace.
using std::tanh;
using std::exp;
using std::pow;
using std::sqrt;

static int g_oob = 0;  // set when a kernel indexes outside a raw array

template <typename U>
struct RawIn {  // a `raw` input parameter: const CArray, indexed by a flat index
    const U* p; ptrdiff_t n;
    const U& operator[](ptrdiff_t k) const {
        if (k < 0 || k >= n) { g_oob = 1; return p[0]; }
        return p[k];
    }
};

template <typename U>
struct RawOut {  // a `raw` output parameter
    U* p; ptrdiff_t n; mutable U dummy;
    U& operator[](ptrdiff_t k) const {
        if (k < 0 || k >= n) { g_oob = 1; return dummy; }
        return p[k];
    }
};

extern "C" int fastseq_take_oob(void) { int r = g_oob; g_oob = 0; return r; }
"""


def _parse_params(spec, is_input):
    """cupy.ElementwiseKernel parameter list -> [(name, kind, type, is_input)], kind one of
    'raw' (indexed array), 'elem' (one element per thread) or 'scalar'; type 'T', 'int32' or
    'float64'."""
    out = []
    for item in spec.split(","):
        toks = item.split()
        raw = toks[0] == "raw"
        typ, name = toks[-2], toks[-1]
        if typ not in ("T", "int32", "float64"):
            raise AssertionError(f"harness does not know parameter type {typ!r}")
        if raw:
            kind = "raw"
        elif typ == "T":
            kind = "elem"
        else:
            kind = "scalar"
        out.append((name, kind, typ, is_input))
    return out


_CTYPE_OF = {"int32": "int", "float64": "double"}


def _elem_type(typ, ctype):
    return ctype if typ == "T" else _CTYPE_OF[typ]


def _harness_source():
    parts = [_PRELUDE]
    for kname, (ins, outs, body) in _cupy._STEP_KERNELS.items():
        params = _parse_params(ins, True) + _parse_params(outs, False)
        decl, prologue = ["ptrdiff_t _size"], []
        for name, kind, typ, is_in in params:
            t = "T" if typ == "T" else _CTYPE_OF[typ]
            if kind == "raw":
                decl.append(f"{'RawIn' if is_in else 'RawOut'}<{t}> {name}")
            elif kind == "scalar":
                decl.append(f"{t} {name}")
            else:
                decl.append(f"{'const ' if is_in else ''}T* _raw_{name}")
                prologue.append(f"{'const ' if is_in else ''}T &{name} = _raw_{name}[i];")
        parts.append(f"template <typename T>\nstatic void {kname}_impl({', '.join(decl)}) {{\n"
                     f"  for (ptrdiff_t i = 0; i < _size; ++i) {{\n    "
                     + "\n    ".join(prologue) + "\n" + body + "\n  }\n}\n")
        for ctype in _CTYPES.values():
            cdecl, cargs = ["ptrdiff_t _size"], ["_size"]
            for idx, (name, kind, typ, is_in) in enumerate(params):
                et = _elem_type(typ, ctype)
                if kind == "raw":
                    cdecl += [f"void* p{idx}", f"ptrdiff_t n{idx}"]
                    q = "const " if is_in else ""
                    init = f"{{({q}{et}*)p{idx}, n{idx}}}" if is_in \
                        else f"{{({et}*)p{idx}, n{idx}, 0}}"
                    cargs.append(f"{'RawIn' if is_in else 'RawOut'}<{et}>{init}")
                elif kind == "scalar":
                    cdecl.append(f"{et} p{idx}")
                    cargs.append(f"p{idx}")
                else:
                    cdecl.append(f"void* p{idx}")
                    cargs.append(f"({'const ' if is_in else ''}{ctype}*)p{idx}")
            parts.append(f'extern "C" void {kname}_{ctype}({", ".join(cdecl)}) {{\n'
                         f"  {kname}_impl<{ctype}>({', '.join(cargs)});\n}}\n")
    for kname, (ins, outs, map_expr, reduce_expr, post, identity) in \
            _cupy_math._REDUCTION_KERNELS.items():
        (xname, _, xt, _), = _parse_params(ins, True)
        (yname, _, yt, _), = _parse_params(outs, False)
        assert xt == "T" and yt == "float64", "harness: reductions T -> float64 only"
        parts.append(
            f"template <typename T>\nstatic void {kname}_impl(ptrdiff_t _size, const T* _raw_x, "
            f"double* _out) {{\n  double _acc = {identity};\n"
            f"  for (ptrdiff_t i = 0; i < _size; ++i) {{\n    const T &{xname} = _raw_x[i];\n"
            f"    const double _mapped = ({map_expr});\n"
            f"    {{ const double a = _acc, b = _mapped; _acc = ({reduce_expr}); }}\n  }}\n"
            f"  {{ const double a = _acc; double &{yname} = *_out; {post}; }}\n}}\n")
        for ctype in _CTYPES.values():
            parts.append(f'extern "C" void {kname}_{ctype}(ptrdiff_t n, const void* x, void* y) '
                         f"{{ {kname}_impl<{ctype}>(n, (const {ctype}*)x, (double*)y); }}\n")
    return "\n".join(parts)


class _EmulatedElementwise:
    """Stands in for cupy.ElementwiseKernel(in_params, out_params, operation, name) on NumPy
    arrays, with CuPy's argument rules plus the engine's own contract (contiguous arrays)."""

    def __init__(self, lib, name):
        ins, outs, _ = _cupy._STEP_KERNELS[name]
        self.params = _parse_params(ins, True) + _parse_params(outs, False)
        self.lib, self.name = lib, name

    def __call__(self, *args, size=None):
        assert len(args) == len(self.params), "raw outputs must be passed explicitly"
        tarrays = [a for a, p in zip(args, self.params) if p[2] == "T"]
        dtypes = {a.dtype for a in tarrays}
        assert len(dtypes) <= 1, f"{self.name}: type T is mismatched {dtypes} (CuPy: TypeError)"
        ctype = _CTYPES[str(dtypes.pop())] if dtypes else "double"
        shapes = {a.shape for a, p in zip(args, self.params) if p[1] == "elem"}
        assert len(shapes) <= 1, f"{self.name}: elementwise shapes differ {shapes}"
        if shapes:
            assert size is None, f"{self.name}: size= with elementwise arrays"
            n = int(np.prod(shapes.pop()))
        else:
            assert size is not None, f"{self.name}: only raw arrays: CuPy needs size="
            n = int(size)
        cargs = [ctypes.c_ssize_t(n)]
        for a, (pname, kind, typ, is_in) in zip(args, self.params):
            if kind == "scalar":
                if typ == "int32":
                    assert isinstance(a, (int, np.integer)), f"{pname} must be an int"
                    cargs.append(ctypes.c_int(int(a)))
                else:
                    assert isinstance(a, (float, int, np.floating)), f"{pname} must be a number"
                    cargs.append(ctypes.c_double(float(a)))
                continue
            assert isinstance(a, np.ndarray) and a.flags.c_contiguous, f"{pname} not contiguous"
            if typ == "float64":
                assert a.dtype == np.float64, f"{pname} must be float64"
            if not is_in:
                assert a.flags.writeable, f"{pname} is read-only"
            if kind == "raw":
                assert a.ndim == 1, f"raw {pname} should be passed flat (the engine's contract)"
                cargs += [ctypes.c_void_p(a.ctypes.data), ctypes.c_ssize_t(a.size)]
            else:
                cargs.append(ctypes.c_void_p(a.ctypes.data))
        getattr(self.lib, f"{self.name}_{ctype}")(*cargs)
        assert self.lib.fastseq_take_oob() == 0, f"{self.name}: index outside a raw array"


class _EmulatedReduction:
    """Stands in for cupy.ReductionKernel over all axes, called as kernel(x, out=y0d)."""

    def __init__(self, lib, name):
        self.lib, self.name = lib, name

    def __call__(self, x, out):
        assert out.shape == () and out.dtype == np.float64
        assert out.flags.writeable
        x = np.ascontiguousarray(x)  # CuPy reduces strided arrays too
        ctype = _CTYPES[str(x.dtype)]
        getattr(self.lib, f"{self.name}_{ctype}")(ctypes.c_ssize_t(x.size),
                                                 ctypes.c_void_p(x.ctypes.data),
                                                 ctypes.c_void_p(out.ctypes.data))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if _CXX is None:
        pytest.skip("no C++ compiler found")
    d = tmp_path_factory.mktemp("cupy_src")
    src, so = d / "kernels.cpp", d / "kernels.so"
    src.write_text(_harness_source())
    # -ffp-contract=off: no fused multiply-add, so float64 results follow NumPy's rounding.
    cmd = [_CXX, "-std=c++11", "-O2", "-ffp-contract=off", "-Wall", "-Werror",
           "-Wno-unused-variable", "-shared", "-fPIC", str(src), "-o", str(so)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"kernel sources failed to compile:\n{r.stderr}"
    return ctypes.CDLL(str(so))


@pytest.fixture
def kernel(lib):
    return lambda name: _EmulatedElementwise(lib, name)


@pytest.fixture
def reduction(lib):
    return lambda name: _EmulatedReduction(lib, name)


TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _params(rng, N, T, D, H, dtype, scale=0.5):
    def r(*s):
        return (rng.standard_normal(s) * scale).astype(dtype)
    return r(N, T, D), r(D, 4 * H), r(H, 4 * H), r(4 * H), r(N, H), r(N, H)


# ------------------------------------------------------------------- single step vs formulas

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,H", [(1, 1), (3, 5), (7, 16)])
def test_forward_step_kernel(kernel, dtype, N, H):
    rng = np.random.default_rng(N * 100 + H)
    xw = (rng.standard_normal((N, 4 * H)) * 2).astype(dtype)
    hw = rng.standard_normal((N, 4 * H)).astype(dtype)
    b, c_prev = rng.standard_normal(4 * H).astype(dtype), rng.standard_normal((N, H)).astype(dtype)
    gates = xw.copy()
    c_next, tanh_c, h_next = (np.full((N, H), np.nan, dtype) for _ in range(3))
    kernel("fastseq_lstm_fwd_step")(hw.reshape(-1), b, c_prev, H, 0, gates.reshape(-1),
                                    c_next, tanh_c, h_next)
    a = xw + b + hw
    exp = np.tanh(a * 0.5) * 0.5 + 0.5  # sigmoid
    exp[:, H:2 * H] = np.tanh(a[:, H:2 * H])
    f, g, i, o = exp[:, :H], exp[:, H:2 * H], exp[:, 2 * H:3 * H], exp[:, 3 * H:]
    c = f * c_prev + g * i
    np.testing.assert_allclose(gates, exp, **TOL[dtype])
    np.testing.assert_allclose(c_next, c, **TOL[dtype])
    np.testing.assert_allclose(tanh_c, np.tanh(c), **TOL[dtype])
    np.testing.assert_allclose(h_next, o * np.tanh(c), **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,H", [(1, 1), (4, 3), (6, 16)])
def test_backward_step_kernel(kernel, dtype, N, H):
    rng = np.random.default_rng(N * 10 + H)
    gates = rng.uniform(0.05, 0.95, (N, 4 * H)).astype(dtype)
    gates[:, H:2 * H] = rng.uniform(-0.9, 0.9, (N, H))
    dh_out, dh_rec, dc_next, c_prev = (rng.standard_normal((N, H)).astype(dtype) for _ in range(4))
    tanh_c = np.tanh(rng.standard_normal((N, H))).astype(dtype)
    dgates = np.full((N, 4 * H), np.nan, dtype)
    dc_prev = np.full((N, H), np.nan, dtype)
    kernel("fastseq_lstm_bwd_step")(gates.reshape(-1), dh_out, dh_rec, dc_next, c_prev, tanh_c, H,
                                    dgates.reshape(-1), dc_prev)
    f, g, i, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
    dh = dh_out + dh_rec
    ds = dc_next + dh * o * (1 - tanh_c * tanh_c)
    exp = np.concatenate([ds * c_prev * f * (1 - f), ds * i * (1 - g * g), ds * g * i * (1 - i),
                          dh * tanh_c * o * (1 - o)], axis=1)
    np.testing.assert_allclose(dgates, exp, **TOL[dtype])
    np.testing.assert_allclose(dc_prev, ds * f, **TOL[dtype])


def test_harness_reports_out_of_bounds(kernel):
    """The raw-array bounds check works: a wrong H makes the kernel index past the gates."""
    N, H = 2, 3
    z = np.zeros
    with pytest.raises(AssertionError, match="index outside a raw array"):
        kernel("fastseq_lstm_fwd_step")(z(N * 4 * H), z(4 * H), z((N, H)), H + 1, 0,
                                        z(N * 4 * H), z((N, H)), z((N, H)), z((N, H)))


# ------------------------------------------------------ whole engine, driven with NumPy arrays

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,T,D,H", [(1, 1, 1, 1), (2, 5, 3, 4), (5, 7, 6, 8), (3, 1, 4, 2),
                                     (4, 9, 2, 10)])
def test_engine_matches_numpy_reference(kernel, dtype, N, T, D, H):
    rng = np.random.default_rng(N * 1000 + T * 100 + D * 10 + H)
    xs, Wx, Wh, b, h0, c0 = _params(rng, N, T, D, H, dtype)
    hs, hT, cT, cache = _cupy._forward(np, kernel, xs, Wx, Wh, b, h0, c0)
    rhs, rhT, rcT, rcache = _numpy.forward(xs, Wx, Wh, b, h0, c0)
    tol = TOL[dtype]
    assert hs.shape == (N, T, H) and hs.dtype == dtype
    np.testing.assert_allclose(hs, rhs, **tol)
    np.testing.assert_allclose(hT, rhT, **tol)
    np.testing.assert_allclose(cT, rcT, **tol)

    dhs = rng.standard_normal((N, T, H)).astype(dtype)
    grads = [np.full_like(Wx, np.nan), np.full_like(Wh, np.nan), np.full_like(b, np.nan)]
    ids = [id(g) for g in grads]
    rgrads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
    dxs, dh0 = _cupy._backward(np, kernel, dhs, cache, grads)
    rdxs, rdh0 = _numpy.backward(dhs, rcache, rgrads)
    assert [id(g) for g in grads] == ids
    gtol = dict(rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    np.testing.assert_allclose(dxs, rdxs, **gtol)
    np.testing.assert_allclose(dh0, rdh0, **gtol)
    for g, rg in zip(grads, rgrads):
        np.testing.assert_allclose(g, rg, **gtol)


def test_engine_noncontiguous_inputs(kernel):
    """Strided xs / weights / state and a strided dhs give the reference results."""
    rng = np.random.default_rng(7)
    N, T, D, H = 3, 4, 5, 6
    xs = rng.standard_normal((T, N, D)).transpose(1, 0, 2)
    Wx = np.asfortranarray(rng.standard_normal((D, 4 * H)))
    Wh = rng.standard_normal((4 * H, H)).T
    b = rng.standard_normal(8 * H)[::2]
    h0 = rng.standard_normal((H, N)).T
    c0 = rng.standard_normal((N, 2 * H))[:, ::2]
    hs, hT, cT, cache = _cupy._forward(np, kernel, xs, Wx, Wh, b, h0, c0)
    rhs, rhT, rcT, rcache = _numpy.forward(xs, Wx, Wh, b, h0, c0)
    np.testing.assert_allclose(hs, rhs, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cT, rcT, rtol=1e-12, atol=1e-13)
    dhs = rng.standard_normal((T, N, H)).transpose(1, 0, 2)
    grads = [np.zeros((D, 4 * H)), np.zeros((H, 4 * H)), np.zeros(4 * H)]
    rgrads = [np.zeros_like(g) for g in grads]
    dxs, dh0 = _cupy._backward(np, kernel, dhs, cache, grads)
    rdxs, rdh0 = _numpy.backward(dhs, rcache, rgrads)
    np.testing.assert_allclose(dxs, rdxs, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(dh0, rdh0, rtol=1e-11, atol=1e-12)
    for g, rg in zip(grads, rgrads):
        np.testing.assert_allclose(g, rg, rtol=1e-11, atol=1e-12)


def test_engine_stateful_continuation(kernel):
    """Two halves with (h, c) carried over equal one pass over the whole sequence."""
    rng = np.random.default_rng(3)
    xs, Wx, Wh, b, h0, c0 = _params(rng, 4, 10, 3, 5, np.float64)
    hs, hT, cT, _ = _cupy._forward(np, kernel, xs, Wx, Wh, b, h0, c0)
    hs1, h1, c1, _ = _cupy._forward(np, kernel, xs[:, :6], Wx, Wh, b, h0, c0)
    hs2, h2, c2, _ = _cupy._forward(np, kernel, xs[:, 6:], Wx, Wh, b, h1, c1)
    np.testing.assert_allclose(np.concatenate([hs1, hs2], axis=1), hs, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(h2, hT, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(c2, cT, rtol=1e-13, atol=1e-14)


def test_engine_gradient_numerically(kernel):
    """Central differences of sum(hs * w) + sum(hT * u) on a tiny float64 problem."""
    rng = np.random.default_rng(11)
    N, T, D, H = 2, 3, 2, 3
    params = list(_params(rng, N, T, D, H, np.float64, scale=0.8))
    w = rng.standard_normal((N, T, H))

    def loss(p):
        hs, _, _, _ = _cupy._forward(np, kernel, *p)
        return float((hs * w).sum())

    _, _, _, cache = _cupy._forward(np, kernel, *params)
    grads = [np.zeros_like(params[1]), np.zeros_like(params[2]), np.zeros_like(params[3])]
    dxs, dh0 = _cupy._backward(np, kernel, w, cache, grads)
    analytic = {0: dxs, 1: grads[0], 2: grads[1], 3: grads[2], 4: dh0}
    eps = 1e-6
    for k, g in analytic.items():
        num = np.zeros_like(params[k])
        flat = params[k].reshape(-1)
        for idx in range(flat.size):
            old = flat[idx]
            flat[idx] = old + eps
            lp = loss(params)
            flat[idx] = old - eps
            lm = loss(params)
            flat[idx] = old
            num.reshape(-1)[idx] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8, err_msg=f"parameter {k}")


def test_engine_empty_sequence(kernel):
    rng = np.random.default_rng(0)
    xs, Wx, Wh, b, h0, c0 = _params(rng, 2, 0, 3, 4, np.float64)
    hs, hT, cT, cache = _cupy._forward(np, kernel, xs, Wx, Wh, b, h0, c0)
    assert hs.shape == (2, 0, 4)
    np.testing.assert_array_equal(hT, h0)
    grads = [np.ones_like(Wx), np.ones_like(Wh), np.ones_like(b)]
    dxs, dh0 = _cupy._backward(np, kernel, np.zeros((2, 0, 4)), cache, grads)
    assert dxs.shape == (2, 0, 3)
    assert not dh0.any() and not any(g.any() for g in grads)


# ----------------------------------------------------------------- module without CuPy

def test_module_imports_and_rejects_numpy_arrays():
    rng = np.random.default_rng(0)
    args = _params(rng, 2, 3, 4, 5, np.float32)
    with pytest.raises(TypeError, match="CuPy arrays"):
        _cupy.forward(*args)


def test_rejects_unsupported_dtype(kernel):
    rng = np.random.default_rng(0)
    args = _params(rng, 2, 3, 4, 5, np.float16)
    with pytest.raises(TypeError, match="float32 and float64"):
        _cupy._forward(np, kernel, *args)


def test_kernel_specs_are_cupy_syntax():
    """Parameter lists use only what ElementwiseKernel accepts, no 'i' parameter, and every
    parameter is used by its operation."""
    import re
    for name, (ins, outs, body) in _cupy._STEP_KERNELS.items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
        for spec in (ins, outs):
            for item in spec.split(","):
                toks = item.split()
                assert len(toks) in (2, 3) and (len(toks) == 2 or toks[0] == "raw"), item
                assert toks[-1] != "i"
                assert re.search(rf"\b{toks[-1]}\b", body), f"{name}: {toks[-1]} unused"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,T,D,H", [(1, 1, 1, 1), (3, 4, 2, 5)])
def test_engine_row_bias_matches_numpy_reference(kernel, dtype, N, T, D, H):
    """b of shape (N, 4H), one bias per row (PeekyDecoder's h Wx_h folded in); db per row."""
    rng = np.random.default_rng(N + T + D + H)
    xs, Wx, Wh, _, h0, c0 = _params(rng, N, T, D, H, dtype)
    b = rng.standard_normal((N, 4 * H)).astype(dtype)
    hs, hT, cT, cache = _cupy._forward(np, kernel, xs, Wx, Wh, b, h0, c0)
    rhs, rhT, rcT, rcache = _numpy.forward(xs, Wx, Wh, b, h0, c0)
    tol = TOL[dtype]
    np.testing.assert_allclose(hs, rhs, **tol)
    dhs = rng.standard_normal((N, T, H)).astype(dtype)
    grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.full_like(b, np.nan)]
    rgrads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
    dxs, dh0 = _cupy._backward(np, kernel, dhs, cache, grads)
    rdxs, rdh0 = _numpy.backward(dhs, rcache, rgrads)
    gtol = dict(rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    np.testing.assert_allclose(dxs, rdxs, **gtol)
    np.testing.assert_allclose(dh0, rdh0, **gtol)
    for g, rg in zip(grads, rgrads):
        np.testing.assert_allclose(g, rg, **gtol)


# ------------------------------------------------- optimiser and clipping kernels, products

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_kernels_match_numpy_adam(kernel, dtype):
    """Three steps of the device Adam (counter kernel + fused update) equal fastseq.optim.Adam's
    NumPy expressions, including a resumed optimiser (iter set on the host)."""
    from fastseq.optim import Adam
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (5,), (2, 3, 2)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ref = [p.copy() for p in params]
    ref_opt = Adam(lr=0.01, fused=False)
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    state = None
    for step in range(1, 4):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        ref_opt.update(ref, grads)
        state = _cupy_math._adam_update(np, kernel, params, grads, m, v, 0.01, 0.9, 0.999, step, state)
        assert state[0][0] == step and state[1] == step
        for p, r in zip(params, ref):
            np.testing.assert_allclose(p, r, **TOL[dtype])
    ref_opt.iter = 10  # resumed elsewhere: the device counter follows the host's step
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ref_opt.update(ref, grads)
    state = _cupy_math._adam_update(np, kernel, params, grads, m, v, 0.01, 0.9, 0.999, 11, state)
    assert state[0][0] == 11
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p, r, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_kernels_match_numpy(kernel, reduction, dtype, max_norm):
    """Norm and rate on the device (sum-of-squares reductions, one rate kernel, one scaling
    kernel per grad) equal fastseq.functions.clip_grads on the host, clipped or not."""
    from fastseq import functions
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(s).astype(dtype) for s in [(4, 6), (7,), (3, 2, 5)]]
    ref = [g.copy() for g in grads]
    want = functions.clip_grads(ref, max_norm)
    got = _cupy_math._clip_grads(np, kernel, reduction, grads, max_norm)
    assert got.shape == ()
    np.testing.assert_allclose(float(got), want, rtol=1e-6 if dtype == np.float32 else 1e-12)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, **TOL[dtype])


def _colmajor(buf, rows, cols, ld):
    """The column-major (rows, cols) matrix with leading dimension ld in flat memory buf."""
    assert ld >= max(1, rows) and (cols - 1) * ld + rows <= buf.size, "gemm plan reads past"
    return np.lib.stride_tricks.as_strided(buf, (rows, cols), (buf.itemsize, ld * buf.itemsize))


def _emulated_gemm(plan, first, second, out):
    """cublas<t>gemm's (or, for a 3-D out, cublas<t>gemmStridedBatched's) column-major semantics
    on the operands' memory (alpha 1, beta 0)."""
    op1, op2, m, n, k, ld1, ld2, ldo, batch, s1, s2, so = plan
    mem = [a.ravel(order="K") for a in (first, second, out)]
    assert all(np.shares_memory(v, a) for v, a in zip(mem, (first, second, out)))
    assert out.ndim == 3 or batch == 1
    for i in range(batch):
        A = _colmajor(mem[0][i * s1:], *((m, k) if op1 == 0 else (k, m)), ld1)
        B = _colmajor(mem[1][i * s2:], *((k, n) if op2 == 0 else (n, k)), ld2)
        C = _colmajor(mem[2][i * so:], m, n, ldo)
        C[...] = (A if op1 == 0 else A.T) @ (B if op2 == 0 else B.T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", [(3, 4, 5), (1, 6, 2), (5, 1, 3), (4, 3, 1), (1, 1, 1),
                                   (0, 3, 2), (2, 0, 3)])
@pytest.mark.parametrize("a_order,b_order", [("C", "C"), ("F", "C"), ("C", "F"), ("F", "F")])
def test_direct_matmul_plan(dtype, M, K, N, a_order, b_order):
    """matmul's cuBLAS arguments, run through a column-major emulation of gemm, give a @ b for
    C-ordered operands and transposed views; out= written in place or through a copy."""
    rng = np.random.default_rng(M * 100 + K * 10 + N)
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    a_op = a if a_order == "C" else np.ascontiguousarray(a.T).T
    b_op = b if b_order == "C" else np.ascontiguousarray(b.T).T
    want = a @ b
    got = _cupy_math._matmul(np, _emulated_gemm, a_op, b_op)
    np.testing.assert_allclose(got, want, **TOL[dtype])
    out = np.full((M, N), np.nan, dtype)
    assert _cupy_math._matmul(np, _emulated_gemm, a_op, b_op, out=out) is out
    np.testing.assert_allclose(out, want, **TOL[dtype])
    outT = np.full((N, M), np.nan, dtype).T  # not C-ordered: computed, then copied in
    _cupy_math._matmul(np, _emulated_gemm, a_op, b_op, out=outT)
    np.testing.assert_allclose(outT, want, **TOL[dtype])


def test_direct_matmul_vectors_and_strided():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((6, 8))
    v = rng.standard_normal(6)
    np.testing.assert_allclose(_cupy_math._matmul(np, _emulated_gemm, v, A), v @ A)
    w = rng.standard_normal(8)
    np.testing.assert_allclose(_cupy_math._matmul(np, _emulated_gemm, A, w), A @ w)
    S = A[::2, 1:5]  # neither C- nor F-ordered: copied first
    B = rng.standard_normal((4, 3))
    np.testing.assert_allclose(_cupy_math._matmul(np, _emulated_gemm, S, B), S @ B)
    with pytest.raises(ValueError, match="do not match"):
        _cupy_math._matmul(np, _emulated_gemm, A, B)
    with pytest.raises(TypeError, match="float32/float64"):
        _cupy_math._matmul(np, _emulated_gemm, A.astype(np.float32), A.T)


@pytest.mark.parametrize("a_order,b_order", [("C", "C"), ("F", "C"), ("C", "F"), ("F", "F"),
                                             ("S", "C"), ("C", "2"), ("2", "F")])
@pytest.mark.parametrize("B,M,K,N", [(3, 4, 5, 2), (2, 1, 3, 1), (1, 2, 2, 2), (4, 3, 1, 2)])
def test_direct_matmul_stacks(a_order, b_order, B, M, K, N):
    """Stacks of products (strided batched gemm): C- or F-ordered blocks (as attention's
    transposes give), strided stacks (copied), and a 2-D operand used for every block."""
    rng = np.random.default_rng(B * 1000 + M * 100 + K * 10 + N)

    def operand(order, r, c):
        if order == "2":
            return rng.standard_normal((r, c))
        x = rng.standard_normal((B, r, c))
        if order == "F":
            return np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)
        if order == "S":  # blocks not one after the other: a time-major view
            return np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2)
        return x

    a, b = operand(a_order, M, K), operand(b_order, K, N)
    want = np.matmul(a, b)
    np.testing.assert_allclose(_cupy_math._matmul(np, _emulated_gemm, a, b), want, rtol=1e-12)
    out = np.full(want.shape, np.nan)
    _cupy_math._matmul(np, _emulated_gemm, a, b, out=out)
    np.testing.assert_allclose(out, want, rtol=1e-12)
    outT = np.full(want.shape[::-1], np.nan).T  # not C-ordered: through a copy
    _cupy_math._matmul(np, _emulated_gemm, a, b, out=outT)
    np.testing.assert_allclose(outT, want, rtol=1e-12)


def test_engine_with_direct_products(kernel, monkeypatch):
    """The engine's products through the direct path (as while a graph is captured) give the
    same results as through the array module."""
    rng = np.random.default_rng(5)
    xs, Wx, Wh, b, h0, c0 = _params(rng, 3, 4, 5, 6, np.float64)
    want_hs, _, _, cache = _cupy._forward(np, kernel, xs, Wx, Wh, b, h0, c0)
    dhs = rng.standard_normal(want_hs.shape)
    grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
    want_dxs, want_dh0 = _cupy._backward(np, kernel, dhs, cache, grads)
    want_grads = [g.copy() for g in grads]

    monkeypatch.setattr(_cupy_math, "cublas_matmul", lambda a, b, out=None: _cupy_math._matmul(
        np, _emulated_gemm, a, b, out))
    monkeypatch.setattr(_cupy_math, "_is_device", lambda xp: True)
    monkeypatch.setattr(_cupy_math, "_capturing", lambda: True)
    hs, _, _, cache = _cupy._forward(np, kernel, xs, Wx, Wh, b, h0, c0)
    np.testing.assert_allclose(hs, want_hs, rtol=1e-13, atol=1e-14)
    grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
    dxs, dh0 = _cupy._backward(np, kernel, dhs, cache, grads)
    np.testing.assert_allclose(dxs, want_dxs, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dh0, want_dh0, rtol=1e-12, atol=1e-13)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_mask_kernel(kernel, dtype):
    """Masks hashed from [seed, draws]: values 0 or 1/keep, the kept fraction close to keep, a
    new mask at every draw (the counter advances on the device), the same masks again from the
    same seed, other masks from another seed."""
    keep = 0.6
    state = np.array([7.0, 0.0])
    m1 = _cupy_math._dropout_mask(np, kernel, (50, 40), dtype, keep, state)
    m2 = _cupy_math._dropout_mask(np, kernel, (50, 40), dtype, keep, state)
    assert state[1] == 2 and m1.dtype == dtype
    assert set(np.unique(m1)) <= {0, dtype(1) / dtype(keep)}
    for m in (m1, m2):
        assert abs((m > 0).mean() - keep) < 0.035  # 2000 draws: 3.2 standard deviations
    assert abs(((m1 > 0) & (m2 > 0)).mean() - keep * keep) < 0.04  # independent draws
    again = _cupy_math._dropout_mask(np, kernel, (50, 40), dtype, keep, np.array([7.0, 0.0]))
    np.testing.assert_array_equal(again, m1)
    other = _cupy_math._dropout_mask(np, kernel, (50, 40), dtype, keep, np.array([8.0, 0.0]))
    assert not np.array_equal(other, m1)
    rows = (m1 > 0).mean(axis=1)  # no stripes along the index
    assert rows.min() > 0.2 and rows.max() < 0.95


@pytest.mark.parametrize("name", ["seq2seq", "peeky", "rnnlm", "better", "attention",
                                  "attention-pad"])
def test_layer_products_through_the_direct_path(name, monkeypatch):
    """Every product the layers make in a training step (TimeAffine, TimeLSTM's context,
    TimeAffineSoftmaxWithLoss, TiedAffine), sent through the cupy engine's matmul as while a
    graph is captured (cuBLAS directly; gemm emulated in column-major order), gives the same loss
    and grads."""
    import fastseq
    from fastseq.ops import _numpy as numpy_engine
    from fastseq.models.attention import AttentionSeq2seq
    rng = np.random.default_rng(6)
    lm = name in ("rnnlm", "better")
    x = rng.integers(0, 40 if lm else 13, (6, 5 if lm else 7))
    t = rng.integers(0, 40 if lm else 12, (6, 5))
    if name == "attention-pad":
        x[:, 5:] = 12
        t[2:, 3:] = 12

    def run():
        with fastseq.backend.using("numpy"):
            model = {"seq2seq": lambda: fastseq.Seq2seq(13, 4, 6, seed=0, dtype=np.float64),
                     "peeky": lambda: fastseq.PeekySeq2seq(13, 4, 6, seed=0, dtype=np.float64),
                     "rnnlm": lambda: fastseq.Rnnlm(40, 4, 6, seed=0, dtype=np.float64),
                     "better": lambda: fastseq.BetterRnnlm(40, 6, 6, 0.0, seed=0,
                                                           dtype=np.float64),
                     "attention": lambda: AttentionSeq2seq(13, 4, 6, seed=0, dtype=np.float64),
                     "attention-pad": lambda: AttentionSeq2seq(13, 4, 6, seed=0,
                                                               dtype=np.float64, pad_id=12),
                     }[name]()
            loss = float(model.forward(x, t))
            model.backward()
            return loss, [g.copy() for g in model.grads]

    want = run()
    calls = []

    def direct(a, b, out=None):
        calls.append((a.shape, b.shape))
        return _cupy_math._matmul(np, _emulated_gemm, a, b, out)

    monkeypatch.setattr(_cupy_math, "_capturing", lambda: True)
    monkeypatch.setattr(_cupy_math, "cublas_matmul", direct)
    monkeypatch.setattr(numpy_engine, "matmul", _cupy_math.matmul)  # the layers' products
    got = run()
    assert calls  # the layers' products did take the direct path
    np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-13)


def test_capture_switch_is_scoped_to_the_capturing_thread():
    """capturing() sends products to cuBLAS in its own thread only, and ends with its block."""
    import threading
    seen = []
    assert not _cupy_math._capturing()
    with _cupy_math.capturing():
        t = threading.Thread(target=lambda: seen.append(_cupy_math._capturing()))
        t.start()
        t.join()
        seen.append(_cupy_math._capturing())
    assert seen == [False, True] and not _cupy_math._capturing()
