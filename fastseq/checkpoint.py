"""checkpoint.npz: everything a training run needs to continue bit for bit.

A checkpoint holds the model's parameters, the optimiser's state (Adam's m, v and step), every
random generator the run draws from (the shuffle generator, each dropout layer's generator, NumPy's
global one), the LSTM state a language model carries between batches, the position (finished
epochs, batches done in the current epoch, the current epoch's row order, the language model's
time index), the loss figures so far, and whatever the caller adds to the metadata (configuration,
metrics, vocabulary). It is written atomically (temporary file, fsync, rename) by fastseq.files,
so a kill at any moment leaves the previous checkpoint or the new one, never a mix;
``fastseq.files.Writer`` does the writing on a background thread, so training waits only for the
snapshot's copies, and ``fastseq.files.load_checkpoint`` reads it back.
"""
import json
import numbers

import numpy as np

from . import backend, files
from .files import CHECKPOINT_FORMAT as FORMAT
from .files import CheckpointError
from .layers import TimeDropout

FILE_NAME = "checkpoint.npz"


# ---------------------------------------------------------------------------------------------
# random generators

def _dropout_layers(model):
    """Every TimeDropout reachable from the model's attributes, in a fixed order."""
    found, seen, todo = [], set(), [model]
    while todo:
        obj = todo.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, TimeDropout):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif type(obj).__module__.startswith("fastseq") and hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    return found


def _rng_get(rs, key, arrays, meta):
    kind, keys, pos, has_gauss, gauss = rs.get_state()
    arrays[f"rng/{key}"] = np.asarray(keys)
    meta[key] = [kind, int(pos), int(has_gauss), float(gauss)]


def _rng_set(rs, key, arrays, meta):
    kind, pos, has_gauss, gauss = meta[key]
    rs.set_state((kind, arrays[f"rng/{key}"], pos, has_gauss, gauss))


def _rngs(loop):
    """name -> generator for every generator the run owns (NumPy's global one included)."""
    rngs = {"global": np.random.mtrand._rand}
    rng = getattr(loop, "rng", None)
    if rng is not None and rng is not rngs["global"]:
        rngs["shuffle"] = rng
    for i, d in enumerate(_dropout_layers(loop.model)):
        if d._rng is not None and isinstance(d._rng[1], np.random.RandomState):
            rngs[f"dropout{i}"] = d._rng[1]
    return rngs


# ---------------------------------------------------------------------------------------------
# capture and restore

def _optimizer_state(opt, arrays):
    """Numbers in meta, lists of arrays (Adam's m and v) in arrays."""
    state = {}
    for k, v in vars(opt).items():
        if isinstance(v, numbers.Number) and not isinstance(v, bool):
            state[k] = v
        elif v is None:
            state[k] = None
        elif isinstance(v, list) and all(hasattr(a, "shape") for a in v):
            state[k] = {"arrays": len(v)}
            for i, a in enumerate(v):
                arrays[f"optim/{k}/{i}"] = host_copy(a)
    return {"class": type(opt).__name__, "state": state}


def host_copy(a):
    """A host copy of a (device or host) array that later training steps cannot change."""
    return np.array(backend.to_cpu(a), copy=True)


