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

and is checked as a whole against SCHEMA (fastseq.schema) before anything is restored.
"""
import json

import numpy as np

from . import backend, files
from .files import CHECKPOINT_FORMAT as FORMAT
from .files import CheckpointError
from .schema import Fields, Float, Int, List, Mapping, Optional, SchemaError, Str, check

FILE_NAME = "checkpoint.npz"


# ---------------------------------------------------------------------------------------------
# the declared metadata

ARRAY = Fields({"array": Str(max_len=1000)})
RNG = Fields({"keys": ARRAY, "pos": Int(0, 624), "has_gauss": Int(0, 1), "gauss": Float()})
COUNT = Int(0)
LOSSES = List(Float())
MODEL_STATE = Fields({
    "params": Mapping(ARRAY),
    "lstm_state": List(Optional(Fields({"h": ARRAY, "c": ARRAY}))),
    "dropout": List(Fields({"rng": Optional(RNG), "device": Optional(ARRAY)}))})
OPTIMIZERS = {
    "SGD": Fields({"lr": Float(0, positive=True)}),
    "Adam": Fields({"lr": Float(0, positive=True), "beta1": Float(0, 1), "beta2": Float(0, 1),
                    "iter": COUNT, "m": Optional(List(ARRAY)), "v": Optional(List(ARRAY)),
                    "device_state": Optional(Fields({"counter": ARRAY, "iter": COUNT}))})}
LOOP = {"epoch": COUNT, "iteration": COUNT, "total_iters": COUNT, "loss_list": LOSSES,
        "epoch_losses": LOSSES, "window": List(Float(), length=2), "epoch_loss_sum": Float(),
        "global_rng": RNG, "callbacks": Mapping()}
TRAINERS = {
    "Trainer": Fields(dict(LOOP, order=Optional(ARRAY), shuffle_rng=Optional(RNG))),
    "RnnlmTrainer": Fields(dict(LOOP, time_idx=COUNT, ppl_list=LOSSES))}
SCHEMA = Fields({
    "format": Str(choices={FORMAT}), "fastseq_version": Str(), "model_class": Str(),
    "model_config": Mapping(), "param_names": List(Str()),
    "optimizer_class": Str(choices=set(OPTIMIZERS)), "trainer_class": Str(choices=set(TRAINERS)),
    "state": Fields({"model": MODEL_STATE, "optimizer": Mapping(), "loop": Mapping()})})


def validate(meta, arrays, path="checkpoint"):
    """Check a checkpoint's metadata as a whole (SCHEMA, then the optimiser's and the loop's
    parts for their classes, then that every array it names is there): CheckpointError naming
    the file and the first bad field."""
    try:
        check(meta, SCHEMA)
        state = meta["state"]
        check(state["optimizer"], OPTIMIZERS[meta["optimizer_class"]], "state.optimizer")
        check(state["loop"], TRAINERS[meta["trainer_class"]], "state.loop")
        if list(state["model"]["params"]) != meta["param_names"]:
            raise SchemaError("state.model.params", "does not list param_names in order")
        _join(state, arrays, "state")
    except SchemaError as e:
        raise CheckpointError(f"{path}: not a usable checkpoint: {e}") from None


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


def _join(tree, arrays, where):
    """The inverse of _split (SchemaError for an array name that is not in arrays)."""
    if isinstance(tree, dict):
        if set(tree) == {"array"} and isinstance(tree["array"], str):
            if tree["array"] not in arrays:
                raise SchemaError(where, f"names array {tree['array'][:80]!r}, which the file "
                                         f"does not hold")
            return arrays[tree["array"]]
        return {k: _join(v, arrays, f"{where}.{k}") for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, arrays, f"{where}[{i}]") for i, v in enumerate(tree)]
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
        loop.load_state_dict(_join(meta["state"], arrays, "state"))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: does not fit the run: {e}") from None
