"""The fastseq file: named arrays + JSON metadata + one checksum (see fastseq.files).

    write_npz(path, {"W": W, "b": b}, {"model": "Rnnlm", ...})
    arrays, meta = read_npz(path)                   # dict name -> ndarray, the meta dict
"""
import ast
import hashlib
import json
import math
import re
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..backend import to_cpu
from . import jsontext
from .core import FastseqFileError, atomic_write, expand_path, open_regular
from .schema import Any, Const, Dict, Int, List, Str, Tuple, check_schema

FORMAT = "fastseq.npz"
VERSION = 2
ENVELOPE = "__fastseq__.npy"
DIGEST = "__fastseq_sha256__.npy"
MAX_NAME = 1024  # characters in an array name
_ARRAY_NAME = re.compile(r"a(\d{3,6})\.npy")
_DESCR = re.compile(r"[<>|=]?(b1|i1|i2|i4|i8|u1|u2|u4|u8|f2|f4|f8)")


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked before anything a file declares is allocated. The metadata limits
    leave room for a vocabulary of a few hundred thousand words and a long run's loss curve
    (PTB's 10,000 words take 90 KB; fastseq's own metadata holds a few hundred object keys, a
    vocabulary is a list). Parsed objects cost up to ~140 bytes per value (an object key), so
    max_values bounds what parsing allocates to ~150 MB, under 10x max_envelope_bytes; object
    keys cost the most time, so max_keys bounds them lower: every envelope under these limits
    loads or is refused in well under 2 s and 500 MB. tests/test_files_forged.py measures the
    memory of each costly shape at the limits, benchmarks/forged_files.py its time."""
    max_file_bytes: int = 4 << 30      # the whole .npz on disk
    max_members: int = 4096            # zip members (arrays + 2)
    max_envelope_bytes: int = 16 << 20  # the JSON metadata
    max_values: int = 1_000_000        # JSON values in it (containers, numbers, strings)
    max_keys: int = 1 << 18            # object keys in it (262,144)
    max_depth: int = 32                # nesting of lists/dicts in it
    max_header_bytes: int = 4096       # one .npy header
    max_ndim: int = 8
    dtypes: tuple = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                     "uint64", "float16", "float32", "float64")


DEFAULT_LIMITS = Limits()


def _envelope_schema(limits):
    entry = Tuple(Str(MAX_NAME, 1), Str(8, 1), List(Int(0), limits.max_ndim))
    return Dict({"format": Const(FORMAT), "version": Const(VERSION),
                 "arrays": List(entry, limits.max_members), "meta": Dict(extra=Any())})


# ---------------------------------------------------------------------------------------------
# writing

def _prepare(arrays, meta, path, limits=DEFAULT_LIMITS):
    """(envelope bytes, digest bytes, arrays) ready to write; refuses what read_npz would."""
    if not isinstance(arrays, dict):
        raise TypeError(f"{path}: arrays must be a dict name -> array, got {type(arrays).__name__}")
    if not isinstance(meta, dict):
        raise TypeError(f"{path}: meta must be a dict, got {type(meta).__name__}")
    if len(arrays) + 2 > limits.max_members:
        raise ValueError(f"{path}: {len(arrays)} arrays is more than a fastseq file holds")
    allowed = {np.dtype(d) for d in limits.dtypes}
    names, prepared = [], []
    for name, a in arrays.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
            raise TypeError(f"{path}: array names must be strings of 1 to {MAX_NAME} characters, "
                            f"got {str(name)[:60]!r}")
        a = np.asarray(to_cpu(a), order="C")  # GPU arrays are saved like any other
        if a.dtype not in allowed or a.ndim > limits.max_ndim:
            raise TypeError(f"{path}: array {name!r} has dtype {a.dtype} and {a.ndim} dimensions; "
                            f"only plain numeric arrays of up to {limits.max_ndim} "
                            f"dimensions are stored")
        names.append(name)
        prepared.append(a)
    envelope = {"format": FORMAT, "version": VERSION,
                "arrays": [[n, a.dtype.str, list(a.shape)] for n, a in zip(names, prepared)],
                "meta": meta}
    try:
        text = json.dumps(envelope, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"{path}: meta is not JSON-serialisable: {e}") from None
    try:
        if len(text) > limits.max_envelope_bytes:
            raise ValueError(f"of {len(text)} bytes is over the limit of "
                             f"{limits.max_envelope_bytes}")
        jsontext.check(text, limits.max_depth, limits.max_values, limits.max_keys)
    except ValueError as e:
        raise ValueError(f"{path}: metadata {e}; a fastseq file could not be read back") from None
    env = np.frombuffer(text, dtype=np.uint8)
    h = hashlib.sha256(env)
    for a in prepared:
        h.update(a.reshape(-1).view(np.uint8) if a.size else b"")
    digest = np.frombuffer(h.hexdigest().encode("ascii"), dtype=np.uint8)
    return env, digest, prepared


def write_npz(path, arrays, meta):
    """Write ``arrays`` (dict name -> numeric ndarray) and ``meta`` (a JSON-serialisable dict)
    to ``path`` atomically, with one checksum over both. Returns the path."""
    path = expand_path(path)
    env, digest, prepared = _prepare(arrays, meta, path)
    members = [(ENVELOPE, env), (DIGEST, digest)]
    members += [(f"a{i:03d}.npy", a) for i, a in enumerate(prepared)]

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, a in members:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                with zf.open(info, "w", force_zip64=a.nbytes > (1 << 30)) as out:
                    np.lib.format.write_array(out, a, allow_pickle=False)

    return atomic_write(path, write)


class Writer:
    """Writes (path, arrays, meta) files with write_npz on one background thread, in the order
    submitted. A failed write is raised by a later submit() or by flush()."""

    max_pending = 2  # an epoch's model.npz and checkpoint.npz

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastseq-writer")
        self._pending = []

    def submit(self, path, arrays, meta):
        """Queue a file; first wait for the files before it if ``max_pending`` are queued (the
        snapshots' memory and how far the disk lags behind stay bounded)."""
        if len(self._pending) >= self.max_pending:
            self.flush()
        self._pending.append(self._pool.submit(write_npz, path, arrays, meta))

    def flush(self):
        """Wait for every submitted file to be on disk."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self):
        try:
            self.flush()
        finally:
            self._pool.shutdown()


# ---------------------------------------------------------------------------------------------
# reading

@dataclass(frozen=True)
class ArraySpec:
    """What a member's .npy header declares (checked before its data is read)."""
    dtype: np.dtype
    shape: tuple

    @property
    def nbytes(self):
        return self.dtype.itemsize * math.prod(self.shape)


class _Reader:
    def __init__(self, path, f, size, limits):
        self.path, self.f, self.size, self.limits = path, f, size, limits

    def fail(self, problem):
        return FastseqFileError(f"{self.path}: {problem}")

    def corrupt(self, e):
        return self.fail(f"not a readable fastseq .npz file (corrupt or truncated?): "
                         f"{type(e).__name__}: {e}")

    # -- zip directory -------------------------------------------------------------------------
    def members(self):
        lim = self.limits
        if self.size > lim.max_file_bytes:
            raise self.fail(f"is {self.size} bytes, more than the limit of {lim.max_file_bytes}")
        self.zf = zipfile.ZipFile(self.f)
        infos = self.zf.infolist()
        if len(infos) > lim.max_members:
            raise self.fail(f"has {len(infos)} zip members, more than the limit of "
                            f"{lim.max_members}")
        by_name, total = {}, 0
        for info in infos:
            if info.filename in by_name:
                raise self.fail(f"has two zip members named {info.filename!r}")
            if info.flag_bits & 0x1:
                raise self.fail(f"member {info.filename!r} is encrypted")
            if info.compress_type != zipfile.ZIP_STORED:
                raise self.fail(f"member {info.filename!r} is compressed (method "
                                f"{info.compress_type}); fastseq files store members uncompressed")
            if info.compress_size != info.file_size:
                raise self.fail(f"member {info.filename!r}: stored size {info.compress_size} and "
                                f"size {info.file_size} disagree (corrupt zip directory)")
            total += info.file_size
            by_name[info.filename] = info
        if total > self.size:
            raise self.fail(f"its zip members declare {total} bytes in a {self.size}-byte file")
        if ENVELOPE not in by_name:
            raise self.fail(f"no fastseq metadata ({ENVELOPE}); not a file written by fastseq")
        if DIGEST not in by_name:
            raise self.fail(f"no checksum member ({DIGEST})")
        arrays = {}
        for name, info in by_name.items():
            if name in (ENVELOPE, DIGEST):
                continue
            m = _ARRAY_NAME.fullmatch(name)
            if m is None:
                raise self.fail(f"has an unexpected member {name!r} (not written by fastseq)")
            arrays[int(m.group(1))] = info
        if sorted(arrays) != list(range(len(arrays))):
            raise self.fail(f"array members are not numbered 0..{len(arrays) - 1}: "
                            f"{sorted(arrays)[:10]}")
        return by_name[ENVELOPE], by_name[DIGEST], [arrays[i] for i in range(len(arrays))]

    # -- one .npy header -----------------------------------------------------------------------
    def header(self, info, stream):
        lim = self.limits
        magic = stream.read(8)
        if len(magic) != 8 or magic[:6] != b"\x93NUMPY":
            raise self.fail(f"member {info.filename!r} is not a .npy array")
        major = magic[6]
        if major == 1:
            raw = stream.read(2)
            hlen = struct.unpack("<H", raw)[0] if len(raw) == 2 else -1
        elif major in (2, 3):
            raw = stream.read(4)
            hlen = struct.unpack("<I", raw)[0] if len(raw) == 4 else -1
        else:
            raise self.fail(f"member {info.filename!r}: unknown .npy format version {major}")
        if not 0 <= hlen <= lim.max_header_bytes:
            raise self.fail(f"member {info.filename!r}: .npy header of {hlen} bytes (limit "
                            f"{lim.max_header_bytes})")
        text = stream.read(hlen)
        if len(text) != hlen:
            raise self.fail(f"member {info.filename!r} is truncated inside its .npy header")
        try:
            d = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin1"))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError,
                UnicodeDecodeError) as e:
            raise self.fail(f"member {info.filename!r}: unreadable .npy header "
                            f"({type(e).__name__})") from None
        if (not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}
                or not isinstance(d["descr"], str) or d["fortran_order"] is not False
                or not isinstance(d["shape"], tuple)):
            raise self.fail(f"member {info.filename!r}: .npy header {text[:120]!r} is not a plain "
                            f"C-ordered array header")
        descr, shape = d["descr"], d["shape"]
        if not _DESCR.fullmatch(descr) or np.dtype(descr).name not in lim.dtypes:
            raise self.fail(f"member {info.filename!r} has dtype {descr!r}; allowed: "
                            f"{', '.join(lim.dtypes)}")
        if len(shape) > lim.max_ndim or not all(type(s) is int and s >= 0 for s in shape):
            raise self.fail(f"member {info.filename!r} has an invalid shape {shape!r:.80}")
        spec = ArraySpec(np.dtype(descr), shape)
        data_start = (10 if major == 1 else 12) + hlen
        if spec.nbytes != info.file_size - data_start:
            raise self.fail(f"member {info.filename!r} declares shape {shape} of {spec.dtype} "
                            f"({spec.nbytes} bytes) but holds {info.file_size - data_start} bytes")
        return spec

    def data(self, stream, spec, name):
        n = spec.nbytes
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = stream.readinto(view[got:])
            if not k:
                raise self.fail(f"array {name!r} is truncated: {got} of {n} bytes")
            got += k
        return buf

    # -- envelope ------------------------------------------------------------------------------
    def envelope(self, info, n_arrays):
        """(raw bytes, array entries, meta) of the metadata member, checked against the
        envelope's schema and the limits before anything in it is used."""
        stream = self.zf.open(info)
        spec = self.header(info, stream)
        if spec.dtype != np.uint8 or len(spec.shape) != 1:
            raise self.fail("metadata member is not a 1-D uint8 array")
        if spec.nbytes > self.limits.max_envelope_bytes:
            raise self.fail(f"metadata of {spec.nbytes} bytes is over the limit of "
                            f"{self.limits.max_envelope_bytes}")
        raw = bytes(self.data(stream, spec, "metadata"))
        try:
            lim = self.limits
            env = jsontext.loads(raw, lim.max_depth, lim.max_values, lim.max_keys)
        except ValueError as e:
            raise self.fail(f"metadata {e}") from None
        if not isinstance(env, dict) or env.get("format") != FORMAT:
            raise self.fail("metadata does not describe a fastseq .npz file")
        check_schema(self.path, env, _envelope_schema(self.limits), "envelope")
        listed = env["arrays"]
        if len(listed) != n_arrays:
            raise self.fail(f"metadata lists {len(listed)} arrays but the file holds {n_arrays}")
        if len({e[0] for e in listed}) != len(listed):
            raise self.fail("metadata names an array twice")
        return raw, listed, env["meta"]


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error, zlib.error,
               NotImplementedError, OverflowError, IndexError, KeyError, TypeError, RuntimeError,
               UnicodeDecodeError, ValueError)


