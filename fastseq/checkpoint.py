"""checkpoint.npz: everything a training run needs to continue bit for bit.

A checkpoint is a trainer's state_dict() (fastseq.trainer): the model's parameters, carried LSTM
state and dropout generators, the optimiser's state (Adam's m, v and step), the loop's position
(finished epochs, batches done in the current epoch, the current epoch's row order, the language
model's time index), its random generators (the shuffle generator, NumPy's global one), the loss
figures so far and its callbacks' state; plus whatever the caller adds to the metadata
(configuration, metrics, vocabulary). It is written atomically (temporary file, fsync, rename) by
fastseq.files, so a kill at any moment leaves the previous checkpoint or the new one, never a mix.
``fastseq.files.Writer`` does the writing (checksum, file, fsync, rename) on a background
thread, so training waits only for the snapshot's copies.

Layout: the arrays are named ``param/<parameter name>`` (the model's weights, as in model files)
and ``state/<path>`` (every other array of the state); the metadata holds

    format, fastseq_version, model_class, model_config, param_names, optimizer_class,
    trainer_class, state: the state_dict() tree, each array replaced by {"array": its name}

and is checked as a whole against schema() (declared with fastseq.files.schema) before anything
is restored.
"""
import json

import numpy as np

from . import backend, files
from .files import CHECKPOINT_FORMAT as FORMAT
from .files import CheckpointError, check_schema
from .files.envelope import DEFAULT_LIMITS, MAX_NAME
from .files.schema import Any, Choice, Dict, Float, Int, List, Num, Optional, Str
from .files.weights import CONFIG

FILE_NAME = "checkpoint.npz"
REFUSED = "not a usable checkpoint:"  # what every refusal of validate() says after the path


# ---------------------------------------------------------------------------------------------
# the declared metadata (lists are bounded by what an envelope may hold at all)

MAX_ITEMS, MAX_ARRAYS = DEFAULT_LIMITS.max_values, DEFAULT_LIMITS.max_members
ARRAY = Dict({"array": Str(MAX_NAME, 1)})
RNG = Dict({"keys": ARRAY, "pos": Int(0, 624), "has_gauss": Int(0, 1), "gauss": Float()})
COUNT = Int(0)
FIGURES = List(Num(), MAX_ITEMS)
MODEL_STATE = Dict({
    "params": Dict(extra=ARRAY, max_len=MAX_ARRAYS),
    "lstm_state": List(Optional(Dict({"h": ARRAY, "c": ARRAY})), MAX_ARRAYS),
    "dropout": List(Dict({"rng": Optional(RNG), "device": Optional(ARRAY)}), MAX_ARRAYS)})
LR, BETA = Num(above=0), Num(0, below=1)  # as strict as the optimisers themselves (fastseq.optim)
MOMENTS = Optional(List(ARRAY, MAX_ARRAYS))
OPTIMIZERS = {
    "SGD": Dict({"lr": LR}),
    "Adam": Dict({"lr": LR, "beta1": BETA, "beta2": BETA, "iter": COUNT, "m": MOMENTS,
                  "v": MOMENTS, "device_state": Optional(Dict({"counter": ARRAY, "iter": COUNT}))})}
LOOP = {"epoch": COUNT, "iteration": COUNT, "total_iters": COUNT, "loss_list": FIGURES,
        "epoch_losses": FIGURES, "window": List(Num(), 2, 2), "epoch_loss_sum": Num(),
        "global_rng": RNG, "callbacks": Dict(extra=Any())}
TRAINERS = {
    "Trainer": Dict(dict(LOOP, order=Optional(ARRAY), shuffle_rng=Optional(RNG))),
    "RnnlmTrainer": Dict(dict(LOOP, time_idx=COUNT, ppl_list=FIGURES))}
TRAINERS["BucketTrainer"] = TRAINERS["Trainer"]  # the same state, another order of rows
CLASSES = Dict({"optimizer_class": Choice(*OPTIMIZERS), "trainer_class": Choice(*TRAINERS)},
               extra=Any())


def schema(optimizer_class, trainer_class):
    """The whole metadata of a checkpoint written by that optimiser and trainer class (other
    top-level keys are the caller's: configuration, metrics, vocabulary)."""
    return Dict({"format": Choice(FORMAT), "fastseq_version": Str(64),
                 "model_class": Str(64, 1), "model_config": CONFIG,
                 "param_names": List(Str(MAX_NAME, 1), MAX_ARRAYS, unique=True),
                 "optimizer_class": Choice(optimizer_class),
                 "trainer_class": Choice(trainer_class),
                 "state": Dict({"model": MODEL_STATE, "optimizer": OPTIMIZERS[optimizer_class],
                                "loop": TRAINERS[trainer_class]})}, extra=Any())


