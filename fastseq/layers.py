"""Time layers with parameters or state (textbook protocol: params, grads, forward, backward).

Arrays are batch-major: xs (N, T, ...). Grads are preallocated and written in place, so a model's
concatenated ``grads`` list stays valid across steps.
"""
import numpy as np

from . import backend, ops
from .ops import _pool
from .backend import get_array_module
from .functions import exp_rows, matmul, softmax_cross_entropy
from .ops._numpy_math import KEY_BITS


class TimeEmbedding:
    """ids (N, T) -> vectors (N, T, D). params = [W (V, D)]."""

    param_names = ("W",)

    def __init__(self, W):
        self.params = [W]
        self.grads = [get_array_module(W).zeros_like(W)]
        self.idx = None

    def forward(self, idx):
        W, = self.params
        xp = get_array_module(W)
        idx = xp.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"TimeEmbedding expects integer ids, got dtype {idx.dtype}")
        out, self.idx = ops.engine_for(W).embed_gather(W, idx)
        return out

    def backward(self, dout, accumulate=False):
        """Scatter-add dout into the rows of dW (zeroed first unless ``accumulate``: then the rows
        are added to what dW already holds, e.g. a tied output layer's gradient)."""
        dW, = self.grads
        ops.engine_for(dW).embed_scatter(dW, self.idx, dout, accumulate)
        return None


