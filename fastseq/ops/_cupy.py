"""The cupy engine (NVIDIA GPU): same math and interface as ``_numpy``, fused per-step kernels.

    forward(xs, Wx, Wh, b, h0, c0) -> hs, hT, cT, cache       xs (N, T, D), hs (N, T, H)
    backward(dhs, cache, grads)    -> dxs, dh0                 grads = [dWx, dWh, db] (in place)
    step(x, Wx, Wh, b, h, c)       -> h, c                     one step, no cache
    final_state(xs, Wx, Wh, b, h0, c0, start=None) -> hT, cT   forward's last state alone

Gate layout is the textbook's: the 4H pre-activation columns are blocked [f | g | i | o].

Per time step the forward pass is one cuBLAS product (h_{t-1} Wh) and one fused elementwise
kernel (bias + gates + cell + output); the backward pass is one fused elementwise kernel (all four
gate gradients and dc_{t-1}) and one product (dA_t Wh^T). x Wx, dWx, dWh and dx are one product
each over all time steps. Every buffer is time-major (T, N, ...) and allocated once per call.

Also here, for the rest of a training step on the GPU without a value read back per step (and
so capturable in a CUDA graph, see fastseq.cuda_graph): ``matmul`` (cuBLAS called directly while
a graph is captured), ``softmax_cross_entropy``, ``adam_update``, ``clip_grads`` and
``dropout_mask``; exp_rows and the embedding ops are the numpy engine's array calls.

The kernel sources are plain C++ expressions over ``T`` (float or double), so
``tests/test_cupy_source.py`` compiles these very strings with a host C++ compiler and runs them
on the CPU (``_forward``, ``_backward`` and the other ``_name`` functions take the array module
and the kernel factory as arguments). Importing this module never needs CuPy; calling ``forward``
does.
"""
import contextlib
import contextvars
import sys

import numpy

from .. import backend
from ._numpy_math import _matmul as _xp_matmul
from ._numpy_math import embed_gather, embed_scatter, exp_rows  # noqa: F401  (array calls)

DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
TAKES_IDS = False  # xs are float inputs (N, T, D); integer ids are for the CPU engines

# name -> (in_params, out_params, operation) in cupy.ElementwiseKernel syntax; filled below.
_STEP_KERNELS = {}
_compiled = {}  # name -> cupy.ElementwiseKernel, built on first use (CuPy caches the binaries)


def _elementwise(name):
    """The memoised ``cupy.ElementwiseKernel`` for step kernel ``name`` (compiled on first call
    for each dtype by CuPy itself)."""
    kern = _compiled.get(name)
    if kern is None:
        import cupy  # lazy: this module must import on machines without CuPy
        in_params, out_params, operation = _STEP_KERNELS[name]
        kern = cupy.ElementwiseKernel(in_params, out_params, operation, name, no_return=True)
        _compiled[name] = kern
    return kern


def _matmul_into(xp, a, b, out):
    """``out[...] = a @ b`` without a temporary when the array module allows it."""
    if _capturing() and _is_device(xp):  # a CUDA graph is being captured: see cublas_matmul
        return cublas_matmul(a, b, out=out)
    if out.flags.c_contiguous and out.dtype == a.dtype == b.dtype:
        try:
            xp.matmul(a, b, out=out)
            return out
        except TypeError:  # a CuPy too old for matmul(out=)
            pass
    out[...] = xp.matmul(a, b)
    return out


def _product(xp, a, b):
    """a @ b (a new array)."""
    if _capturing() and _is_device(xp):
        return cublas_matmul(a, b)
    return xp.matmul(a, b)


def _is_device(xp):
    return xp is not numpy


def _require_gpu_arrays(arrays, what):
    backend.check_same_device(*arrays, what=what)
    cupy = sys.modules.get("cupy")  # loaded whenever CuPy arrays exist; never imported here
    if cupy is None or not isinstance(arrays[0], cupy.ndarray):
        raise TypeError(f"the CuPy LSTM engine needs CuPy arrays, got NumPy ones for {what}; "
                        "move them with fastseq.backend.to_gpu (or use the numpy engine)")


def _check_dtype(dtype):
    dtype = numpy.dtype(dtype)
    if dtype not in DTYPES:
        raise TypeError(f"the CuPy LSTM engine supports float32 and float64, not {dtype}")
    return dtype


# ----------------------------------------------------------------------------------------------
# forward

