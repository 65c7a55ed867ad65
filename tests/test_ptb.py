"""PTB loading (textbook facts) and the downloader, exercised against a real local HTTP server."""
import functools
import hashlib
import shutil
import urllib.request
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

from fastseq import backend
from fastseq.datasets import ptb

from conftest import PTB_FILES, TEXTBOOK_DATA, local_http_server, needs_textbook

PTB_DIR = TEXTBOOK_DATA / "ptb"
NAMES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")

needs_ptb = needs_textbook(*PTB_FILES)

UNREACHABLE = "http://127.0.0.1:1/"  # nothing listens there: connection refused at once


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _ShortReadHandler(_QuietHandler):
    """Announces the full Content-Length, sends half the body, and hangs up."""

    def do_GET(self):
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True


def serve(directory, handler=_QuietHandler):
    return local_http_server(functools.partial(handler, directory=str(directory)))


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty cache root; returns the ptb/ folder inside it."""
    root = tmp_path / "cache"
    monkeypatch.setattr(backend, "DATA_DIR", str(root))
    monkeypatch.setattr(backend, "PTB_URL", "")
    return root / "ptb"


def cache_listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# Tests that need only *some* corpus (offline folders, the downloader) use a small synthetic one
# whose sizes and checksums are patched in, so they run in a fresh clone without the real files.
_SYNTH = {"ptb.train.txt": " the cat sat on the mat \n a dog ran \n N $ <unk> \n" * 30,
          "ptb.valid.txt": " a cat ran \n the dog sat \n" * 20,
          "ptb.test.txt": " the mat ran on a cat \n" * 25}
SYNTH_TRAIN_TOKENS = 30 * (7 + 4 + 4)  # words and <eos> per repetition
SYNTH_VAL_TOKENS, SYNTH_TEST_TOKENS = 20 * 8, 25 * 7
SYNTH_VOCAB = 12


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A folder holding the synthetic corpus, whose hashes and sizes ptb now expects."""
    d = tmp_path / "mirror"
    d.mkdir()
    for name, text in _SYNTH.items():
        data = text.encode()
        (d / name).write_bytes(data)
        monkeypatch.setitem(ptb.SHA256, name, hashlib.sha256(data).hexdigest())
        monkeypatch.setitem(ptb.SIZES, name, len(data))
    ptb._train_cache.clear()
    yield d
    ptb._train_cache.clear()


@pytest.fixture
def bad_mirror(tmp_path, corpus):
    """Good train file, valid with one byte flipped, test truncated."""
    d = tmp_path / "bad_mirror"
    d.mkdir()
    shutil.copy(corpus / "ptb.train.txt", d / "ptb.train.txt")
    data = bytearray((corpus / "ptb.valid.txt").read_bytes())
    data[100] ^= 0x01
    (d / "ptb.valid.txt").write_bytes(bytes(data))
    data = (corpus / "ptb.test.txt").read_bytes()
    (d / "ptb.test.txt").write_bytes(data[: len(data) - 50])
    return d


# ---------------------------------------------------------------------------------------------
# loading: the textbook's facts

@needs_ptb
def test_train_facts_and_vocab_order():
    corpus, word_to_id, id_to_word = ptb.load_data("train", data_dir=PTB_DIR)
    assert corpus.dtype in (np.int32, np.int64) and corpus.ndim == 1
    assert len(corpus) == 929_589
    assert len(word_to_id) == len(id_to_word) == 10_000
    assert [id_to_word[i] for i in range(5)] == ["aer", "banknote", "berlitz", "calloway", "centrust"]
    assert list(corpus[:3]) == [0, 1, 2]
    assert "<eos>" in word_to_id and "<unk>" in word_to_id
    assert all(word_to_id[w] == i for i, w in id_to_word.items())
    # ids in order of first appearance
    first = np.unique(corpus, return_index=True)[1]
    assert np.all(np.diff(first) > 0)
    assert corpus.max() == 9_999
    # the number of <eos> tokens is the number of lines
    lines = (PTB_DIR / "ptb.train.txt").read_bytes().count(b"\n")
    assert int(np.sum(corpus == word_to_id["<eos>"])) == lines


