"""Reference LSTM engine (NumPy, or CuPy through the same array calls).

Gate layout is the textbook's: the 4H pre-activation columns are blocked [f | g | i | o].

    a_t = x_t Wx + h_{t-1} Wh + b            (x_t Wx for all t in one product)
    f, i, o = sigmoid(a_f, a_i, a_o);  g = tanh(a_g)
    c_t = f * c_{t-1} + g * i;          h_t = o * tanh(c_t)

Backward keeps the activated gates (as the textbook does) in the buffer that held the
pre-activations, plus c_t and tanh(c_t); nothing is recomputed. Buffers are time-major so each
step's slice is contiguous.

Interface shared by every engine (numpy, cython, cupy):
    forward(xs, Wx, Wh, b, h0, c0) -> hs, hT, cT, cache       xs (N, T, D), hs (N, T, H)
    backward(dhs, cache, grads, need_dh0=True) -> dxs, dh0     grads = [dWx, dWh, db], written in place
    step(x, Wx, Wh, b, h, c) -> h, c                           one step, x (N, D), no cache
                                                               (generation and decoding)
    final_state(xs, Wx, Wh, b, h0, c0) -> hT, cT               forward's last state alone
                                                               (inference: an encoder)
    greedy(ids, Wx, Wh, b, h, c, Wout, bout, steps) -> (N, steps) int64
        greedy decoding from (h, c): step t's input is onehot(id_t) (Wx is the one-hot table,
        see below), with id_0 = ids (N,) and id_{t+1} = argmax(h_{t+1} Wout + bout), the
        first index on ties; bout is (V,) or (N, V). Returns id_1 .. id_steps.

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
from ..backend import get_array_module
TAKES_IDS = True  # xs may be integer ids standing for one-hot rows (see forward)


def _gate_scale(H, dtype, xp):
    """Column scale so one tanh over all 4H columns serves every gate:
    sigmoid(x) = 0.5 tanh(0.5 x) + 0.5 for f, i, o; tanh(x) for g."""
    scale = xp.full(4 * H, 0.5, dtype=dtype)
    scale[H:2 * H] = 1.0
    return scale


def forward(xs, Wx, Wh, b, h0, c0):
    xp = get_array_module(xs)
    H = Wh.shape[0]
    scale = _gate_scale(H, Wx.dtype, xp)
    # pre-activations come out already scaled for the single tanh: a * scale = x (Wx scale) + ...
    Whs = Wh * scale
    if xs.ndim == 2 and xs.dtype.kind in "iu":  # one-hot inputs: gather rows of Wx
        N, T = xs.shape
        if xs.size and (int(xs.min()) < 0 or int(xs.max()) >= Wx.shape[0]):
            raise ValueError(f"input id outside [0, {Wx.shape[0]})")
        A = (Wx * scale)[xs.T]                                                           # (T, N, 4H)
    else:
        N, T, D = xs.shape
        A = (xs.transpose(1, 0, 2).reshape(T * N, D) @ (Wx * scale)).reshape(T, N, 4 * H)
    A += b * scale
    hs = xp.empty((T, N, H), dtype=A.dtype)
    cs = xp.empty((T, N, H), dtype=A.dtype)
    tcs = xp.empty((T, N, H), dtype=A.dtype)
    hWh = xp.empty((N, 4 * H), dtype=A.dtype)
    gi = xp.empty((N, H), dtype=A.dtype)
    h, c = h0, c0
    for t in range(T):
        a = A[t]
        if t > 0 or h.any():  # a zero initial state contributes nothing
            xp.matmul(h, Whs, out=hWh)
            a += hWh
        xp.tanh(a, out=a)
        for sig in (a[:, :H], a[:, 2 * H:]):   # sigmoid gates f and (i, o): 0.5 tanh + 0.5
            sig *= 0.5
            sig += 0.5
        f, g, i, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        c = xp.multiply(f, c, out=cs[t])
        xp.multiply(g, i, out=gi)
        c += gi
        xp.tanh(c, out=tcs[t])
        h = xp.multiply(o, tcs[t], out=hs[t])
    cache = (xs, Wx, Wh, h0, c0, A, hs, cs, tcs, b.ndim == 2)
    return hs.transpose(1, 0, 2), h.copy(), c.copy(), cache


def backward(dhs, cache, grads, need_dh0=True):
    xs, Wx, Wh, h0, c0, A, hs, cs, tcs, row_bias = cache
    xp = get_array_module(dhs)
    T, N, H = hs.shape
    # local derivatives for all steps at once: y(1-y) for sigmoid gates, 1-y^2 for tanh g
    dact = A * A
    dact *= -1
    dact[..., :H] += A[..., :H]
    dact[..., H:2 * H] += 1
    dact[..., 2 * H:] += A[..., 2 * H:]
    ok = tcs * tcs                      # o * (1 - tanh(c)^2)
    xp.subtract(1, ok, out=ok)
    ok *= A[..., 3 * H:]
    dhs_t = xp.ascontiguousarray(dhs.transpose(1, 0, 2))  # (T, N, H)
    dA = xp.empty_like(A)
    dh_next = xp.zeros((N, H), dtype=A.dtype)
    dc_next = xp.zeros((N, H), dtype=A.dtype)
    dh = xp.empty((N, H), dtype=A.dtype)
    ds = xp.empty((N, H), dtype=A.dtype)
    for t in reversed(range(T)):
        a, da = A[t], dA[t]
        c_prev = cs[t - 1] if t > 0 else c0
        xp.add(dhs_t[t], dh_next, out=dh)
        xp.multiply(dh, ok[t], out=ds)
        ds += dc_next                                   # ds = dc + dh o (1 - tanh^2 c)
        xp.multiply(ds, c_prev, out=da[:, :H])          # df
        xp.multiply(ds, a[:, 2 * H:3 * H], out=da[:, H:2 * H])   # dg = ds i
        xp.multiply(ds, a[:, H:2 * H], out=da[:, 2 * H:3 * H])   # di = ds g
        xp.multiply(dh, tcs[t], out=da[:, 3 * H:])      # do = dh tanh c
        da *= dact[t]
        dc_next = ds * a[:, :H]
        if t > 0 or need_dh0:
            dh_next = da @ Wh.T
    dWx, dWh, db = grads
    dA2 = dA.reshape(T * N, 4 * H)
    one_hot = xs.ndim == 2
    if one_hot:  # dWx = onehot^T dA, as one product with the (V, T N) indicator matrix
        V = Wx.shape[0]
        dWx[...] = (xp.arange(V)[:, None] == xs.T.reshape(1, T * N)).astype(dA.dtype) @ dA2
    else:
        dWx[...] = xs.transpose(1, 0, 2).reshape(T * N, xs.shape[2]).T @ dA2
    dWh[...] = h0.T @ dA[0]
    if T > 1:
        dWh += hs[:-1].reshape((T - 1) * N, H).T @ dA[1:].reshape((T - 1) * N, 4 * H)
    db[...] = dA.sum(axis=0) if row_bias else dA2.sum(axis=0)
    dxs = None if one_hot else (dA2 @ Wx.T).reshape(T, N, Wx.shape[0]).transpose(1, 0, 2)
    return dxs, (dh_next if need_dh0 else None)


def step(x, Wx, Wh, b, h, c):
    """One time step from state (h, c) (N, H) on input x (N, D): the new (h, c). Nothing is kept
    for a backward pass. The same operations, in the same order, as one step of forward."""
    xp = get_array_module(x)
    H = Wh.shape[0]
    scale = _gate_scale(H, Wx.dtype, xp)
    a = x @ (Wx * scale)
    a += b * scale
    a += h @ (Wh * scale)
    xp.tanh(a, out=a)
    for sig in (a[:, :H], a[:, 2 * H:]):
        sig *= 0.5
        sig += 0.5
    c = a[:, :H] * c
    c += a[:, H:2 * H] * a[:, 2 * H:3 * H]
    h = xp.tanh(c)
    h *= a[:, 3 * H:]
    return h, c


def final_state(xs, Wx, Wh, b, h0, c0):
    """forward's (h_T, c_T) without the sequence hs or a cache (inference)."""
    _, hT, cT, _ = forward(xs, Wx, Wh, b, h0, c0)
    return hT, cT


