"""Language models (chapter 6/7): Rnnlm and BetterRnnlm, with text generation.

    Rnnlm:       TimeEmbedding -> TimeLSTM (stateful) -> TimeAffine -> TimeSoftmaxWithLoss
    BetterRnnlm: TimeEmbedding -> TimeDropout -> TimeLSTM -> TimeDropout -> TimeLSTM -> TimeDropout
                 -> affine with the embedding weight transposed (weight tying) -> softmax with loss

``params`` follow the textbook's order. BetterRnnlm holds the tied weight once, so its params have 8
entries [embed W, Wx1, Wh1, b1, Wx2, Wh2, b2, affine b] (the textbook lists 9, with W.T at index 7;
``textbook_tied = [(0, 7)]`` lets ``fastseq.files.load_textbook_params`` read its .pkl files).
"""
import numpy as np

from .. import backend
from .._checks import check_fraction
from ..backend import get_array_module
from ..functions import matmul
from ..layers import (TimeAffine, TimeAffineSoftmaxWithLoss, TimeDropout, TimeEmbedding,
                      TimeLSTM, TimeSoftmaxWithLoss)
from ..sampling import make_sampler
from .base import Model, check_dtype, check_size, lstm_params, make_rng, randn, register, zeros


class TiedAffine:
    """x (N, T, H) -> x E^T + b, where E (V, H) is an embedding's weight, shared by identity.

    params = [b] only: the weight belongs to the embedding. backward() writes the weight's gradient
    from this path into the buffer it is given (the embedding's own gradient buffer, so the two
    paths are summed without a temporary).
    """

    param_names = ("b",)

    def __init__(self, embed, b):
        self.embed = embed
        self.params = [b]
        self.grads = [get_array_module(b).zeros_like(b)]
        self.x = None

    @property
    def W(self):
        return self.embed.params[0]

    def forward(self, x):
        E, = self.embed.params
        b, = self.params
        N, T, H = x.shape
        if H != E.shape[1]:
            raise ValueError(f"TiedAffine expects input width {E.shape[1]}, got {x.shape}")
        self.x = x.reshape(N * T, H)
        out = matmul(self.x, E.T)
        out += b
        return out.reshape(N, T, -1)

    def backward(self, dout, dW_out):
        """Returns dx; the weight gradient d^T x goes into dW_out (V, H)."""
        E, = self.embed.params
        N, T, V = dout.shape
        d = dout.reshape(N * T, V)
        matmul(d.T, self.x, out=dW_out)
        d.sum(axis=0, out=self.grads[0])
        return matmul(d, E).reshape(N, T, -1)


