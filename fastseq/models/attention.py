"""AttentionEncoder, AttentionDecoder, AttentionSeq2seq: dot-product attention over every encoder
state (the textbook's chapter 8 model), padding-aware, with the extensions of its section 8.5:
a bidirectional encoder, stacked LSTM layers and dropout.

The decoder starts each LSTM layer from the encoder's final state of the same layer (c = 0); for
each decoder state h_t (of its top layer) it takes weights a_t = softmax(hs h_t) over the encoder
states hs (of the encoder's top layer), the context c_t = sum_j a_tj hs_j, and scores
Affine([c_t ; h_t]) (context first).

Bidirectional encoder (encoder='bi'): each layer is a forward and a backward LSTM of H/2 units
(hidden_size H must be even); a layer's output, and its final state, is [forward ; backward], H
wide, so the decoder and the attention see the same widths as with one direction. The backward
LSTM reads each row reversed within its true length: the row is reordered by an index gather
(positions 0 .. len-1 reversed, padded positions left where they are), the ordinary TimeLSTM runs
over it (any engine), and its outputs are gathered back. Padded steps thus come after a row's real
ones in both directions and influence nothing; the backward direction's final state is the one
after reading position 0.

Stacked layers (layers=L): layer l + 1 reads layer l's outputs, in the encoder and the decoder.
Dropout (dropout_ratio=p > 0, BetterRnnlm's inverted TimeDropout): on the word vectors of both
sides, between stacked layers, and on [c_t ; h_t] before the output Affine; off in eval() and
while decoding (start/step).

Padding (``pad_id`` given): a question's true length ends at its last non-pad id; pads sit after
it (trailing). The encoder's outputs at padded steps repeat the state at each row's true end
(hs[n, t] = hs[n, len_n - 1] for t >= len_n), final states are taken at each row's true end,
padded keys get zero attention weight, and in each answer the first trailing pad is the end
symbol while the pads after it are ignored by the loss. Where nothing is padded, all of this is
the identity.
"""
import numpy as np

from .. import backend
from ..backend import get_array_module
from ..decoding import start_ids
from ..functions import matmul, true_lengths
from ..layers import (TimeAffine, TimeAttention, TimeDropout, TimeEmbedding, TimeLSTM,
                      TimeSoftmaxWithLoss)
from .base import (Model, check_size, embed_lstm_params, lstm_params, make_rng, randn, register,
                   zeros)
from .seq2seq import DecoderState, EncoderDecoder, embed_lstm_backward, embed_lstm_forward

ENCODERS = ("uni", "bi")
MAX_LAYERS = 32


def _lstm(rng, D, H, init, dtype, stateful):
    """A TimeLSTM on inputs of width D (lstm_params; 'unit' init: forget and output gate biases
    1, as models.base.embed_lstm_params gives the first layer)."""
    Wx, Wh, b = lstm_params(rng, D, H, dtype)
    if init == "unit":
        b[:H] = b[3 * H:] = 1  # gate order f, g, i, o
    return TimeLSTM(Wx, Wh, b, stateful=stateful)


def _layer_names(layers, directions):
    """Parameter-group names of the LSTMs, bottom layer first: lstm, lstm_back, lstm2, ..."""
    return [("lstm" if l == 0 else f"lstm{l + 1}") + ("" if d == 0 else "_back")
            for l in range(layers) for d in range(directions)]


def _active(drop):
    """Whether a dropout layer (or None) draws a mask on its next forward."""
    return drop is not None and drop.train_flg and drop.dropout_ratio > 0


def flip_index(N, T, lengths, xp):
    """(N, T) positions that reverse each row within its true length: row n reads
    len_n - 1, ..., 0 and then its padded positions in place (an involution: applied twice it is
    the identity). lengths None: every row is T long."""
    t = xp.arange(T)[None, :]
    if lengths is None:
        return xp.broadcast_to(T - 1 - t, (N, T))
    L = lengths[:, None]
    return xp.where(t < L, L - 1 - t, t)


def _at_end(hs, lengths):
    """hs[n, len_n - 1] for every row n (N, H): a state at each row's true end."""
    if lengths is None:
        return hs[:, -1]
    return hs[get_array_module(hs).arange(hs.shape[0]), lengths - 1]