def greedy(ids, Wx, Wh, b, h, c, Wout, bout, steps):
    """Greedy decoding (see the protocol above): forward's arithmetic with ids, one step at a
    time, into buffers allocated once."""
    xp = get_array_module(Wx)
    N, H = h.shape[0], Wh.shape[0]
    if Wout.shape[1] > Wx.shape[0]:
        raise ValueError(f"{Wout.shape[1]} output symbols cannot all be fed back into "
                         f"{Wx.shape[0]} inputs")
    scale = _gate_scale(H, Wx.dtype, xp)
    Wxs, bs, Whs = Wx * scale, b * scale, Wh * scale
    a, hWh = xp.empty((N, 4 * H), Wx.dtype), xp.empty((N, 4 * H), Wx.dtype)
    h, c, gi = h.astype(Wx.dtype), c.astype(Wx.dtype), xp.empty((N, H), Wx.dtype)
    scores = xp.empty((N, Wout.shape[1]), Wx.dtype)
    out = xp.empty((N, steps), dtype=xp.int64)
    for t in range(steps):
        xp.take(Wxs, ids, axis=0, out=a)
        a += bs
        xp.matmul(h, Whs, out=hWh)
        a += hWh
        xp.tanh(a, out=a)
        for sig in (a[:, :H], a[:, 2 * H:]):
            sig *= 0.5
            sig += 0.5
        xp.multiply(a[:, :H], c, out=c)
        xp.multiply(a[:, H:2 * H], a[:, 2 * H:3 * H], out=gi)
        c += gi
        xp.tanh(c, out=h)
        h *= a[:, 3 * H:]
        xp.matmul(h, Wout, out=scores)
        scores += bout
        ids = out[:, t] = scores.argmax(axis=1)
    return out
