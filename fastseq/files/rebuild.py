"""``fastseq.load``: a model rebuilt -- class, sizes, weights, vocabulary, input reversal -- from
a model file or a checkpoint.

    saved = fastseq.load("runs/addition/model.npz")
    saved.answer(["71+118"])                  # ['189']  (seq2seq models)
    saved.answer(["71+118"], beam=5)          # beam search of width 5
    saved.nbest(["71+118"], 3)                # [[('189', -0.01), ('188', -5.2), ...]]

Nothing a file declares is trusted before it is checked: the metadata against a declared schema
(MODEL_FILE or CHECKPOINT_MODEL), the model class against the registry, the configuration against
the class, and the parameter shapes that configuration implies against the arrays in the file --
verified on small probe models before the real one is built, so a file whose metadata claims a
vocabulary of 25 million words is refused without allocating it. Weights must be finite
float32/float64. Every refusal is a FastseqFileError naming the file.
"""
from dataclasses import dataclass

import numpy as np

from .. import backend
from .core import FastseqFileError, check_params, expand_path
from .envelope import read_npz
from .schema import check_schema
from .weights import CHECKPOINT_FORMAT, CHECKPOINT_MODEL, MODEL_FILE

_NOT_CONFIG = ("seed", "rng", "dtype")  # constructor arguments a file may not set
BATCH = 256           # sources decoded together
WINDOW_BATCHES = 32   # batches per window of sources sorted by length


@dataclass
class LoadedModel:
    """A model rebuilt from a file, with what is needed to use it."""
    model: object
    task: str           # 'seq2seq' or 'lm'
    vocab: object       # seq2seq: datasets.sequence.Vocabulary; lm: list of words by id
    reverse: bool       # seq2seq: questions are fed reversed
    meta: dict
    path: str

    def answer(self, sources, beam=None, batch_size=BATCH):
        """The model's answer to each source string (seq2seq models): greedy, or with beam=k
        a beam search of width k. Symbols outside a vocabulary that has <unk> become <unk>
        (counted in one warning); one without <unk> refuses them. Sources are converted as
        ``python -m fastseq.generate --input`` converts a file's lines (see convert): the same
        answers, bit for bit."""
        return [hyps[0][0] for hyps in self._converted(sources, beam, None, batch_size,
                                                       "answer")]

    def nbest(self, sources, n, beam=None, batch_size=BATCH):
        """The n best answers to each source string, best first, from a beam search of width
        beam (default n): a list, per source, of n (answer, log-probability) pairs, the
        log-probability being the answer's summed natural-log p(symbol | source, symbols
        before), its end symbol included."""
        return self._converted(sources, n if beam is None else beam, n, batch_size, "nbest")

    def _converted(self, sources, beam, nbest, batch_size, caller):
        out, unknown = self.convert(sources, beam, nbest, batch_size)
        if unknown:
            import warnings
            warnings.warn(f"{caller}: {unknown} unknown symbol(s) in the sources became <unk>",
                          stacklevel=3)
        return out

    def convert(self, sources, beam=None, nbest=None, batch_size=BATCH):
        """(per source a list of (answer, log-probability or None) hypotheses, best first;
        number of unknown symbols in the sources). Greedy without beam (one hypothesis, no
        score); beam=k: a beam search of width k, keeping nbest hypotheses (default 1) with
        their summed log-probabilities.

        Sources go in windows of WINDOW_BATCHES batches; each window's sources are sorted by
        length (similar lengths pad little) and converted batch_size at a time
        (convert_window). Results depend on which sources share a batch only through
        floating-point rounding, yet that can flip a near tie: generate --input makes the
        same windows and batches, so its answers are these."""
        if isinstance(sources, str):
            sources = [sources]
        sources = list(sources)
        window = batch_size * WINDOW_BATCHES
        out, unknown = [], 0
        for s in range(0, len(sources), window):
            hyps, n_unknown = self.convert_window(sources[s:s + window], beam, nbest, batch_size)
            out += hyps
            unknown += n_unknown
        return out, unknown

    def convert_window(self, sources, beam=None, nbest=None, batch_size=BATCH):
        """convert for one window of sources: sorted by length, converted in batches, the
        results put back in the sources' order."""
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out, unknown = [None] * len(sources), 0
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            hyps, n_unknown = self.convert_batch([sources[i] for i in rows], beam, nbest)
            for i, h in zip(rows, hyps):
                out[i] = h
            unknown += n_unknown
        return out, unknown

    def convert_batch(self, sources, beam=None, nbest=None):
        """convert for one batch of sources, decoded together. Written against the
        vocabulary's conversion protocol: encode_sources, decode_targets, start_id,
        max_answer_length."""
        if self.task != "seq2seq":
            raise ValueError(f"{self.path}: holds a language model; answers need a seq2seq model")
        if not sources:
            return [], 0
        v = self.vocab
        if v.start_id is None:
            raise ValueError(f"{self.path}: the vocabulary has no start symbol")
        xs, unknown = v.encode_sources(sources)
        if self.reverse:  # a padding-aware model reverses each source's symbols only
            from ..datasets.sequence import reverse_padded
            xs = reverse_padded(xs, self.model.config().get("pad_id"))
        steps = v.max_answer_length
        if beam is None:
            if nbest is not None:
                raise ValueError("nbest needs a beam search (give beam)")
            out = np.asarray(self.model.generate(xs, v.start_id, steps)).reshape(len(xs), -1)
            return [[(a, None)] for a in v.decode_targets(out)], unknown
        from ..decoding import beam_search
        n = 1 if nbest is None else nbest
        seqs, scores = beam_search(self.model, xs, v.start_id, steps, k=beam, nbest=n)
        texts = v.decode_targets(seqs.reshape(len(xs) * n, -1))
        return [[(texts[i * n + j], float(scores[i, j])) for j in range(n)]
                for i in range(len(xs))], unknown


