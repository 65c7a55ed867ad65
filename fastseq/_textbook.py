"""The textbook's pickled weight files (``Rnnlm.pkl``, ``BetterRnnlm.pkl``, ``Seq2seq.pkl`` ...).

Such a file is a pickled *list* of float16 (or float32) NumPy arrays in the order of the model's
``params``. Unpickling runs whatever callables the file names, so it is read here without ever
calling NumPy from the pickle:

1. the whole file (bounded by a size derived from the model) is walked opcode by opcode without
   running anything: every length an opcode declares must fit in the bytes that follow, memo
   indices, opcode count and nesting are bounded;
2. the unpickler admits only the globals an array pickle names, and maps them to stand-ins that
   merely record their arguments (anything else is an ``UnsafePickleError`` before it runs);
3. each recorded array must have a plain float dtype (float16/32/64: integer, bool, complex,
   object and structured arrays are refused, never cast) and exactly the bytes its shape needs;
   only then is it built, with ``np.frombuffer``.

The arrays are then checked, by count, shape and finiteness, against the model, and copied into its
parameters in place once all of them passed.

    from fastseq._textbook import load_textbook_params
    load_textbook_params(model, "BetterRnnlm.pkl")
"""
import io
import math
import os
import pickle
import pickletools
import re
import warnings

import numpy as np

from . import backend
from .files.core import FastseqFileError, check_params, open_regular

MAX_FILE_BYTES = 1 << 30  # the textbook's largest file (BetterRnnlm.pkl) is ~25 MB
MAX_OPS = 100_000         # pickle opcodes (a list of arrays needs a few dozen per array)
MAX_MEMO = 100_000        # memo index (the unpickler sizes its memo table by the largest index)
MAX_MARKS = 64            # open MARKs at a time (nesting)
MAX_NDIM = 32
_SIMPLE_DTYPE = re.compile(r"[a-zA-Z?]\d{0,2}")


class UnsafePickleError(FastseqFileError):
    """The pickle names a global outside the NumPy-array allowlist (nothing of it was run)."""


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """Stand-in for ``_codecs.encode`` as protocols 0-2 use it for bytes: str -> latin-1 bytes."""
    if (not isinstance(obj, str) or not isinstance(encoding, str) or errors != "strict"
            or encoding.replace("-", "").replace("_", "").lower() != "latin1"):
        raise UnsafePickleError(f"_codecs.encode is admitted only as encode(str, 'latin1'), "
                                f"got encode({type(obj).__name__}, {str(encoding)[:20]!r})")
    return obj.encode("latin-1")


def _empty_bytes():
    """Stand-in for ``bytes`` as protocols 0-2 use it: ``bytes()`` for an empty bytes object."""
    return b""


# Stand-ins for the NumPy callables a pickled array names. They only record their arguments;
# arrays are built afterwards from those records, once dtype, shape and byte count agree.
_NDARRAY = object()  # numpy.ndarray


class _DtypeStub:
    def __init__(self, spec, align=False, copy=False):
        if not isinstance(spec, str) or not _SIMPLE_DTYPE.fullmatch(spec):
            raise FastseqFileError(f"refusing dtype {str(spec)[:40]!r}: only plain numeric "
                                   f"dtypes are read")
        try:
            self.dtype = np.dtype(spec)
        except TypeError:
            raise FastseqFileError(f"unknown dtype {spec!r}") from None
        if self.dtype.kind not in "biufc":
            raise FastseqFileError(f"refusing dtype {self.dtype}: only numeric arrays are read")
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def resolve(self):
        st = self.state
        if st is None:
            return self.dtype
        if (not isinstance(st, tuple) or len(st) not in (8, 9) or st[0] not in (3, 4)
                or st[1] not in ("<", ">", "|", "=") or any(x is not None for x in st[2:5])):
            raise FastseqFileError(f"dtype state {str(st)[:60]} is not a plain numeric dtype's "
                                   f"(structured or nested dtypes are not read)")
        return self.dtype.newbyteorder(st[1]) if st[1] in "<>" else self.dtype


class _ArrayStub:
    def __init__(self, state=None):
        self.state = state

    def __setstate__(self, state):
        self.state = state


class _ScalarStub:
    def __init__(self, *args):
        pass


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY:
        raise FastseqFileError("_reconstruct is admitted only for numpy.ndarray")
    return _ArrayStub()


def _frombuffer(buf, dtype, shape, order):
    return _ArrayStub((1, shape, dtype, order == "F", buf))


