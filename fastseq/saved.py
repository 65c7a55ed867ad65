"""Rebuild a saved model -- class, sizes, weights, vocabulary, input reversal -- from the
``model.npz`` or ``checkpoint.npz`` that ``python -m fastseq.train`` writes.

    saved = fastseq.load("runs/addition/model.npz")
    saved.answer(["71+118"])                  # ['189']  (seq2seq models)
    saved.model, saved.vocab, saved.reverse, saved.task, saved.meta

Nothing the file declares is trusted before it is checked: the model class must be a registered
one, the configuration may only hold the constructor's own keywords, and the parameter shapes that
configuration implies must be exactly the shapes of the arrays in the file -- verified on small
probe models before the real one is built, so a file whose metadata claims a vocabulary of 25
million words is refused without allocating it. The vocabulary must fit the model; weights must be
finite float32/float64. Every refusal is a fastseq.io.FastseqFileError naming the file.
"""
import inspect
import os
from dataclasses import dataclass

import numpy as np

from . import backend
from .io import FastseqFileError, check_params, read_npz

CHECKPOINT_FORMAT = "fastseq-checkpoint-1"
MAX_WIDTH = 1 << 16   # question/answer widths a seq2seq file may declare
MAX_SIZE = 1 << 31    # any size in a configuration (the array shapes then decide)
START = "_"           # answers begin with this character (the textbook's data format)


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
            from .datasets.sequence import reverse_padded
            xs = reverse_padded(xs, getattr(self.model, "pad_id", None))
        if beam is not None:
            from .decoding import beam_search
            out = beam_search(self.model, xs, start, self.vocab.answer_width - 1, k=beam)
        else:
            out = np.atleast_2d(np.asarray(self.model.generate(xs, start,
                                                               self.vocab.answer_width - 1)))
        return [s.strip() for s in self.vocab.decode(out)]


def _registry():
    from .models import REGISTRY
    return {e.cls.__name__: e for e in REGISTRY.values()}


