"""Time layers with parameters or state (textbook protocol: params, grads, forward, backward).

Arrays are batch-major: xs (N, T, ...). Grads are preallocated and written in place, so a model's
concatenated ``grads`` list stays valid across steps.
"""
from . import backend
from .backend import get_array_module
from .functions import softmax_cross_entropy
from .lstm import TimeLSTM  # noqa: F401  (re-exported: the LSTM lives in fastseq/lstm)


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
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= W.shape[0]):
            raise ValueError(f"token id out of range: ids must be in [0, {W.shape[0]}), "
                             f"got min {int(idx.min())}, max {int(idx.max())}")
        self.idx = idx
        return W[idx]

    def backward(self, dout, accumulate=False):
        """Scatter-add dout into the rows of dW (zeroed first unless ``accumulate``: then the rows
        are added to what dW already holds, e.g. a tied output layer's gradient)."""
        dW, = self.grads
        xp = get_array_module(dW)
        if not accumulate:
            dW[...] = 0
        D = dW.shape[1]
        # scatter-add of rows; bincount per column is much faster than add.at on NumPy
        ids = self.idx.ravel()
        d = dout.reshape(-1, D)
        if xp is backend.np:
            V = dW.shape[0]
            if ids.size * 4 < V:  # few ids, big vocabulary: add.at over rows only
                xp.add.at(dW, ids, d)
            else:
                order = xp.argsort(ids, kind="stable")
                sids = ids[order]
                starts = xp.flatnonzero(xp.r_[True, sids[1:] != sids[:-1]])
                rows = sids[starts]
                sums = xp.add.reduceat(d[order], starts, axis=0)
                if accumulate:
                    dW[rows] += sums  # rows are unique here
                else:
                    dW[rows] = sums
        else:
            xp.add.at(dW, ids, d)
        return None


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
        out = self.x @ W
        out += b
        return out.reshape(N, T, -1)

    def backward(self, dout):
        W, _ = self.params
        N, T, V = dout.shape
        d = dout.reshape(N * T, V)
        self.grads[0][...] = self.x.T @ d
        self.grads[1][...] = d.sum(axis=0)
        return (d @ W.T).reshape(N, T, -1)


class TimeSoftmaxWithLoss:
    """Mean cross-entropy over all (n, t) whose label is not ``ignore_label``; masked in the
    gradient too. forward(xs (N, T, V), ts (N, T)) -> float loss."""

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


class TimeDropout:
    """Inverted dropout: scale kept units by 1/(1-p) in training, identity at inference."""

    def __init__(self, dropout_ratio=0.5, seed=None):
        self.params, self.grads = [], []
        self.dropout_ratio = dropout_ratio
        self.train_flg = True
        self.mask = None
        self._seed = seed
        self._rng = None

    def reseed(self, seed=None):
        """Restart the mask generator (same seed -> same masks again)."""
        self._seed = seed
        self._rng = None

    def _random(self, shape, xp):
        if self._rng is None or self._rng[0] is not xp:
            self._rng = (xp, xp.random.RandomState(self._seed) if self._seed is not None
                         else xp.random)
        return self._rng[1].random_sample(shape)

    def forward(self, xs):
        if not self.train_flg or self.dropout_ratio == 0:
            self.mask = None
            return xs
        xp = get_array_module(xs)
        keep = 1.0 - self.dropout_ratio
        self.mask = (self._random(xs.shape, xp) < keep).astype(xs.dtype) / xs.dtype.type(keep)
        return xs * self.mask

    def backward(self, dout):
        return dout if self.mask is None else dout * self.mask