def check(path, meta, spec):
    """CheckpointError "<path>: not a usable checkpoint: metadata field ..." unless meta fits."""
    check_schema(path, meta, spec, f"{REFUSED} metadata", CheckpointError)


def validate(meta, arrays, path="checkpoint"):
    """Check a checkpoint's metadata as a whole (its classes, then schema() for them, then that
    every array it names is there): CheckpointError naming the file and the first bad field."""
    check(path, meta, CLASSES)
    check(path, meta, schema(meta["optimizer_class"], meta["trainer_class"]))
    state = meta["state"]
    if list(state["model"]["params"]) != meta["param_names"]:
        raise CheckpointError(f"{path}: {REFUSED} metadata field 'state.model.params' does not "
                              f"list param_names in order")
    _join(state, arrays, "state", path)


# ---------------------------------------------------------------------------------------------
# state trees <-> (arrays, JSON)

def _split(tree, name, arrays):
    """The tree with each array replaced by {"array": name}, its host copy put in arrays."""
    if isinstance(tree, dict):
        return {k: _split(v, f"{name}/{k}", arrays) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split(v, f"{name}/{i}", arrays) for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, np.generic):
        return tree.item()
    arrays[name] = host_copy(tree)
    return {"array": name}


def _join(tree, arrays, where, path):
    """The inverse of _split (CheckpointError for an array name that is not in arrays)."""
    if isinstance(tree, dict):
        if set(tree) == {"array"} and isinstance(tree["array"], str):
            if tree["array"] not in arrays:
                raise CheckpointError(f"{path}: {REFUSED} metadata field {where!r} names array "
                                      f"{tree['array'][:80]!r}, which the file does not hold")
            return arrays[tree["array"]]
        return {k: _join(v, arrays, f"{where}.{k}", path) for k, v in tree.items()}
    if isinstance(tree, list):  # (a loss curve's numbers are returned as they are)
        return [_join(v, arrays, f"{where}[{i}]", path) if isinstance(v, (dict, list)) else v
                for i, v in enumerate(tree)]
    return tree


def host_copy(a):
    """A host copy of a (device or host) array that later training steps cannot change."""
    return np.array(backend.to_cpu(a), copy=True)


# ---------------------------------------------------------------------------------------------
# capture and restore

def snapshot(loop, meta=None):
    """(arrays, meta) of ``loop``'s whole training state (a Trainer or RnnlmTrainer) now, plus
    ``meta``: copies, safe to write while training goes on."""
    from . import __version__
    model, arrays = loop.model, {}
    state = loop.state_dict()
    params = state["model"]["params"]
    for n, p in params.items():
        arrays[f"param/{n}"] = host_copy(p)
    state["model"] = dict(state["model"], params={})
    tree = _split(state, "state", arrays)
    tree["model"]["params"] = {n: {"array": f"param/{n}"} for n in params}
    m = {"format": FORMAT, "fastseq_version": __version__,
         "model_class": type(model).__name__, "param_names": list(params),
         "model_config": model.config(),  # what fastseq.load rebuilds the model from
         "optimizer_class": type(loop.optimizer).__name__,
         "trainer_class": type(loop).__name__, "state": tree}
    m.update(meta or {})
    return arrays, json.loads(json.dumps(m))  # a frozen copy of the figures and settings


def save(path, loop, meta=None):
    """Write ``loop``'s whole training state and ``meta`` to path (atomically), now."""
    files.write_npz(path, *snapshot(loop, meta))


def restore(loop, arrays, meta, path="checkpoint"):
    """Put a checkpoint's state into a freshly built ``loop`` (same model class and sizes, same
    optimiser and trainer class): the metadata is validated first, then loop.load_state_dict."""
    validate(meta, arrays, path)
    model, opt = loop.model, loop.optimizer
    built = {"model_class": type(model).__name__, "param_names": model.param_names,
             "optimizer_class": type(opt).__name__, "trainer_class": type(loop).__name__}
    for field, value in built.items():
        if meta[field] != value:
            raise CheckpointError(f"{path}: holds a {meta['model_class']} ({field} "
                                  f"{str(meta[field])[:200]}) but the run built a "
                                  f"{type(model).__name__} ({field} {str(value)[:200]})")
    try:
        loop.load_state_dict(_join(meta["state"], arrays, "state", path))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: does not fit the run: {e}") from None