def load(path, data_dir=None):
    """A LoadedModel from ``model.npz`` or ``checkpoint.npz``. ``data_dir``: the PTB folder,
    needed only for a language model saved without its vocabulary."""
    path = expand_path(path)
    plans = []
    arrays, meta = read_npz(path, check=lambda meta, specs: plans.append(_Plan(path, meta, specs)))
    p = plans[0]
    model = p.cls(**p.config, seed=0)
    if model.param_names != p.names:
        raise FastseqFileError(f"{path}: {p.cls.__name__} parameters changed while loading")
    ready = check_params(path, p.names, [arrays[p.prefix + n] for n in p.names], model.params)
    for param, a in zip(model.params, ready):
        param[...] = backend.asarray(a)
    vocab = p.vocab if p.vocab is not None else _ptb_vocab(path, data_dir, model)
    return LoadedModel(model, p.task, vocab, p.reverse, meta, path)


def _ptb_vocab(path, data_dir, model):
    from ..datasets import ptb
    _, _, id_to_word = ptb.load_data("train", data_dir=data_dir)
    vocab = [id_to_word[i] for i in range(len(id_to_word))]
    if len(vocab) != model.vocab_size:
        raise FastseqFileError(f"{path}: the PTB vocabulary has {len(vocab)} words but the "
                               f"model ({type(model).__name__}) has vocab_size {model.vocab_size}")
    return vocab