class _LanguageModel(Model):
    """What Rnnlm and BetterRnnlm share: id checks, state, prediction, loss and generation."""

    embed = None

    # --- textbook interface ---------------------------------------------------------------

    def _scores(self, xs, train_flg):
        raise NotImplementedError

    def _loss_input(self, xs, train_flg):
        """What loss_layer takes: the scores, unless it applies the output affine itself."""
        return self._scores(xs, train_flg)

    def predict(self, xs, train_flg=False):
        """Scores (N, T, V) for word ids xs (N, T); carries the LSTM state (stateful)."""
        xs = self._check_ids(xs, "xs")
        return self._scores(xs, train_flg)

    def forward(self, xs, ts, train_flg=None):
        """Mean cross-entropy of predicting ts (N, T) from xs (N, T); dropout as the model's
        mode (train() / eval()) says unless ``train_flg`` is given (textbook)."""
        xs = self._check_ids(xs, "xs")
        ts = self._check_ids(ts, "ts")
        if xs.shape != ts.shape:
            raise ValueError(f"xs has shape {xs.shape} but ts has shape {ts.shape}")
        return self.loss_layer.forward(
            self._loss_input(xs, self.training if train_flg is None else train_flg), ts)

    # --- generation -------------------------------------------------------------------------

    def _stepper(self):
        """A function id (1, 1) -> scores (V,) for word-by-word generation: the cheap inference
        path (no id checks, no dropout). Each LSTM layer takes one engine step (TimeLSTM.stepper:
        the weights do not change while generating), reading and writing the layer's (h, c), so
        generation and predict() share the stateful layers. The output weight is laid out
        (V, H): one contiguous matrix-vector product."""
        E = self.embed.params[0]
        Wout = self._output_weight_vh()
        b_out = self.affine.params[-1]
        cells = [lstm.stepper() for lstm in self.lstm_layers]

        def step(x):
            h = E[x[0]]  # (1, D)
            for cell in cells:
                h = cell(h)
            s = Wout @ h[0]
            s += b_out
            return s
        return step

    def generate(self, start_id, skip_ids=None, sample_size=100, *, temperature=1.0, top_k=None,
                 top_p=None, greedy=False, seed=None, rng=None):
        """Sample word ids one at a time, feeding each back in (as the textbook).

        start_id: one id, or a phrase (list of ids): all but its last word are fed first (priming)
        and sampling starts from the last one. Returns a list of ints: the phrase followed by the
        sampled ids, ``sample_size`` ids from the last start word on (textbook: ``[start_id] +
        sample_size - 1 samples``). ``skip_ids`` are never sampled. ``temperature`` (0 = greedy),
        ``top_k``, ``top_p`` shape the distribution; ``seed`` or ``rng`` (a NumPy Generator or
        RandomState) make it reproducible; without either, NumPy's global random state is used (so
        ``np.random.seed`` works as in the textbook). The LSTM state carries on from where it was
        (call ``reset_state()`` first for a fresh start).
        """
        ids = [int(i) for i in (start_id if np.ndim(start_id) else [start_id])]
        if not ids:
            raise ValueError("start_id is an empty phrase")
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"start id {i} is outside the vocabulary [0, {self.vocab_size})")
        sample_size = check_size("sample_size", sample_size)
        for lstm in self.lstm_layers:
            if lstm.h is not None and lstm.h.shape[0] != 1:
                raise ValueError(f"the LSTM state holds a batch of {lstm.h.shape[0]} rows; "
                                 "call reset_state() before generating")
        sample = make_sampler(self.vocab_size, skip_ids=skip_ids, temperature=temperature,
                              top_k=top_k, top_p=top_p, greedy=greedy, seed=seed, rng=rng)
        for d in self.dropout_layers:
            d.train_flg = False
        xp = backend.xp
        out = list(ids)
        with backend.single_blas_thread():  # one-row products: threads only cost hand-off time
            if len(ids) > 1:
                self._scores(xp.asarray(np.array(ids[:-1], dtype=np.int64).reshape(1, -1)), False)
            step = self._stepper()
            x = xp.empty((1, 1), dtype=np.int64)
            x[0, 0] = ids[-1]
            for _ in range(sample_size - 1):
                scores = step(x)
                nxt = sample(backend.to_cpu(scores))
                out.append(nxt)
                x[0, 0] = nxt
        return out


class Rnnlm(_LanguageModel):
    """Embedding -> LSTM (stateful) -> Affine, with softmax cross-entropy (textbook chapter 6).

    params = [embed W (V, D), Wx (D, 4H), Wh (H, 4H), b (4H,), affine W (H, V), affine b (V,)].
    """

    def __init__(self, vocab_size=10000, wordvec_size=100, hidden_size=100, *, seed=None,
                 dtype=np.float32):
        V = self.vocab_size = check_size("vocab_size", vocab_size)
        D = self.wordvec_size = check_size("wordvec_size", wordvec_size)
        H = self.hidden_size = check_size("hidden_size", hidden_size)
        dtype = self.dtype = check_dtype(dtype)
        rng = make_rng(seed)
        self.embed = TimeEmbedding(randn(rng, V, D, scale=0.01, dtype=dtype))
        self.lstm = TimeLSTM(*lstm_params(rng, D, H, dtype), stateful=True)
        self.affine = TimeAffine(randn(rng, H, V, scale=1 / np.sqrt(H), dtype=dtype),
                                 zeros(V, dtype=dtype))
        # training computes affine + softmax + loss together (the affine's W and b become views
        # of one buffer); predict() uses the affine layer alone
        self.loss_layer = TimeAffineSoftmaxWithLoss(self.affine)
        self.layers = [("embed", self.embed), ("lstm", self.lstm), ("affine", self.affine)]
        self.lstm_layers = [self.lstm]
        self.dropout_layers = []

    def config(self):
        return {"vocab_size": self.vocab_size, "wordvec_size": self.wordvec_size,
                "hidden_size": self.hidden_size}

    def _loss_input(self, xs, train_flg):
        return self.lstm.forward(self.embed.forward(xs))  # the loss layer applies the affine

    def _scores(self, xs, train_flg):
        return self.affine.forward(self._loss_input(xs, train_flg))

    def _output_weight_vh(self):
        W = self.affine.params[0]
        return get_array_module(W).ascontiguousarray(W.T)

    def backward(self, dout=1):
        dx = self.loss_layer.backward(dout)
        self.embed.backward(self.lstm.backward(dx))
        return None