def read_npz(path, limits=None, expected=None, check=None):
    """``(arrays, meta)`` from a file written by write_npz: all-or-nothing, no pickle, bounded.

    limits    a Limits (default DEFAULT_LIMITS)
    expected  optional dict name -> shape: the file must hold exactly these arrays, in this order
    check     optional callable(meta, specs) run after the metadata and every .npy header were
              read and before any array data is: specs is a dict name -> ArraySpec; it raises
              FastseqFileError (or ValueError, which gets the path in front) to refuse the file
    Refusals are FastseqFileError; trouble opening or reading the file is an OSError.
    """
    limits = limits or DEFAULT_LIMITS
    path = expand_path(path)
    f, size = open_regular(path)
    with f:
        r = _Reader(path, f, size, limits)
        try:
            return _read(r, expected, check)
        except FastseqFileError:
            raise
        except OSError as e:
            if e.errno is None or e.errno == 22:  # zipfile's bad seeks on a corrupt directory
                raise r.corrupt(e) from None
            raise
        except MemoryError:
            raise r.fail("needs more memory than is available to read") from None
        except _ZIP_ERRORS as e:
            raise r.corrupt(e) from None


def _read(r, expected, check):
    env_info, digest_info, infos = r.members()
    raw_env, listed, meta = r.envelope(env_info, len(infos))
    names = [e[0] for e in listed]
    streams, specs = [], {}
    for name, entry, info in zip(names, listed, infos):
        stream = r.zf.open(info)
        spec = r.header(info, stream)
        if entry[1] != spec.dtype.str or entry[2] != list(spec.shape):
            raise r.fail(f"array {name!r}: metadata says {entry[1]} {entry[2]} but the array is "
                         f"{spec.dtype.str} {list(spec.shape)}")
        streams.append(stream)
        specs[name] = spec
    if expected is not None:
        _check_expected(r, names, specs, expected, meta)
    if check is not None:
        try:
            check(meta, specs)
        except FastseqFileError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise r.fail(str(e)) from None
    dstream = r.zf.open(digest_info)
    dspec = r.header(digest_info, dstream)
    if dspec.dtype != np.uint8 or dspec.shape != (64,):
        raise r.fail("checksum member is malformed")
    stored = bytes(r.data(dstream, dspec, "checksum")).decode("latin1")
    h = hashlib.sha256(raw_env)
    arrays = {}
    for name, stream in zip(names, streams):
        spec = specs[name]
        buf = r.data(stream, spec, name)
        h.update(buf)
        a = np.frombuffer(buf, dtype=spec.dtype).reshape(spec.shape)
        arrays[name] = a if spec.dtype.isnative else a.astype(spec.dtype.newbyteorder("="))
    if h.hexdigest() != stored:
        raise r.fail("checksum mismatch: the arrays or the metadata were modified or corrupted")
    return arrays, meta


def _check_expected(r, names, specs, expected, meta):
    what = meta.get("model") if isinstance(meta.get("model"), str) else "arrays"
    want = list(expected)
    if len(names) != len(want):
        raise r.fail(f"holds {len(names)} parameters ({what}) but the model has {len(want)}")
    for i, (n, en) in enumerate(zip(names, want)):
        if n != en:
            raise r.fail(f"parameter {i} is named {n!r} but the model expects {en!r}")
        shape, es = specs[n].shape, tuple(expected[en])
        if shape != es:
            raise r.fail(f"parameter {n!r} has shape {shape} but the model expects {es} "
                         f"(trained with another vocabulary or size?)")

