"""Reference LSTM engine (NumPy, or CuPy through the same array calls).

Gate layout is the textbook's: the 4H pre-activation columns are blocked [f | g | i | o].

    a_t = x_t Wx + h_{t-1} Wh + b            (x_t Wx for all t in one product)
    f, i, o = sigmoid(a_f, a_i, a_o);  g = tanh(a_g)
    c_t = f * c_{t-1} + g * i;          h_t = o * tanh(c_t)

Backward keeps the activated gates (as the textbook does) in the buffer that held the
pre-activations, plus c_t and tanh(c_t); nothing is recomputed.

Interface shared by every engine (numpy, cython, cupy):
    forward(xs, Wx, Wh, b, h0, c0) -> hs, hT, cT, cache       xs (N, T, D), hs (N, T, H)
    backward(dhs, cache, grads)    -> dxs, dh0                 grads = [dWx, dWh, db], written in place
"""
from ..backend import get_array_module


def _sigmoid(x, xp):
    # sigmoid(x) = (1 + tanh(x/2)) / 2: no overflow warnings, one transcendental
    x *= 0.5
    xp.tanh(x, out=x)
    x += 1.0
    x *= 0.5
    return x


def forward(xs, Wx, Wh, b, h0, c0):
    xp = get_array_module(xs)
    N, T, D = xs.shape
    H = Wh.shape[0]
    # time-major buffers: per-step slices are contiguous
    A = (xs.transpose(1, 0, 2).reshape(T * N, D) @ Wx).reshape(T, N, 4 * H)  # (T, N, 4H)
    A += b
    hs = xp.empty((T, N, H), dtype=A.dtype)
    cs = xp.empty((T, N, H), dtype=A.dtype)
    tcs = xp.empty((T, N, H), dtype=A.dtype)
    h, c = h0, c0
    for t in range(T):
        a = A[t]
        a += h @ Wh
        _sigmoid(a[:, :H], xp)
        xp.tanh(a[:, H:2 * H], out=a[:, H:2 * H])
        _sigmoid(a[:, 2 * H:], xp)
        f, g, i, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        c = xp.multiply(f, c, out=cs[t])
        c += g * i
        xp.tanh(c, out=tcs[t])
        h = xp.multiply(o, tcs[t], out=hs[t])
    cache = (xs, Wx, Wh, h0, c0, A, hs, cs, tcs)
    return hs.transpose(1, 0, 2), h.copy(), c.copy(), cache


def backward(dhs, cache, grads):
    xs, Wx, Wh, h0, c0, A, hs, cs, tcs = cache
    xp = get_array_module(dhs)
    T, N, H = hs.shape
    D = xs.shape[2]
    dA = xp.empty_like(A)
    dh_next = xp.zeros((N, H), dtype=A.dtype)
    dc_next = xp.zeros((N, H), dtype=A.dtype)
    for t in reversed(range(T)):
        a = A[t]
        f, g, i, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        tc = tcs[t]
        c_prev = cs[t - 1] if t > 0 else c0
        dh = dhs[:, t] + dh_next
        ds = dc_next + dh * o * (1 - tc * tc)
        da = dA[t]
        da[:, :H] = ds * c_prev * f * (1 - f)
        da[:, H:2 * H] = ds * i * (1 - g * g)
        da[:, 2 * H:3 * H] = ds * g * i * (1 - i)
        da[:, 3 * H:] = dh * tc * o * (1 - o)
        dc_next = ds * f
        dh_next = da @ Wh.T
    dWx, dWh, db = grads
    dA2 = dA.reshape(T * N, 4 * H)
    x2 = xs.transpose(1, 0, 2).reshape(T * N, D)
    dWx[...] = x2.T @ dA2
    h_prev = xp.concatenate([h0[None], hs[:-1]], axis=0).reshape(T * N, H)
    dWh[...] = h_prev.T @ dA2
    db[...] = dA2.sum(axis=0)
    dxs = (dA2 @ Wx.T).reshape(T, N, D).transpose(1, 0, 2)
    return dxs, dh_next
