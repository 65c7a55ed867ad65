"""The textbook's LSTM written plainly, in float64: the oracle every engine is tested against.

One time step at a time, gates in the textbook's blocked layout [f | g | i | o]:

    a = x Wx + h_prev Wh + b               (N, 4H)
    f, i, o = sigmoid(a_f, a_i, a_o);  g = tanh(a_g)
    c = f * c_prev + g * i;            h = o * tanh(c)

b is (4H,) or one bias per row (N, 4H); db then has b's shape. Inputs of any float dtype are
computed in float64; nothing here is tuned for speed.
"""
import numpy as np


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # 1 / (1 + exp(-x)), without overflow


def step(x, Wx, Wh, b, h_prev, c_prev):
    """One step: x (N, D), h_prev and c_prev (N, H) -> h, c and what backward needs."""
    x, Wx, Wh, b, h_prev, c_prev = (np.asarray(a, np.float64) for a in
                                    (x, Wx, Wh, b, h_prev, c_prev))
    H = Wh.shape[0]
    a = x @ Wx + h_prev @ Wh + b
    f, g, i, o = sigmoid(a[:, :H]), np.tanh(a[:, H:2 * H]), sigmoid(a[:, 2 * H:3 * H]), \
        sigmoid(a[:, 3 * H:])
    c = f * c_prev + g * i
    h = o * np.tanh(c)
    return h, c, (x, h_prev, c_prev, f, g, i, o, c)


def forward(xs, Wx, Wh, b, h0, c0):
    """xs (N, T, D) -> hs (N, T, H), h_T, c_T and the per-step caches."""
    T = xs.shape[1]
    h, c, caches, hs = h0, c0, [], []
    for t in range(T):
        h, c, cache = step(xs[:, t], Wx, Wh, b, h, c)
        hs.append(h)
        caches.append(cache)
    hs = np.stack(hs, axis=1) if T else np.zeros(xs.shape[:2] + (Wh.shape[0],))
    return hs, np.asarray(h, np.float64), np.asarray(c, np.float64), (caches, Wx, Wh, b)


def backward(dhs, caches):
    """Backpropagation through time from dhs (N, T, H) (no gradient into c_T):
    -> dxs (N, T, D), dh0 (N, H), dWx, dWh, db (db of b's shape)."""
    caches, Wx, Wh, b = caches
    Wx, Wh, b = (np.asarray(a, np.float64) for a in (Wx, Wh, b))
    dhs = np.asarray(dhs, np.float64)
    N, T, H = dhs.shape
    dWx, dWh = np.zeros_like(Wx), np.zeros_like(Wh)
    dB = np.zeros((N, 4 * H))
    dxs = np.zeros((N, T, Wx.shape[0]))
    dh, dc = np.zeros((N, H)), np.zeros((N, H))
    for t in reversed(range(T)):
        x, h_prev, c_prev, f, g, i, o, c = caches[t]
        dh = dh + dhs[:, t]
        tanh_c = np.tanh(c)
        ds = dc + dh * o * (1 - tanh_c ** 2)
        dc = ds * f
        da = np.hstack([ds * c_prev * f * (1 - f),     # f
                        ds * i * (1 - g ** 2),         # g
                        ds * g * i * (1 - i),          # i
                        dh * tanh_c * o * (1 - o)])    # o
        dWx += x.T @ da
        dWh += h_prev.T @ da
        dB += da
        dxs[:, t] = da @ Wx.T
        dh = da @ Wh.T
    db = dB if b.ndim == 2 else dB.sum(axis=0)
    return dxs, dh, dWx, dWh, db