@needs_ptb
def test_val_test_use_train_vocab():
    _, train_w2i, _ = ptb.load_data("train", data_dir=PTB_DIR)
    test, w2i, i2w = ptb.load_data("test", data_dir=PTB_DIR)
    assert len(test) == 82_430
    assert w2i == train_w2i and len(i2w) == 10_000
    val, w2i_v, _ = ptb.load_data("val", data_dir=PTB_DIR)
    valid, _, _ = ptb.load_data("valid", data_dir=PTB_DIR)
    assert w2i_v == train_w2i
    assert len(val) == 73_760 and np.array_equal(val, valid)
    words = (PTB_DIR / "ptb.test.txt").read_text().replace("\n", " <eos> ").split()
    assert [i2w[int(i)] for i in test[:50]] == words[:50]


def test_returned_objects_are_private_copies(corpus):
    ids, w2i, i2w = ptb.load_data("train", data_dir=corpus)
    ids[:] = 0
    w2i.clear()
    i2w.clear()
    ids2, w2i2, i2w2 = ptb.load_data("train", data_dir=corpus)
    assert ids2[1] == 1 and len(w2i2) == len(i2w2) == SYNTH_VOCAB


def test_bad_data_type():
    with pytest.raises(ValueError, match="data_type"):
        ptb.load_data("training")


# ---------------------------------------------------------------------------------------------
# offline data_dir

