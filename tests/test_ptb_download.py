"""The PTB downloader against hostile local servers (127.0.0.1): endless streams without a
Content-Length, a byte at a time, oversized announcements. Small synthetic files stand in for the
corpus (its size and SHA-256 patched in), so these run anywhere, in seconds. The download's clock
is a stand-in that each reading moves on, so the deadline is tested without timing anything."""
import hashlib
import re
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
            if mode in ("slow", "huge_length"):
                self.send_header("Content-Length", str(10 ** 12 if mode == "huge_length"
                                                       else len(TRAIN)))
            self.end_headers()
            t_end = time.monotonic() + 30
            try:
                while time.monotonic() < t_end:
                    if mode == "endless":  # no Content-Length, never ends
                        self.wfile.write(b"x" * 1000)
                    else:  # a byte at a time: no single read ever times out
                        self.wfile.write(TRAIN[:1])
                        self.wfile.flush()
                        time.sleep(0.02)
            except OSError:
                pass  # the client gave up
    return Handler


def serve(mode):
    return local_http_server(_handler(mode))


class StepClock:
    """Stands in for the downloader's clock: every reading is `step` seconds after the last."""

    def __init__(self, step):
        self.now, self.step, self.readings = 0.0, step, 0

    def monotonic(self):
        self.readings += 1
        self.now += self.step
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """The downloader's clock moves 0.5 s per reading (the deadline is 1.5 s)."""
    c = StepClock(0.5)
    monkeypatch.setattr(ptb, "time", c)
    return c


def _download(tmp_path, url):
    dest = tmp_path / "ptb"
    with pytest.raises(ptb.DownloadError) as e:
        ptb._download_file("ptb.train.txt", dest, base_url=url)
    assert not dest.exists() or list(dest.iterdir()) == []  # nothing left behind
    return str(e.value)


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
        msg = _download(tmp_path, url)
    assert f"more than the {len(TRAIN)} bytes" in msg and "discarded" in msg


def test_trickling_server_stops_at_the_deadline(tmp_path, fake_corpus, clock):
    """Every read returns within the per-read timeout; the deadline on the whole download stops
    it at the first reading past it: the clock reads 0.5 when the download starts (deadline 2.0),
    then once after each read: 1.0, 1.5, 2.0, 2.5."""
    with serve("slow") as url:
        msg = _download(tmp_path, url)
    assert "took longer than 1.5 s" in msg and "discarded" in msg
    received = int(re.search(r"\((\d+) bytes received\)", msg).group(1))
    assert 4 <= received < len(TRAIN) and clock.readings == 5


def test_announced_length_beyond_the_cap_is_refused_at_once(tmp_path, fake_corpus, clock):
    """Refused from the header, before the body (which trickles: reading it would end at the
    deadline instead): the clock is read once, for the deadline."""
    with serve("huge_length") as url:
        msg = _download(tmp_path, url)
    assert "announces 1000000000000 bytes" in msg and "not downloaded" in msg
    assert clock.readings == 1


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
