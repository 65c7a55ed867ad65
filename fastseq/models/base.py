"""What every model shares: params/grads lists, initialisation, the state protocol
(state_dict / load_state_dict, train / eval), save/load as .npz."""
import copy
import dataclasses
import sys

import numpy as np

from .. import backend
from .._checks import check_count as check_size  # noqa: F401  (the model files' size check)
from ..files.weights import load_params as load_file, save_params as save_file


def make_rng(seed):
    """A NumPy RandomState: seeded, or the global one (so np.random.seed(...) works as in the textbook)."""
    return np.random.RandomState(seed) if seed is not None else np.random.mtrand._rand


def randn(rng, *shape, scale=1.0, dtype=np.float32):
    """Gaussian weights created on the host (same numbers on every engine), moved to the device."""
    return backend.asarray((rng.standard_normal(shape) * scale).astype(dtype))


def zeros(*shape, dtype=np.float32):
    return backend.xp.zeros(shape, dtype=dtype)


def check_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


def lstm_params(rng, D, H, dtype=np.float32):
    """[Wx (D, 4H), Wh (H, 4H), b (4H,)] for an LSTM with input width D: Gaussian weights scaled
    by 1/sqrt(fan-in) (the textbook's Xavier initialisation), zero bias."""
    return [randn(rng, D, 4 * H, scale=1 / np.sqrt(D), dtype=dtype),
            randn(rng, H, 4 * H, scale=1 / np.sqrt(H), dtype=dtype),
            zeros(4 * H, dtype=dtype)]


INITS = ("textbook", "unit")


