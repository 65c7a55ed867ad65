"""TimeLSTM and the choice of LSTM engine.

Engines: ``numpy`` (reference, always there), ``cython`` (fastseq/_ext, float32/float64 on CPU)
and ``cupy`` (GPU). The choice is automatic (cupy for CuPy arrays, cython when built, else numpy);
``FASTSEQ_KERNEL=numpy|cython`` in the environment, or ``set_kernel(name)``, overrides it.
"""
import os

from .. import backend
from ..backend import get_array_module
from . import _numpy

_cython_error = None
try:
    from . import _cython
except ImportError as e:  # extension not built here
    _cython = None
    _cython_error = str(e)

_override = os.environ.get("FASTSEQ_KERNEL") or None
if _override not in (None, "numpy", "cython", "cupy"):
    raise ValueError(f"FASTSEQ_KERNEL={_override!r}: expected numpy, cython or cupy")


def cython_available():
    return _cython is not None


def set_kernel(name=None):
    """Force an engine ('numpy', 'cython', 'cupy') or None for the automatic choice."""
    global _override
    if name not in (None, "numpy", "cython", "cupy"):
        raise ValueError(f"unknown LSTM kernel {name!r}; expected numpy, cython or cupy")
    if name == "cython" and _cython is None:
        raise backend.BackendError(f"the Cython LSTM kernel is not built: {_cython_error}")
    _override = name


def kernel_name():
    if backend.is_gpu():
        return "cupy"
    if _override == "cython" and _cython is None:
        raise backend.BackendError(
            f"FASTSEQ_KERNEL=cython but the Cython LSTM kernel is not built: {_cython_error}")
    if _override in ("numpy", "cython"):
        return _override
    return "cython" if _cython is not None else "numpy"


def get_kernel(x):
    """The engine module that runs an LSTM over array x."""
    if get_array_module(x) is not __import__("numpy"):
        from . import _cupy
        return _cupy
    name = kernel_name() if not backend.is_gpu() else "numpy"
    if name == "cython" and x.dtype in _cython.DTYPES:
        return _cython
    return _numpy


class TimeLSTM:
    """LSTM over a whole sequence. params = [Wx (D, 4H), Wh (H, 4H), b (4H,)], gates [f|g|i|o].

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
                and getattr(get_kernel(self.params[0]), "TAKES_IDS", False))

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
                context_proj = context @ Wx[:K]  # (N, 4H): the same at every step
            elif context_proj.shape != (N, Wx.shape[1]):
                raise ValueError(f"context_proj must have shape {(N, Wx.shape[1])}, "
                                 f"got {context_proj.shape}")
            b = context_proj + self.params[2]
            Wx = Wx[K:]
        self._context = context
        self.dcontext = None
        if embed is not None:
            Wx = E @ Wx  # (V, 4H): row v is E[v] Wx (Wx: the rows for x, after a context's)
        xp = get_array_module(xs)
        if not self.stateful or self.h is None:
            self.h = xp.zeros((N, H), dtype=Wx.dtype)
        if not self.stateful or self.c is None:
            self.c = xp.zeros((N, H), dtype=Wx.dtype)
        if self.h.shape != (N, H):
            raise ValueError(f"TimeLSTM state has shape {self.h.shape} but the batch needs {(N, H)}")
        self._kernel = get_kernel(Wx)
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
            db[...] = xp.ones(dB.shape[0], dtype=dtype) @ dB
            dWx[:K] = context.T @ dB
            self.dcontext = dB @ Wx[:K].T
        if embed is not None:  # P = E Wx[K:]: dWx[K:] = E^T dP, dE = dP Wx[K:]^T
            E = embed.params[0]
            dWx[K:] = E.T @ dP
            embed.grads[0][...] = dP @ Wx[K:].T
        self._cache = None
        return dxs

    def set_state(self, h, c=None):
        self.h, self.c = h, c

    def reset_state(self):
        self.h, self.c = None, None