class TimeLSTM:
    """LSTM over a whole sequence. params = [Wx (D, 4H), Wh (H, 4H), b (4H,)], gates [f|g|i|o].
    The arithmetic is the engine's (fastseq.ops.engine_for); step(x) advances one time step for
    generation and decoding.

    stateful=True carries (h, c) from one forward to the next (truncated BPTT); set_state(h, c)
    starts from a given state; after backward, ``dh`` is the gradient of the initial h.
    need_dh = False (e.g. the Encoder, which starts from a zero state) skips computing it (one
    N x 4H x H product per backward): ``dh`` is then None after backward.

    forward(xs, context=c) with c (N, K): an input held constant over the sequence (the
    PeekyDecoder's encoder state). The step input is [c, x_t]: the first K rows of Wx multiply c,
    the other rows multiply x_t. Since c Wx[:K] is the same at every step it is computed once,
    and enters the engines as one bias per row, b + c Wx[:K]; after backward, ``dcontext`` is the
    gradient of c. This is the same as concatenating [c, x_t] at every step, with T times fewer
    products for that part. context_proj, if given, is c Wx[:K] already computed (decoding one
    step at a time with the same c and weights), and saves that product.

    forward(ids, embed=layer) with a TimeEmbedding ``layer`` (table E, V x D) and its ids (N, T):
    the same as forward(layer.forward(ids)), but x_t Wx = E[ids_t] Wx is read from the table
    E Wx (V x 4H), computed once per call, so the per-step input products become row gathers and
    backward's dx and dWx products a scatter-add (dWx = E^T dP, dE = dP Wx^T with P = E Wx).
    Worth it when V is small next to N T (fuse_embedding says when). backward then writes the
    embedding's gradient itself and returns None.
    """

    param_names = ("Wx", "Wh", "b")

    def __init__(self, Wx, Wh, b, stateful=False):
        self.params = [Wx, Wh, b]
        xp = get_array_module(Wx)
        self.grads = [xp.zeros_like(Wx), xp.zeros_like(Wh), xp.zeros_like(b)]
        self.stateful = stateful
        self.need_dh = True
        self.h = self.c = self.dh = None
        self.dcontext = None
        self._context = None
        self._embed = None
        self._cache = None
        self._kernel = None

    def fuse_embedding(self, embed, ids):
        """Whether forward(ids, embed=embed) pays here: a small vocabulary next to the batch's
        N T positions, and an engine that takes ids (the NumPy and Cython ones)."""
        V = embed.params[0].shape[0]
        return (ids.ndim == 2 and 4 * V <= ids.size
                and ops.engine_for(self.params[0]).TAKES_IDS)

    def forward(self, xs, context=None, embed=None, context_proj=None):
        Wx, Wh, b = self.params
        K = 0 if context is None else context.shape[-1]
        self._embed = embed
        if embed is not None:  # xs are ids into embed's table: the step input is E[ids_t]
            E = embed.params[0]
            if xs.ndim != 2 or xs.dtype.kind not in "iu":
                raise ValueError(f"with embed=, TimeLSTM expects integer ids (N, T), got "
                                 f"{xs.dtype} {xs.shape}")
            if E.shape[1] + K != Wx.shape[0]:
                raise ValueError(f"embedding width {E.shape[1]} does not match the LSTM input "
                                 f"width {Wx.shape[0] - K}")
            # int64 and contiguous for the engines, which check the range as they gather
            xs = get_array_module(E).ascontiguousarray(xs, dtype="int64")
        elif xs.ndim != 3 or xs.shape[2] + K != Wx.shape[0]:
            raise ValueError(f"TimeLSTM expects input of shape (N, T, {Wx.shape[0] - K}), "
                             f"got {xs.shape}" + (f" (with a context of width {K})" if K else ""))
        backend.check_same_device(xs, Wx, what="TimeLSTM input and weights")
        N, H = xs.shape[0], Wh.shape[0]
        if context is not None:
            if context.shape != (N, K):
                raise ValueError(f"TimeLSTM context must have shape ({N}, K), got {context.shape}")
            backend.check_same_device(context, Wx, what="TimeLSTM context and weights")
            context = context.astype(Wx.dtype, copy=False)
            if context_proj is None:
                context_proj = matmul(context, Wx[:K])  # (N, 4H): the same at every step
            elif context_proj.shape != (N, Wx.shape[1]):
                raise ValueError(f"context_proj must have shape {(N, Wx.shape[1])}, "
                                 f"got {context_proj.shape}")
            b = context_proj + self.params[2]
            Wx = Wx[K:]
        self._context = context
        self.dcontext = None
        if embed is not None:
            Wx = matmul(E, Wx)  # (V, 4H): row v is E[v] Wx (Wx: the rows for x, after a context's)
        xp = get_array_module(xs)
        if not self.stateful or self.h is None:
            self.h = xp.zeros((N, H), dtype=Wx.dtype)
        if not self.stateful or self.c is None:
            self.c = xp.zeros((N, H), dtype=Wx.dtype)
        if self.h.shape != (N, H):
            raise ValueError(f"TimeLSTM state has shape {self.h.shape} but the batch needs {(N, H)}")
        self._kernel = ops.engine_for(Wx)
        if embed is None:
            xs = xs.astype(Wx.dtype, copy=False)
        hs, self.h, self.c, self._cache = self._kernel.forward(xs, Wx, Wh, b, self.h, self.c)
        return hs

    def backward(self, dhs):
        Wx = self.params[0]
        dtype = Wx.dtype
        context, embed = self._context, self._embed
        xp = get_array_module(Wx)
        K = 0 if context is None else context.shape[1]
        dWx, dWh, db = self.grads
        # what the engine fills: dWx's rows for x (or, with embed, dP for the table P = E Wx[K:])
        # and db (or, with a context, the per-row bias gradient dB (N, 4H))
        dP = None if embed is None else xp.empty((embed.params[0].shape[0], db.shape[0]), dtype)
        dB = None if context is None else xp.empty((context.shape[0], db.shape[0]), dtype)
        grads = [dWx[K:] if dP is None else dP, dWh, db if dB is None else dB]
        dxs, self.dh = self._kernel.backward(dhs.astype(dtype, copy=False), self._cache, grads,
                                             need_dh0=self.need_dh)
        if context is not None:  # B = b + c Wx[:K]: db = sum of dB's rows, dWx[:K] = c^T dB
            matmul(xp.ones(dB.shape[0], dtype=dtype), dB, out=db)
            matmul(context.T, dB, out=dWx[:K])
            self.dcontext = matmul(dB, Wx[:K].T)
        if embed is not None:  # P = E Wx[K:]: dWx[K:] = E^T dP, dE = dP Wx[K:]^T
            E = embed.params[0]
            matmul(E.T, dP, out=dWx[K:])
            matmul(dP, Wx[K:].T, out=embed.grads[0])
        self._cache = None
        return dxs

    def step(self, x, context=None):
        """One time step for generation: x (N, D) -> h (N, H), carrying (h, c) in the layer
        (zeros when unset) as a stateful forward would. No backward follows. context as in
        forward."""
        Wx, Wh, b = self.params
        if context is not None:
            K = context.shape[1]
            b = matmul(context.astype(Wx.dtype, copy=False), Wx[:K]) + b
            Wx = Wx[K:]
        self._step_state(x, Wx)
        self.h, self.c = ops.engine_for(Wx).step(x.astype(Wx.dtype, copy=False), Wx, Wh, b,
                                                 self.h, self.c)
        return self.h

    def stepper(self):
        """step() without a context, for a run of steps over weights that do not change
        meanwhile (generation): a function x (N, D) -> h, with the engine's per-weights work
        (see the engines' stepper) done here once."""
        Wx, Wh, b = self.params
        run = ops.engine_for(Wx).stepper(Wx, Wh, b)

        def step(x):
            self._step_state(x, Wx)
            self.h, self.c = run(x.astype(Wx.dtype, copy=False), self.h, self.c)
            return self.h
        return step

    def cell(self, embed=None, context=None, rows=None):
        """Decoding's one step: a function run(x, h, c, out=None) -> (h, c) over B rows, with
        nothing kept for backward and the layer's own state left alone; the weights' share of the
        work is done here, once, so use it while they do not change. out=(h', c') (B, H): the
        new state is written there, and h', c' may be h and c themselves (the state advances in
        place, nothing is allocated).

        embed: a TimeEmbedding; x is then ids (B,) into its table. Where the engine takes ids and
        the table has no more rows than a step (V <= rows), each step reads x_t Wx from the table
        E Wx made here (see forward's embed=); else it gathers E's rows. context (B, K): an input
        held constant (as in forward), its share c Wx[:K] + b computed here."""
        Wx, Wh, b = self.params
        kernel = ops.engine_for(Wx)
        if context is not None:
            if context.ndim != 2 or context.shape[1] >= Wx.shape[0]:
                raise ValueError(f"TimeLSTM context must be (B, K) with K < {Wx.shape[0]}, "
                                 f"got {context.shape}")
            K = context.shape[1]
            b = matmul(context.astype(Wx.dtype, copy=False), Wx[:K])          # (B, 4H)
            b += self.params[2]
            Wx = Wx[K:]
        if embed is not None:
            E = embed.params[0]
            if E.shape[1] != Wx.shape[0]:
                raise ValueError(f"embedding width {E.shape[1]} does not match the LSTM input "
                                 f"width {Wx.shape[0]}")
            if rows is not None and E.shape[0] <= rows and kernel.TAKES_IDS:
                table = matmul(E, Wx)                                         # (V, 4H)
                return lambda ids, h, c, out=None: kernel.final_state(ids[:, None], table, Wh, b,
                                                                      h, c, out=out)
        step = kernel.stepper(Wx, Wh, b)

        def run(x, h, c, out=None):
            h, c = step(E[x] if embed is not None else x.astype(Wx.dtype, copy=False), h, c)
            if out is None:
                return h, c
            out[0][...], out[1][...] = h, c
            return out
        return run

    def _step_state(self, x, Wx):
        """Check a step's input against Wx (its input rows) and set a missing state to zeros."""
        if x.ndim != 2 or x.shape[1] != Wx.shape[0]:
            raise ValueError(f"TimeLSTM.step expects input of shape (N, {Wx.shape[0]}), got {x.shape}")
        if self.h is None or self.c is None:
            xp, N, H = get_array_module(Wx), x.shape[0], self.params[1].shape[0]
            if self.h is None:
                self.h = xp.zeros((N, H), dtype=Wx.dtype)
            if self.c is None:
                self.c = xp.zeros((N, H), dtype=Wx.dtype)

    def final_state(self, ids, embed):
        """Inference: the last (h, c) of forward(ids, embed=embed) from a zero state. Nothing is
        kept for backward, and the layer's own state is left alone.

        The state after step t depends only on the prefix ids[:, :t+1], so each step runs once
        per distinct prefix (batches of padded or similar sequences share many), until every
        row's prefix is distinct, or the last step, which run for every row in one call."""
        Wx, Wh, b = self.params
        E = embed.params[0]
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or E.shape[1] != Wx.shape[0]:
            raise ValueError(f"final_state expects integer ids (N, T) for an embedding of width "
                             f"{Wx.shape[0]}, got {ids.dtype} {ids.shape} and width {E.shape[1]}")
        xp = get_array_module(Wx)
        kernel = ops.engine_for(Wx)
        (N, T), V, H = ids.shape, E.shape[0], Wh.shape[0]
        fused = self.fuse_embedding(embed, ids)
        if fused:  # ids into the table E Wx (see forward's embed=)
            Wx = matmul(E, Wx)

        # the prefixes' states: two (h, c) pairs of (N, H) buffers from the buffer pool (fresh
        # memory costs a page fault per 4 KiB), each step reading one pair and writing the first
        # rows of the other; the last step writes new arrays, which are returned
        key = ("prefix states", N, H, np.dtype(Wx.dtype).str, xp.__name__)
        bufs = _pool.take(key) or tuple(xp.empty((N, H), Wx.dtype) for _ in range(4))

        def run(x_ids, h, c, start, out=None):  # the rows of x_ids start from h[start], c[start]
            xs = xp.ascontiguousarray(x_ids, dtype="int64") if fused else E[x_ids]
            return kernel.final_state(xs, Wx, Wh, b, h, c, start, out=out)

        h = c = xp.zeros((1, H), dtype=Wx.dtype)
        prefix = xp.zeros(N, dtype="int64")  # row n's prefix so far: its row of h, c
        try:
            for t in range(T):
                if t == T - 1 or h.shape[0] == N:  # the remaining steps for every row at once
                    return run(ids[:, t:], h, c, prefix)
                keys, prefix = xp.unique(prefix * V + ids[:, t], return_inverse=True)
                h, c = run((keys % V)[:, None], h, c, keys // V,
                           out=tuple(a[:len(keys)] for a in bufs[2 * (t % 2):2 * (t % 2) + 2]))
            return h[prefix], c[prefix]  # T == 0: the zero state
        finally:
            _pool.give(key, bufs)

    def set_state(self, h, c=None):
        self.h, self.c = h, c

    def reset_state(self):
        self.h, self.c = None, None