def snapshot(loop, meta=None):
    """(arrays, meta) of ``loop``'s whole training state (a Trainer or RnnlmTrainer) now, plus
    ``meta``: copies, safe to write while training goes on."""
    from . import __version__
    model = loop.model
    arrays = {}
    names = model.param_names
    for n, p in zip(names, model.params):
        arrays[f"param/{n}"] = host_copy(p)
    rng_meta = {}
    dropouts = _dropout_layers(model)
    for key, rs in _rngs(loop).items():
        _rng_get(rs, key, arrays, rng_meta)
    for i, d in enumerate(dropouts):  # on the GPU: [seed, draws] of the device-side masks
        if getattr(d, "_device_state", None) is not None:
            arrays[f"dropout_draws/{i}"] = host_copy(d._device_state)
    lm_state = None
    if hasattr(model, "get_state"):
        lm_state = []
        for i, (h, c) in enumerate(model.get_state()):
            lm_state.append(h is not None)
            if h is not None:
                arrays[f"lmstate/{i}/h"] = host_copy(h)
                arrays[f"lmstate/{i}/c"] = host_copy(c)
    order = getattr(loop, "order", None)
    if order is not None:
        order = np.asarray(order)
        arrays["order"] = order.astype(np.int32) if len(order) < 2 ** 31 else order
    m = {
        "format": FORMAT, "fastseq_version": __version__,
        "model_class": type(model).__name__, "param_names": names,
        "model_config": model.config(),  # what fastseq.load rebuilds the model from
        "position": {"epoch": loop.current_epoch, "iteration": loop.iteration,
                     "total_iters": loop.total_iters, "time_idx": getattr(loop, "time_idx", None)},
        "losses": {"loss_list": loop.loss_list, "epoch_losses": loop.epoch_losses,
                   "ppl_list": getattr(loop, "ppl_list", None),
                   "window": [float(loop.window[0]), loop.window[1]],  # float(): a device sum
                   "epoch_loss_sum": float(loop.epoch_loss_sum)},
        "optimizer": _optimizer_state(loop.optimizer, arrays),
        "rngs": rng_meta,
        "dropout_born": [d._rng is not None for d in dropouts],
        "lm_state": lm_state,
    }
    m.update(meta or {})
    return arrays, json.loads(json.dumps(m))  # a frozen copy of the figures and settings


def save(path, loop, meta=None):
    """Write ``loop``'s whole training state and ``meta`` to path (atomically), now."""
    files.write_npz(path, *snapshot(loop, meta))


def restore(loop, arrays, meta, path="checkpoint"):
    """Put a checkpoint's state into a freshly built ``loop`` (same model class and sizes,
    same optimiser class)."""
    model, opt = loop.model, loop.optimizer
    if meta["model_class"] != type(model).__name__ or meta["param_names"] != model.param_names:
        raise CheckpointError(f"{path}: holds a {meta['model_class']} but the run built a "
                              f"{type(model).__name__}")
    for n, p in zip(model.param_names, model.params):
        a = arrays[f"param/{n}"]
        if a.shape != p.shape or a.dtype != p.dtype:
            raise CheckpointError(f"{path}: parameter {n} is {a.dtype}{a.shape} but the model's is "
                                  f"{p.dtype}{p.shape}")
        p[...] = backend.asarray(a)
    o = meta["optimizer"]
    if o["class"] != type(opt).__name__:
        raise CheckpointError(f"{path}: optimiser {o['class']} but the run built "
                              f"{type(opt).__name__}")
    for k, v in o["state"].items():
        if isinstance(v, dict):
            v = [backend.asarray(arrays[f"optim/{k}/{i}"]) for i in range(v["arrays"])]
        setattr(opt, k, v)
    dropouts = _dropout_layers(model)
    for d, born in zip(dropouts, meta["dropout_born"]):
        if not born:
            d._rng = None
        elif d._seed is not None:
            d._rng = (np, np.random.RandomState(d._seed))
        else:
            d._rng = (np, np.random)
    for key, rs in _rngs(loop).items():
        if key in meta["rngs"]:
            _rng_set(rs, key, arrays, meta["rngs"])
    for i, d in enumerate(dropouts):
        draws = arrays.get(f"dropout_draws/{i}")
        d._device_state = backend.asarray(draws) if draws is not None and backend.is_gpu() \
            else None
    if meta["lm_state"] is not None:
        model.set_state([(backend.asarray(arrays[f"lmstate/{i}/h"]),
                          backend.asarray(arrays[f"lmstate/{i}/c"])) if has else (None, None)
                         for i, has in enumerate(meta["lm_state"])])
    pos, losses = meta["position"], meta["losses"]
    loop.current_epoch, loop.iteration = pos["epoch"], pos["iteration"]
    loop.total_iters = pos["total_iters"]
    if pos["time_idx"] is not None:
        loop.time_idx = pos["time_idx"]
    if "order" in arrays:
        loop.order = arrays["order"]
    loop.loss_list[:] = losses["loss_list"]
    loop.epoch_losses[:] = losses["epoch_losses"]
    if losses["ppl_list"] is not None:
        loop.ppl_list[:] = losses["ppl_list"]
    loop.window[:] = losses["window"]
    loop.epoch_loss_sum = losses["epoch_loss_sum"]
