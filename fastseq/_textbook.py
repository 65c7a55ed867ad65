"""The textbook's pickled weight files (``Rnnlm.pkl``, ``BetterRnnlm.pkl``, ``Seq2seq.pkl`` ...).

Such a file is a pickled *list* of float16 (or float32) NumPy arrays in the order of the model's
``params``. Unpickling runs whatever callables the file names, so it is read here through an
unpickler that admits only the few NumPy internals an array needs and refuses anything else before
it can run (``UnsafePickleError``). The arrays are then checked, by count and shape, against the
model and copied into its parameters in place.

    from fastseq._textbook import load_textbook_params
    load_textbook_params(model, "BetterRnnlm.pkl")
"""
import os
import pickle

import numpy as np

from . import backend


class UnsafePickleError(ValueError):
    """The pickle names a global outside the NumPy-array allowlist (nothing of it was run)."""


def _numpy_attr(*dotted):
    """The first of ``numpy._core.x.y`` / ``numpy.core.x.y`` that exists (NumPy 2 / NumPy 1),
    found without importing the deprecated ``numpy.core`` alias."""
    for path in dotted:
        obj = np
        try:
            for part in path.split(".")[1:]:
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AttributeError(f"none of {dotted} exists in this NumPy")


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """Stand-in for ``_codecs.encode`` as protocols 0-2 use it for bytes: str -> latin-1 bytes."""
    if not isinstance(obj, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise UnsafePickleError(f"_codecs.encode is admitted only as encode(str, 'latin1'), "
                                f"got encode({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin-1", errors)


def _allowlist():
    reconstruct = _numpy_attr("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
    scalar = _numpy_attr("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    frombuffer = _numpy_attr("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,  # protocols 0-2 write bytes through it
        ("__builtin__", "bytes"): bytes,  # ... and empty bytes as bytes() (Python 2 module name)
        ("builtins", "bytes"): bytes,
    }
    for mod in ("numpy._core", "numpy.core"):  # files written by NumPy 2 and by NumPy 1
        allowed[(f"{mod}.multiarray", "_reconstruct")] = reconstruct  # protocols 0-4
        allowed[(f"{mod}.multiarray", "scalar")] = scalar  # 0-d NumPy scalars
        allowed[(f"{mod}.numeric", "_frombuffer")] = frombuffer  # protocol 5
    return allowed


_ALLOWED = _allowlist()


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file, source):
        super().__init__(file, encoding="latin1")  # latin1: what NumPy needs for Python 2 pickles
        self._source = source

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"refusing to unpickle {self._source}: it references the global {module}.{name}, "
                f"which is not needed for NumPy arrays (only a list of arrays is accepted; nothing "
                f"from the file was run)")
        return obj

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing to unpickle {self._source}: it uses persistent ids")


def restricted_load(path):
    """The list of NumPy arrays pickled in ``path`` (a path or a binary file object), read without
    running anything but NumPy's array reconstruction."""
    if hasattr(path, "read"):
        source = getattr(path, "name", "<file object>")
        f, close = path, False
    else:
        source = os.fspath(path)
        f, close = open(source, "rb"), True
    try:
        try:
            obj = _ArrayUnpickler(f, source).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
                IndexError, KeyError, UnicodeDecodeError) as e:
            raise ValueError(f"{source} is not a readable pickle of NumPy arrays "
                             f"({type(e).__name__}: {e})") from e
    finally:
        if close:
            f.close()
    if not isinstance(obj, (list, tuple)):
        raise ValueError(f"{source}: expected a pickled list of NumPy arrays, found {type(obj).__name__}")
    for i, a in enumerate(obj):
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{source}: entry {i} is a {type(a).__name__}, not a NumPy array")
        if a.dtype.kind not in "biufc":
            raise ValueError(f"{source}: entry {i} has non-numeric dtype {a.dtype}")
    return list(obj)


def _drop_tied(arrays, tied, source):
    """Check and remove the textbook's duplicated (transposed) tied weights.

    Returns (kept arrays, their indices in the file)."""
    drop = set()
    for kept, dup in tied:
        for idx in (kept, dup):
            if not 0 <= idx < len(arrays):
                raise ValueError(f"{source}: tied pair ({kept}, {dup}) refers to entry {idx}, "
                                 f"but the file has {len(arrays)} arrays")
        a, b = arrays[kept], arrays[dup]
        if b.shape != a.T.shape:
            raise ValueError(f"{source}: entry {dup} should be entry {kept} transposed (tied weights): "
                             f"expected shape {a.T.shape}, found shape {b.shape}")
        if not np.array_equal(b, a.T, equal_nan=a.dtype.kind in "fc" and b.dtype.kind in "fc"):
            raise ValueError(f"{source}: entry {dup} should equal entry {kept} transposed "
                             f"(tied weights), but the values differ")
        drop.add(dup)
    keep = [i for i in range(len(arrays)) if i not in drop]
    return [arrays[i] for i in keep], keep


def load_textbook_params(model, path):
    """Load a textbook weight file into ``model.params`` in place (with dtype conversion).

    Entries are matched by position. If the file holds more entries than the model has params
    and the model declares ``textbook_tied`` -- ``(kept_index, textbook_index)`` pairs, meaning
    the file's entry ``textbook_index`` is entry ``kept_index`` transposed -- those duplicates are
    checked and dropped first. Every count and shape is checked before anything is copied.
    Returns the model.
    """
    source = getattr(path, "name", "<file object>") if hasattr(path, "read") else os.fspath(path)
    arrays = restricted_load(path)
    params = list(model.params)
    index = list(range(len(arrays)))
    n_file = len(arrays)
    tied = getattr(model, "textbook_tied", None)
    if len(arrays) != len(params) and tied:
        arrays, index = _drop_tied(arrays, tied, source)
    if len(arrays) != len(params):
        extra = (f" ({len(arrays)} after dropping the tied duplicates {sorted(set(range(n_file)) - set(index))})"
                 if len(arrays) != n_file else "")
        raise ValueError(f"{source}: the file holds {n_file} arrays{extra}, "
                         f"but {type(model).__name__} has {len(params)} parameters")
    for i, (p, a, j) in enumerate(zip(params, arrays, index)):
        if tuple(p.shape) != a.shape:
            where = f"entry {i}" if i == j else f"parameter {i} (file entry {j})"
            raise ValueError(f"{source}: {where}: expected shape {tuple(p.shape)}, found shape {a.shape}")
    for p, a in zip(params, arrays):
        xp = backend.get_array_module(p)
        p[...] = xp.asarray(a, dtype=p.dtype)
    return model
