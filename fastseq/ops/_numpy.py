"""The numpy engine: the LSTM here, the ops around it in _numpy_math (NumPy, or CuPy arrays
through the same calls).

Gate layout is the textbook's: the 4H pre-activation columns are blocked [f | g | i | o].

    a_t = x_t Wx + h_{t-1} Wh + b            (x_t Wx for all t in one product)
    f, i, o = sigmoid(a_f, a_i, a_o);  g = tanh(a_g)
    c_t = f * c_{t-1} + g * i;          h_t = o * tanh(c_t)

The gates come from one exp over all 4H columns (see _gate_scale); the rows of a batch are
independent, so forward's and backward's recurrences run in fixed pieces of rows (_row_pieces)
that a second thread may take.

Backward keeps the activated gates (as the textbook does) in the buffer that held the
pre-activations, plus c_t and tanh(c_t); nothing is recomputed. The gate buffers are gate-major,
(4, T, N, H): each gate of each step is one contiguous block, so every elementwise operation runs
over contiguous memory (NumPy is several times slower over the strided column slices of an
(N, 4H) array). The products stay the (N, 4H) ones the step function uses (forward and step give
the same bits); backward's products run per gate. The internal buffers come from the buffer pool
(_pool.py) and go back to it with the cache, so training reuses the same memory every step.
Work comes in pieces fixed by the shapes (halves of the rows for the recurrences, groups of gates
for the weight gradients) that a second thread may take when fastseq.backend allows two (NumPy
releases the GIL inside its products and loops); every product runs on one BLAS thread
(backend.single_blas_thread), so the bits never depend on the thread count.

Interface shared by every engine (numpy, cython, cupy):
    forward(xs, Wx, Wh, b, h0, c0) -> hs, hT, cT, cache       xs (N, T, D), hs (N, T, H)
    backward(dhs, cache, grads, need_dh0=True) -> dxs, dh0     grads = [dWx, dWh, db], written in place
    step(x, Wx, Wh, b, h, c) -> h, c                           one step, x (N, D), no cache
                                                               (generation and decoding)
    stepper(Wx, Wh, b) -> run(x, h, c) -> h, c                 step() over weights that stay
        the same for a run of steps (generation): the per-weights work done once, same bits
    final_state(xs, Wx, Wh, b, h0, c0, start=None, out=None) -> hT, cT
        forward's last state alone (inference: an encoder; with ids (N, 1), decoding's step);
        with start (N,), row n starts from h0[start[n]], c0[start[n]]; out=(h, c) (N, H):
        written there and returned, which may be h0 and c0 themselves without start (the state
        advances in place, nothing allocated)

need_dh0=False skips the product dA_0 Wh^T at t = 0 (N x 4H x H) and returns dh0 = None: for a
layer whose initial state is a constant (the Encoder's zero state) nobody needs that gradient.

b is either (4H,), shared by every row, or (N, 4H), one bias per row (a per-sequence input term
such as PeekyDecoder's h Wx_h folded in); grads' db then has b's shape: the sum of dA_t over the
steps, per row.

xs may also be integer ids (N, T): one-hot inputs x_t = onehot(ids[:, t]) of width V = Wx.shape[0],
so x_t Wx is a gather of Wx's rows (an embedding followed by the LSTM, with Wx = E Wx_lstm
precomputed: see TimeLSTM). backward then returns dxs = None, and dWx = onehot^T dA, a
scatter-add of dA's rows.
"""
import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import backend
from ..backend import get_array_module
from . import _pool
from ._numpy_math import (adam_update, clip_grads, dropout, dropout_mask,  # noqa: F401
                          embed_gather, embed_scatter, exp_rows, matmul, softmax_cross_entropy)

TAKES_IDS = True  # xs may be integer ids standing for one-hot rows (see forward)


def _gate_scale(H, dtype, xp):
    """Column scale so that one exp over all 4H columns serves every gate (see _activate): -1
    for f, i, o, -2 for g (powers of two: the scaled sums are exactly the scaled pre-activations).
    exp is much cheaper than tanh in NumPy."""
    scale = xp.full(4 * H, -1.0, dtype=dtype)
    scale[H:2 * H] = -2.0
    return scale


