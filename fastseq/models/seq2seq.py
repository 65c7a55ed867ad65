"""Encoder, Decoder, Seq2seq (chapter 7): teacher forcing, batched greedy generation."""
import numpy as np

from .. import backend
from ..backend import get_array_module
from ..layers import TimeAffine, TimeEmbedding, TimeLSTM, TimeSoftmaxWithLoss
from .base import (Model, check_dtype, check_size, embed_lstm_params, lstm_params, make_rng, randn,
                   register, zeros)


def embed_lstm_forward(embed, lstm, ids, context=None, context_proj=None):
    """lstm.forward(embed.forward(ids)); computed as one step (TimeLSTM's embed= input: row
    gathers from the table E Wx instead of per-step products) where that pays."""
    if lstm.fuse_embedding(embed, ids):
        return lstm.forward(ids, context=context, embed=embed, context_proj=context_proj)
    return lstm.forward(embed.forward(ids), context=context, context_proj=context_proj)


def embed_lstm_backward(embed, lstm, dhs):
    """Backward of embed_lstm_forward: fills both layers' grads."""
    dxs = lstm.backward(dhs)
    if dxs is not None:  # (the fused path has written the embedding's gradient)
        embed.backward(dxs)


class Encoder(Model):
    """ids (N, T) -> last hidden state h (N, H). ``init``: see models.base.embed_lstm_params."""

    def __init__(self, vocab_size, wordvec_size, hidden_size, *, rng=None, dtype=np.float32,
                 init="textbook"):
        rng = rng if rng is not None else make_rng(None)
        E, *lstm = embed_lstm_params(rng, vocab_size, wordvec_size, hidden_size, init, dtype)
        self.embed = TimeEmbedding(E)
        self.lstm = TimeLSTM(*lstm, stateful=False)
        self.lstm.need_dh = False  # starts from a zero state: nobody uses the gradient of h0
        self.layers = [("embed", self.embed), ("lstm", self.lstm)]
        self.hs = None

    def forward(self, xs):
        hs = embed_lstm_forward(self.embed, self.lstm, xs)
        self.hs = hs
        return hs[:, -1, :]

    def infer(self, xs):
        """forward(xs) for inference: the last hidden state, nothing kept for backward."""
        return self.lstm.final_state(xs, self.embed)[0]

    def backward(self, dh):
        xp = get_array_module(dh)
        dhs = xp.zeros(self.hs.shape, dtype=self.hs.dtype)
        dhs[:, -1, :] = dh
        embed_lstm_backward(self.embed, self.lstm, dhs)


def _as_start_ids(start_id, N, xp):
    s = xp.asarray(start_id)
    if s.ndim == 0:
        s = xp.full((N,), int(s))
    return s.reshape(N, 1).astype(np.int64)


class Decoder(Model):
    """Teacher-forced scores (N, T, V) from ids (N, T) starting at encoder state h (c = 0)."""

    def __init__(self, vocab_size, wordvec_size, hidden_size, *, rng=None, dtype=np.float32):
        rng = rng if rng is not None else make_rng(None)
        V, D, H = vocab_size, wordvec_size, hidden_size
        self.embed = TimeEmbedding(randn(rng, V, D, scale=0.01, dtype=dtype))
        self.lstm = TimeLSTM(*lstm_params(rng, D, H, dtype), stateful=True)
        self.affine = TimeAffine(randn(rng, H, V, scale=1 / np.sqrt(H), dtype=dtype),
                                 zeros(V, dtype=dtype))
        self.layers = [("embed", self.embed), ("lstm", self.lstm), ("affine", self.affine)]

    def _step(self, xs, h):
        return self.affine.forward(embed_lstm_forward(self.embed, self.lstm, xs))

    def forward(self, xs, h):
        self.lstm.set_state(h)
        return self._step(xs, h)

    def backward(self, dscore):
        embed_lstm_backward(self.embed, self.lstm, self.affine.backward(dscore))
        return self.lstm.dh

    def generate(self, h, start_id, sample_size):
        """Greedy decoding of sample_size ids for every row of h at once -> (N, sample_size)."""
        W, b = self.affine.params
        return self._greedy(h, start_id, sample_size, W, b)

    def _greedy(self, h, start_id, sample_size, Wout, bout, context=None):
        """The LSTM's greedy decoding with scores h_t Wout + bout."""
        sample_size = check_size("sample_size", sample_size)
        ids = _as_start_ids(start_id, h.shape[0], get_array_module(h))[:, 0]
        return self.lstm.greedy(ids, self.embed, h, Wout, bout, sample_size, context=context)


class Seq2seq(Model):
    """Encoder + Decoder. forward(xs, ts) -> loss: decoder input ts[:, :-1], targets ts[:, 1:]."""

    decoder_class = Decoder

    def __init__(self, vocab_size, wordvec_size, hidden_size, *, seed=None, dtype=np.float32,
                 ignore_label=-1):
        vocab_size = self.vocab_size = check_size("vocab_size", vocab_size)
        wordvec_size = self.wordvec_size = check_size("wordvec_size", wordvec_size)
        hidden_size = self.hidden_size = check_size("hidden_size", hidden_size)
        dtype = check_dtype(dtype)
        rng = make_rng(seed)
        self.encoder = Encoder(vocab_size, wordvec_size, hidden_size, rng=rng, dtype=dtype)
        self.decoder = self.decoder_class(vocab_size, wordvec_size, hidden_size, rng=rng, dtype=dtype)
        self.softmax = TimeSoftmaxWithLoss(ignore_label=ignore_label)
        self.layers = [("encoder." + n, l) for n, l in self.encoder.layers] + \
                      [("decoder." + n, l) for n, l in self.decoder.layers]

    def config(self):
        return {"vocab_size": self.vocab_size, "wordvec_size": self.wordvec_size,
                "hidden_size": self.hidden_size}

    def forward(self, xs, ts):
        ignore = self.softmax.ignore_label
        xs = self._check_ids(xs, "questions xs")
        ts = self._check_ids(ts, "answers ts", ignore=ignore)
        if xs.shape[0] != ts.shape[0]:
            raise ValueError(f"xs has {xs.shape[0]} rows but ts has {ts.shape[0]}")
        h = self.encoder.forward(xs)
        # ignored (padding) positions are fed as id 0; their targets are masked out of the loss
        dec_in = ts[:, :-1]
        if ignore is not None and ignore < 0:
            dec_in = backend.xp.where(dec_in == ignore, 0, dec_in)
        score = self.decoder.forward(dec_in, h)
        return self.softmax.forward(score, ts[:, 1:])

    def backward(self, dout=1):
        dh = self.decoder.backward(self.softmax.backward(dout))
        self.encoder.backward(dh)

    def generate(self, xs, start_id, sample_size):
        """Greedy answers: a list of ids for one (1, T) question (as the textbook), else an
        (N, sample_size) NumPy array for N questions decoded together."""
        sample_size = check_size("sample_size", sample_size)
        xs = self._check_ids(xs, "questions xs")
        h = self.encoder.infer(xs)
        out = backend.to_cpu(self.decoder.generate(h, start_id, sample_size))
        if xs.shape[0] == 1:
            return [int(i) for i in out[0]]
        return out


register("seq2seq", Seq2seq, family="seq2seq", defaults={"wordvec_size": 16, "hidden_size": 128},
         help="Encoder + Decoder (textbook 7.3)")