class TimeAffine:
    """x (N, T, H) -> x W + b (N, T, V). params = [W (H, V), b (V,)]."""

    param_names = ("W", "b")

    def __init__(self, W, b):
        self.params = [W, b]
        xp = get_array_module(W)
        self.grads = [xp.zeros_like(W), xp.zeros_like(b)]
        self.x = None

    def forward(self, x):
        W, b = self.params
        N, T, H = x.shape
        if H != W.shape[0]:
            raise ValueError(f"TimeAffine expects input width {W.shape[0]}, got {x.shape}")
        self.x = x.reshape(N * T, H)
        out = matmul(self.x, W)
        out += b
        return out.reshape(N, T, -1)

    def backward(self, dout):
        W, _ = self.params
        xp = get_array_module(dout)
        N, T, V = dout.shape
        d = dout.reshape(N * T, V)
        matmul(self.x.T, d, out=self.grads[0])
        # column sums as a vector-matrix product: NumPy's axis-0 sum over short rows is slower
        matmul(xp.ones(d.shape[0], dtype=d.dtype), d, out=self.grads[1])
        return matmul(d, W.T).reshape(N, T, -1)


class TimeSoftmaxWithLoss:
    """Mean cross-entropy over all (n, t) whose label is not ``ignore_label``; masked in the
    gradient too. forward(xs (N, T, V), ts (N, T)) -> float loss."""

    param_names = ()

    def __init__(self, ignore_label=-1, overwrite_input=False):
        self.params, self.grads = [], []
        self.ignore_label = ignore_label
        self.overwrite_input = overwrite_input  # reuse the scores' memory for the gradient
        self.dx = None

    def forward(self, xs, ts):
        N, T, V = xs.shape
        if ts.ndim == 3:  # one-hot labels
            ts = ts.argmax(axis=2)
        if ts.shape != (N, T):
            raise ValueError(f"labels have shape {ts.shape} but scores need {(N, T)}")
        scores = xs.reshape(N * T, V)
        if not self.overwrite_input:
            scores = scores.copy()
        loss, d = softmax_cross_entropy(scores, ts.reshape(N * T), self.ignore_label)
        self.dx = d.reshape(N, T, V)
        return loss

    def backward(self, dout=1):
        dx = self.dx
        if dout != 1:
            dx = dx * dout
        return dx


