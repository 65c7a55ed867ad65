"""``fastseq.load``: a model rebuilt -- class, sizes, weights, vocabulary, input reversal -- from
a model file or a checkpoint.

    saved = fastseq.load("runs/addition/model.npz")
    saved.answer(["71+118"])                  # ['189']  (seq2seq models)

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

START = "_"            # answers begin with this character (the textbook's data format)
_NOT_CONFIG = ("seed", "rng", "dtype")  # constructor arguments a file may not set


@dataclass
class LoadedModel:
    """A model rebuilt from a file, with what is needed to use it."""
    model: object
    task: str           # 'seq2seq' or 'lm'
    vocab: object       # seq2seq: datasets.sequence.Vocabulary; lm: list of words by id
    reverse: bool       # seq2seq: questions are fed reversed
    meta: dict
    path: str

    def answer(self, questions, beam=None):
        """Greedy answers (strings, padding stripped) to question strings (seq2seq models);
        beam=k: beam search of width k instead."""
        if self.task != "seq2seq":
            raise ValueError(f"{self.path}: holds a language model; answer() needs a seq2seq model")
        if isinstance(questions, str):
            questions = [questions]
        if not questions:
            return []
        start = self.vocab.char_to_id.get(START)
        if start is None:
            raise ValueError(f"{self.path}: the vocabulary has no {START!r} start symbol")
        xs = self.vocab.encode(list(questions))
        if self.reverse:  # a padding-aware model reverses each question's characters only
            from ..datasets.sequence import reverse_padded
            xs = reverse_padded(xs, self.model.config().get("pad_id"))
        if beam is not None:
            from ..decoding import beam_search
            out = beam_search(self.model, xs, start, self.vocab.answer_width - 1, k=beam)
        else:
            out = np.atleast_2d(np.asarray(self.model.generate(xs, start,
                                                               self.vocab.answer_width - 1)))
        return [s.strip() for s in self.vocab.decode(out)]


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
    (sizes equal in ``config`` move together, keeping constraints such as BetterRnnlm's D == H)."""
    sizes = sorted({v for v in config.values() if type(v) is int and v > 0})
    base = {v: 3 + 4 * i for i, v in enumerate(sizes)}  # distinct small probe values

    def probe(bump):
        cfg = {k: (base[v] + bump.get(v, 0) if v in base and type(v) is int else v)
               for k, v in config.items()}
        try:
            m = cls(**cfg, seed=0)
        except (ValueError, TypeError) as e:
            raise fail(f"configuration {_fmt(config)} is not valid for {cls.__name__}: "
                       f"{e}") from None
        return m.param_names, [tuple(p.shape) for p in m.params]

    names, at_base = probe({})
    steps = {v: probe({v: 1})[1] for v in sizes}
    predicted = []
    for i, shape in enumerate(at_base):
        dims = []
        for d, s0 in enumerate(shape):
            dims.append(s0 + sum((steps[v][i][d] - s0) * (v - base[v]) for v in sizes))
        predicted.append(tuple(dims))
    check_names, at_two = probe({v: 2 for v in sizes})  # the coefficients hold at a third point
    linear = [tuple(s0 + 2 * sum(steps[v][i][d] - s0 for v in sizes) for d, s0 in enumerate(shape))
              for i, shape in enumerate(at_base)]
    if check_names != names or at_two != linear:
        raise fail(f"cannot verify the sizes of a {cls.__name__} from its configuration")
    return names, predicted