class _Plan:
    """What the metadata says, checked: class, configuration, vocabulary, array-name prefix."""

    def __init__(self, path, meta, specs):
        self.path = path
        self.checkpoint = meta.get("format") == CHECKPOINT_FORMAT
        if self.checkpoint:
            cls_name, vmeta = meta.get("model_class"), meta.get("vocabulary")
            run = meta.get("config") if isinstance(meta.get("config"), dict) else {}
            self.prefix = "param/"
            self.reverse = run.get("reverse", False)
        else:
            cls_name, vmeta, run = meta.get("model"), meta, {}
            self.prefix = ""
            self.reverse = meta.get("reverse", False)
        known = _registry()
        if not isinstance(cls_name, str) or cls_name not in known:
            raise FastseqFileError(f"{path}: holds a model of class {str(cls_name)[:60]!r}, which "
                                   f"this fastseq does not know (known: "
                                   f"{', '.join(sorted(known))})")
        entry = known[cls_name]
        self.cls, self.task = entry.cls, entry.task
        if not isinstance(self.reverse, bool):
            raise FastseqFileError(f"{path}: 'reverse' must be true or false, got "
                                   f"{str(self.reverse)[:40]}")
        if not isinstance(vmeta, dict):
            raise FastseqFileError(f"{path}: no vocabulary in the metadata")
        self.config = self._config(meta, run, vmeta, entry, specs)
        self.vocab = self._vocab(vmeta)
        self._check_shapes(specs)

    def fail(self, problem):
        return FastseqFileError(f"{self.path}: {problem}")

    # -- configuration ---------------------------------------------------------------------
    def _config(self, meta, run, vmeta, entry, specs):
        takes = inspect.signature(self.cls).parameters
        allowed = {k for k, p in takes.items() if k not in ("seed", "rng", "dtype")
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        config = meta.get("model_config") if self.checkpoint else meta.get("config")
        if config is None and self.checkpoint:  # older checkpoints: the run's settings
            chars = vmeta.get("chars")
            vocab_len = len(chars or vmeta.get("vocab") or [])
            config = {"vocab_size": vocab_len, **{k: run[k] for k in entry.defaults
                                                  if k in allowed and k in run}}
            if "pad_id" in allowed and isinstance(chars, list) and " " in chars:
                config["pad_id"] = chars.index(" ")  # as train.py sets it
        if not isinstance(config, dict):
            raise self.fail("metadata has no model configuration")
        for k, v in config.items():
            if k not in allowed:
                raise self.fail(f"configuration key {str(k)[:40]!r} is not a {self.cls.__name__} "
                                f"argument (it takes {', '.join(sorted(allowed))})")
            if isinstance(v, int) and not isinstance(v, bool) and not 1 <= v <= MAX_SIZE:
                raise self.fail(f"configuration {k} = {v} is out of range [1, {MAX_SIZE}]")
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise self.fail(f"configuration {k} is a {type(v).__name__}, not a number")
        return dict(config)

    # -- vocabulary ------------------------------------------------------------------------
    def _vocab(self, vmeta):
        V = self.config.get("vocab_size")
        if self.task == "seq2seq":
            chars = vmeta.get("chars")
            if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1
                                                      for c in chars):
                raise self.fail("the vocabulary ('chars') must be a list of single characters")
            if len(set(chars)) != len(chars):
                raise self.fail("the vocabulary ('chars') lists a character twice")
            if len(chars) != V:
                raise self.fail(f"the vocabulary has {len(chars)} characters but the model "
                                f"({self.cls.__name__}) has vocab_size {V}")
            widths = [vmeta.get("question_width"), vmeta.get("answer_width")]
            if not all(type(w) is int and 1 <= w <= MAX_WIDTH for w in widths):
                raise self.fail(f"question_width/answer_width must be integers in "
                                f"[1, {MAX_WIDTH}], "
                                f"got {str(widths)[:60]}")
            from .datasets.sequence import Vocabulary
            return Vocabulary({c: i for i, c in enumerate(chars)}, dict(enumerate(chars)), *widths)
        words = vmeta.get("vocab")
        if words is None:
            if vmeta.get("vocab_source", "ptb") != "ptb":
                raise self.fail(f"no vocabulary stored and an unknown vocab_source "
                                f"{str(vmeta.get('vocab_source'))[:40]!r}")
            return None  # the PTB training split's, read after the weights
        if not isinstance(words, list) or not all(isinstance(w, str) and w and not w.isspace()
                                                  for w in words):
            raise self.fail("the vocabulary ('vocab') must be a list of non-empty words")
        if len(set(words)) != len(words):
            raise self.fail("the vocabulary ('vocab') lists a word twice")
        if len(words) != V:
            raise self.fail(f"the vocabulary has {len(words)} words but the model "
                            f"({self.cls.__name__}) has vocab_size {V}")
        return list(words)

    # -- shapes ----------------------------------------------------------------------------
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
    sizes = sorted({v for v in config.values() if type(v) is int})
    base = {v: 3 + 4 * i for i, v in enumerate(sizes)}  # distinct small probe values

    def probe(bump):
        cfg = {k: (base[v] + bump.get(v, 0) if type(v) is int else v) for k, v in config.items()}
        try:
            m = cls(**cfg, **({"seed": 0} if "seed" in inspect.signature(cls).parameters else {}))
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


def load(path, data_dir=None):
    """A LoadedModel from ``model.npz`` or ``checkpoint.npz`` (see the module docstring).
    ``data_dir``: the PTB folder, needed only for a language model saved without its vocabulary."""
    path = os.fspath(path)
    plan = []

    def check(meta, specs):
        plan.append(_Plan(path, meta, specs))

    arrays, meta = read_npz(path, check=check)
    p = plan[0]
    seed = {"seed": 0} if "seed" in inspect.signature(p.cls).parameters else {}
    model = p.cls(**p.config, **seed)
    if model.param_names != p.names:
        raise FastseqFileError(f"{path}: {p.cls.__name__} parameters changed while loading")
    ready = check_params(path, p.names, [arrays[p.prefix + n] for n in p.names], model.params)
    for param, a in zip(model.params, ready):
        param[...] = backend.asarray(a)
    vocab = p.vocab
    if vocab is None:
        from .datasets import ptb
        _, _, id_to_word = ptb.load_data("train", data_dir=data_dir)
        vocab = [id_to_word[i] for i in range(len(id_to_word))]
        if len(vocab) != model.vocab_size:
            raise FastseqFileError(f"{path}: the PTB vocabulary has {len(vocab)} words but the "
                                   f"model ({p.cls.__name__}) has vocab_size {model.vocab_size}")
    return LoadedModel(model, p.task, vocab, p.reverse, meta, path)