_LSTM_FWD_IN = "raw T hw, raw T b, T c_prev, int32 H, int32 b_rs"
_LSTM_FWD_OUT = "raw T gates, T c_next, T tanh_c, T h_next"
# One thread per (n, j) of the (N, H) state; i = n * H + j. ``gates`` is the flat (N * 4H) row
# block of x_t Wx on entry and the activated gates on exit; ``hw`` is the flat h_{t-1} Wh; row n's
# bias starts at b[n * b_rs] (b_rs = 0: one shared bias; 4H: one bias per row).
_LSTM_FWD_SRC = r"""
const ptrdiff_t n = i / H;
const ptrdiff_t j = i - n * H;
const ptrdiff_t k = n * 4 * H + j;
const ptrdiff_t kb = n * b_rs + j;
const T a_f = gates[k] + b[kb] + hw[k];
const T a_g = gates[k + H] + b[kb + H] + hw[k + H];
const T a_i = gates[k + 2 * H] + b[kb + 2 * H] + hw[k + 2 * H];
const T a_o = gates[k + 3 * H] + b[kb + 3 * H] + hw[k + 3 * H];
const T f = tanh(a_f * T(0.5)) * T(0.5) + T(0.5);
const T g = tanh(a_g);
const T in_g = tanh(a_i * T(0.5)) * T(0.5) + T(0.5);
const T o = tanh(a_o * T(0.5)) * T(0.5) + T(0.5);
gates[k] = f;
gates[k + H] = g;
gates[k + 2 * H] = in_g;
gates[k + 3 * H] = o;
const T c = f * c_prev + g * in_g;
const T tc = tanh(c);
c_next = c;
tanh_c = tc;
h_next = o * tc;
"""
_STEP_KERNELS["fastseq_lstm_fwd_step"] = (_LSTM_FWD_IN, _LSTM_FWD_OUT, _LSTM_FWD_SRC)


def forward(xs, Wx, Wh, b, h0, c0):
    """LSTM over a whole sequence on the GPU.

    NumPy equivalent (``_numpy.forward``), per step t with a = x_t Wx + b + h_{t-1} Wh::

        f, g, i, o = sigmoid(a[:, :H]), tanh(a[:, H:2H]), sigmoid(a[:, 2H:3H]), sigmoid(a[:, 3H:])
        c_t = f * c_{t-1} + g * i;   h_t = o * tanh(c_t)

    b is (4H,) or (N, 4H), one bias per row (then ``backward`` gives db as (N, 4H)).
    Returns hs (N, T, H) (a view of the cached time-major buffer), copies of h_T and c_T, and
    the cache for ``backward``. All arrays must be CuPy arrays of one float dtype.
    """
    _require_gpu_arrays((xs, Wx, Wh, b, h0, c0), "LSTM forward inputs")
    import cupy
    return _forward(cupy, _elementwise, xs, Wx, Wh, b, h0, c0)


def _forward(xp, kernel, xs, Wx, Wh, b, h0, c0):
    dtype = _check_dtype(Wx.dtype)
    N, T, D = xs.shape
    H = Wh.shape[0]
    row_bias = b.ndim == 2
    b_shape = (N, 4 * H) if row_bias else (4 * H,)
    if Wx.shape != (D, 4 * H) or Wh.shape != (H, 4 * H) or b.shape != b_shape:
        raise ValueError(f"LSTM weights have shapes Wx {Wx.shape}, Wh {Wh.shape}, b {b.shape}; "
                         f"expected {(D, 4 * H)}, {(H, 4 * H)}, {b_shape}")
    if h0.shape != (N, H) or c0.shape != (N, H):
        raise ValueError(f"LSTM state has shapes {h0.shape}, {c0.shape}; expected {(N, H)}")
    Wx = xp.ascontiguousarray(Wx)
    Wh = xp.ascontiguousarray(Wh, dtype=dtype)
    b = xp.ascontiguousarray(b, dtype=dtype).reshape(-1)
    # time-major copy of the inputs; kept for dWx
    x2 = xp.ascontiguousarray(xs.transpose(1, 0, 2), dtype=dtype).reshape(T * N, D)
    A = _product(xp, x2, Wx).reshape(T, N * 4 * H)  # row t: flat (N, 4H) x_t Wx, then the gates
    Hs = xp.empty((T + 1, N, H), dtype=dtype)     # Hs[0] = h0, Hs[t + 1] = h_t
    Cs = xp.empty((T + 1, N, H), dtype=dtype)     # Cs[0] = c0, Cs[t + 1] = c_t
    TCs = xp.empty((T, N, H), dtype=dtype)        # tanh(c_t)
    Hs[0] = h0
    Cs[0] = c0
    HW = xp.empty((N, 4 * H), dtype=dtype)
    HW_flat = HW.reshape(N * 4 * H)
    step = kernel("fastseq_lstm_fwd_step")
    for t in range(T):
        _matmul_into(xp, Hs[t], Wh, HW)
        step(HW_flat, b, Cs[t], H, 4 * H if row_bias else 0, A[t], Cs[t + 1], TCs[t], Hs[t + 1])
    cache = (x2, Wx, Wh, A, Hs, Cs, TCs, row_bias)
    return Hs[1:].transpose(1, 0, 2), Hs[T].copy(), Cs[T].copy(), cache