class BetterRnnlm(_LanguageModel):
    """Two LSTM layers, inverted dropout, and the output affine tied to the embedding (chapter 6).

    The affine weight IS the embedding weight transposed (same array); its gradient is the sum of
    the embedding's and the affine's contributions, formed once in backward(). Requires
    wordvec_size == hidden_size.
    """

    textbook_tied = [(0, 7)]  # the textbook's params[7] is params[0].T

    def __init__(self, vocab_size=10000, wordvec_size=650, hidden_size=650, dropout_ratio=0.5, *,
                 seed=None, dtype=np.float32):
        V = self.vocab_size = check_size("vocab_size", vocab_size)
        D = self.wordvec_size = check_size("wordvec_size", wordvec_size)
        H = self.hidden_size = check_size("hidden_size", hidden_size)
        if D != H:
            raise ValueError(f"BetterRnnlm ties the affine weight to the embedding, so wordvec_size "
                             f"({D}) must equal hidden_size ({H})")
        self.dropout_ratio = check_fraction("dropout_ratio", dropout_ratio)
        dtype = self.dtype = check_dtype(dtype)
        rng = make_rng(seed)
        self.embed = TimeEmbedding(randn(rng, V, D, scale=0.01, dtype=dtype))
        self.lstm1 = TimeLSTM(*lstm_params(rng, D, H, dtype), stateful=True)
        self.lstm2 = TimeLSTM(*lstm_params(rng, H, H, dtype), stateful=True)
        self.affine = TiedAffine(self.embed, zeros(V, dtype=dtype))
        # dropout masks come from a generator derived from the seed (reproducible runs)
        dseeds = [None] * 3 if seed is None else [int(s) for s in rng.randint(0, 2 ** 31 - 1, 3)]
        self.dropout_layers = [TimeDropout(self.dropout_ratio, seed=s) for s in dseeds]
        self.loss_layer = TimeSoftmaxWithLoss(overwrite_input=True)
        self.layers = [("embed", self.embed), ("lstm1", self.lstm1), ("lstm2", self.lstm2),
                       ("affine", self.affine)]
        self.lstm_layers = [self.lstm1, self.lstm2]

    def config(self):
        return {"vocab_size": self.vocab_size, "wordvec_size": self.wordvec_size,
                "hidden_size": self.hidden_size, "dropout_ratio": self.dropout_ratio}

    def _scores(self, xs, train_flg):
        d0, d1, d2 = self.dropout_layers
        d0.train_flg = d1.train_flg = d2.train_flg = train_flg
        x = d0.forward(self.embed.forward(xs))
        x = d1.forward(self.lstm1.forward(x))
        x = d2.forward(self.lstm2.forward(x))
        return self.affine.forward(x)

    def _output_weight_vh(self):
        return self.embed.params[0]  # tied: the (V, H) embedding is the output weight

    def backward(self, dout=1):
        d0, d1, d2 = self.dropout_layers
        dW = self.embed.grads[0]
        # the affine path writes the shared weight's gradient first; the embedding adds its rows
        dx = self.affine.backward(self.loss_layer.backward(dout), dW_out=dW)
        dx = self.lstm2.backward(d2.backward(dx))
        dx = self.lstm1.backward(d1.backward(dx))
        self.embed.backward(d0.backward(dx), accumulate=True)
        return None


register("rnnlm", Rnnlm, family="lm", defaults={"wordvec_size": 100, "hidden_size": 100,
                                                "epochs": 4},
         help="Embedding + LSTM + Affine language model (textbook 6.4)")
register("better", BetterRnnlm, family="lm",
         defaults={"wordvec_size": 650, "hidden_size": 650, "dropout_ratio": 0.5, "epochs": 40},
         help="two LSTM layers, dropout, tied weights (textbook 6.5)")