class AttentionEncoder(Model):
    """ids (N, T) -> every hidden state hs (N, T, H) of the top layer; with ``lengths``, padded
    steps repeat the state at each row's true end. After forward, ``finals`` holds each layer's
    final state (N, H) (bottom first), which backward(dhs, dfinals) takes gradients for.

    ``bidirectional``: each layer is two LSTMs of H/2 units, the second reading each row
    reversed within its true length; ``layers``: stacked layers; ``dropout_ratio``: see
    use_dropout (the model adds the dropout layers once every weight is drawn)."""

    def __init__(self, vocab_size, wordvec_size, hidden_size, *, rng=None, dtype=np.float32,
                 init="unit", bidirectional=False, layers=1):
        rng = rng if rng is not None else make_rng(None)
        V, D, H = vocab_size, wordvec_size, hidden_size
        self.directions = 2 if bidirectional else 1
        Hd = H // self.directions
        E, *first = embed_lstm_params(rng, V, D, Hd, init, dtype)
        self.embed = TimeEmbedding(E)
        lstms = [TimeLSTM(*first, stateful=False)]
        lstms += [_lstm(rng, D if l == 0 else H, Hd, init, dtype, stateful=False)
                  for l in range(layers) for d in range(self.directions) if l or d]
        for lstm in lstms:
            lstm.need_dh = False  # from a zero state: nobody uses the gradient of h0
        self.stack = [lstms[l * self.directions:(l + 1) * self.directions]
                      for l in range(layers)]
        self.lstm = lstms[0]
        self.layers = [("embed", self.embed)] + list(zip(_layer_names(layers, self.directions),
                                                         lstms))
        self.drops = []
        self.finals = None
        self._fill = self._flip = self._lengths = self._drops = None
        self._fused = False

    def use_dropout(self, ratio, seeds):
        """Dropout on the word vectors and on the input of every layer above the first: one
        TimeDropout per layer, seeded with ``seeds`` (one per layer)."""
        self.drops = [TimeDropout(ratio, seed=s) for s in seeds]
        self.dropout_layers = list(self.drops)

    def forward(self, xs, lengths=None, dropout=True):
        """Top-layer states hs (N, T, H) of ids xs (N, T); dropout=False: no dropout even in
        training mode (decoding)."""
        xp = get_array_module(self.embed.params[0])
        N, T = xs.shape
        drops = self.drops if dropout and self.drops else [None] * len(self.stack)
        self._lengths = lengths
        self._flip = None
        if self.directions == 2:
            self._flip = (xp.arange(N)[:, None], flip_index(N, T, lengths, xp))
        self._drops = drops
        # the first layer reads ids (E Wx's rows: TimeLSTM's embed=) where that pays and no
        # dropout mask comes between the embedding and the LSTM
        self._fused = not _active(drops[0]) and self.lstm.fuse_embedding(self.embed, xs)
        if self._fused:
            x = xs
        else:
            x = self.embed.forward(xs)
            x = x if drops[0] is None else drops[0].forward(x, in_place=True)
        finals = []
        for l, lstms in enumerate(self.stack):
            if l and drops[l] is not None:  # (two directions: x is a concatenation made here)
                x = drops[l].forward(x, in_place=self.directions == 2)
            outs, ends = [], []
            for d, lstm in enumerate(lstms):
                inp = x if d == 0 else self._flipped(x)
                h = lstm.forward(inp, embed=self.embed if l == 0 and self._fused else None)
                ends.append(_at_end(h, lengths))
                outs.append(h if d == 0 else self._flipped(h))
            x = outs[0] if len(outs) == 1 else xp.concatenate(outs, axis=2)
            finals.append(ends[0] if len(ends) == 1 else xp.concatenate(ends, axis=1))
        self.finals = finals
        self._fill = None
        # on the GPU the fill always runs (the identity when nothing is padded): testing first
        # would read a value back to the host at every step
        if lengths is not None and (xp is not np or bool((lengths < T).any())):
            real = xp.arange(T)[None, :] < lengths[:, None]                     # (N, T)
            x = xp.where(real[:, :, None], x, _at_end(x, lengths)[:, None, :])
            self._fill = real
        return x

    def _flipped(self, a):
        """a (N, T, ...) with each row reversed within its true length (flip_index)."""
        rows, idx = self._flip
        return a[rows, idx]

    def backward(self, dhs, dfinals=None):
        """Gradients of every weight from dhs (N, T, H) (of forward's output) and dfinals (each
        layer's final state's gradient, or None)."""
        xp = get_array_module(dhs)
        lengths = self._lengths
        if self._fill is not None:  # padded positions copy the end state: their grads go there
            pad = ~self._fill[:, :, None]
            to_end = (dhs * pad).sum(axis=1)
            dhs = xp.where(pad, 0, dhs)
            dhs[xp.arange(dhs.shape[0]), lengths - 1] += to_end
        Hd = self.stack[0][0].params[1].shape[0]
        for l in range(len(self.stack) - 1, -1, -1):
            gs = []
            for d in range(self.directions):  # each direction's output gradient, in its order
                g = dhs if self.directions == 1 else dhs[:, :, d * Hd:(d + 1) * Hd]
                g = self._flipped(g) if d else xp.ascontiguousarray(g)
                if dfinals is not None:
                    end = dfinals[l] if self.directions == 1 else dfinals[l][:, d * Hd:(d + 1) * Hd]
                    if lengths is None:
                        g[:, -1] += end
                    else:
                        g[xp.arange(g.shape[0]), lengths - 1] += end
                gs.append(g)
            if l == 0 and self._fused:
                self._fused_backward(gs)
                return
            dx = None
            for d, (lstm, g) in enumerate(zip(self.stack[l], gs)):
                dxi = lstm.backward(g)
                dxi = self._flipped(dxi) if d else dxi
                dx = dxi if dx is None else dx + dxi
            drop = self._drops[l]
            dhs = dx if drop is None else drop.backward(dx, in_place=True)
        self.embed.backward(dhs)

    def _fused_backward(self, gs):
        """Backward of a first layer that read ids (TimeLSTM's embed=): each direction writes the
        embedding's gradient itself, so the first direction's is kept and added."""
        lstms = self.stack[0]
        lstms[0].backward(gs[0])
        if len(lstms) == 2:
            dE = self.embed.grads[0].copy()
            lstms[1].backward(gs[1])
            self.embed.grads[0] += dE