def _numerators(H, dtype, xp, gate_major):
    """1 for f, i, o and 2 for g, shaped to broadcast over a's gates: (4, 1, 1) gate-major,
    (4H,) for rows of 4H columns (see _activate)."""
    num = xp.ones((4, 1, 1) if gate_major else (4, H), dtype)
    num[1] = 2
    return num if gate_major else num.reshape(4 * H)


def _activate(a, g, num):
    """The gates from the scaled pre-activations a (see _gate_scale), in place; g is a's view of
    the g gate, num _numerators. With e = exp(a): sigmoid(x) = 1 / (1 + e), tanh(x) =
    2 / (1 + e) - 1. Where exp overflows (x < -88 in float32) e = inf gives the exact limits 0
    and -1 (call inside np.errstate(over="ignore")). Positional outputs: fewer cycles spent
    holding the GIL that the other piece's thread waits for."""
    xp = get_array_module(a)
    xp.exp(a, a)
    xp.add(a, 1, a)
    xp.divide(num, a, a)
    xp.subtract(g, 1, g)


# Rows per h_{t-1} Wh product. OpenBLAS's bits for a row depend on how many rows the call has,
# so every path (forward, step, final_state) cuts its rows at the same multiples of
# PRODUCT_ROWS: a row's h_t then has the same bits whatever the batch or the path.
PRODUCT_ROWS = 64
MIN_PIECE_ROWS = 32  # fewest rows in the second piece of a split recurrence


def _matmul_rows(h, W, out):
    """out = h W, PRODUCT_ROWS rows at a time (h's row 0 at a multiple of PRODUCT_ROWS of the
    batch); one product on the GPU."""
    xp = get_array_module(h)
    if xp is not np:
        return xp.matmul(h, W, out=out)
    for s in range(0, h.shape[0], PRODUCT_ROWS):
        xp.matmul(h[s:s + PRODUCT_ROWS], W, out=out[s:s + PRODUCT_ROWS])
    return out


