"""Data loading facts, clear errors on bad input, checkpoints."""
import json
import zipfile

import numpy as np
import pytest

from fastseq import PeekySeq2seq, Seq2seq
from fastseq.datasets import sequence
from fastseq.files import FastseqFileError

from conftest import TEXTBOOK_DATA, needs_textbook


@needs_textbook("addition.txt")
def test_textbook_addition_arrays():
    (x, t), (xt, tt) = sequence.load_data(str(TEXTBOOK_DATA / "addition.txt"))
    assert x.shape == (45000, 7) and t.shape == (45000, 5)
    assert xt.shape == (5000, 7) and tt.shape == (5000, 5)
    assert x[0].tolist() == [3, 0, 2, 0, 0, 11, 5] and t[0].tolist() == [6, 0, 11, 7, 5]
    c2i, i2c = sequence.get_vocab()
    assert len(c2i) == 13
    assert "".join(i2c[i] for i in x[0]) == "71+118 " and "".join(i2c[i] for i in t[0]) == "_189 "


def test_generated_addition_same_format_and_seeded():
    d1 = sequence.load_dataset("addition.txt")
    d2 = sequence.load_dataset("addition.txt")
    assert d1.x_train.shape == (45000, 7) and d1.t_test.shape == (5000, 5)
    assert np.array_equal(d1.x_train, d2.x_train)
    v = d1.vocab
    for row_q, row_a in zip(d1.x_train[:200], d1.t_train[:200]):
        q, a = v.decode(row_q), v.decode(row_a)
        a_, b_ = q.strip().split("+")
        assert a.startswith("_") and int(a[1:]) == int(a_) + int(b_)
        assert 0 <= int(a_) <= 999 and 0 <= int(b_) <= 999


