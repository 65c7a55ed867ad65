"""The cupy engine's ops around the LSTM, and what its LSTM shares with them: the memoised
elementwise kernels, the products (cuBLAS called directly while a CUDA graph is captured, see
fastseq.cuda_graph), ``adam_update``, ``clip_grads``, ``dropout_mask`` and
``softmax_cross_entropy``, none of which reads a value back to the host (so a training step can
be captured); exp_rows and the embedding ops are the numpy engine's array calls. Same
signatures as the numpy engine (see fastseq.ops).

The kernel sources are plain C++ expressions over ``T`` (float or double), so
``tests/test_cupy_source.py`` compiles these very strings with a host C++ compiler and runs them
on the CPU (the ``_name`` functions take the array module and the kernel factory as arguments).
Importing this module never needs CuPy.
"""
import contextlib
import contextvars
import ctypes
import functools

import numpy

from .. import backend
from ._numpy_math import _matmul as _xp_matmul
from ._numpy_math import (dropout, embed_gather, embed_scatter,  # noqa: F401  (array calls)
                          exp_rows)

DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))

# name -> (in_params, out_params, operation) in cupy.ElementwiseKernel syntax; filled below and
# by _cupy.py (the LSTM's step kernels).
_STEP_KERNELS = {}
_compiled = {}  # name -> CuPy kernel, built on first use (CuPy caches the binaries)


def _elementwise(name):
    """The memoised ``cupy.ElementwiseKernel`` for step kernel ``name``, or
    ``cupy.ReductionKernel`` for a reduction (compiled on first call for each dtype by CuPy)."""
    kern = _compiled.get(name)
    if kern is None:
        import cupy  # lazy: this module must import on machines without CuPy
        if name in _REDUCTION_KERNELS:
            kern = cupy.ReductionKernel(*_REDUCTION_KERNELS[name], name)
        else:
            kern = cupy.ElementwiseKernel(*_STEP_KERNELS[name], name, no_return=True)
        _compiled[name] = kern
    return kern


def _product(xp, a, b, out=None):
    """``a @ b``, into ``out`` when given (without a temporary where its layout allows)."""
    if _capturing() and _is_device(xp):  # a CUDA graph is being captured: see cublas_matmul
        return cublas_matmul(a, b, out)
    if out is None:
        return xp.matmul(a, b)
    if out.flags.c_contiguous and out.dtype == a.dtype == b.dtype:
        return xp.matmul(a, b, out=out)
    out[...] = xp.matmul(a, b)
    return out


def _is_device(xp):
    return xp is not numpy


# ----------------------------------------------------------------------------------------------
# products while a CUDA graph is captured
#
# CuPy refuses every cuBLAS call while its stream is capturing (its wrappers re-set the handle's
# stream first, and raise there). cuBLAS itself can be captured, so during capture the products
# go to cublas<t>gemm directly, through a handle of fastseq's own (ctypes, the libcublas CuPy
# has loaded), with its stream and a workspace of its own set before the capture begins.


_capture = contextvars.ContextVar("fastseq_cuda_capture", default=False)


@contextlib.contextmanager
def capturing():
    """Inside, in this thread only, every product goes to cuBLAS directly (fastseq.cuda_graph
    captures a step in it)."""
    token = _capture.set(True)
    try:
        yield
    finally:
        _capture.reset(token)


def _capturing():
    return _capture.get()

_OP_N, _OP_T = 0, 1  # cublasOperation_t


def gemm_plan(a_shape, a_c_order, b_shape, b_c_order):
    """cublas<t>gemm's arguments for row-major ``out (M, N) = a (M, K) @ b (K, N)``.

    a and b are C-ordered, or F-ordered (transposed views of C-ordered memory). A row-major
    (r, c) block is the column-major (c, r) block of the same memory, so cuBLAS computes
    out^T = b^T a^T: its first operand is b's memory, its second a's. Returns
    (op_first, op_second, m, n, k, ld_first, ld_second, ld_out).
    """
    M, K = a_shape
    N = b_shape[1]
    op_b, ld_b = (_OP_N, N) if b_c_order else (_OP_T, K)
    op_a, ld_a = (_OP_N, K) if a_c_order else (_OP_T, M)
    return op_b, op_a, N, M, K, max(ld_b, 1), max(ld_a, 1), max(N, 1)


