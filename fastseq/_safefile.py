"""The file-error family every fastseq loader raises, and the checks they share: open only regular
files, and accept only finite float weights."""
import os
import stat

import numpy as np


class FastseqFileError(ValueError):
    """A file that fastseq refuses: corrupt, truncated, tampered with, too large for its limits, or
    not matching what the caller expects. The message names the file and the problem."""


CheckpointError = FastseqFileError  # the earlier name


class NotRegularFileError(FastseqFileError, OSError):
    """The path is a directory, FIFO, device, socket or (for writes) a symbolic link."""


_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link"))


def _kind(mode):
    for test, name in _KINDS:
        if test(mode):
            return name
    return "special file"


def open_regular(path):
    """(binary file object, size) for ``path``, refused at once unless it is a regular file (a FIFO
    would block, a device never ends). Symbolic links are followed for reading."""
    p = os.fspath(path)
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(f"{p}: is a {_kind(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f, st.st_size


def check_params(path, names, arrays, targets, allowed=(np.float32, np.float64)):
    """Arrays ready to copy into ``targets`` (same order as names): float32/float64 only (no
    casting of integer, bool or other kinds), converted to each target's dtype, finite after
    conversion. Raises FastseqFileError naming the file and parameter."""
    out = []
    for n, a, p in zip(names, arrays, targets):
        if a.dtype not in allowed:
            raise FastseqFileError(f"{path}: parameter {n!r} has dtype {a.dtype}; weights must be "
                                   f"{' or '.join(np.dtype(d).name for d in allowed)}")
        with np.errstate(over="ignore"):
            b = a.astype(p.dtype, copy=False)
        if not np.isfinite(b).all():
            bad = int(b.size - np.isfinite(b).sum())
            raise FastseqFileError(f"{path}: parameter {n!r} holds {bad} non-finite value(s) "
                                   f"(NaN or inf: a diverged run?)")
        out.append(b)
    return out