class _Plan:
    """What the metadata says, checked: class, configuration, vocabulary, array-name prefix."""

    def __init__(self, path, meta, specs):
        self.path = path
        if meta.get("format") == CHECKPOINT_FORMAT:
            check_schema(path, meta, CHECKPOINT_MODEL)
            cls_name, config, vmeta = meta["model_class"], meta["model_config"], meta["vocabulary"]
            self.reverse = meta.get("config", {}).get("reverse", False)
            self.prefix, self.checkpoint = "param/", True
        else:
            check_schema(path, meta, MODEL_FILE)
            cls_name, config, vmeta = meta["model"], meta["config"], meta
            self.reverse = meta.get("reverse", False)
            self.prefix, self.checkpoint = "", False
        from ..models import REGISTRY
        known = {e.cls.__name__: e for e in REGISTRY.values()}
        if cls_name not in known:
            raise self.fail(f"holds a model of class {cls_name!r}, which this fastseq does not "
                            f"know (known: {', '.join(sorted(known))})")
        self.cls, self.task = known[cls_name].cls, known[cls_name].task
        for k in _NOT_CONFIG:
            if k in config:
                raise self.fail(f"configuration key {k!r} is not stored in a model file")
        self.config = dict(config)
        self.vocab = self._vocab(vmeta)
        self._check_shapes(specs)

    def fail(self, problem):
        return FastseqFileError(f"{self.path}: {problem}")

    def _vocab(self, vmeta):
        V = self.config.get("vocab_size")
        if self.task == "seq2seq" and "pairs" in vmeta:
            return self._pairs_vocab(vmeta["pairs"], V)
        if self.task == "seq2seq":
            for k in ("chars", "question_width", "answer_width"):
                if k not in vmeta:
                    raise self.fail(f"metadata field {k!r} is missing (a seq2seq model's "
                                    f"vocabulary)")
            chars = vmeta["chars"]
            if len(chars) != V:
                raise self.fail(f"the vocabulary has {len(chars)} characters but the model "
                                f"({self.cls.__name__}) has vocab_size {V}")
            from ..datasets.sequence import Vocabulary
            return Vocabulary({c: i for i, c in enumerate(chars)}, dict(enumerate(chars)),
                              vmeta["question_width"], vmeta["answer_width"])
        words = vmeta.get("vocab")
        if words is None:
            if vmeta.get("vocab_source", "ptb") != "ptb":
                raise self.fail(f"no vocabulary stored and an unknown vocab_source "
                                f"{vmeta['vocab_source'][:40]!r}")
            return None  # the PTB training split's, read after the weights
        if len(words) != V:
            raise self.fail(f"the vocabulary has {len(words)} words but the model "
                            f"({self.cls.__name__}) has vocab_size {V}")
        return list(words)

    def _pairs_vocab(self, pm, V):
        """A PairsVocabulary from metadata that fits VOCABULARY['pairs'] (checked) and whose
        fields agree with each other and with the model."""
        from ..datasets.pairs import SPECIALS, PairsVocabulary
        symbols = pm["symbols"]
        where = "vocabulary" if self.checkpoint else "metadata"
        for i, s in enumerate(SPECIALS):
            if symbols[i] != s:
                raise self.fail(f"{where} field 'pairs.symbols[{i}]' must be {s!r}, got "
                                f"{symbols[i][:40]!r}")
        kinds = {pm["source_tokens"], pm["target_tokens"]}
        both_char = kinds == {"char"}
        for i, s in enumerate(symbols[len(SPECIALS):], len(SPECIALS)):
            whole = not any(c.isspace() for c in s)  # a token split at whitespace
            if not (len(s) == 1 if both_char else whole or (len(s) == 1 and "char" in kinds)):
                raise self.fail(f"{where} field 'pairs.symbols[{i}]' = {s[:40]!r} is not a "
                                f"{'character' if both_char else 'token'}")
        if len(symbols) != V:
            raise self.fail(f"{where} field 'pairs.symbols' has {len(symbols)} symbols but the "
                            f"model ({self.cls.__name__}) has vocab_size {V}")
        if self.config.get("pad_id", PairsVocabulary.pad_id) != PairsVocabulary.pad_id:
            raise self.fail(f"the model's pad_id {self.config['pad_id']} is not the "
                            f"vocabulary's {PairsVocabulary.pad_id} ({SPECIALS[0]})")
        return PairsVocabulary(symbols, pm["source_tokens"], pm["target_tokens"],
                               pm["max_answer_length"])

    def _check_shapes(self, specs):
        names, shapes = _predict_shapes(self.cls, self.config, self.fail)
        params = {k[len(self.prefix):]: v for k, v in specs.items() if k.startswith(self.prefix)}
        if not self.checkpoint and len(params) != len(names):
            raise self.fail(f"holds {len(params)} arrays but a {self.cls.__name__} has "
                            f"{len(names)} parameters")
        for n, shape in zip(names, shapes):
            if n not in params:
                raise self.fail(f"has no array for the {self.cls.__name__} parameter {n!r}")
            if params[n].shape != shape:
                raise self.fail(f"the metadata describes {self.cls.__name__}({_fmt(self.config)}), "
                                f"whose parameter {n!r} has shape {shape}, but the file's array "
                                f"has shape {params[n].shape} (metadata and weights disagree)")
        self.names = names


def _fmt(config):
    return ", ".join(f"{k}={v}" for k, v in config.items())


def _predict_shapes(cls, config, fail):
    """Parameter names and shapes of cls(**config), found without building it: every dimension
    of these models is linear in the integer sizes, so small probe models give the coefficients
    (sizes equal in ``config`` move together, keeping constraints such as BetterRnnlm's D == H).
    Probe sizes are even and move in steps of 2, so a dimension may be half a size (each
    direction of a bidirectional layer). The keys a class names in ``structure_keys`` (counts
    of layers) keep their value in every probe."""
    fixed = set(getattr(cls, "structure_keys", ()))

    def is_size(k, v):
        return k not in fixed and type(v) is int and v > 0

    sizes = sorted({v for k, v in config.items() if is_size(k, v)})
    base = {v: 4 + 4 * i for i, v in enumerate(sizes)}  # distinct small even probe values

    def probe(bump):
        cfg = {k: (base[v] + bump.get(v, 0) if is_size(k, v) else v) for k, v in config.items()}
        try:
            m = cls(**cfg, seed=0)
        except (ValueError, TypeError) as e:
            raise fail(f"configuration {_fmt(config)} is not valid for {cls.__name__}: "
                       f"{e}") from None
        return m.param_names, [tuple(p.shape) for p in m.params]

    names, at_base = probe({})
    steps = {v: probe({v: 2})[1] for v in sizes}
    predicted = []
    for i, shape in enumerate(at_base):
        dims = []
        for d, s0 in enumerate(shape):
            twice = 2 * s0 + sum((steps[v][i][d] - s0) * (v - base[v]) for v in sizes)
            if twice % 2:
                raise fail(f"configuration {_fmt(config)} is not valid for {cls.__name__}: "
                           f"parameter {names[i]!r} would have a fractional size")
            dims.append(twice // 2)
        predicted.append(tuple(dims))
    check_names, at_two = probe({v: 4 for v in sizes})  # the coefficients hold at a third point
    linear = [tuple(s0 + 2 * sum(steps[v][i][d] - s0 for v in sizes) for d, s0 in enumerate(shape))
              for i, shape in enumerate(at_base)]
    if check_names != names or at_two != linear:
        raise fail(f"cannot verify the sizes of a {cls.__name__} from its configuration")
    return names, predicted