def _order(a):
    """True (C-ordered), False (F-ordered) or None (neither) for a 2-D block, or for every
    block of a 3-D stack laid out one after the other."""
    if a.ndim == 3:
        B, r, c = a.shape
        if B > 1 and a.strides[0] != r * c * a.itemsize:
            return None
        a = a[0]
    if a.flags.c_contiguous:
        return True
    if a.flags.f_contiguous:
        return False
    return None


def _as_operand(xp, a):
    """(array, c_order): a as it is when C- or F-ordered (per block), else a C-ordered copy."""
    order = _order(a)
    if order is None:
        return xp.ascontiguousarray(a), True
    return a, order


def _matmul(xp, gemm, a, b, out=None):
    """out = a @ b through ``gemm(plan, first, second, out)`` (first: b's memory, second: a's;
    plan: gemm_plan's tuple plus (batch, stride_first, stride_second, stride_out), in elements).
    Operands are 1-D or 2-D, or stacks (B, ., .) of blocks (a 2-D operand is used for every
    block). ``out`` may be any writable array of the result's shape; the product goes straight
    into it when it is C-ordered."""
    if a.ndim not in (1, 2, 3) or b.ndim not in (1, 2, 3) or a.dtype != b.dtype \
            or a.dtype not in DTYPES or (max(a.ndim, b.ndim) == 3 and min(a.ndim, b.ndim) == 1):
        raise TypeError(f"matmul takes 1-D, 2-D or 3-D float32/float64 operands of one dtype, got "
                        f"{a.dtype} {a.shape} and {b.dtype} {b.shape}")
    a2 = a.reshape(1, -1) if a.ndim == 1 else a
    b2 = b.reshape(-1, 1) if b.ndim == 1 else b
    batch = max(a2.shape[0] if a2.ndim == 3 else 1, b2.shape[0] if b2.ndim == 3 else 1)
    if a2.shape[-1] != b2.shape[-2] or any(x.ndim == 3 and x.shape[0] != batch for x in (a2, b2)):
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match")
    if max(a.ndim, b.ndim) == 3:
        shape = (batch, a2.shape[-2], b2.shape[-1])
    else:
        shape = a.shape[:-1] + b.shape[1:]  # numpy.matmul's result shape
    M, K, N = a2.shape[-2], a2.shape[-1], b2.shape[-1]
    if out is not None and (out.shape != shape or out.dtype != a.dtype):
        raise ValueError(f"matmul: out has {out.dtype} {out.shape}, expected {a.dtype} {shape}")
    direct = out is not None and out.flags.c_contiguous
    res = out if direct else xp.empty(shape, dtype=a.dtype)
    if batch and M and N:
        if K == 0:
            res[...] = 0
        else:
            a2, a_c = _as_operand(xp, a2)
            b2, b_c = _as_operand(xp, b2)
            plan = gemm_plan((M, K), a_c, (K, N), b_c) + (
                batch, K * N if b2.ndim == 3 else 0, M * K if a2.ndim == 3 else 0, M * N)
            gemm(plan, b2, a2, res.reshape((batch, M, N) if len(shape) == 3 else (M, N)))
    if out is not None and not direct:
        out[...] = res
        return out
    return res


def matmul(a, b, out=None):
    """a @ b, written into out when given: cuBLAS directly while a graph is captured, else
    CuPy's own product."""
    if _capturing():
        return cublas_matmul(a, b, out)
    return _xp_matmul(a, b, out)


def cublas_matmul(a, b, out=None):
    """``a @ b`` (1-D, 2-D or stacked 3-D CuPy arrays, float32 or float64) by cublas<t>gemm (or
    cublas<t>gemmStridedBatched for stacks) on fastseq's own handle: what the engine and the
    layers use while a CUDA graph is captured.

    NumPy equivalent: ``numpy.matmul(a, b, out=out)``.
    """
    import cupy
    return _matmul(cupy, _cublas().gemm, a, b, out)


