"""Files: model weights as .npz (names, shapes, metadata, checksum; written atomically, read
without pickle) and the textbook's pickled weight files (restricted unpickler)."""
import hashlib
import json
import os
import tempfile
import zipfile

import numpy as np

META_KEY = "__fastseq_meta__"


class CheckpointError(ValueError):
    """A weight file that does not match the model, or is corrupt or tampered with."""


def atomic_write(path, write):
    """Call write(fileobj) on a temporary file next to ``path``, then rename it over ``path``."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _digest(names, arrays):
    h = hashlib.sha256()
    for n, a in zip(names, arrays):
        a = np.ascontiguousarray(a)
        h.update(n.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_npz_params(path, names, arrays, meta=None):
    meta = dict(meta or {})
    meta["names"] = list(names)
    meta["sha256"] = _digest(names, arrays)
    payload = {f"p{i:03d}": np.asarray(a) for i, a in enumerate(arrays)}
    payload[META_KEY] = np.array(json.dumps(meta))
    atomic_write(path, lambda f: np.savez(f, **payload))


def read_npz(path):
    """(names, arrays, meta) from a fastseq .npz, verifying its checksum."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = dict((k, z[k]) for k in z.files)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz weight file (corrupt or truncated?): {e}")
    if META_KEY not in files:
        raise CheckpointError(f"{path}: no fastseq metadata; not a file written by save_params")
    try:
        meta = json.loads(str(files.pop(META_KEY)))
        names = meta["names"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: metadata is corrupt: {e}")
    arrays = [files.get(f"p{i:03d}") for i in range(len(names))]
    if any(a is None for a in arrays) or len(files) != len(names):
        raise CheckpointError(f"{path}: holds {len(files)} arrays but its metadata names {len(names)}")
    if _digest(names, arrays) != meta.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch: the weights were modified or corrupted")
    return names, arrays, meta


def load_npz_params(path, expected_names, expected_shapes):
    names, arrays, meta = read_npz(path)
    if len(names) != len(expected_names):
        raise CheckpointError(f"{path}: holds {len(names)} parameters ({meta.get('model')}) but the "
                              f"model has {len(expected_names)}")
    for i, (n, a, en, es) in enumerate(zip(names, arrays, expected_names, expected_shapes)):
        if n != en:
            raise CheckpointError(f"{path}: parameter {i} is named {n!r} but the model expects {en!r}")
        if tuple(a.shape) != tuple(es):
            raise CheckpointError(f"{path}: parameter {n!r} has shape {tuple(a.shape)} but the model "
                                  f"expects {tuple(es)} (trained with another vocabulary or size?)")
    return arrays, meta


def load_textbook_params(model, path):
    """Load the textbook's pickled weight list (e.g. BetterRnnlm.pkl) safely into ``model``."""
    from ._textbook import load_textbook_params as _load
    return _load(model, path)