_ALLOWED = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): _latin1_encode,  # protocols 0-2 write bytes through it
    ("__builtin__", "bytes"): _empty_bytes,  # ... and empty bytes as bytes() (Python 2 name)
    ("builtins", "bytes"): _empty_bytes,
}
for _mod in ("numpy._core", "numpy.core"):  # files written by NumPy 2 and by NumPy 1
    _ALLOWED[(f"{_mod}.multiarray", "_reconstruct")] = _reconstruct  # protocols 0-4
    _ALLOWED[(f"{_mod}.multiarray", "scalar")] = _ScalarStub  # 0-d NumPy scalars (refused)
    _ALLOWED[(f"{_mod}.numeric", "_frombuffer")] = _frombuffer  # protocol 5


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


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}
_REFUSED_OPS = {"NEXT_BUFFER", "READONLY_BUFFER", "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4",
                "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}


def _prescan(data, source):
    """Walk the opcodes without running them: every length an opcode declares must fit in the
    bytes that follow (pickletools reads them from memory, so nothing large is allocated), memo
    indices, opcode count and MARK nesting are bounded."""
    stream = io.BytesIO(data)
    marks = ops = 0
    try:
        with warnings.catch_warnings():  # pickletools' complaints about odd escapes in STRING args
            warnings.simplefilter("ignore", DeprecationWarning)
            for op, arg, pos in pickletools.genops(stream):
                ops += 1
                if ops > MAX_OPS:
                    raise FastseqFileError(f"{source}: more than {MAX_OPS} pickle opcodes")
                if op.name == "FRAME" and arg > len(data) - stream.tell():
                    raise FastseqFileError(f"{source}: a pickle frame of {arg} bytes at offset "
                                           f"{pos} runs past the end of the file")
                if op.name in _MEMO_OPS and not (isinstance(arg, int) and 0 <= arg <= MAX_MEMO):
                    raise FastseqFileError(f"{source}: memo index {str(arg)[:30]} at offset {pos} "
                                           f"is out of range")
                if op.name in _REFUSED_OPS:
                    raise UnsafePickleError(f"refusing to unpickle {source}: it uses the "
                                            f"{op.name} opcode (not needed for a list of NumPy "
                                            f"arrays)")
                if op.name == "MARK":
                    marks += 1
                    if marks > MAX_MARKS:
                        raise FastseqFileError(f"{source}: pickle nests more than {MAX_MARKS} "
                                               f"deep")
                elif pickletools.markobject in op.stack_before:
                    marks -= 1
    except FastseqFileError:
        raise
    except Exception as e:  # pickletools' own complaints: truncated, unknown opcode, bad literal
        raise FastseqFileError(f"{source} is not a readable pickle of NumPy arrays "
                               f"({type(e).__name__}: {str(e)[:120]})") from None


def _build_array(stub, i, source):
    """A real float ndarray from a stub's record: dtype, shape and byte count checked first."""
    st = stub.state
    if isinstance(st, tuple) and len(st) == 4:
        st = (1, *st)
    if not isinstance(st, tuple) or len(st) != 5:
        raise FastseqFileError(f"{source}: entry {i} is not a complete pickled array")
    _, shape, dstub, fortran, raw = st
    if not isinstance(dstub, _DtypeStub):
        raise FastseqFileError(f"{source}: entry {i} has no plain dtype")
    dtype = dstub.resolve()
    if dtype.kind != "f":
        raise FastseqFileError(f"{source}: entry {i} has dtype {dtype}; weights must be float16, "
                               f"float32 or float64 (nothing is cast silently)")
    if (not isinstance(shape, tuple) or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise FastseqFileError(f"{source}: entry {i} has an invalid shape {str(shape)[:60]}")
    if not isinstance(raw, (bytes, bytearray)):
        raise FastseqFileError(f"{source}: entry {i} holds its data as a {type(raw).__name__}")
    n = dtype.itemsize * math.prod(shape)
    if n != len(raw):
        raise FastseqFileError(f"{source}: entry {i} declares shape {shape} of {dtype} ({n} bytes) "
                               f"but holds {len(raw)} bytes")
    a = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran is True else "C")
    return a.astype(dtype.newbyteorder("="), copy=True)


def _source(path):
    """How messages name ``path``: a path (str, bytes or os.PathLike) or a binary file object."""
    if isinstance(path, io.IOBase):
        return getattr(path, "name", "<file object>")
    return os.fspath(path)


def restricted_load(path, max_bytes=MAX_FILE_BYTES):
    """The list of float NumPy arrays pickled in ``path`` (a path or a binary file object), read
    without running anything from the file and without allocating more than it holds."""
    source = _source(path)
    if isinstance(path, io.IOBase):
        data = path.read(max_bytes + 1)
    else:
        f, size = open_regular(source)
        with f:
            if size > max_bytes:
                raise FastseqFileError(f"{source}: {size} bytes is more than the limit of "
                                       f"{max_bytes} for these weights")
            data = f.read(max_bytes + 1)
    if not isinstance(data, bytes):
        raise TypeError(f"{source}: the file object must be opened in binary mode")
    if len(data) > max_bytes:
        raise FastseqFileError(f"{source}: more than the limit of {max_bytes} bytes")
    _prescan(data, source)
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except FastseqFileError as e:
        raise FastseqFileError(f"{source}: {e}") from None
    except Exception as e:  # only our stand-ins ran: any other failure means a malformed file
        raise FastseqFileError(f"{source} is not a readable pickle of NumPy arrays "
                               f"({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, (list, tuple)):
        raise FastseqFileError(f"{source}: expected a pickled list of NumPy arrays, found "
                               f"{type(obj).__name__}")
    out = []
    for i, a in enumerate(obj):
        if not isinstance(a, _ArrayStub):
            kind = "NumPy scalar" if isinstance(a, _ScalarStub) else type(a).__name__
            raise FastseqFileError(f"{source}: entry {i} is a {kind}, not a NumPy array")
        out.append(_build_array(a, i, source))
    return out


def _drop_tied(arrays, tied, source):
    """Check and remove the textbook's duplicated (transposed) tied weights.

    Returns (kept arrays, their indices in the file)."""
    drop = set()
    for kept, dup in tied:
        for idx in (kept, dup):
            if not 0 <= idx < len(arrays):
                raise FastseqFileError(f"{source}: tied pair ({kept}, {dup}) refers to entry "
                                       f"{idx}, but the file has {len(arrays)} arrays")
        a, b = arrays[kept], arrays[dup]
        if b.shape != a.T.shape:
            raise FastseqFileError(f"{source}: entry {dup} should be entry {kept} transposed (tied "
                                   f"weights): expected shape {a.T.shape}, found shape {b.shape}")
        if not np.array_equal(b, a.T, equal_nan=True):
            raise FastseqFileError(f"{source}: entry {dup} should equal entry {kept} transposed "
                                   f"(tied weights), but the values differ")
        drop.add(dup)
    keep = [i for i in range(len(arrays)) if i not in drop]
    return [arrays[i] for i in keep], keep


def load_textbook_params(model, path):
    """Load a textbook weight file into ``model.params`` in place (with float conversion).

    Entries are matched by position. ``model`` is a fastseq Model, or anything with ``params``
    and ``textbook_tied``: ``(kept_index, textbook_index)`` pairs (empty for most models), meaning
    the file's entry ``textbook_index`` is entry ``kept_index`` transposed. If the file holds more
    entries than the model has params, those duplicates are checked and dropped first. Every
    count, shape and value is checked before anything is copied; the file may hold at most what
    the model's weights need in any pickle protocol. Returns the model.
    """
    source = _source(path)
    params = list(model.params)
    # protocol 0 spells each byte as up to 6 characters; tied duplicates double a matrix
    budget = (1 << 20) + 16 * sum(int(p.size) * 8 for p in params)
    arrays = restricted_load(path, max_bytes=min(budget, MAX_FILE_BYTES))
    index = list(range(len(arrays)))
    n_file = len(arrays)
    tied = model.textbook_tied
    if len(arrays) != len(params) and tied:
        arrays, index = _drop_tied(arrays, tied, source)
    if len(arrays) != len(params):
        dropped = sorted(set(range(n_file)) - set(index))
        extra = (f" ({len(arrays)} after dropping the tied duplicates {dropped})"
                 if len(arrays) != n_file else "")
        raise FastseqFileError(f"{source}: the file holds {n_file} arrays{extra}, "
                               f"but {type(model).__name__} has {len(params)} parameters")
    for i, (p, a, j) in enumerate(zip(params, arrays, index)):
        if tuple(p.shape) != a.shape:
            where = f"entry {i}" if i == j else f"parameter {i} (file entry {j})"
            raise FastseqFileError(f"{source}: {where}: expected shape {tuple(p.shape)}, "
                                   f"found shape {a.shape}")
    names = [f"entry {j}" for j in index]
    ready = check_params(source, names, arrays, [np.empty(0, p.dtype) for p in params],
                         allowed=(np.float16, np.float32, np.float64))
    moved = [backend.get_array_module(p).asarray(a) for p, a in zip(params, ready)]
    for p, a in zip(params, moved):
        p[...] = a
    return model
