"""Model files and checkpoints: what their metadata must hold (declared schemas), the model
file's writer and the weights' loader.

    arrays, meta = model_file(model, {"vocab": words})   # what save_params writes
    meta = load_params(model, "model.npz")                # model.load_params
    arrays, meta = load_checkpoint("checkpoint.npz")      # format checked; pass a fuller schema
"""
import numpy as np

from .. import backend
from .core import check_params, expand_path
from .envelope import read_npz, write_npz
from .schema import Any, Bool, Choice, Const, Dict, Float, Int, List, Null, OneOf, Str, check_schema

CHECKPOINT_FORMAT = "fastseq-checkpoint-1"
CHECKPOINT_FILE = Dict({"format": Const(CHECKPOINT_FORMAT)}, extra=Any())
MAX_WIDTH = 1 << 16    # question/answer widths a seq2seq file may declare
MAX_SIZE = 1 << 31     # any size in a configuration (the array shapes then decide)
MAX_VOCAB = 1 << 21    # symbols in a stored vocabulary

CONFIG = Dict({"vocab_size": Int(1, MAX_SIZE)},  # every model has one; other sizes vary
              extra=OneOf(Null(), Bool(), Int(0, MAX_SIZE), Float(), Str(64)), max_len=32)
VOCABULARY = {  # seq2seq: chars + widths; language model: vocab, or vocab_source "ptb"
    "chars": List(Str(1, 1), MAX_VOCAB, unique=True),
    "question_width": Int(1, MAX_WIDTH), "answer_width": Int(1, MAX_WIDTH),
    "vocab": List(Str(4096, 1, blank=False), MAX_VOCAB, unique=True),
    "vocab_source": Str(4096),
    # pairs (fastseq.datasets.pairs): symbols by id, <pad> <s> <unk> first; how sides are split
    "pairs": Dict({"symbols": List(Str(4096, 1), MAX_VOCAB, 4, unique=True),
                   "source_tokens": Choice("char", "space"),
                   "target_tokens": Choice("char", "space"),
                   "max_answer_length": Int(1, MAX_WIDTH)}),
}
MODEL_FILE = Dict({"model": Str(64, 1), "config": CONFIG},
                  optional={"reverse": Bool(), **VOCABULARY}, extra=Any())
CHECKPOINT_MODEL = Dict({"format": Const(CHECKPOINT_FORMAT), "model_class": Str(64, 1),
                         "model_config": CONFIG,
                         "vocabulary": Dict(optional=VOCABULARY, extra=Any())},
                        optional={"config": Dict(optional={"reverse": Bool()}, extra=Any())},
                        extra=Any())


def model_file(model, meta=None):
    """(arrays, meta) of ``model``'s file: host copies of the weights by name, the class and
    configuration, then ``meta``."""
    m = {"model": type(model).__name__, "config": model.config(), **(meta or {})}
    arrays = {n: np.array(backend.to_cpu(p), copy=True)
              for n, p in zip(model.param_names, model.params)}
    return arrays, m


def save_params(model, path, meta=None):
    """Write ``model``'s file (model_file) to ``path`` atomically. Returns the path."""
    return write_npz(path, *model_file(model, meta))


def load_params(model, path):
    """Read weights saved by save_params into ``model``. Everything is checked (metadata schema,
    names, shapes, float32/64, finite values, checksum) before the first parameter changes.
    Returns the metadata."""
    path = expand_path(path)
    names, params = model.param_names, model.params
    arrays, meta = read_npz(path, expected={n: p.shape for n, p in zip(names, params)},
                            check=lambda meta, specs: check_schema(path, meta, MODEL_FILE))
    # onto each parameter's own device (weights saved on either engine load on the other)
    ready = [backend.get_array_module(p).asarray(a)
             for p, a in zip(params, check_params(path, names, arrays.values(), params))]
    for p, a in zip(params, ready):
        p[...] = a
    return meta


def load_checkpoint(path, schema=CHECKPOINT_FILE):
    """(arrays, meta) of a checkpoint file whose metadata fits ``schema``; FastseqFileError
    (naming the file and the field) otherwise."""
    path = expand_path(path)
    return read_npz(path, check=lambda meta, specs: check_schema(path, meta, schema))
