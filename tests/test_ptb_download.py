"""The PTB downloader against hostile local servers (127.0.0.1): endless streams without a
Content-Length, a byte every half second, oversized announcements. Small synthetic files stand in
for the corpus (its size and SHA-256 patched in), so these run anywhere, in seconds."""
import hashlib
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest

from fastseq.datasets import ptb

from conftest import local_http_server

TRAIN = ("the cat sat on the mat \n a dog ran \n" * 40).encode()


@pytest.fixture
def fake_corpus(monkeypatch):
    """ptb.train.txt is TRAIN (its size and hash patched in); caps and deadline are small."""
    monkeypatch.setitem(ptb.SHA256, "ptb.train.txt", hashlib.sha256(TRAIN).hexdigest())
    monkeypatch.setitem(ptb.SIZES, "ptb.train.txt", len(TRAIN))
    monkeypatch.setattr(ptb, "DEADLINE_S", 1.5)
    monkeypatch.setattr(ptb, "_TIMEOUT_S", 1.0)
    ptb._train_cache.clear()
    yield TRAIN
    ptb._train_cache.clear()


def _handler(mode):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            if mode == "intact":
                self.send_header("Content-Length", str(len(TRAIN)))
                self.end_headers()
                self.wfile.write(TRAIN)
                return
            if mode == "huge_length":
                self.send_header("Content-Length", str(10 ** 12))
                self.end_headers()
                self.wfile.write(TRAIN)
                return
            if mode == "slow":
                self.send_header("Content-Length", str(len(TRAIN)))
            self.end_headers()
            t_end = time.monotonic() + 30
            try:
                while time.monotonic() < t_end:
                    if mode == "endless":  # no Content-Length, never ends
                        self.wfile.write(b"x" * 1000)
                    else:  # one byte every half second: no single read ever times out
                        self.wfile.write(TRAIN[:1])
                        self.wfile.flush()
                        time.sleep(0.5)
            except OSError:
                pass  # the client gave up
    return Handler


def serve(mode):
    return local_http_server(_handler(mode))


def _download(tmp_path, url):
    dest = tmp_path / "ptb"
    t0 = time.monotonic()
    with pytest.raises(ptb.DownloadError) as e:
        ptb._download_file("ptb.train.txt", dest, base_url=url)
    elapsed = time.monotonic() - t0
    assert not dest.exists() or list(dest.iterdir()) == []  # nothing left behind
    return str(e.value), elapsed


def test_intact_download_and_load(tmp_path, fake_corpus):
    with serve("intact") as url:
        ptb._download_file("ptb.train.txt", tmp_path, base_url=url)
    assert (tmp_path / "ptb.train.txt").read_bytes() == TRAIN
    assert [p.name for p in tmp_path.iterdir()] == ["ptb.train.txt"]
    corpus, w2i, i2w = ptb.load_data("train", data_dir=tmp_path)
    assert len(w2i) == 9 and i2w[0] == "the" and corpus[:3].tolist() == [0, 1, 2]
    assert corpus.dtype == np.int32 and (corpus == w2i["<eos>"]).sum() == 80


def test_endless_stream_without_length_stops_at_the_cap(tmp_path, fake_corpus):
    with serve("endless") as url:
        msg, elapsed = _download(tmp_path, url)
    assert f"more than the {len(TRAIN)} bytes" in msg and "discarded" in msg
    assert elapsed < 5


def test_trickling_server_stops_at_the_deadline(tmp_path, fake_corpus):
    with serve("slow") as url:
        msg, elapsed = _download(tmp_path, url)
    assert "took longer than 1.5 s" in msg and "discarded" in msg
    assert 1.4 < elapsed < 5


def test_announced_length_beyond_the_cap_is_refused_at_once(tmp_path, fake_corpus):
    with serve("huge_length") as url:
        msg, elapsed = _download(tmp_path, url)
    assert "announces 1000000000000 bytes" in msg and elapsed < 2


def test_cached_file_of_the_wrong_size_is_not_read(tmp_path, fake_corpus, monkeypatch):
    (tmp_path / "ptb.train.txt").write_bytes(TRAIN + b"more")
    reads = []
    monkeypatch.setattr(ptb.hashlib, "sha256", lambda *a: reads.append(a) or hashlib.sha256(*a))
    with pytest.raises(ptb.ChecksumError,
                       match=f"has {len(TRAIN) + 4} bytes, not the {len(TRAIN)}"):
        ptb.load_data("train", data_dir=tmp_path)
    assert reads == []  # refused from its size alone


def test_undecodable_or_unknown_words_name_the_file(tmp_path, fake_corpus, monkeypatch):
    bad = b"caf\xe9 \n" * 10
    monkeypatch.setitem(ptb.SHA256, "ptb.train.txt", hashlib.sha256(bad).hexdigest())
    monkeypatch.setitem(ptb.SIZES, "ptb.train.txt", len(bad))
    (tmp_path / "ptb.train.txt").write_bytes(bad)
    with pytest.raises(ptb.FastseqFileError, match=r"ptb.train.txt: is not UTF-8 text .byte 0xe9"):
        ptb.load_data("train", data_dir=tmp_path)