class _Cublas:
    """libcublas through ctypes: one handle, set to the current stream (and a workspace of its
    own) whenever the stream changes."""

    WORKSPACE = 32 << 20  # bytes; what cuBLAS asks for on recent GPUs

    def __init__(self):
        import cupy
        cupy.cuda.device.get_cublas_handle()  # makes sure CuPy has loaded libcublas
        with open("/proc/self/maps") as f:  # the very library CuPy uses (Linux)
            path = next((p for p in (line.split()[-1] for line in f) if "/libcublas.so" in p),
                        None)
        if path is None:
            raise RuntimeError("could not find the libcublas that CuPy loaded")
        self.lib = lib = ctypes.CDLL(path)
        handle = ctypes.c_void_p()
        self._check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = cupy.empty(self.WORKSPACE, dtype=cupy.uint8)
        self.stream = None
        self.cupy = cupy
        c = ctypes
        head = [c.c_void_p, c.c_int, c.c_int, c.c_int, c.c_int, c.c_int]
        for t, real in (("S", c.c_float), ("D", c.c_double)):
            getattr(lib, f"cublas{t}gemm_v2").argtypes = head + [
                c.POINTER(real), c.c_void_p, c.c_int, c.c_void_p, c.c_int,
                c.POINTER(real), c.c_void_p, c.c_int]
            getattr(lib, f"cublas{t}gemmStridedBatched").argtypes = head + [
                c.POINTER(real), c.c_void_p, c.c_int, c.c_longlong, c.c_void_p, c.c_int,
                c.c_longlong, c.POINTER(real), c.c_void_p, c.c_int, c.c_longlong, c.c_int]
        self.one = {4: c.c_float(1.0), 8: c.c_double(1.0)}
        self.zero = {4: c.c_float(0.0), 8: c.c_double(0.0)}

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def set_stream(self, stream_ptr):
        self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream_ptr)),
                    "cublasSetStream")
        # setting the stream resets the workspace to cuBLAS's own pool: set ours again
        self._check(self.lib.cublasSetWorkspace_v2(
            self.handle, ctypes.c_void_p(self.workspace.data.ptr), ctypes.c_size_t(self.WORKSPACE)),
            "cublasSetWorkspace")
        self.stream = stream_ptr

    def gemm(self, plan, first, second, out):
        stream = self.cupy.cuda.get_current_stream().ptr
        if stream != self.stream:
            self.set_stream(stream)
        op1, op2, m, n, k, ld1, ld2, ldo, batch, s1, s2, so = plan
        size = out.dtype.itemsize
        t = "S" if size == 4 else "D"
        one, zero = ctypes.byref(self.one[size]), ctypes.byref(self.zero[size])
        args = [self.handle, op1, op2, m, n, k, one, first.data.ptr, ld1]
        if out.ndim == 3:  # a stack: one strided batched call
            fn = getattr(self.lib, f"cublas{t}gemmStridedBatched")
            args += [s1, second.data.ptr, ld2, s2, zero, out.data.ptr, ldo, so, batch]
        else:
            fn = getattr(self.lib, f"cublas{t}gemm_v2")
            args += [second.data.ptr, ld2, zero, out.data.ptr, ldo]
        self._check(fn(*args), "cublas gemm")


@functools.cache
def _cublas():
    return _Cublas()


def prepare_direct_products(stream_ptr):
    """Load cuBLAS and set fastseq's handle to the stream a graph will be captured on (before the
    capture begins: setting the stream and workspace is not captured)."""
    _cublas().set_stream(stream_ptr)


# ----------------------------------------------------------------------------------------------
# optimiser and clipping kernels: no value comes back to the host, so they can be captured