def embed_lstm_params(rng, V, D, H, init="textbook", dtype=np.float32):
    """[E (V, D), Wx, Wh, b]: word vectors, then an LSTM on them (lstm_params), drawn in that order.
    'textbook': E ~ 0.01 N(0, 1). 'unit' (AttentionSeq2seq's): E ~ N(0, 1), forget- and output-gate
    biases 1: the gates see their input at unit scale from the first step instead of at 1% of it,
    and h starts larger, so attention (h . hs) starts less flat (on addition AttentionSeq2seq then
    learns instead of stalling: BENCHMARKS.md, "Addition")."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    E = randn(rng, V, D, scale=0.01 if init == "textbook" else 1.0, dtype=dtype)
    Wx, Wh, b = lstm_params(rng, D, H, dtype)
    if init == "unit":
        b[:H] = b[3 * H:] = 1  # the forget and output gates' columns (gate order f, g, i, o)
    return [E, Wx, Wh, b]


class Model:
    """Subclasses set self.layers = [(name, layer), ...]; params/grads follow that order.

    ``lstm_layers``: the LSTM layers whose (h, c) a stateful model carries from batch to batch
    (get_state / set_state / reset_state); ``dropout_layers``: the layers that draw random masks
    while training. ``train()`` / ``eval()`` switch dropout on and off for every model."""

    layers = ()
    lstm_layers = ()
    dropout_layers = ()
    training = True
    ignore_label = None  # the label in t that the loss skips (None: every label must be an id)
    textbook_tied = ()  # (kept, textbook) index pairs of the textbook's tied duplicates (.pkl)

    @property
    def params(self):
        return [p for _, layer in self.layers for p in layer.params]

    @property
    def grads(self):
        return [g for _, layer in self.layers for g in layer.grads]

    @property
    def param_names(self):
        return [f"{lname}.{n}" for lname, layer in self.layers for n in layer.param_names]

    def config(self):
        return {}

    # --- mode and carried state -------------------------------------------------------------

    def train(self, mode=True):
        """Training mode (dropout on) or, with mode=False, evaluation mode. Returns the model."""
        self.training = bool(mode)
        for d in self.dropout_layers:
            d.train_flg = self.training
        return self

    def eval(self):
        return self.train(False)

    def reset_state(self):
        for lstm in self.lstm_layers:
            lstm.reset_state()

    def get_state(self):
        """[(h, c), ...] for each carried LSTM layer (copies; None before the first forward)."""
        return [(None if l.h is None else l.h.copy(), None if l.c is None else l.c.copy())
                for l in self.lstm_layers]

    def set_state(self, state):
        state = list(state)
        if len(state) != len(self.lstm_layers):
            raise ValueError(f"{type(self).__name__} has {len(self.lstm_layers)} LSTM layers but "
                             f"the state holds {len(state)}")
        for lstm, (h, c) in zip(self.lstm_layers, state):
            lstm.set_state(None if h is None else h.copy(), None if c is None else c.copy())

    # --- state protocol ---------------------------------------------------------------------

    def state_dict(self):
        """{'params': {name: array}, 'lstm_state': [{'h', 'c'} or None per carried layer],
        'dropout': [each dropout layer's state_dict()]}: references, not copies."""
        return {"params": dict(zip(self.param_names, self.params)),
                "lstm_state": [None if h is None else {"h": h, "c": c}
                               for h, c in ((l.h, l.c) for l in self.lstm_layers)],
                "dropout": [d.state_dict() for d in self.dropout_layers]}

    def load_state_dict(self, state):
        """Restore a state_dict(): names, shapes and dtypes are checked before anything changes
        (ValueError naming the first mismatch); arrays go to each parameter's device."""
        names, params = self.param_names, self.params
        given = state["params"]
        if list(given) != names:
            raise ValueError(f"the state holds parameters {list(given)[:6]} but "
                             f"{type(self).__name__} has {names[:6]}")
        for n, p in zip(names, params):
            a = given[n]
            if a.shape != p.shape or a.dtype != p.dtype:
                raise ValueError(f"parameter {n} is {a.dtype}{a.shape} in the state but "
                                 f"{p.dtype}{p.shape} in the model")
        carried, drops = state["lstm_state"], state["dropout"]
        if len(carried) != len(self.lstm_layers) or len(drops) != len(self.dropout_layers):
            raise ValueError(f"the state holds {len(carried)} LSTM states and {len(drops)} "
                             f"dropout states; {type(self).__name__} has "
                             f"{len(self.lstm_layers)} and {len(self.dropout_layers)}")
        for lstm, s in zip(self.lstm_layers, carried):
            Wh, (h, c) = lstm.params[1], (None, None) if s is None else (s["h"], s["c"])
            if h is not None and (h.ndim != 2 or h.shape[1] != Wh.shape[0] or c.shape != h.shape
                                  or not h.dtype == c.dtype == Wh.dtype):
                raise ValueError(f"a carried LSTM state must be two (N, {Wh.shape[0]}) {Wh.dtype} "
                                 f"arrays, got {h.dtype}{h.shape} and {c.dtype}{c.shape}")
        for p, n in zip(params, names):
            p[...] = backend.get_array_module(p).asarray(given[n])
        self.set_state([(None, None) if s is None else
                        (backend.asarray(s["h"]), backend.asarray(s["c"])) for s in carried])
        for d, s in zip(self.dropout_layers, drops):
            d.load_state_dict(s)

    def inference_copy(self):
        """A copy with its own layer state (caches, LSTM h/c) that shares the weight and gradient
        arrays, so several threads can decode with one set of weights (modules are shared)."""
        memo = {id(a): a for a in self.params + self.grads}
        memo.update((id(m), m) for m in list(sys.modules.values()))
        return copy.deepcopy(self, memo)

    def _check_ids(self, a, what, ignore=None):
        """a as a 2-D integer array on the current device, every id in [0, vocab_size) (or equal
        to ``ignore``); otherwise a clear error naming ``what``."""
        a = backend.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"{what} must be a 2-D (N, T) array of ids, got shape {a.shape}")
        if a.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integer ids, got dtype {a.dtype}")
        if a.size and not backend.skip_id_check(a):
            lo, hi = int(a.min()), int(a.max())
            if hi >= self.vocab_size:
                raise ValueError(f"{what} holds id {hi} outside the model's vocabulary "
                                 f"[0, {self.vocab_size}) (vocabulary mismatch?)")
            if lo < 0 and not (ignore is not None and bool(((a >= 0) | (a == ignore)).all())):
                raise ValueError(f"{what} holds negative id {lo}")
        return a

    def check_data(self, x, t):
        """Check a whole data set's ids once, as forward() checks each batch's (a trainer on the
        GPU does this, then skips the per-batch checks: see backend.ids_checked)."""
        x, t = backend.asarray(x), backend.asarray(t)
        if x.ndim == 1:  # a language model's corpus
            x, t = x.reshape(1, -1), t.reshape(1, -1)
        self._check_ids(x, "x")
        self._check_ids(t, "t", ignore=self.ignore_label)

    save_params = save_file  # (self, path, meta=None): fastseq.files.weights
    load_params = load_file  # (self, path) -> the file's metadata


# ---------------------------------------------------------------------------------------------
# Registry: model name -> class, task family and CLI defaults. A model file registers itself
# with one line; the training CLI reads everything it needs from here.

FAMILIES = ("seq2seq", "lm")


@dataclasses.dataclass
class ModelEntry:
    """One registered model. ``defaults``: its CLI defaults, constructor keywords (hidden_size
    ...) and training settings (epochs ..., which override the task's)."""
    name: str
    cls: type
    task: str           # family: 'seq2seq' or 'lm'
    defaults: dict
    help: str           # one line for --help
    pads: bool = False  # whether the constructor takes the data's pad_id (padding-aware)


REGISTRY = {}


def register(name, cls, *, family, defaults=None, help="", pads=False):
    """Add ``cls`` to REGISTRY under ``name``; ``family`` is 'seq2seq' or 'lm'; ``pads``: the
    constructor takes a ``pad_id`` keyword."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if name in REGISTRY and REGISTRY[name].cls is not cls:
        raise ValueError(f"model name {name!r} is already registered for {REGISTRY[name].cls}")
    REGISTRY[name] = ModelEntry(name, cls, family, dict(defaults or {}), help, pads)
    return cls