# ----------------------------------------------------------------------------------------------
# backward

_LSTM_BWD_IN = "raw T gates, T dh_out, T dh_rec, T dc_next, T c_prev, T tanh_c, int32 H"
_LSTM_BWD_OUT = "raw T dgates, T dc_prev"
# One thread per (n, j); ``gates`` / ``dgates`` are flat (N * 4H) rows of the activated gates and
# of dA_t. dh = dh_out (from above) + dh_rec (from step t + 1, dA_{t+1} Wh^T).
_LSTM_BWD_SRC = r"""
const ptrdiff_t n = i / H;
const ptrdiff_t j = i - n * H;
const ptrdiff_t k = n * 4 * H + j;
const T f = gates[k];
const T g = gates[k + H];
const T in_g = gates[k + 2 * H];
const T o = gates[k + 3 * H];
const T tc = tanh_c;
const T dh = dh_out + dh_rec;
const T ds = dc_next + dh * o * (T(1) - tc * tc);
dgates[k] = ds * c_prev * f * (T(1) - f);
dgates[k + H] = ds * in_g * (T(1) - g * g);
dgates[k + 2 * H] = ds * g * in_g * (T(1) - in_g);
dgates[k + 3 * H] = dh * tc * o * (T(1) - o);
dc_prev = ds * f;
"""
_STEP_KERNELS["fastseq_lstm_bwd_step"] = (_LSTM_BWD_IN, _LSTM_BWD_OUT, _LSTM_BWD_SRC)


def step(x, Wx, Wh, b, h, c):
    """One step (see _numpy.step): forward over a sequence of length 1, its cache dropped."""
    _, h, c, _ = forward(x[:, None, :], Wx, Wh, b, h, c)
    return h, c


def stepper(Wx, Wh, b):
    """step() over these weights (see _numpy.stepper): the kernels have no per-weights work."""
    return lambda x, h, c: step(x, Wx, Wh, b, h, c)


def final_state(xs, Wx, Wh, b, h0, c0, start=None):
    """forward's (h_T, c_T) alone (see _numpy.final_state)."""
    if start is not None:
        if start.size and (int(start.min()) < 0 or int(start.max()) >= h0.shape[0]):
            raise ValueError(f"start row outside [0, {h0.shape[0]})")
        h0, c0 = h0[start], c0[start]
    _, hT, cT, _ = forward(xs, Wx, Wh, b, h0, c0)
    return hT, cT


def backward(dhs, cache, grads, need_dh0=True):
    """Backpropagation through time for ``forward``; grads = [dWx, dWh, db] written in place.

    NumPy equivalent (``_numpy.backward``), per step t from T-1 down to 0::

        dh = dhs[:, t] + dh_next;   ds = dc_next + dh * o * (1 - tanh(c_t)**2)
        dA_t = [ds * c_{t-1} * f * (1 - f) | ds * i * (1 - g**2) | ds * g * i * (1 - i)
                | dh * tanh(c_t) * o * (1 - o)]
        dc_next = ds * f;   dh_next = dA_t Wh^T

    then dWx = X^T dA, dWh = H_prev^T dA, db = sum(dA) (per row, over the steps, for per-row
    biases), dxs = dA Wx^T over all steps at once.
    Returns dxs (N, T, D) and dh0 (N, H); need_dh0=False skips dA_0 Wh^T and returns dh0 None.
    """
    _require_gpu_arrays((dhs, cache[3]), "LSTM backward inputs")
    _require_gpu_arrays(list(grads), "LSTM gradient buffers")
    import cupy
    return _backward(cupy, _elementwise, dhs, cache, grads, need_dh0=need_dh0)