# Adam's step counter and step size live on the device, in state = [t, lr_t] (float64):
# t += 1;  lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t).   One thread (size=1).
_STEP_KERNELS["fastseq_adam_count"] = (
    "float64 lr, float64 beta1, float64 beta2", "raw float64 state", r"""
const double t = state[0] + 1.0;
state[0] = t;
state[1] = lr * sqrt(1.0 - pow(beta2, t)) / (1.0 - pow(beta1, t));
""")

# One fused pass per parameter (textbook Adam):
# m += (1 - b1)(g - m);  v += (1 - b2)(g^2 - v);  p -= lr_t m / (sqrt(v) + eps)
_STEP_KERNELS["fastseq_adam_update"] = (
    "T g, raw float64 state, float64 one_minus_b1, float64 one_minus_b2, float64 eps",
    "T p, T m, T v", r"""
const T lr_t = T(state[1]);
const T m_new = m + T(one_minus_b1) * (g - m);
const T v_new = v + T(one_minus_b2) * (g * g - v);
m = m_new;
v = v_new;
p = p - lr_t * m_new / (sqrt(v_new) + T(eps));
""")

# Global-norm clipping: res = [norm, rate] from the n squared norms; one thread (size=1).
_STEP_KERNELS["fastseq_clip_rate"] = (
    "raw float64 sq, int32 n, float64 max_norm", "raw float64 res", r"""
double total = 0.0;
for (int k = 0; k < n; ++k) total += sq[k];
const double norm = sqrt(total);
res[0] = norm;
res[1] = max_norm / (norm + 1e-6);
""")

# g *= rate when rate < 1 (host: the same test on the host value)
_STEP_KERNELS["fastseq_clip_scale"] = ("raw float64 res", "T g", r"""
if (res[1] < 1.0) g = g * T(res[1]);
""")

# name -> (in_params, out_params, map_expr, reduce_expr, post_map_expr, identity)
_REDUCTION_KERNELS = {
    "fastseq_sum_squares": ("T x", "float64 y", "double(x) * double(x)", "a + b", "y = a", "0"),
}


def adam_update(params, grads, ms, vs, lr, beta1, beta2, step, state=None):
    """Adam on CuPy arrays: one kernel for the step counter, one fused kernel per parameter.

    NumPy equivalent (_numpy_math.adam_update), with lr_t from the device counter::

        m += (1 - b1) (g - m);  v += (1 - b2) (g^2 - v);  p -= lr_t m / (sqrt(v) + 1e-7)

    state: (device counter [t, lr_t], the step it was made for), as returned by the previous
    call; rebuilt from step whenever the two disagree (first use, a resumed checkpoint).
    """
    import cupy
    return _adam_update(cupy, _elementwise, params, grads, ms, vs, lr, beta1, beta2, step, state)


def _adam_update(xp, kernel, params, grads, ms, vs, lr, beta1, beta2, step, state):
    counter = _adam_counter(xp, step, state)
    kernel("fastseq_adam_count")(float(lr), float(beta1), float(beta2), counter, size=1)
    update = kernel("fastseq_adam_update")
    for p, g, m, v in zip(params, grads, ms, vs):
        update(g, counter, 1.0 - beta1, 1.0 - beta2, 1e-7, p, m, v)
    return counter, step


def _adam_counter(xp, step, state):
    """The device counter [t, lr_t] valid for this step (t = step - 1 before the count kernel
    runs)."""
    if isinstance(state, tuple) and state[1] == step - 1 \
            and backend.get_array_module(state[0]) is xp:
        return state[0]
    return xp.asarray(numpy.array([step - 1, 0.0]))


def clip_grads(grads, max_norm):
    """Scale all grads in place by max_norm / (norm + 1e-6) when that is below 1, all on the
    device; returns the norm as a 0-d CuPy array (read it at a logging interval, not per step).

    NumPy equivalent (fastseq.functions.clip_grads)::

        norm = sqrt(sum((g ** 2).sum() for g in grads));  rate = max_norm / (norm + 1e-6)
        if rate < 1: for g in grads: g *= rate
    """
    import cupy
    return _clip_grads(cupy, _elementwise, _elementwise, grads, max_norm)


