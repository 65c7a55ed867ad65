"""The error family every fastseq reader and writer raises, user paths, regular files only, and the
one atomic writer."""
import os
import stat
import tempfile

import numpy as np


class FastseqFileError(ValueError):
    """A file that fastseq refuses: corrupt, truncated, tampered with, too large for its limits, or
    not matching what the caller expects. The message names the file and the problem."""


class CheckpointError(FastseqFileError):
    """A checkpoint that does not fit the run being restored (model, optimiser, position)."""


class NotRegularFileError(FastseqFileError, OSError):
    """The path is a directory, FIFO, device, socket or (for writes) a symbolic link."""


_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link"))
_UMASK = os.umask(0)
os.umask(_UMASK)


def _kind(mode):
    for test, name in _KINDS:
        if test(mode):
            return name
    return "special file"


def expand_path(path):
    """``path`` (str, bytes or path-like) as a str with ``~`` and ``~user`` expanded; a
    FastseqFileError when the home folder it names cannot be found."""
    try:
        p = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"a path must be a string or path-like, "
                        f"got {type(path).__name__}") from None
    out = os.path.expanduser(p)
    if out.startswith("~"):  # expanduser leaves an unknown user (or a missing home) as it is
        user = p[1:].split(os.sep, 1)[0]
        who = f"user {user!r}" if user else "the current user"
        raise FastseqFileError(f"{p}: cannot expand '~{user}': no home folder is known for {who}")
    return out


def open_regular(path):
    """(binary file object, size) for ``path``, refused at once unless it is a regular file (a FIFO
    would block, a device never ends). Symbolic links are followed for reading."""
    p = expand_path(path)
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


def _check_write_target(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise NotRegularFileError(f"{path}: is a symbolic link; fastseq does not write through "
                                  f"links (save to the target's own path, "
                                  f"{os.path.realpath(path)})")
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(f"{path}: is a {_kind(st.st_mode)}, not a regular file; "
                                  f"refusing to replace it")


def atomic_write(path, write):
    """Call write(fileobj) on a temporary file next to ``path``, fsync it and rename it over
    ``path`` (which must be absent or a regular file; never a symbolic link). A reader sees the
    old file or the new one, never half of either; nothing is left behind on failure."""
    path = expand_path(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    _check_write_target(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _check_write_target(path)  # again, just before the rename
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(d)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    return path


def _fsync_dir(d):
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is done


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
