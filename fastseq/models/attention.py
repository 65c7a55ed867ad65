"""AttentionEncoder, AttentionDecoder, AttentionSeq2seq: dot-product attention over every encoder
state (the textbook's chapter 8 model), padding-aware.

The decoder starts its LSTM from the encoder's last state (c = 0); for each decoder state h_t it
takes weights a_t = softmax(hs h_t) over the encoder states hs, the context c_t = sum_j a_tj hs_j,
and scores Affine([c_t ; h_t]) (context first).

Padding (``pad_id`` given): a question's true length ends at its last non-pad id; pads sit after
it (trailing). The encoder's outputs are those of an LSTM whose padded steps leave h unchanged
(hs[n, t] = hs[n, len_n - 1] for t >= len_n, so its final state is taken at each row's true end),
padded keys get zero attention weight, and in each answer the first trailing pad is the end
symbol while the pads after it are ignored by the loss. Where nothing is padded, all of this is
the identity.
"""
import numpy as np

from .. import backend
from ..backend import get_array_module
from ..decoding import start_ids
from ..functions import matmul, true_lengths
from ..layers import TimeAffine, TimeAttention, TimeEmbedding, TimeLSTM, TimeSoftmaxWithLoss
from .base import Model, check_size, embed_lstm_params, make_rng, randn, register, zeros
from .seq2seq import (DecoderState, Encoder, EncoderDecoder, embed_lstm_backward,
                      embed_lstm_forward)


class AttentionEncoder(Encoder):
    """The Encoder's layers, returning every hidden state hs (N, T, H) of ids (N, T); with
    ``lengths``, padded steps repeat the state at each row's true end."""

    _fill = None

    def __init__(self, vocab_size, wordvec_size, hidden_size, *, rng=None, dtype=np.float32,
                 init="unit"):
        super().__init__(vocab_size, wordvec_size, hidden_size, rng=rng, dtype=dtype, init=init)

    def forward(self, xs, lengths=None):
        hs = embed_lstm_forward(self.embed, self.lstm, xs)
        N, T, _ = hs.shape
        self._fill = None
        xp = get_array_module(hs)
        # on the GPU the fill always runs (the identity when nothing is padded): testing first
        # would read a value back to the host at every step
        if lengths is not None and (xp is not np or bool((lengths < T).any())):
            real = xp.arange(T)[None, :] < lengths[:, None]                     # (N, T)
            end = hs[xp.arange(N), lengths - 1]                                  # (N, H)
            hs = xp.where(real[:, :, None], hs, end[:, None, :])
            self._fill = (real, lengths)
        return hs

    def backward(self, dhs):
        if self._fill is not None:  # padded positions copy the end state: their grads go there
            real, lengths = self._fill
            xp = get_array_module(dhs)
            pad = ~real[:, :, None]
            to_end = (dhs * pad).sum(axis=1)
            dhs = xp.where(pad, 0, dhs)
            dhs[xp.arange(dhs.shape[0]), lengths - 1] += to_end
        embed_lstm_backward(self.embed, self.lstm, dhs)