def _clip_grads(xp, kernel, reduction, grads, max_norm):
    grads = list(grads)
    sq = xp.empty(len(grads), dtype=numpy.float64)
    sum_squares = reduction("fastseq_sum_squares")
    for k, g in enumerate(grads):
        sum_squares(g, out=sq[k:k + 1].reshape(()))  # a 0-d view into sq
    res = xp.empty(2, dtype=numpy.float64)
    kernel("fastseq_clip_rate")(sq, len(grads), float(max_norm), res, size=1)
    scale = kernel("fastseq_clip_scale")
    for g in grads:
        scale(res, g)
    return res[0]


# ----------------------------------------------------------------------------------------------
# dropout masks without a host-side generator
#
# cuRAND calls cannot be captured, and a generator stepped on the host would give a captured step
# the same mask at every replay. So a mask element is a hash (splitmix64's finaliser) of the
# layer's seed, a draw counter kept on the device, and the element's index: state = [seed, draws].

_STEP_KERNELS["fastseq_dropout_mask"] = ("raw float64 state, float64 keep", "T mask", r"""
unsigned long long z = (unsigned long long)state[0] * 0x9E3779B97F4A7C15ULL
    + (unsigned long long)state[1] * 0xD1B54A32D192ED03ULL
    + (unsigned long long)i * 0xBF58476D1CE4E5B9ULL + 0x632BE59BD9B4E019ULL;
z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
z = z ^ (z >> 31);
const double u = (double)(z >> 11) * (1.0 / 9007199254740992.0);  // uniform in [0, 1)
mask = u < keep ? T(1) / T(keep) : T(0);
""")

_STEP_KERNELS["fastseq_dropout_next"] = ("float64 step", "raw float64 state", r"""
state[1] = state[1] + step;
""")


def dropout_mask(shape, dtype, keep, state):
    """An inverted-dropout mask on the device: 1/keep where kept (probability keep), else 0;
    state = [seed, draws] (float64 CuPy array) is advanced by one draw.

    NumPy equivalent (other random numbers)::

        (rng.random_sample(shape) < keep).astype(dtype) / dtype(keep)
    """
    import cupy
    return _dropout_mask(cupy, _elementwise, shape, dtype, keep, state)


def _dropout_mask(xp, kernel, shape, dtype, keep, state):
    mask = xp.empty(shape, dtype=dtype)
    kernel("fastseq_dropout_mask")(state, float(keep), mask)
    kernel("fastseq_dropout_next")(1.0, state, size=1)
    return mask


def softmax_cross_entropy(scores, labels, ignore_label=-1):
    """The numpy engine's (see fastseq.functions.softmax_cross_entropy) without reading anything
    back to the host: the loss is a 0-d device array; per-row maxima always (the global shift's
    underflow test would be a host read); the masked formula always. Labels are range-checked
    unless the ids were checked already (backend.ids_checked)."""
    xp = backend.get_array_module(scores)
    M, V = scores.shape
    mask = labels != ignore_label if ignore_label is not None else xp.ones(M, dtype=bool)
    if M and not backend.skip_id_check(labels):
        wrong = mask & ((labels < 0) | (labels >= V))
        if bool(wrong.any()):
            bad = int(xp.flatnonzero(wrong)[0])
            raise ValueError(f"label {int(labels[bad])} at position {bad} is outside [0, {V}) "
                             f"(and is not the ignore label {ignore_label})")
    safe = xp.where(mask, labels, 0)
    scores -= scores.max(axis=1, keepdims=True)
    flat = scores.reshape(-1)
    at_label = xp.arange(M) * V + safe
    picked = flat[at_label]                  # log-softmax numerator
    xp.exp(scores, out=scores)
    z = scores.sum(axis=1)
    w = mask.astype(scores.dtype) / xp.maximum(mask.sum(), 1).astype(scores.dtype)
    loss = ((xp.log(z) - picked) * w).sum()
    scores *= (w / z)[:, None]
    flat[at_label] -= w
    return loss, scores