def test_second_load_does_not_corrupt_first_vocab(tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("ab_x\nba_y\n" * 10)
    d1 = sequence.load_dataset("addition.txt")
    before = dict(d1.vocab.char_to_id)
    sequence.load_dataset(str(other))
    assert d1.vocab.char_to_id == before
    assert d1.vocab.decode(d1.x_train[0]).strip()[0].isdigit()
    c2i, _ = sequence.get_vocab()
    c2i["zzz"] = 99  # the caller's copy; the loaded vocabulary is untouched
    assert "zzz" not in sequence.get_vocab()[0]


def test_malformed_line_named(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1+1  _2  \n2+2  _4  \nno underscore here\n")
    with pytest.raises(sequence.DataFormatError, match="line 3"):
        sequence.load_dataset(str(bad))
    bad.write_text("1+1  _2  \n22+22  _44  \n")
    with pytest.raises(sequence.DataFormatError, match="line 2.*widths"):
        sequence.load_dataset(str(bad))


def test_missing_file_named():
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        sequence.load_dataset("/does/not/exist/nope.txt")


def test_question_errors():
    v = sequence.load_dataset("addition.txt").vocab
    assert v.decode(v.encode("12+3")[0]) == "12+3   "
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        v.encode(["12*3"])
    with pytest.raises(ValueError, match="input width is 7"):
        v.encode(["1234+5678"])
    assert v.encode(["12+3"], reverse=True)[0].tolist() == v.encode(["12+3"])[0][::-1].tolist()


def test_model_rejects_out_of_vocabulary_ids():
    m = Seq2seq(13, 8, 8, seed=0)
    with pytest.raises(ValueError, match="vocabulary"):
        m.forward(np.full((2, 7), 20), np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="2-D"):
        m.generate(np.zeros(7, dtype=np.int64), 0, 3)
    with pytest.raises(TypeError, match="integer"):
        m.forward(np.zeros((2, 7)), np.zeros((2, 5), dtype=np.int64))


def test_check_data_accepts_the_ignore_label_only_where_the_loss_skips_it():
    from fastseq import AttentionSeq2seq, Rnnlm
    x, t = np.zeros((2, 7), dtype=np.int64), np.full((2, 5), 3)
    t[:, 3:] = -1  # padding the seq2seq losses skip
    for m in (Seq2seq(13, 8, 8, seed=0), AttentionSeq2seq(13, 8, 8, seed=0)):
        assert m.ignore_label == -1
        m.check_data(x, t)
    m = Seq2seq(13, 8, 8, seed=0, ignore_label=None)
    assert m.ignore_label is None
    with pytest.raises(ValueError, match="negative id -1"):
        m.check_data(x, t)
    lm = Rnnlm(13, 8, 8, seed=0)
    assert lm.ignore_label is None
    with pytest.raises(ValueError, match="negative id -1"):
        lm.check_data(np.zeros(10, dtype=np.int64), np.r_[np.zeros(9, dtype=np.int64), -1])


def test_generate_single_and_batched_agree():
    m = PeekySeq2seq(13, 8, 16, seed=0)
    xs = np.random.RandomState(0).randint(0, 13, (6, 7))
    batch = m.generate(xs, 6, 4)
    assert batch.shape == (6, 4)
    for i in range(6):
        single = m.generate(xs[i:i + 1], 6, 4)
        assert isinstance(single, list) and single == batch[i].tolist()


@pytest.mark.parametrize("cls", [Seq2seq, PeekySeq2seq])
def test_save_load_roundtrip(tmp_path, cls):
    m = cls(13, 8, 16, seed=0)
    path = tmp_path / "m.npz"
    m.save_params(path, meta={"reverse": True})
    m2 = cls(13, 8, 16, seed=1)
    meta = m2.load_params(path)
    assert meta["reverse"] is True and meta["model"] == cls.__name__
    for a, b in zip(m.params, m2.params):
        assert np.array_equal(a, b)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temporary


def test_load_wrong_shapes_and_kind(tmp_path):
    path = tmp_path / "m.npz"
    Seq2seq(13, 8, 16, seed=0).save_params(path)
    with pytest.raises(FastseqFileError, match=r"shape \(13, 8\).*expects \(11, 8\)"):
        Seq2seq(11, 8, 16).load_params(path)
    with pytest.raises(FastseqFileError, match="named"):
        _load_renamed(path)
    with pytest.raises(FastseqFileError, match="holds 10 parameters"):
        _model_with_extra_layer().load_params(path)


def _model_with_extra_layer():
    from fastseq.layers import TimeAffine
    m = Seq2seq(13, 8, 16)
    m.layers = m.layers + [("extra", TimeAffine(np.zeros((2, 2), "f"), np.zeros(2, "f")))]
    return m


def _load_renamed(path):
    from fastseq.layers import TimeAffine
    m = Seq2seq(13, 8, 16)
    m.layers = m.layers[:-1] + [("decoder.output", m.layers[-1][1])]
    assert isinstance(m.layers[-1][1], TimeAffine)
    return m.load_params(path)


def test_load_corrupt_or_tampered(tmp_path):
    path = tmp_path / "m.npz"
    Seq2seq(13, 8, 16, seed=0).save_params(path)
    # tamper: rewrite one array with other values, keep the metadata
    with np.load(path) as z:
        files = {k: z[k] for k in z.files}
    files["a000"] = files["a000"] + 1
    np.savez(path, **files)
    with pytest.raises(FastseqFileError, match="checksum"):
        Seq2seq(13, 8, 16).load_params(path)
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(FastseqFileError, match="corrupt"):
        Seq2seq(13, 8, 16).load_params(path)
    np.savez(path, p000=np.zeros(3))
    with pytest.raises(FastseqFileError, match="metadata"):
        Seq2seq(13, 8, 16).load_params(path)


def test_threaded_eval_matches_serial(numpy_kernel):
    from fastseq import Adam, Trainer, eval_seq2seq
    d = sequence.load_dataset("addition.txt")
    m = PeekySeq2seq(len(d.vocab), 8, 32, seed=0)
    Trainer(m, Adam(1e-2), seed=0, progress=False).fit(d.x_train[:2048], d.t_train[:2048], 1, 128)
    q = d.x_test[:1200]
    start = d.t_test[:1200, :1]
    # the serial guesses as "answers": the threaded run must reproduce every row exactly
    own = np.hstack([start, m.generate(q, start[:, 0], 4)])
    assert eval_seq2seq(m, q, own, batch_size=100, workers=1) == 1.0
    assert eval_seq2seq(m, q, own, batch_size=100, workers=3) == 1.0
    own[::7, 2] = (own[::7, 2] + 1) % len(d.vocab)  # and it notices wrong rows
    assert eval_seq2seq(m, q, own, batch_size=100, workers=3) == pytest.approx(1 - 172 / 1200)
    copy = m.inference_copy()
    assert all(a is b for a, b in zip(copy.params, m.params))  # weights shared, not copied
    assert copy.decoder.lstm is not m.decoder.lstm               # state is its own