def test_offline_data_dir_missing_file(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("data_dir must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError) as e:
        ptb.load_data("train", data_dir=tmp_path)
    assert "ptb.train.txt" in str(e.value) and str(tmp_path) in str(e.value)


def test_offline_data_dir_missing_split(tmp_path, corpus):
    shutil.copy(corpus / "ptb.train.txt", tmp_path)
    assert len(ptb.load_data("train", data_dir=tmp_path)[0]) == SYNTH_TRAIN_TOKENS
    with pytest.raises(FileNotFoundError, match="ptb.test.txt"):
        ptb.load_data("test", data_dir=tmp_path)


def test_offline_data_dir_checksum_mismatch(tmp_path, bad_mirror):
    shutil.copy(bad_mirror / "ptb.train.txt", tmp_path)
    shutil.copy(bad_mirror / "ptb.valid.txt", tmp_path)
    with pytest.raises(ptb.ChecksumError) as e:
        ptb.load_data("val", data_dir=tmp_path)
    msg = str(e.value)
    assert "ptb.valid.txt" in msg and ptb.SHA256["ptb.valid.txt"] in msg
    assert sha256(bad_mirror / "ptb.valid.txt") in msg


# ---------------------------------------------------------------------------------------------
# the downloader, against a local server

def test_download_into_fresh_cache(cache, corpus, monkeypatch):
    with serve(corpus) as url:
        monkeypatch.setattr(backend, "PTB_URL", url)
        test, w2i, _ = ptb.load_data("test")
        assert len(test) == SYNTH_TEST_TOKENS and len(w2i) == SYNTH_VOCAB
        assert cache_listing(cache) == ["ptb.test.txt", "ptb.train.txt"]  # only what was needed
        assert ptb.download() == cache
    assert cache_listing(cache) == sorted(NAMES)  # no temporary files left
    for name in NAMES:
        assert sha256(cache / name) == ptb.SHA256[name]
    # the server is gone: the cache alone serves every split now
    monkeypatch.setattr(backend, "PTB_URL", UNREACHABLE)
    assert len(ptb.load_data("val")[0]) == SYNTH_VAL_TOKENS


def test_download_helper_arguments(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(backend, "PTB_URL", UNREACHABLE)  # the argument wins over the environment
    with serve(corpus) as url:
        assert ptb.download(data_dir=tmp_path / "d", base_url=url) == tmp_path / "d"
    assert cache_listing(tmp_path / "d") == sorted(NAMES)
    assert len(ptb.load_data("val", data_dir=tmp_path / "d")[0]) == SYNTH_VAL_TOKENS


def test_corrupt_download_is_refused(cache, bad_mirror, monkeypatch):
    with serve(bad_mirror) as url:
        monkeypatch.setattr(backend, "PTB_URL", url)
        with pytest.raises(ptb.DownloadError) as e:
            ptb.load_data("val")
    msg = str(e.value)
    assert "ptb.valid.txt" in msg
    assert ptb.SHA256["ptb.valid.txt"] in msg and sha256(bad_mirror / "ptb.valid.txt") in msg
    assert cache_listing(cache) == ["ptb.train.txt"]  # the good file stays, nothing else


def test_truncated_download_is_refused(cache, bad_mirror, monkeypatch):
    with serve(bad_mirror) as url:
        monkeypatch.setattr(backend, "PTB_URL", url)
        with pytest.raises(ptb.DownloadError) as e:
            ptb.load_data("test")
    msg = str(e.value)
    assert "ptb.test.txt" in msg
    assert ptb.SHA256["ptb.test.txt"] in msg and sha256(bad_mirror / "ptb.test.txt") in msg
    assert cache_listing(cache) == ["ptb.train.txt"]


def test_short_read_is_refused(tmp_path, corpus):
    dest = tmp_path / "dl"
    with serve(corpus, _ShortReadHandler) as url:
        with pytest.raises(ptb.DownloadError) as e:
            ptb.download(data_dir=dest, base_url=url)
    msg = str(e.value)
    assert "ptb.train.txt" in msg and "truncated" in msg
    assert str((corpus / "ptb.train.txt").stat().st_size) in msg
    assert cache_listing(dest) == []


def test_http_error_is_reported(cache, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve(empty) as url:
        monkeypatch.setattr(backend, "PTB_URL", url)
        with pytest.raises(ptb.DownloadError, match=r"ptb\.train\.txt.*404"):
            ptb.load_data("train")
    assert cache_listing(cache) == []


def test_unreachable_mirror_is_reported(cache, monkeypatch):
    monkeypatch.setattr(backend, "PTB_URL", UNREACHABLE)
    with pytest.raises(ptb.DownloadError, match=r"ptb\.train\.txt"):
        ptb.load_data("train")
    assert cache_listing(cache) == []


def test_corrupt_cached_file_is_downloaded_again(cache, corpus, monkeypatch):
    cache.mkdir(parents=True)
    data = bytearray((corpus / "ptb.test.txt").read_bytes())
    data[0] ^= 0x20
    (cache / "ptb.test.txt").write_bytes(bytes(data))
    shutil.copy(corpus / "ptb.train.txt", cache)

    monkeypatch.setattr(backend, "PTB_URL", UNREACHABLE)  # offline: a clear error naming the cache
    with pytest.raises(ptb.DownloadError) as e:
        ptb.load_data("test")
    assert "ptb.test.txt" in str(e.value) and str(cache) in str(e.value)
    assert ptb.SHA256["ptb.test.txt"] in str(e.value)

    with serve(corpus) as url:  # online: replaced by an intact copy
        monkeypatch.setattr(backend, "PTB_URL", url)
        assert len(ptb.load_data("test")[0]) == SYNTH_TEST_TOKENS
    assert sha256(cache / "ptb.test.txt") == ptb.SHA256["ptb.test.txt"]
    assert cache_listing(cache) == ["ptb.test.txt", "ptb.train.txt"]


def test_default_mirrors_use_tls():
    assert ptb.MIRRORS and all(u.startswith("https://") for u in ptb.MIRRORS)
    assert ptb.MIRRORS[0] == "https://raw.githubusercontent.com/tomsercu/lstm/master/data/"
    assert set(ptb.SHA256) == set(NAMES)
