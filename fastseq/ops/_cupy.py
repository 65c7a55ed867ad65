"""The cupy engine (NVIDIA GPU): same math and interface as ``_numpy``, fused per-step kernels.

    forward(xs, Wx, Wh, b, h0, c0) -> hs, hT, cT, cache       xs (N, T, D), hs (N, T, H)
    backward(dhs, cache, grads)    -> dxs, dh0                 grads = [dWx, dWh, db] (in place)
    step(x, Wx, Wh, b, h, c)       -> h, c                     one step, no cache
    final_state(xs, Wx, Wh, b, h0, c0, start=None, out=None) -> hT, cT
                                   forward's last state alone

Gate layout is the textbook's: the 4H pre-activation columns are blocked [f | g | i | o].

Per time step the forward pass is one cuBLAS product (h_{t-1} Wh) and one fused elementwise
kernel (bias + gates + cell + output); the backward pass is one fused elementwise kernel (all four
gate gradients and dc_{t-1}) and one product (dA_t Wh^T). x Wx, dWx, dWh and dx are one product
each over all time steps. Every buffer is time-major (T, N, ...) and allocated once per call.

The ops around the LSTM (products, Adam, clipping, dropout masks, softmax) are in _cupy_math.py,
imported here: this module is the engine. Its kernel sources are tested on the CPU as
_cupy_math.py says (``_forward`` and ``_backward`` take the array module and the kernel factory).
Importing this module never needs CuPy; calling ``forward`` does.
"""
import sys

import numpy

from .. import backend
from . import _numpy
from ._cupy_math import (DTYPES, _STEP_KERNELS, _elementwise, _product,  # noqa: F401
                         adam_update, capturing, clip_grads, cublas_matmul, dropout,
                         dropout_mask, embed_gather, embed_scatter, exp_rows, matmul,
                         prepare_direct_products, softmax_cross_entropy)

TAKES_IDS = False  # xs are float inputs (N, T, D); integer ids are for the CPU engines


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
        _product(xp, Hs[t], Wh, HW)
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


def final_state(xs, Wx, Wh, b, h0, c0, start=None, out=None):
    """forward's (h_T, c_T) alone (see _numpy.final_state)."""
    if start is not None:
        if start.size and (int(start.min()) < 0 or int(start.max()) >= h0.shape[0]):
            raise ValueError(f"start row outside [0, {h0.shape[0]})")
        h0, c0 = h0[start], c0[start]
    _, hT, cT, _ = forward(xs, Wx, Wh, b, h0, c0)
    return (hT, cT) if out is None else _numpy.into(out, hT, cT)


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
            _product(xp, dA[t].reshape(N, 4 * H), WhT, dh)
        dc, dc_prev = dc_prev, dc
    dWx, dWh, db = grads
    dA2 = dA.reshape(T * N, 4 * H)
    _product(xp, x2.T, dA2, dWx)
    _product(xp, Hs[:T].reshape(T * N, H).T, dA2, dWh)
    db[...] = dA.reshape(T, N, 4 * H).sum(axis=0) if row_bias else dA2.sum(axis=0)
    dxs = _product(xp, dA2, Wx.T).reshape(T, N, D).transpose(1, 0, 2)
    return dxs, (dh if need_dh0 else None)