def _row_pieces(N, xp):
    """The pieces of rows forward's and backward's recurrences run in, fixed by N alone (so the
    bits never depend on the thread count): two, cut at a multiple of PRODUCT_ROWS near the
    middle, where the second still has enough rows for its products and loops to outweigh a
    hand-off; one piece on the GPU."""
    chunks = -(-N // PRODUCT_ROWS)
    mid = min(-(-chunks // 2) * PRODUCT_ROWS, N)
    if xp is not np or N - mid < MIN_PIECE_ROWS:
        return [slice(0, N)]
    return [slice(0, mid), slice(mid, N)]


def _gates(a, H):
    """(..., 4H) -> (4, ..., H): gate k's columns as block k (a view when a is contiguous)."""
    n = a.ndim
    return a.reshape(a.shape[:-1] + (4, H)).transpose((n - 1,) + tuple(range(n - 1)) + (n,))


class _Work:
    """Internal buffers from the pool (_pool.py), given back when dropped (with the cache that
    holds them, or at the end of backward)."""

    __slots__ = ("key", "bufs")

    def __init__(self, xp, kind, T, N, H, dtype):
        self.key = ("numpy-engine", xp.__name__, kind, T, N, H, dtype.str)
        self.bufs = _pool.take(self.key)
        if self.bufs is None:
            shapes = {"forward": [(4, T, N, H), (T + 1, N, H), (T, N, H), (N, 4 * H), (N, H)],
                      "backward": [(4, T, N, H), (T, N, H), (N, H), (N, H), (N, H), (4, N, H)]}
            self.bufs = tuple(xp.empty(s, dtype) for s in shapes[kind])

    def __del__(self):
        try:
            _pool.give(self.key, self.bufs)
        except Exception:  # interpreter shutdown
            pass


def _input_gates(xs, Wxs, bs, A):
    """Fill A (4, T, N, H) with the scaled x_t Wx + b of every step, gate-major. Returns the
    inputs as backward needs them: the ids, or xs time-major (T N, D)."""
    xp = get_array_module(A)
    _, T, N, H = A.shape
    if xs.ndim == 2 and xs.dtype.kind in "iu":  # one-hot inputs: gather rows of Wx
        if xs.size and (int(xs.min()) < 0 or int(xs.max()) >= Wxs.shape[0]):
            raise ValueError(f"input id outside [0, {Wxs.shape[0]})")
        table = Wxs if bs.ndim == 2 else Wxs + bs  # the same sums as adding b after the gather
        table = xp.ascontiguousarray(_gates(table, H))
        if xp is np:
            np.take(table, xs.T, axis=1, out=A, mode="clip")  # ids checked above
        else:
            A[...] = table[:, xs.T]
        X = xs
    else:  # the same product as step's, then copied gate-major
        X = xs.transpose(1, 0, 2).reshape(T * N, xs.shape[2]).astype(A.dtype, copy=False)
        P = X @ Wxs
        if bs.ndim == 1:
            P += bs
        A[...] = _gates(P.reshape(T, N, 4 * H), H)
    if bs.ndim == 2:
        A += xp.ascontiguousarray(_gates(bs, H))[:, None]
    return X


def forward(xs, Wx, Wh, b, h0, c0):
    with backend.single_blas_thread():
        return _forward(xs, Wx, Wh, b, h0, c0)


def _forward(xs, Wx, Wh, b, h0, c0):
    xp = get_array_module(Wx)
    dtype, H = Wx.dtype, Wh.shape[0]
    N, T = xs.shape[:2]
    scale = _gate_scale(H, dtype, xp)
    # pre-activations come out already scaled for the gates' single exp: a * scale = x (Wx scale) + ...
    Whs = Wh * scale
    work = _Work(xp, "forward", T, N, H, dtype)
    A, C, TC, hWh, gi = work.bufs  # A[k, t]: gate k of step t (contiguous blocks)
    X = _input_gates(xs, Wx * scale, b * scale, A)
    Hb = xp.empty((T + 1, N, H), dtype)  # h_0 .. h_T; hs is a view of it, never pooled
    Hb[0], C[0] = h0, c0
    h0_zero = not h0.any()  # a zero initial state adds nothing to a_0 nor to dWh
    _in_pieces([functools.partial(_forward_rows, A, C, TC, Hb, hWh, gi, Whs, h0_zero, rows)
                for rows in _row_pieces(N, xp)], xp)
    cache = (X, Wx, Wh, Hb, work, h0_zero, b.ndim == 2)
    return Hb[1:].transpose(1, 0, 2), Hb[T].copy(), C[T].copy(), cache


def _forward_rows(A, C, TC, Hb, hWh, gi, Whs, h0_zero, rows):
    """forward's recurrence over every step for a piece of the rows (each step's views taken
    first, outputs positional: the loop holds the GIL as little as it can)."""
    xp = get_array_module(A)
    H = Hb.shape[2]
    num = _numerators(H, A.dtype, xp, True)
    hWh, gi = hWh[rows], gi[rows]
    hWh_gates = _gates(hWh, H)
    A, C, TC, Hb = A[:, :, rows], C[:, rows], TC[:, rows], Hb[:, rows]
    steps = [(A[:, t], *A[:, t], C[t], C[t + 1], TC[t], Hb[t], Hb[t + 1])
             for t in range(A.shape[1])]
    with np.errstate(over="ignore"):
        for t, (a, f, g, i, o, c_prev, c, tc, h_prev, h) in enumerate(steps):
            if t > 0 or not h0_zero:
                _matmul_rows(h_prev, Whs, hWh)
                xp.add(a, hWh_gates, a)
            _activate(a, g, num)
            xp.multiply(f, c_prev, c)
            xp.multiply(g, i, gi)
            xp.add(c, gi, c)
            xp.tanh(c, tc)
            xp.multiply(o, tc, h)


def _local_factors(A, C, TC, Q, OK):
    """Per step, dA_t = [ds, ds, ds, dh] * Q_t gate by gate (ds = dL/dc_t in full, dh = dL/dh_t);
    Q holds the factors that do not depend on them, for all steps at once. Also OK = o (1 -
    tanh^2 c), so that ds = dh OK + dc_{t+1} f_{t+1}."""
    xp = get_array_module(A)
    T = TC.shape[0]
    xp.multiply(A, A, out=Q)
    xp.subtract(A[0], Q[0], out=Q[0])      # y (1 - y) for the sigmoid gates
    xp.subtract(A[2:], Q[2:], out=Q[2:])
    xp.subtract(1, Q[1], out=Q[1])         # 1 - y^2 for tanh g
    Q[0] *= C[:T]                          # df = ds c_{t-1} f (1 - f)
    Q[1] *= A[2]                           # dg = ds i (1 - g^2)
    Q[2] *= A[1]                           # di = ds g i (1 - i)
    Q[3] *= TC                             # do = dh tanh(c) o (1 - o)
    xp.multiply(TC, TC, out=OK)
    xp.subtract(1, OK, out=OK)
    OK *= A[3]


def _set_gates(g, parts):
    """g (..., 4H) = parts (4, ..., H) (gate k's block into g's columns of gate k)."""
    if g.flags.c_contiguous:
        _gates(g, parts.shape[-1])[...] = parts  # through a view of g
    else:
        n = parts.ndim
        g[...] = parts.transpose(tuple(range(1, n - 1)) + (0, n - 1)).reshape(g.shape)


def backward(dhs, cache, grads, need_dh0=True):
    with backend.single_blas_thread():
        return _backward(dhs, cache, grads, need_dh0)


def _backward(dhs, cache, grads, need_dh0):
    X, Wx, Wh, Hb, work, h0_zero, row_bias = cache
    A, C, TC = work.bufs[:3]
    xp = get_array_module(A)
    _, T, N, H = A.shape
    dhs = dhs.astype(A.dtype, copy=False)
    scratch = _Work(xp, "backward", T, N, H, A.dtype)
    dA, OK = scratch.bufs[:2]
    WhT = _gates(Wh, H).transpose(0, 2, 1)  # (4, H, H): gate k's block of Wh, transposed
    dh_next = xp.zeros((N, H), A.dtype)  # (not pooled: dh0 goes to the caller)
    _in_pieces([functools.partial(_backward_rows, dhs, A, C, TC, WhT, scratch.bufs, dh_next,
                                  need_dh0, rows) for rows in _row_pieces(N, xp)], xp)
    dxs = _weight_grads(X, Wx, Hb, dA, h0_zero, row_bias, grads)
    return dxs, (dh_next if need_dh0 else None)


def _backward_rows(dhs, A, C, TC, WhT, bufs, dh_next, need_dh0, rows):
    """backward's recurrence over every step for a piece of the rows: their dA (4, T, rows, H)
    and their dh_0 into dh_next."""
    xp = get_array_module(A)
    T = A.shape[1]
    dA, OK, dh, ds, dc, parts = (a[..., rows, :] for a in bufs)
    A, dh_next = A[:, :, rows], dh_next[rows]
    _local_factors(A, C[:, rows], TC[:, rows], dA, OK)
    steps = [(dhs[rows, t], OK[t], dA[:, t], dA[:3, t], dA[3, t], A[0, t]) for t in range(T)]
    for t in reversed(range(T)):
        dh_t, ok, da, da_s, da_h, f = steps[t]
        xp.add(dh_t, dh_next, dh)
        xp.multiply(dh, ok, ds)
        if t < T - 1:
            xp.add(ds, dc, ds)
        xp.multiply(da_s, ds, da_s)
        xp.multiply(da_h, dh, da_h)
        if t > 0:
            xp.multiply(ds, f, dc)
        if t > 0 or need_dh0:  # dh_{t-1} = sum over gates of da_k Wh_k^T
            xp.matmul(da, WhT, parts)
            parts.sum(axis=0, out=dh_next)


def _weight_grads(X, Wx, Hb, dA, h0_zero, row_bias, grads):
    """dWx, dWh, db from all steps' dA (4, T, N, H), each as one product per gate; returns dxs
    (None for ids). Three independent pieces: dWh's first two gates, its last two, the rest."""
    xp = get_array_module(dA)
    dWx, dWh, db = grads
    _, T, N, H = dA.shape
    dA3 = dA.reshape(4, T * N, H)
    one_hot = X.ndim == 2 and X.dtype.kind in "iu"
    s = 1 if h0_zero else 0  # dWh = sum_t h_{t-1}^T dA_t (h_0's share is 0 when h_0 is)
    M = max(T - s, 0) * N
    dWh_gates = (xp.empty if M else xp.zeros)((4, H, H), dA.dtype)

    def dwh(k):  # gates k, k + 1
        return lambda: xp.matmul(Hb[s:T].reshape(M, H).T, dA[k:k + 2, s:].reshape(2, M, H),
                                 out=dWh_gates[k:k + 2])

    def rest():
        if one_hot:  # dWx = onehot^T dA, as products with the (V, T N) indicator matrix
            onehot_T = (xp.arange(Wx.shape[0])[:, None] == X.T.reshape(1, T * N)).astype(dA.dtype)
            dWx_gates = xp.matmul(onehot_T, dA3)
            _set_gates(dWx, dWx_gates)
            if not row_bias:  # one id per position: db, the sum over positions, is dWx's column sum
                _set_gates(db, dWx_gates.sum(axis=1))
                return
        else:
            _set_gates(dWx, xp.matmul(X.T, dA3))
        _set_gates(db, dA.sum(axis=1) if row_bias else dA3.sum(axis=1))

    _in_pieces([dwh(0), dwh(2), rest] if T > s else [rest], xp)
    _set_gates(dWh, dWh_gates)
    if one_hot:
        return None
    dX = xp.matmul(dA3, _gates(Wx, H).transpose(0, 2, 1)).sum(axis=0)  # sum over gates
    return dX.reshape(T, N, Wx.shape[0]).transpose(1, 0, 2)


_helpers = (0, None)  # (count, executor): threads, started on first use, that take pieces


def _in_pieces(pieces, xp):
    """Run every piece (a function writing its own outputs) on up to backend.config.threads
    threads. The caller runs the first, then each one no helper thread has begun (rather than
    wait for a helper the OS has descheduled); the pieces and their results are the same with one
    thread, several, or under load."""
    global _helpers
    n = min(len(pieces), backend.config.threads) - 1
    if n < 1 or xp is not np:
        for run in pieces:
            run()
        return
    if _helpers[0] < n:
        _helpers = (n, ThreadPoolExecutor(n, thread_name_prefix="fastseq-numpy"))

    def helped(run):
        with backend.single_blas_thread():
            run()

    futures = [_helpers[1].submit(helped, run) for run in pieces[1:]]
    pieces[0]()
    begun = []
    for f, run in zip(futures, pieces[1:]):  # the caller takes what no helper has begun
        if f.cancel():
            run()
        else:
            begun.append(f)
    for f in begun:
        f.result()


def step(x, Wx, Wh, b, h, c):
    """One time step from state (h, c) (N, H) on input x (N, D): the new (h, c). Nothing is kept
    for a backward pass. The same operations, in the same order, as one step of forward (with
    the products on as many BLAS threads: OpenBLAS's bits depend on that too)."""
    return stepper(Wx, Wh, b)(x, h, c)


def stepper(Wx, Wh, b):
    """step() for a run of steps over these weights: they are scaled for the gates' single exp
    once, not at every step."""
    xp = get_array_module(Wx)
    H = Wh.shape[0]
    scale = _gate_scale(H, Wx.dtype, xp)
    Wxs, Whs, bs = Wx * scale, Wh * scale, b * scale
    num = _numerators(H, Wx.dtype, xp, False)

    def run(x, h, c):
        with backend.single_blas_thread():
            a = x @ Wxs
            a += bs
            a += _matmul_rows(h.astype(Wx.dtype, copy=False), Whs,
                              xp.empty((x.shape[0], 4 * H), Wx.dtype))
            with np.errstate(over="ignore"):
                _activate(a, a[:, H:2 * H], num)
            c_next = a[:, :H] * c
            c_next += a[:, H:2 * H] * a[:, 2 * H:3 * H]
            h_next = xp.tanh(c_next)
            h_next *= a[:, 3 * H:]
            return h_next, c_next
    return run


# rows per block in final_state: a block's step arrays stay in cache (a multiple of
# PRODUCT_ROWS, so that blocks cut the products where forward does)
BLOCK_ROWS = 8 * PRODUCT_ROWS


def _by_blocks(N, xp, run):
    """run(rows) for every block of BLOCK_ROWS of the N rows. Blocks are independent: on the
    host they go to the threads of _in_pieces (NumPy releases the GIL in its loops), each with a
    single-threaded BLAS, so a block's bits do not depend on the thread count."""
    def work(rows):
        with backend.single_blas_thread():
            run(rows)

    _in_pieces([functools.partial(work, slice(s, s + BLOCK_ROWS))
                for s in range(0, N, BLOCK_ROWS)], xp)


def _block(a, rows):
    """a's share of a block of rows: per-row arrays (N, ...) are sliced, shared ones kept."""
    return a[rows] if a.ndim == 2 else a


def _check_range(ids, V, what="input id"):
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"{what} outside [0, {V})")


def final_state(xs, Wx, Wh, b, h0, c0, start=None, out=None):
    """forward's (h_T, c_T) without the sequence hs or a cache (inference), block by block.
    out=(h, c): written there and returned; they may be h0 and c0 themselves when start is None
    (each block reads its rows before it writes them)."""
    xp = get_array_module(Wx)
    if xs.ndim == 2:
        _check_range(xs, Wx.shape[0])
    if start is not None:
        _check_range(start, h0.shape[0], "start row")
        h0, c0 = h0[start], c0[start]
    if out is None:
        hT, cT = xp.empty(h0.shape, Wx.dtype), xp.empty(c0.shape, Wx.dtype)
    else:
        hT, cT = out
        if hT.shape != (xs.shape[0], Wh.shape[0]) or cT.shape != hT.shape:
            raise ValueError(f"final_state: out arrays of shapes {hT.shape} and {cT.shape}, "
                             f"expected {(xs.shape[0], Wh.shape[0])}")

    def run(r):
        cell = _Cell(Wx, Wh, _block(b, r), h0[r], c0[r])
        for t in range(xs.shape[1]):
            cell.step(xs[r, t])
        hT[r], cT[r] = cell.h, cell.c

    _by_blocks(xs.shape[0], xp, run)
    return hT, cT


def into(out, h, c):
    """out = (h', c') given to final_state, holding h and c (unless they are those arrays)."""
    for dst, src in zip(out, (h, c)):
        if dst is not src:
            dst[...] = src
    return out


class _Cell:
    """The state (h, c) of a block of rows, advanced in place one step at a time with forward's
    arithmetic (gate-major, as there), in buffers allocated once (inference: nothing is kept)."""

    def __init__(self, Wx, Wh, b, h, c):
        xp = self.xp = get_array_module(Wx)
        H = self.H = Wh.shape[0]
        N = h.shape[0]
        scale = _gate_scale(H, Wx.dtype, xp)
        self.Wx, self.Wh = Wx * scale, Wh * scale
        self.table = xp.ascontiguousarray(_gates(self.Wx, H))  # (4, D, H): one-hot inputs
        bs = xp.ascontiguousarray(_gates(b * scale, H))        # (4, N, H) or (4, H)
        self.b = bs if b.ndim == 2 else bs[:, None]
        self.h, self.c = h.astype(Wx.dtype), c.astype(Wx.dtype)  # copies
        self.a, self.hWh = xp.empty((4, N, H), Wx.dtype), xp.empty((N, 4 * H), Wx.dtype)
        self.gi = xp.empty((N, H), Wx.dtype)
        self.num = _numerators(H, Wx.dtype, xp, True)
        self.h_zero = not h.any()  # as in forward: a zero state contributes no h Wh

    def step(self, x):
        """x: (N, D) inputs or (N,) one-hot ids. Returns h, updated in place."""
        xp, H, a, h, c = self.xp, self.H, self.a, self.h, self.c
        if x.ndim == 2:
            a[...] = _gates(x @ self.Wx, H)
        elif xp is np:
            np.take(self.table, x, axis=1, out=a, mode="clip")  # x is checked: no buffering
        else:
            a[...] = self.table[:, x]
        a += self.b
        if not self.h_zero:
            _matmul_rows(h, self.Wh, self.hWh)
            a += _gates(self.hWh, H)
        self.h_zero = False
        with np.errstate(over="ignore"):
            _activate(a, a[1], self.num)
        f, g, i, o = a
        xp.multiply(f, c, out=c)
        xp.multiply(g, i, out=self.gi)
        c += self.gi
        xp.tanh(c, out=h)
        h *= o
        return h
