"""Text data sets as users' editors write them, and strict encode/decode."""
import os

import numpy as np
import pytest

from fastseq.datasets import sequence
from fastseq.datasets.sequence import DataFormatError

LINES = [f"{a}+{b}".ljust(7) + f"_{a + b}".ljust(5) for a, b in zip(range(30), range(5, 35))]


@pytest.fixture
def vocab():
    return sequence.build(*sequence.parse_lines(LINES), seed=0).vocab


def test_utf8_byte_order_mark_is_stripped(tmp_path):
    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    a, b = sequence.load_dataset(str(plain)), sequence.load_dataset(str(bom))
    assert a.vocab.char_to_id == b.vocab.char_to_id and np.array_equal(a.x_train, b.x_train)
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(LINES).encode())
    assert np.array_equal(sequence.load_dataset(str(crlf)).x_train, a.x_train)


@pytest.mark.parametrize("data,message", [
    ("\n".join(LINES).encode("utf-16"), "is UTF-16 text"),
    (bytes(range(256)) * 4, "is not UTF-8 text .byte 0x80 at offset 128"),
    (b"12+3 _15\x00\n" * 20, "contains NUL characters at offset 8"),
])
def test_undecodable_text_names_the_file(tmp_path, data, message):
    path = tmp_path / "data.txt"
    path.write_bytes(data)
    with pytest.raises(DataFormatError, match=f"data.txt: {message}"):
        sequence.load_dataset(str(path))


def test_too_few_lines_for_a_test_split(tmp_path):
    path = tmp_path / "few.txt"
    path.write_text("\n".join(LINES[:9]) + "\n")
    with pytest.raises(DataFormatError, match="few.txt: 9 data lines; at least 10"):
        sequence.load_dataset(str(path))
    path.write_text("\n".join(LINES[:10]) + "\n")
    d = sequence.load_dataset(str(path))
    assert len(d.x_test) == 1 and len(d.x_train) == 9


def test_fifo_or_directory_as_data_refused_at_once(tmp_path):
    fifo = tmp_path / "data.txt"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="data.txt: is a FIFO"):
        sequence.load_dataset(str(fifo))
    with pytest.raises(OSError, match="directory"):
        sequence.load_dataset(str(tmp_path))


def test_oversized_file_refused_before_reading(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("\n".join(LINES * 20))
    with pytest.raises(DataFormatError, match="big.txt: .* more than the 1000-byte limit"):
        sequence.read_text_lines(str(path), max_bytes=1000)


def test_decode_takes_integer_ids_in_range_only(vocab):
    row = vocab.encode("12+3")[0]
    assert vocab.decode(row) == "12+3   "
    assert vocab.decode(row.tolist()) == "12+3   "
    batch = vocab.encode(["1+2", "20+21"])
    assert vocab.decode(batch) == ["1+2    ", "20+21  "]
    assert vocab.decode([]) == "" and vocab.decode(np.zeros((2, 0), int)) == ["", ""]
    for bad in ([1.9, 2.2], "123", [True, False], np.array([1.0])):
        with pytest.raises(TypeError, match="integer ids"):
            vocab.decode(bad)
    for bad in ([len(vocab)], [-1], [2 ** 63]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            vocab.decode(bad)
    with pytest.raises(TypeError, match="integer ids"):
        vocab.decode([2 ** 70])
    with pytest.raises(ValueError, match="2-D"):
        vocab.decode(np.zeros((1, 1, 1), int))
    with pytest.raises(ValueError):
        vocab.decode([[1, 2], [3]])


def test_encode_refuses_non_strings(vocab):
    with pytest.raises(TypeError, match="question string"):
        vocab.encode([12])
    with pytest.raises(TypeError, match="question string"):
        vocab.encode([b"12"])


def test_training_on_a_fifo_or_bom_text_file(tmp_path, capsys):
    """python -m fastseq.train reads --data through the same reader: a FIFO is refused at once
    (it used to block), a byte-order mark is not taken for part of the first word."""
    from fastseq.train import main
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    for task in ("text", "addition"):
        assert main(["--task", task, "--data", str(fifo), "--out", str(tmp_path / "run"),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastseq: ") and "corpus.txt: is a FIFO" in err
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbf" + b"the cat sat\na dog ran\n" * 1000)
    assert main(["--task", "text", "--data", str(text), "--epochs", "1", "--hidden-size", "4",
                 "--wordvec-size", "4", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    import fastseq
    assert fastseq.load(tmp_path / "run" / "model.npz").vocab[2] == "the"