class StackedState(DecoderState):
    """The DecoderState of a stacked decoder: h and c are tuples of (B, H) arrays, one per layer
    (bottom first); select reorders the rows of every layer's."""

    __slots__ = ()

    def moved(self, h, c):
        return StackedState(h, c, self.k, self.fixed)

    def select(self, rows):
        xp = get_array_module(self.h[0])
        rows = xp.asarray(rows)
        B = self.h[0].shape[0]
        if rows.shape != (B,) or not bool((rows // self.k == xp.arange(B) // self.k).all()):
            raise ValueError(f"select needs {B} rows, each among its question's {self.k}")
        return self.moved(tuple(h[rows] for h in self.h), tuple(c[rows] for c in self.c))

    @staticmethod
    def _each(a, f):
        return tuple(f(x) for x in a)


class AttentionDecoder(Model):
    """Teacher-forced scores (N, T, V) from ids (N, T), attending over the encoder states.
    ``layers``: stacked LSTM layers (each starts from its own initial state); dropout: see
    use_dropout."""

    def __init__(self, vocab_size, wordvec_size, hidden_size, *, rng=None, dtype=np.float32,
                 init="unit", layers=1):
        rng = rng if rng is not None else make_rng(None)
        V, D, H = vocab_size, wordvec_size, hidden_size
        E, *first = embed_lstm_params(rng, V, D, H, init, dtype)
        self.embed = TimeEmbedding(E)
        self.lstms = [TimeLSTM(*first, stateful=True)]
        self.lstms += [_lstm(rng, H, H, init, dtype, stateful=True) for _ in range(layers - 1)]
        self.lstm = self.lstms[0]
        self.attention = TimeAttention()
        self.affine = TimeAffine(randn(rng, 2 * H, V, scale=1 / np.sqrt(2 * H), dtype=dtype),
                                 zeros(V, dtype=dtype))
        self.layers = [("embed", self.embed), *zip(_layer_names(layers, 1), self.lstms),
                       ("attention", self.attention), ("affine", self.affine)]
        self.H = H
        self.drops = []
        self.dh0 = None
        self._drops = self._h0 = None
        self._dropped = False

    def use_dropout(self, ratio, seeds):
        """Dropout on the word vectors, on the input of every layer above the first and on
        [c ; h] before the Affine: layers + 1 TimeDropout layers, seeded with ``seeds``."""
        self.drops = [TimeDropout(ratio, seed=s) for s in seeds]
        self.dropout_layers = list(self.drops)

    def forward(self, xs, enc_hs, mask=None, h0=None, dropout=True):
        """h0: each layer's initial state (N, H) (None: enc_hs[:, -1] for every layer); after
        backward, ``dh0`` holds their gradients (with h0=None they are added to the returned
        gradient of enc_hs[:, -1] instead). dropout=False: none even in training mode."""
        xp = get_array_module(enc_hs)
        self._h0 = h0
        h0 = [enc_hs[:, -1]] * len(self.lstms) if h0 is None else h0
        drops = self.drops if dropout and self.drops else [None] * (len(self.lstms) + 1)
        self._drops = drops
        self._dropped = _active(drops[0])
        for lstm, h in zip(self.lstms, h0):
            lstm.set_state(h)
        if self._dropped:
            x = self.lstm.forward(drops[0].forward(self.embed.forward(xs), in_place=True))
        else:
            x = embed_lstm_forward(self.embed, self.lstm, xs)                   # (N, T, H)
        for lstm, drop in zip(self.lstms[1:], drops[1:]):
            x = lstm.forward(x if drop is None else drop.forward(x))
        c = self.attention.forward(enc_hs, x, mask)                             # (N, T, H)
        out = xp.concatenate([c, x], axis=2)
        if drops[-1] is not None:
            out = drops[-1].forward(out, in_place=True)  # (out: the concatenation just made)
        return self.affine.forward(out)

    def backward(self, dscore):
        H, drops = self.H, self._drops
        dout = self.affine.backward(dscore)
        dout = dout if drops[-1] is None else drops[-1].backward(dout, in_place=True)
        denc_hs, dx = self.attention.backward(dout[:, :, :H])
        dx += dout[:, :, H:]
        for l in range(len(self.lstms) - 1, 0, -1):
            dx = self.lstms[l].backward(dx)
            dx = dx if drops[l] is None else drops[l].backward(dx, in_place=True)
        if self._dropped:
            self.embed.backward(drops[0].backward(self.lstm.backward(dx), in_place=True))
        else:
            embed_lstm_backward(self.embed, self.lstm, dx)
        self.dh0 = [lstm.dh for lstm in self.lstms]
        if self._h0 is None:
            for dh in self.dh0:
                denc_hs[:, -1] += dh
        return denc_hs

    def start(self, enc_hs, mask=None, k=1, h0=None):
        """Decoding state for k rows per question, from the encoder states enc_hs (N, T, H), their
        key mask and each layer's initial state h0 (None: enc_hs[:, -1]); c = 0."""
        h0 = [enc_hs[:, -1]] * len(self.lstms) if h0 is None else h0
        hs = [h if k == 1 else h.repeat(k, axis=0) for h in h0]
        B, xp = hs[0].shape[0], get_array_module(hs[0])
        W, b = self.affine.params
        fixed = (self._cells(B), enc_hs, mask, W[:self.H], W[self.H:], b)  # Affine: c's, h's rows
        if len(hs) == 1:
            return DecoderState(hs[0], xp.zeros_like(hs[0]), k, fixed)
        return StackedState(tuple(hs), tuple(xp.zeros_like(h) for h in hs), k, fixed)

    def _cells(self, B):
        """Each layer's LSTM cell for steps of B rows (the first reads ids)."""
        return [self.lstm.cell(self.embed, rows=B)] + [l.cell(rows=B) for l in self.lstms[1:]]

    def widen(self, state, k):
        """A state of one row per question as k rows per question (each row repeated): the
        state start(..., k) would have made, advanced as the one given."""
        cells, *rest = state.fixed
        B = (state.h[0] if isinstance(state, StackedState) else state.h).shape[0]
        return state.widen(k, (self._cells(B * k), *rest))

    def step(self, ids, state):
        """Scores (B, V) after feeding ids (B,), and the next state: the k rows of a question
        attend to one copy of its encoder states, as k more queries."""
        cells, enc_hs, mask, Wc, Wh, b = state.fixed
        if len(cells) == 1:
            h, c = cells[0](ids, state.h, state.c)                              # (B, H)
            moved = (h, c)
        else:
            h, hs, cs = ids, [], []
            for cell, h_l, c_l in zip(cells, state.h, state.c):
                h, c = cell(h, h_l, c_l)
                hs.append(h)
                cs.append(c)
            moved = (tuple(hs), tuple(cs))
        (B, H), N = h.shape, enc_hs.shape[0]
        ctx = self.attention.forward(enc_hs, h.reshape(N, B // N, H), mask).reshape(B, H)
        scores = matmul(ctx, Wc)  # Affine([c ; h]) as c W[:H] + h W[H:] + b: no concatenation
        scores += matmul(h, Wh)
        scores += b
        return scores, state.moved(*moved)

    def keep(self, state, questions):
        """The state for the questions ``questions`` (N',) only: their rows and encoder states."""
        cells, enc_hs, mask, *rest = state.fixed
        xp = get_array_module(enc_hs)
        q = xp.asarray(questions)
        fixed = (cells, enc_hs[q], None if mask is None else mask[q], *rest)
        return state.keep(q, fixed)


class AttentionSeq2seq(EncoderDecoder):
    """AttentionEncoder + AttentionDecoder. forward(xs, ts) -> loss: decoder input ts[:, :-1],
    targets ts[:, 1:]. ``pad_id``: the id that pads questions and answers at their end (None: no
    padding, every position is data). ``init``: 'unit' (N(0, 1) word vectors, forget- and
    output-gate biases 1: with the textbook's 0.01 word vectors this model stalls on addition) or
    'textbook' (models.base.embed_lstm_params).

    ``encoder``: 'uni' (one LSTM per layer) or 'bi' (a forward and a backward LSTM of
    hidden_size / 2 units per layer, concatenated); ``layers``: stacked LSTM layers on each side
    (the decoder's layer l starts from the encoder's layer l); ``dropout_ratio``: inverted
    dropout on the word vectors, between layers and before the output Affine (training only).
    Their defaults give the textbook's model. Weights are drawn first (the same for any
    dropout_ratio), then the dropout layers' seeds."""

    decode_batch = 256  # questions per length-sorted batch in generate
    structure_keys = ("layers",)  # config integers that count layers (not sizes: files.rebuild)

    def __init__(self, vocab_size, wordvec_size=16, hidden_size=256, *, seed=None,
                 dtype=np.float32, ignore_label=-1, pad_id=None, init="unit", encoder="uni",
                 layers=1, dropout_ratio=0.0):
        rng = make_rng(seed)
        vocab_size = self.vocab_size = check_size("vocab_size", vocab_size)
        wordvec_size = self.wordvec_size = check_size("wordvec_size", wordvec_size)
        hidden_size = self.hidden_size = check_size("hidden_size", hidden_size)
        if pad_id is not None and not 0 <= int(pad_id) < vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary [0, {vocab_size})")
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if encoder == "bi" and hidden_size % 2:
            raise ValueError(f"encoder='bi' gives each direction hidden_size / 2 units: "
                             f"hidden_size must be even, got {hidden_size}")
        layers = check_size("layers", layers)
        if layers > MAX_LAYERS:
            raise ValueError(f"layers must be at most {MAX_LAYERS}, got {layers}")
        if isinstance(dropout_ratio, bool) or \
                not isinstance(dropout_ratio, (int, float, np.floating)) or \
                not 0 <= dropout_ratio < 1:
            raise ValueError(f"dropout_ratio must be a number in [0, 1), got {dropout_ratio!r}")
        self.pad_id = None if pad_id is None else int(pad_id)
        self.encoder_kind, self.n_layers = encoder, layers
        self.dropout_ratio = float(dropout_ratio)
        self.encoder = AttentionEncoder(vocab_size, wordvec_size, hidden_size, rng=rng, dtype=dtype,
                                        init=init, bidirectional=encoder == "bi", layers=layers)
        self.decoder = AttentionDecoder(vocab_size, wordvec_size, hidden_size, rng=rng, dtype=dtype,
                                        init=init, layers=layers)
        if self.dropout_ratio > 0:  # masks from generators seeded from the seed (reproducible)
            n = 2 * layers + 1  # encoder: one per layer; decoder: one per layer and the output
            seeds = [None] * n if seed is None else [int(s) for s in rng.randint(0, 2 ** 31 - 1, n)]
            self.encoder.use_dropout(self.dropout_ratio, seeds[:layers])
            self.decoder.use_dropout(self.dropout_ratio, seeds[layers:])
        self.dropout_layers = self.encoder.drops + self.decoder.drops
        self.softmax = TimeSoftmaxWithLoss(ignore_label=ignore_label)
        self.layers = [("encoder." + n, l) for n, l in self.encoder.layers] + \
                      [("decoder." + n, l) for n, l in self.decoder.layers]

    def config(self):
        return {"vocab_size": self.vocab_size, "wordvec_size": self.wordvec_size,
                "hidden_size": self.hidden_size, "pad_id": self.pad_id,
                "encoder": self.encoder_kind, "layers": self.n_layers,
                "dropout_ratio": self.dropout_ratio}

    def encode(self, xs, trim=True):
        """Encoder states (N, T', H) and the key mask (N, T') (None when nothing is padded).
        With a pad id, T' is the longest true length in xs (trim=True): the columns after it are
        padding in every row, and padded steps after a row's end influence nothing."""
        return self._encode(xs, trim)[:2]

    def _encode(self, xs, trim=True, dropout=True):
        """encode(), and each encoder layer's final state (the decoder's initial states)."""
        if self.pad_id is None:
            return self.encoder.forward(xs, dropout=dropout), None, self.encoder.finals
        lengths = true_lengths(xs, self.pad_id)
        xp = get_array_module(xs)
        device = xp is not np  # there, no trimming and the mask always: no host reads per step
        if trim and not device:
            xs = xs[:, :int(lengths.max())]
        T = xs.shape[1]
        if not device and not bool((lengths < T).any()):
            return self.encoder.forward(xs, dropout=dropout), None, self.encoder.finals
        hs = self.encoder.forward(xs, lengths, dropout=dropout)
        return hs, xp.arange(T)[None, :] < lengths[:, None], self.encoder.finals

    def forward(self, xs, ts):
        ignore = self.softmax.ignore_label
        xs = self._check_ids(xs, "questions xs")
        ts = self._check_ids(ts, "answers ts", ignore=ignore)
        if xs.shape[0] != ts.shape[0]:
            raise ValueError(f"xs has {xs.shape[0]} rows but ts has {ts.shape[0]}")
        xp = get_array_module(xs)
        enc_hs, mask, h0 = self._encode(xs)
        dec_in, targets = ts[:, :-1], ts[:, 1:]
        if ignore is not None and ignore < 0:
            dec_in = xp.where(dec_in == ignore, 0, dec_in)
        if self.pad_id is not None and ignore is not None:
            # the first trailing pad ends the answer; the pads after it are not data
            ends = true_lengths(ts, self.pad_id)                      # index of the end symbol
            after = xp.arange(1, ts.shape[1])[None, :] > ends[:, None]
            if xp is not np or bool(after.any()):  # (GPU: no host read to test first)
                targets = xp.where(after, ignore, targets)
        score = self.decoder.forward(dec_in, enc_hs, mask, h0)
        return self.softmax.forward(score, targets)

    def backward(self, dout=1):
        denc_hs = self.decoder.backward(self.softmax.backward(dout))
        self.encoder.backward(denc_hs, self.decoder.dh0)

    @property
    def end_id(self):
        """The first trailing pad ends an answer (None without a pad id)."""
        return self.pad_id

    def start(self, xs, k=1):
        """The decoder's state for k rows per question xs (N, T), attending over encode(xs)
        (no dropout)."""
        xs = self._check_ids(xs, "questions xs")
        enc_hs, mask, h0 = self._encode(xs, dropout=False)
        return self.decoder.start(enc_hs, mask, k=k, h0=h0)

    def step(self, ids, state):
        return self.decoder.step(ids, state)

    def keep(self, state, questions):
        return self.decoder.keep(state, questions)

    def widen(self, state, k):
        return self.decoder.widen(state, k)

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
        enc_hs, mask, h0 = self._encode(xs, dropout=False)
        # teacher-forced on its own answers: the same weights
        self.decoder.forward(dec_in, enc_hs, mask, h0, dropout=False)
        w = backend.to_cpu(self.decoder.attention.attention_weights)
        return out, np.pad(w, ((0, 0), (0, 0), (0, xs.shape[1] - w.shape[2])))


register("attention", AttentionSeq2seq, family="seq2seq",
         defaults={"wordvec_size": 16, "hidden_size": 256, "encoder": "uni", "layers": 1,
                   "dropout_ratio": 0.0},
         help="dot-product attention over every encoder state (textbook 8; bidirectional "
              "encoder, stacked layers, dropout: 8.5), padding-aware",
         pads=True)