def _backward(xp, kernel, dhs, cache, grads, need_dh0=True):
    x2, Wx, Wh, A, Hs, Cs, TCs, row_bias = cache
    T, N, H = TCs.shape
    D = x2.shape[1]
    dtype = A.dtype
    if dhs.shape != (N, T, H):
        raise ValueError(f"dhs has shape {dhs.shape}; the forward pass produced {(N, T, H)}")
    dhs_tm = xp.ascontiguousarray(dhs.transpose(1, 0, 2), dtype=dtype)  # (T, N, H)
    dA = xp.empty((T, N * 4 * H), dtype=dtype)
    dh = xp.zeros((N, H), dtype=dtype)        # dh_next: dA_{t+1} Wh^T (zero after the last step)
    dc = xp.zeros((N, H), dtype=dtype)        # dc_next
    dc_prev = xp.empty((N, H), dtype=dtype)
    WhT = xp.ascontiguousarray(Wh.T)
    step = kernel("fastseq_lstm_bwd_step")
    for t in reversed(range(T)):
        step(A[t], dhs_tm[t], dh, dc, Cs[t], TCs[t], H, dA[t], dc_prev)
        if t > 0 or need_dh0:
            _matmul_into(xp, dA[t].reshape(N, 4 * H), WhT, dh)
        dc, dc_prev = dc_prev, dc
    dWx, dWh, db = grads
    dA2 = dA.reshape(T * N, 4 * H)
    _matmul_into(xp, x2.T, dA2, dWx)
    _matmul_into(xp, Hs[:T].reshape(T * N, H).T, dA2, dWh)
    db[...] = dA.reshape(T, N, 4 * H).sum(axis=0) if row_bias else dA2.sum(axis=0)
    dxs = _product(xp, dA2, Wx.T).reshape(T, N, D).transpose(1, 0, 2)
    return dxs, (dh if need_dh0 else None)


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
        import ctypes

        import cupy
        cupy.cuda.device.get_cublas_handle()  # makes sure CuPy has loaded libcublas
        path = None
        with open("/proc/self/maps") as f:  # the very library CuPy uses (Linux)
            for line in f:
                name = line.split()[-1]
                if "/libcublas.so" in name:
                    path = name
                    break
        if path is None:
            raise RuntimeError("could not find the libcublas that CuPy loaded")
        self.ctypes = ctypes
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
        c = self.ctypes
        self._check(self.lib.cublasSetStream_v2(self.handle, c.c_void_p(stream_ptr)),
                    "cublasSetStream")
        # setting the stream resets the workspace to cuBLAS's own pool: set ours again
        self._check(self.lib.cublasSetWorkspace_v2(self.handle, c.c_void_p(self.workspace.data.ptr),
                                                   c.c_size_t(self.WORKSPACE)), "cublasSetWorkspace")
        self.stream = stream_ptr

    def gemm(self, plan, first, second, out):
        stream = self.cupy.cuda.get_current_stream().ptr
        if stream != self.stream:
            self.set_stream(stream)
        op1, op2, m, n, k, ld1, ld2, ldo, batch, s1, s2, so = plan
        size = out.dtype.itemsize
        c = self.ctypes
        args = [self.handle, op1, op2, m, n, k, c.byref(self.one[size]), first.data.ptr, ld1]
        if out.ndim == 3:  # a stack: one strided batched call
            fn = self.lib.cublasSgemmStridedBatched if size == 4 else \
                self.lib.cublasDgemmStridedBatched
            args += [s1, second.data.ptr, ld2, s2, c.byref(self.zero[size]), out.data.ptr, ldo, so,
                     batch]
        else:
            fn = self.lib.cublasSgemm_v2 if size == 4 else self.lib.cublasDgemm_v2
            args += [second.data.ptr, ld2, c.byref(self.zero[size]), out.data.ptr, ldo]
        self._check(fn(*args), "cublas gemm")


_cublas_lib = None


def _cublas():
    global _cublas_lib
    if _cublas_lib is None:
        _cublas_lib = _Cublas()
    return _cublas_lib


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


def _reduction(name):
    kern = _compiled.get(name)
    if kern is None:
        import cupy
        in_params, out_params, map_expr, reduce_expr, post, identity = _REDUCTION_KERNELS[name]
        kern = cupy.ReductionKernel(in_params, out_params, map_expr, reduce_expr, post, identity,
                                    name)
        _compiled[name] = kern
    return kern


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
    return _clip_grads(cupy, _elementwise, _reduction, grads, max_norm)


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
