"""Every file fastseq reads or writes, in one place.

    write_npz(path, {"W": W, "b": b}, {"model": "Rnnlm", ...})   # any arrays + JSON metadata
    arrays, meta = read_npz(path)
    saved = load("runs/addition/model.npz")      # fastseq.load: model, vocabulary, reversal
    model.load_params(path)                      # load_params(model, path)
    arrays, meta = load_checkpoint("runs/addition/checkpoint.npz")
    load_textbook_params(model, "BetterRnnlm.pkl")   # the textbook's pickles (fastseq._textbook)

The fastseq file (model files and checkpoints alike: one envelope, other contents) is a zip of
stored ``.npy`` members, so ``np.load`` can still look inside: ``__fastseq__.npy`` holds the JSON
envelope ``{"format": "fastseq.npz", "version": 2, "arrays": [[name, dtype, shape], ...],
"meta": {...}}`` as uint8 bytes, ``__fastseq_sha256__.npy`` the SHA-256 of that envelope followed
by every array's bytes, and ``a000.npy``, ``a001.npy`` ... the arrays in order. The checksum
catches corruption and edits of arrays *or* metadata; it is not a signature (anyone can compute
one), so every field is checked against a declared schema (``check_schema``) before it is used.

Reading is all-or-nothing and bounded: the zip directory, every ``.npy`` header and the envelope
are checked against ``Limits`` before any array is allocated, and the JSON text is scanned for its
depth, number of values and number of object keys before it is parsed (``Limits`` says what each
bound allows and why; every envelope under them loads or is refused in well under 2 s and 500 MB:
``python -m benchmarks.forged_files``); only plain numeric dtypes are accepted; the result is
returned only once every byte was read and the checksum matched. Every refusal is a
``FastseqFileError`` (a ValueError) naming the file; user paths have ``~`` expanded.

Writing touches regular files only: an existing target that is a directory, FIFO, device or socket
is refused, and so is a symbolic link (fastseq never writes through a link). Every file goes
through ``atomic_write``: a temporary file in the same folder, fsync'ed and renamed over the
target, so a reader sees the old file or the new one, never half of either.
"""
from .._textbook import load_textbook_params
from .core import (CheckpointError, FastseqFileError, NotRegularFileError, atomic_write,
                   check_params, expand_path, open_regular)
from .envelope import (DEFAULT_LIMITS, FORMAT, VERSION, ArraySpec, Limits, Writer, read_npz,
                       write_npz)
from .rebuild import LoadedModel, load
from .schema import check_schema
from .weights import CHECKPOINT_FORMAT, load_checkpoint, load_params, model_file, save_params


__all__ = ["CheckpointError", "FastseqFileError", "NotRegularFileError", "atomic_write",
           "check_params", "expand_path", "open_regular", "DEFAULT_LIMITS", "FORMAT", "VERSION",
           "ArraySpec", "Limits", "Writer", "read_npz", "write_npz", "CHECKPOINT_FORMAT",
           "LoadedModel", "load", "load_checkpoint", "load_params", "model_file", "save_params",
           "check_schema", "load_textbook_params"]