class AttentionDecoder(Model):
    """Teacher-forced scores (N, T, V) from ids (N, T), attending over the encoder states."""

    def __init__(self, vocab_size, wordvec_size, hidden_size, *, rng=None, dtype=np.float32,
                 init="unit"):
        rng = rng if rng is not None else make_rng(None)
        V, D, H = vocab_size, wordvec_size, hidden_size
        E, *lstm = embed_lstm_params(rng, V, D, H, init, dtype)
        self.embed = TimeEmbedding(E)
        self.lstm = TimeLSTM(*lstm, stateful=True)
        self.attention = TimeAttention()
        self.affine = TimeAffine(randn(rng, 2 * H, V, scale=1 / np.sqrt(2 * H), dtype=dtype),
                                 zeros(V, dtype=dtype))
        self.layers = [("embed", self.embed), ("lstm", self.lstm), ("attention", self.attention),
                       ("affine", self.affine)]
        self.H = H

    def forward(self, xs, enc_hs, mask=None):
        self.lstm.set_state(enc_hs[:, -1])
        dec_hs = embed_lstm_forward(self.embed, self.lstm, xs)                   # (N, T, H)
        c = self.attention.forward(enc_hs, dec_hs, mask)                         # (N, T, H)
        return self.affine.forward(get_array_module(c).concatenate([c, dec_hs], axis=2))

    def backward(self, dscore):
        H = self.H
        dout = self.affine.backward(dscore)
        denc_hs, ddec_hs = self.attention.backward(dout[:, :, :H])
        ddec_hs += dout[:, :, H:]
        embed_lstm_backward(self.embed, self.lstm, ddec_hs)
        denc_hs[:, -1] += self.lstm.dh
        return denc_hs

    def start(self, enc_hs, mask=None, k=1):
        """Decoding state for k rows per question, from the encoder states enc_hs (N, T, H) (the
        LSTM starts from the last one, c = 0) and their key mask."""
        h = enc_hs[:, -1] if k == 1 else enc_hs[:, -1].repeat(k, axis=0)
        W, b = self.affine.params
        cell = self.lstm.cell(self.embed, rows=h.shape[0])
        return DecoderState(h, get_array_module(h).zeros_like(h), k, (cell, enc_hs, mask, W, b))

    def step(self, ids, state):
        """Scores (B, V) after feeding ids (B,), and the next state: the k rows of a question
        attend to one copy of its encoder states, as k more queries."""
        cell, enc_hs, mask, W, b = state.fixed
        h, c = cell(ids, state.h, state.c)                                       # (B, H)
        (B, H), N = h.shape, enc_hs.shape[0]
        ctx = self.attention.forward(enc_hs, h.reshape(N, B // N, H), mask).reshape(B, H)
        scores = matmul(get_array_module(h).concatenate([ctx, h], axis=1), W)
        scores += b
        return scores, state.moved(h, c)


class AttentionSeq2seq(EncoderDecoder):
    """AttentionEncoder + AttentionDecoder. forward(xs, ts) -> loss: decoder input ts[:, :-1],
    targets ts[:, 1:]. ``pad_id``: the id that pads questions and answers at their end (None: no
    padding, every position is data). ``init``: 'unit' (N(0, 1) word vectors, forget- and
    output-gate biases 1: with the textbook's 0.01 word vectors this model stalls on addition) or
    'textbook' (models.base.embed_lstm_params)."""

    decode_batch = 256  # questions per length-sorted batch in generate

    def __init__(self, vocab_size, wordvec_size=16, hidden_size=256, *, seed=None,
                 dtype=np.float32, ignore_label=-1, pad_id=None, init="unit"):
        rng = make_rng(seed)
        vocab_size = self.vocab_size = check_size("vocab_size", vocab_size)
        wordvec_size = self.wordvec_size = check_size("wordvec_size", wordvec_size)
        hidden_size = self.hidden_size = check_size("hidden_size", hidden_size)
        if pad_id is not None and not 0 <= int(pad_id) < vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary [0, {vocab_size})")
        self.pad_id = None if pad_id is None else int(pad_id)
        self.encoder = AttentionEncoder(vocab_size, wordvec_size, hidden_size, rng=rng, dtype=dtype,
                                        init=init)
        self.decoder = AttentionDecoder(vocab_size, wordvec_size, hidden_size, rng=rng, dtype=dtype,
                                        init=init)
        self.softmax = TimeSoftmaxWithLoss(ignore_label=ignore_label)
        self.layers = [("encoder." + n, l) for n, l in self.encoder.layers] + \
                      [("decoder." + n, l) for n, l in self.decoder.layers]

    def config(self):
        return {"vocab_size": self.vocab_size, "wordvec_size": self.wordvec_size,
                "hidden_size": self.hidden_size, "pad_id": self.pad_id}

    def encode(self, xs, trim=True):
        """Encoder states (N, T', H) and the key mask (N, T') (None when nothing is padded).
        With a pad id, T' is the longest true length in xs (trim=True): the columns after it are
        padding in every row, and padded steps after a row's end influence nothing."""
        if self.pad_id is None:
            return self.encoder.forward(xs), None
        lengths = true_lengths(xs, self.pad_id)
        xp = get_array_module(xs)
        device = xp is not np  # there, no trimming and the mask always: no host reads per step
        if trim and not device:
            xs = xs[:, :int(lengths.max())]
        T = xs.shape[1]
        if not device and not bool((lengths < T).any()):
            return self.encoder.forward(xs), None
        return self.encoder.forward(xs, lengths), xp.arange(T)[None, :] < lengths[:, None]

    def forward(self, xs, ts):
        ignore = self.softmax.ignore_label
        xs = self._check_ids(xs, "questions xs")
        ts = self._check_ids(ts, "answers ts", ignore=ignore)
        if xs.shape[0] != ts.shape[0]:
            raise ValueError(f"xs has {xs.shape[0]} rows but ts has {ts.shape[0]}")
        xp = get_array_module(xs)
        enc_hs, mask = self.encode(xs)
        dec_in, targets = ts[:, :-1], ts[:, 1:]
        if ignore is not None and ignore < 0:
            dec_in = xp.where(dec_in == ignore, 0, dec_in)
        if self.pad_id is not None and ignore is not None:
            # the first trailing pad ends the answer; the pads after it are not data
            ends = true_lengths(ts, self.pad_id)                      # index of the end symbol
            after = xp.arange(1, ts.shape[1])[None, :] > ends[:, None]
            if xp is not np or bool(after.any()):  # (GPU: no host read to test first)
                targets = xp.where(after, ignore, targets)
        score = self.decoder.forward(dec_in, enc_hs, mask)
        return self.softmax.forward(score, targets)

    def backward(self, dout=1):
        self.encoder.backward(self.decoder.backward(self.softmax.backward(dout)))

    @property
    def end_id(self):
        """The first trailing pad ends an answer (None without a pad id)."""
        return self.pad_id

    def start(self, xs, k=1):
        """The decoder's state for k rows per question xs (N, T), attending over encode(xs)."""
        xs = self._check_ids(xs, "questions xs")
        return self.decoder.start(*self.encode(xs), k=k)

    def step(self, ids, state):
        return self.decoder.step(ids, state)

    def length_order(self, xs):
        """Row order by true question length (None without a pad id): decoding rows of similar
        length together lets each batch drop the columns past its longest question."""
        if self.pad_id is None:
            return None
        return backend.to_cpu(true_lengths(xs, self.pad_id)).argsort(kind="stable")

    def attention_map(self, xs, start_id, sample_size):
        """Greedy answers (N, sample_size) and the attention weights (N, sample_size, T) each
        answer symbol gave the question positions as fed (0 on padding)."""
        xs = self._check_ids(xs, "questions xs")
        out = self.generate(xs, start_id, sample_size)
        out = np.asarray(out).reshape(xs.shape[0], sample_size)
        xp = get_array_module(xs)
        dec_in = xp.concatenate([start_ids(start_id, xs.shape[0], xp)[:, None],
                                 backend.asarray(out[:, :-1])], axis=1)
        enc_hs, mask = self.encode(xs)
        self.decoder.forward(dec_in, enc_hs, mask)  # teacher-forced on its own answers: same weights
        w = backend.to_cpu(self.decoder.attention.attention_weights)
        return out, np.pad(w, ((0, 0), (0, 0), (0, xs.shape[1] - w.shape[2])))


register("attention", AttentionSeq2seq, family="seq2seq",
         defaults={"wordvec_size": 16, "hidden_size": 256},
         help="dot-product attention over every encoder state (textbook 8), padding-aware",
         pads=True)