def rng_state(rs):
    """A NumPy RandomState's state as {keys (624,) uint32, pos, has_gauss, gauss}."""
    kind, keys, pos, has_gauss, gauss = rs.get_state()
    return {"keys": np.asarray(keys), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def set_rng_state(rs, state):
    """Put rng_state()'s dict back into a RandomState (ValueError if it cannot be one)."""
    keys = np.asarray(backend.to_cpu(state["keys"]))
    if keys.shape != (624,) or keys.dtype.kind not in "iu":
        raise ValueError(f"a generator state needs 624 integer keys, got {keys.dtype}{keys.shape}")
    rs.set_state(("MT19937", keys.astype(np.uint32), int(state["pos"]),
                  int(state["has_gauss"]), float(state["gauss"])))


class TimeDropout:
    """Inverted dropout: scale kept units by 1/(1-p) in training, identity at inference.

    On the host each forward draws one key from a generator seeded with ``seed`` (NumPy's global
    one when None); the mask is a hash of that key and each element's position
    (fastseq.ops._numpy_math.dropout_mask), generated and applied in one pass by the engine's
    ``dropout`` and again in backward, so no mask is stored. On the GPU masks are a hash of the
    seed and a draw counter kept on the device. state_dict() holds both generators' states.
    ``mask`` is the last forward's mask (made on request on the host)."""

    param_names = ()

    def __init__(self, dropout_ratio=0.5, seed=None):
        self.params, self.grads = [], []
        self.dropout_ratio = dropout_ratio
        self.train_flg = True
        self._mask = None  # the GPU's last mask
        self._key = None  # the host's last draw: (key, keep, shape, dtype)
        self._seed = seed
        self._rng = None
        self._device_state = None  # CuPy: [seed, draws] on the device (ops._cupy.dropout_mask)

    def reseed(self, seed=None):
        """Restart the mask generator (same seed -> same masks again)."""
        self._seed = seed
        self._rng = None
        self._device_state = None

    def state_dict(self):
        """{'rng': the own host generator's state (None before its first draw, or when the masks
        come from NumPy's global generator), 'device': [seed, draws] on the GPU or None}."""
        own = self._rng is not None and isinstance(self._rng[1], np.random.RandomState)
        return {"rng": rng_state(self._rng[1]) if own else None, "device": self._device_state}

    def load_state_dict(self, state):
        rng = None
        if state["rng"] is not None:
            rng = np.random.RandomState(0)
            set_rng_state(rng, state["rng"])
        device = state["device"]
        if device is not None and backend.is_gpu():
            device = backend.asarray(np.asarray(backend.to_cpu(device), dtype=np.float64))
            if device.shape != (2,):
                raise ValueError(f"a dropout device state is [seed, draws], got shape "
                                 f"{device.shape}")
        else:
            device = None
        self._rng = None if rng is None else (np, rng)
        self._device_state = device

    def _generator(self, xp):
        if self._rng is None or self._rng[0] is not xp:
            self._rng = (xp, xp.random.RandomState(self._seed) if self._seed is not None
                         else xp.random)
        return self._rng[1]

    @property
    def mask(self):
        """The last forward's mask (same shape and dtype as its input), or None."""
        if self._key is not None:
            key, keep, shape, dtype = self._key
            return ops.engine("numpy").dropout_mask(shape, dtype, keep, key)
        return self._mask

    def forward(self, xs, in_place=False):
        """in_place: write the result into xs where it is a C-contiguous writeable host array
        (a temporary of the caller's)."""
        self._mask = self._key = None
        if not self.train_flg or self.dropout_ratio == 0:
            return xs
        xp = get_array_module(xs)
        keep = 1.0 - self.dropout_ratio
        if xp is not np:  # masks hashed on the device: nothing from the host, capturable
            if self._device_state is None:
                seed = self._seed if self._seed is not None else np.random.randint(2 ** 31 - 1)
                self._device_state = xp.asarray(np.array([seed, 0.0]))
            self._mask = ops.engine_for(xs).dropout_mask(xs.shape, xs.dtype, keep,
                                                          self._device_state)
            return xs * self._mask
        key = int(self._generator(xp).randint(0, 2 ** KEY_BITS, dtype=np.int64))
        self._key = (key, keep, xs.shape, xs.dtype)
        return ops.engine_for(xs).dropout(xs, keep, key, out=_writable(xs, in_place))

    def backward(self, dout, in_place=False):
        """in_place: write the gradient into dout where it is a C-contiguous writeable host
        array."""
        if self._key is not None:  # the forward's mask again, from its key
            key, keep, shape, _ = self._key
            if dout.shape != shape:
                raise ValueError(f"TimeDropout.backward got shape {dout.shape}, its forward "
                                 f"had {shape}")
            return ops.engine_for(dout).dropout(dout, keep, key, out=_writable(dout, in_place))
        return dout if self._mask is None else dout * self._mask


def _writable(a, wanted):
    """a where an op may write into it (wanted, and a C-contiguous writeable host array), else
    None."""
    ok = wanted and type(a) is np.ndarray and a.flags.c_contiguous and a.flags.writeable
    return a if ok else None


class TimeAffineSoftmaxWithLoss:
    """TimeAffine followed by TimeSoftmaxWithLoss, computed together (large vocabularies).

    Wraps an existing ``TimeAffine``: its weight and bias are moved into one (H + 2, V) buffer
    [W; b; 1] (``affine.params`` become views [W, b] of it, same for ``affine.grads``), so one
    product [x, 1, -c] @ [W; b; 1] gives the scores with the bias added and each row already
    shifted by a constant c_i for a stable exp, and one product gives dW and db.

    The shift: softmax needs some c_i >= max_j s_ij; instead of a pass over the (M, V) scores for
    the maximum, c_i is the Cauchy-Schwarz bound ||[x_i, 1]|| max_j ||[W_j; b_j]|| >= |s_ij|. It is
    used when it is below 40 for every row (then every exp(s_ij - c_i) lies in [exp(-80), 1]: no
    overflow, no subnormals); otherwise the exact row maximum is subtracted as usual.

    forward(x (N, T, H), ts (N, T)) -> mean cross-entropy over labels != ignore_label. The scores
    buffer is turned in place into e = exp(s - c); backward subtracts z_i = sum_j e_ij at each
    label and never normalises the (M, V) matrix: with per-row factors r = dout / (n z),
        dx = r * ((e - z onehot) W^T),      [dW; db] = ([x, 1] r)^T (e - z onehot),
    so the only passes over (M, V) are the two products, exp and sum (plus max and subtract in the
    fallback). Buffers are reused from call to call.
    """

    SHIFT_BOUND = {"float32": 40.0, "float64": 300.0}
    param_names = ()  # the weights are the wrapped TimeAffine's

    def __init__(self, affine, ignore_label=-1):
        W, b = affine.params
        xp = get_array_module(W)
        H, V = W.shape
        Wb = xp.empty((H + 2, V), dtype=W.dtype)
        Wb[:H] = W
        Wb[H] = b
        Wb[H + 1] = 1
        G = xp.zeros_like(Wb)
        affine.params = [Wb[:H], Wb[H]]
        affine.grads = [G[:H], G[H]]
        self.affine = affine
        self._Wb, self._G = Wb, G
        self.params, self.grads = [], []  # they belong to the affine layer
        self.ignore_label = ignore_label
        self._S = self._Xb = None
        self._saved = None
        self.used_bound = None  # whether the last forward used the bound shift (for tests)

    def forward(self, x, ts):
        xp = get_array_module(x)
        Wb = self._Wb
        N, T, H = x.shape
        V = Wb.shape[1]
        if H + 2 != Wb.shape[0]:
            raise ValueError(f"expected input width {Wb.shape[0] - 2}, got {x.shape}")
        if ts.shape != (N, T):
            raise ValueError(f"labels have shape {ts.shape} but scores need {(N, T)}")
        M = N * T
        dtype = Wb.dtype
        if self._S is None or self._S.shape != (M, V):
            self._S = xp.empty((M, V), dtype=dtype)
            self._Xb = xp.empty((M, H + 2), dtype=dtype)
        S, Xb = self._S, self._Xb
        Xb[:, :H] = x.reshape(M, H)
        Xb[:, H] = 1
        device = xp is not np  # there: nothing read back, so always the exact row maximum
        if device:
            self.used_bound = False
        else:
            # row bound c_i = ||[x_i, 1]|| * max_j ||[W_j; b_j]||
            Wt = Wb[:H + 1]
            wn = float(xp.sqrt(xp.einsum("ij,ij->j", Wt, Wt).max()))
            Xt = Xb[:, :H + 1]
            c = xp.sqrt(xp.einsum("ij,ij->i", Xt, Xt)) * wn
            limit = self.SHIFT_BOUND.get(np.dtype(dtype).name, 40.0)
            self.used_bound = bool(float(c.max()) < limit)
        Xb[:, H + 1] = -c if self.used_bound else 0
        matmul(Xb, Wb, out=S)
        if not self.used_bound:
            S -= S.max(axis=1, keepdims=True)
        labels = ts.reshape(M)
        mask = labels != self.ignore_label
        safe = xp.where(mask, labels, 0)
        picked = S[xp.arange(M), safe]
        z = exp_rows(S)  # S = exp(S)
        if device:  # count and loss stay on the device (0-d arrays)
            n = xp.maximum(mask.sum(), 1).astype(dtype)
            loss = ((xp.log(z) - picked) * mask).sum() / n
        else:
            n = max(int(mask.sum()), 1)
            loss = float(((xp.log(z) - picked) * mask).sum()) / n
        self._saved = (z, mask, safe, n, N, T)
        return loss

    def backward(self, dout=1):
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first (and serves one forward only)")
        xp = get_array_module(self._S)
        z, mask, safe, n, N, T = self._saved
        S, Xb, Wb, G = self._S, self._Xb, self._Wb, self._G
        H = Wb.shape[0] - 2
        W = Wb[:H]
        dtype = Wb.dtype
        r = (mask * (float(dout) / n) / z).astype(dtype)          # (M,), 0 on ignored rows
        # (on the device n is a 0-d array: the division stays there)
        # e - z onehot(t): scaled by r this is the softmax gradient (p - onehot) dout / n
        S[xp.arange(S.shape[0]), safe] -= z
        dx = matmul(S, W.T)
        dx *= r[:, None]
        # [x, 1] scaled by r: one product gives dW and db together (row H + 1 is unused)
        Xb *= r[:, None]
        matmul(Xb.T, S, out=G)
        G[H + 1] = 0
        self._saved = None
        return dx.reshape(N, T, H)


class TimeAttention:
    """Dot-product attention of decoder states over encoder states (no parameters).

    forward(hs_enc (N, Te, H), hs_dec (N, Td, H), mask=None) -> context (N, Td, H):
        s = hs_dec hs_enc^T                      (N, Td, Te) one score per (query, key)
        a = softmax(s) over the keys             masked keys (mask False) get weight 0
        c = a hs_enc
    backward(dc) -> (dhs_enc, dhs_dec):
        da = dc hs_enc^T;   ds = a * (da - sum_j a_j da_j)
        dhs_enc = a^T dc + ds^T hs_dec;   dhs_dec = ds hs_enc
    ``mask`` (N, Te) bool: True for real keys, at least one per row. ``attention_weights`` holds
    the last forward's a, for attention maps.
    """

    param_names = ()

    def __init__(self):
        self.params, self.grads = [], []
        self.attention_weights = None
        self._cache = None

    def forward(self, hs_enc, hs_dec, mask=None):
        xp = get_array_module(hs_enc)
        N, Te, H = hs_enc.shape
        if hs_dec.ndim != 3 or hs_dec.shape[0] != N or hs_dec.shape[2] != H:
            raise ValueError(f"TimeAttention: decoder states {hs_dec.shape} do not match encoder "
                             f"states {hs_enc.shape} (expected (N, Td, H) with N={N}, H={H})")
        if mask is not None and mask.shape != (N, Te):
            raise ValueError(f"TimeAttention: mask has shape {mask.shape}, expected {(N, Te)}")
        a = matmul(hs_dec, hs_enc.transpose(0, 2, 1))             # (N, Td, Te)
        if mask is not None:  # -inf scores: exp gives those keys exactly 0
            a += xp.where(mask, 0, -xp.inf).astype(a.dtype)[:, None, :]
        a -= a.max(axis=2, keepdims=True)
        xp.exp(a, out=a)
        a /= a.sum(axis=2, keepdims=True)
        self._cache = (hs_enc, hs_dec, a)
        self.attention_weights = a
        return matmul(a, hs_enc)                                    # (N, Td, H)

    def backward(self, dc):
        hs_enc, hs_dec, a = self._cache
        xp = get_array_module(dc)
        da = matmul(dc, hs_enc.transpose(0, 2, 1))                  # (N, Td, Te)
        ds = da - (a * da).sum(axis=2, keepdims=True)
        ds *= a
        dhs_enc = matmul(a.transpose(0, 2, 1), dc)
        dhs_enc += matmul(ds.transpose(0, 2, 1), hs_dec)
        dhs_dec = matmul(ds, hs_enc)
        return dhs_enc, dhs_dec
