"""PeekyDecoder / PeekySeq2seq: the encoder state h is fed to every LSTM step and every affine step.

LSTM input at each step: [h ; embedding] (rows 0..H-1 of Wx multiply h; TimeLSTM's context
input computes h's share once per sequence); affine input: [h ; LSTM output] (rows 0..H-1 of the
affine W multiply h).
"""
import numpy as np

from ..backend import get_array_module
from ..functions import matmul
from ..layers import TimeAffine, TimeEmbedding, TimeLSTM
from .base import lstm_params, make_rng, randn, register, zeros
from .seq2seq import Decoder, DecoderState, Seq2seq, embed_lstm_backward, embed_lstm_forward


class PeekyDecoder(Decoder):
    """Decoder whose every step also sees the encoder state h (its step is Decoder's)."""

    def __init__(self, vocab_size, wordvec_size, hidden_size, *, rng=None, dtype=np.float32):
        rng = rng if rng is not None else make_rng(None)
        V, D, H = vocab_size, wordvec_size, hidden_size
        self.embed = TimeEmbedding(randn(rng, V, D, scale=0.01, dtype=dtype))
        self.lstm = TimeLSTM(*lstm_params(rng, H + D, H, dtype), stateful=True)  # input [h ; x]
        self.affine = TimeAffine(randn(rng, H + H, V, scale=1 / np.sqrt(H + H), dtype=dtype),
                                 zeros(V, dtype=dtype))
        self.layers = [("embed", self.embed), ("lstm", self.lstm), ("affine", self.affine)]
        self.H = H

    def forward(self, xs, h):
        xp = get_array_module(h)
        N, T = xs.shape
        self.lstm.set_state(h)
        out = embed_lstm_forward(self.embed, self.lstm, xs, context=h)  # input [h ; embedding]
        hs = xp.broadcast_to(h[:, None, :], (N, T, self.H))
        return self.affine.forward(xp.concatenate([hs, out], axis=2))

    def backward(self, dscore):
        H = self.H
        dout = self.affine.backward(dscore)
        dhs_affine, dout = dout[:, :, :H], dout[:, :, H:]
        embed_lstm_backward(self.embed, self.lstm, dout)
        return self.lstm.dh + dhs_affine.sum(axis=1) + self.lstm.dcontext

    def start(self, h, k=1, own=False):
        """Decoding state for k rows per encoder state h (N, H) (own: as Decoder's). h's shares
        of the LSTM input and of the scores are the same at every step: both are computed here,
        once per call, and the steps score h_t W[H:] + (h W[:H] + b)."""
        H = self.H
        h = h if k == 1 else h.repeat(k, axis=0)
        W, b = self.affine.params
        bias = matmul(h, W[:H])
        bias += b
        cell = self.lstm.cell(self.embed, context=h, rows=h.shape[0])
        return DecoderState(h, get_array_module(h).zeros_like(h), k, (cell, W[H:], bias),
                            owned=own or k > 1)


class PeekySeq2seq(Seq2seq):
    decoder_class = PeekyDecoder


register("peeky", PeekySeq2seq, family="seq2seq", defaults={"wordvec_size": 16, "hidden_size": 128},
         help="decoder sees the encoder's state at every step (textbook 7.4)")
