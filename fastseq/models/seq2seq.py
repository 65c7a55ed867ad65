"""Encoder, Decoder, Seq2seq (chapter 7): teacher forcing, and the decoding interface every
seq2seq model implements (EncoderDecoder; the searches over it live in fastseq.decoding)."""
import numpy as np

from .. import backend
from ..backend import get_array_module
from ..decoding import greedy_search
from ..functions import matmul
from ..layers import TimeAffine, TimeEmbedding, TimeLSTM, TimeSoftmaxWithLoss
from .base import (Model, check_dtype, check_size, embed_lstm_params, lstm_params, make_rng, randn,
                   register, zeros)


def embed_lstm_forward(embed, lstm, ids, context=None):
    """lstm.forward(embed.forward(ids)); computed as one step (TimeLSTM's embed= input: row
    gathers from the table E Wx instead of per-step products) where that pays."""
    if lstm.fuse_embedding(embed, ids):
        return lstm.forward(ids, context=context, embed=embed)
    return lstm.forward(embed.forward(ids), context=context)


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


class DecoderState:
    """A decoder while decoding B = N k rows, k per question (rows n k .. n k + k - 1): its
    LSTM's (h, c) (B, H) and ``fixed``, what stays the same for the call (the one-step function
    with the weights prepared, per-row constants), made once by the decoder's start.

    ``owned``: h and c are this state's own arrays (made by a step or select, not handed in by
    a caller), so that the next step may overwrite them: see advance."""

    __slots__ = ("h", "c", "k", "fixed", "owned")

    def __init__(self, h, c, k, fixed, owned=False):
        self.h, self.c, self.k, self.fixed, self.owned = h, c, k, fixed, owned

    def moved(self, h, c):
        return DecoderState(h, c, self.k, self.fixed, owned=True)

    def advance(self, cell, ids):
        """The state after cell(ids, h, c) (an LSTM cell's run): written over this state's own
        arrays, which this state then gives up (a later use of it is refused), else into new
        ones."""
        if self.h is None:
            raise ValueError("this decoding state has been used up by a step: continue from the "
                             "state that step returned")
        if not self.owned:
            return self.moved(*cell(ids, self.h, self.c))
        h, c = cell(ids, self.h, self.c, out=(self.h, self.c))
        self.h = self.c = None
        return self.moved(h, c)

    def select(self, rows):
        """Row i of the result is row rows[i] of this state; every row stays among its
        question's k rows (beam search reorders a question's beams)."""
        xp = get_array_module(self.h)
        rows = xp.asarray(rows)
        B = self.h.shape[0]
        if rows.shape != (B,) or not bool((rows // self.k == xp.arange(B) // self.k).all()):
            raise ValueError(f"select needs {B} rows, each among its question's {self.k}")
        return self.moved(self.h[rows], self.c[rows])

    def keep(self, questions, fixed):
        """This state for the questions ``questions`` (N',) only (indices in this state's
        order, increasing): their k rows each, and ``fixed``, what the decoder keeps for them."""
        xp = get_array_module(self.h)
        rows = (xp.asarray(questions)[:, None] * self.k + xp.arange(self.k)).reshape(-1)
        return type(self)(self._each(self.h, lambda a: a[rows]),
                          self._each(self.c, lambda a: a[rows]), self.k, fixed, owned=True)

    def widen(self, k, fixed):
        """This state of one row per question as k rows per question (each row repeated k
        times), with ``fixed``."""
        if self.k != 1:
            raise ValueError(f"widen needs a state of one row per question, not {self.k}")
        return type(self)(self._each(self.h, lambda a: a.repeat(k, axis=0)),
                          self._each(self.c, lambda a: a.repeat(k, axis=0)), k, fixed, owned=True)

    @staticmethod
    def _each(a, f):
        """f of the state's array a (StackedState: of each layer's)."""
        return f(a)


class EncoderDecoder(Model):
    """What every seq2seq model shares: the decoding interface that fastseq.decoding's greedy
    and beam search use, and the textbook's generate.

        state = model.start(xs, k=1)            encode questions xs (N, T), k rows for each
        scores, state = model.step(ids, state)  one decoder step: ids (B,) -> scores (B, V); the
                                                state passed in is used up (its arrays may
                                                hold the next state)
        state = model.select(state, rows)       rows reordered within each question's k rows
        state = model.keep(state, questions)    only these questions (N',) from now on (None:
                                                the model cannot drop questions)
        state = model.widen(state, k)           one row per question -> k (each repeated), for
                                                models that have it (beam search's first step
                                                runs on one row per question)
        model.end_id                            the id that ends an answer (None: none)
        model.length_order(xs)                  a row order batching similar questions, or None
    """

    end_id = None
    decode_batch = None  # questions per batch in generate (None: all at once)

    @property
    def ignore_label(self):
        """The answer label the loss skips (padding), as the loss layer ``softmax`` holds it."""
        return self.softmax.ignore_label

    def check_ids(self, ids, what):
        """ids as a 2-D integer array on the current device, each in [0, vocab_size)."""
        return self._check_ids(ids, what)

    def select(self, state, rows):
        return state.select(rows)

    def keep(self, state, questions):
        """The state for the questions ``questions`` (N',) only (increasing indices into the
        state's questions), so that later steps run on fewer rows; None where the model cannot
        (the search then keeps stepping every question)."""
        return None

    widen = None  # optional: widen(state, k), a state of one row per question as k rows each

    def length_order(self, xs):
        return None

    def generate(self, xs, start_id, sample_size):
        """Greedy answers (fastseq.decoding.greedy_search): a list of ids for one (1, T)
        question (as the textbook), else an (N, sample_size) NumPy array for N questions decoded
        together. After an end symbol (end_id), only end symbols."""
        sample_size = check_size("sample_size", sample_size)
        out = greedy_search(self, xs, start_id, sample_size, batch_size=self.decode_batch)
        if out.shape[0] == 1:
            return [int(i) for i in out[0]]
        return out


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

    def forward(self, xs, h):
        self.lstm.set_state(h)
        return self.affine.forward(embed_lstm_forward(self.embed, self.lstm, xs))

    def backward(self, dscore):
        embed_lstm_backward(self.embed, self.lstm, self.affine.backward(dscore))
        return self.lstm.dh

    def start(self, h, k=1, own=False):
        """Decoding state for k rows per encoder state h (N, H): scores h_t W + b. own: h is
        the decoder's to overwrite (the steps then advance the state in h's memory)."""
        h = h if k == 1 else h.repeat(k, axis=0)
        W, b = self.affine.params
        cell = self.lstm.cell(self.embed, rows=h.shape[0])
        return DecoderState(h, get_array_module(h).zeros_like(h), k, (cell, W, b),
                            owned=own or k > 1)

    def step(self, ids, state):
        """Scores (B, V) after feeding ids (B,), and the next state (state is used up)."""
        cell, W, b = state.fixed
        state = state.advance(cell, ids)
        scores = matmul(state.h, W)
        scores += b
        return scores, state


class Seq2seq(EncoderDecoder):
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

    def start(self, xs, k=1):
        """The decoder's state for k rows per question xs (N, T) (nothing kept for backward)."""
        xs = self._check_ids(xs, "questions xs")
        return self.decoder.start(self.encoder.infer(xs), k, own=True)

    def step(self, ids, state):
        return self.decoder.step(ids, state)


register("seq2seq", Seq2seq, family="seq2seq", defaults={"wordvec_size": 16, "hidden_size": 128},
         help="Encoder + Decoder (textbook 7.3)")
