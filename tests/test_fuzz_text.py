"""Fuzzing the text loaders and the vocabularies: the addition/date data set loader, the PTB
text loader (with the checksum patched to each generated file, so the parser itself is reached),
encode and decode. A file is loaded faithfully or refused with a FastseqFileError / OSError naming
it; encode/decode give the text back or a ValueError / TypeError."""
import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fuzz_support import bounded
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastseq.datasets import ptb, sequence

DIR = Path(tempfile.mkdtemp(prefix="fastseq-fuzz-text-"))
atexit.register(shutil.rmtree, DIR, True)
ADDITION = sequence.generate_addition(30, seed=1)
DATES = sequence.generate_date(30, seed=1) if hasattr(sequence, "generate_date") else ADDITION


@st.composite
def edited_lines(draw):
    lines = list(draw(st.sampled_from([ADDITION, DATES])))
    lines = lines[:draw(st.integers(0, len(lines)))]
    for _ in range(draw(st.integers(0, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "dup", "blank", "underscore"]))
        line = lines[i]
        j = draw(st.integers(0, len(line)))
        if kind == "insert":
            lines[i] = line[:j] + draw(st.text(min_size=1, max_size=3)) + line[j:]
        elif kind == "delete":
            lines[i] = line[:j] + line[j + 1:]
        elif kind == "replace":
            lines[i] = line[:j] + draw(st.characters()) + line[j + 1:]
        elif kind == "dup":
            lines.insert(i, line)
        elif kind == "blank":
            lines.insert(i, draw(st.sampled_from(["", " ", "\r", "\t"])))
        else:
            lines[i] = line.replace("_", draw(st.sampled_from(["", "__", "-"])), 1)
    sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = sep.join(lines) + draw(st.sampled_from(["", sep]))
    data = text.encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])),
                       errors="replace")
    return data, lines


def _load(data):
    path = DIR / "data.txt"
    path.write_bytes(data)
    return path, bounded(sequence.load_dataset, str(path))


@given(edited_lines())
def test_sequence_loader_on_edited_files(case):
    data, lines = case
    path, (d, refusal) = _load(data)
    if refusal is not None:
        assert str(path) in str(refusal)
        return
    v = d.vocab
    rows = [a + b for a, b in zip(v.decode(np.vstack([d.x_train, d.x_test])),
                                  v.decode(np.vstack([d.t_train, d.t_test])))]
    got = sorted(rows)
    assert len(got) >= sequence.MIN_LINES and len(d.x_test) == len(got) // 10
    assert all("_" in r for r in got)


@given(st.binary(max_size=3000))
def test_sequence_loader_on_random_bytes(data):
    path, (_, refusal) = _load(data)
    if refusal is not None:
        assert str(path) in str(refusal)


words = st.sampled_from(["the", "cat", "N", "<unk>", "$", "a", "caf\u00e9", "x" * 50, "1.5"])


@st.composite
def ptb_texts(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=500))
    lines = draw(st.lists(st.lists(words, max_size=8), max_size=12))
    return "\n".join(" " + " ".join(ln) + " " for ln in lines).encode()


@pytest.fixture(autouse=True)
def _restore_ptb():
    sha, sizes = dict(ptb.SHA256), dict(ptb.SIZES)
    yield
    ptb.SHA256.update(sha)
    ptb.SIZES.update(sizes)
    ptb._train_cache.clear()


@given(train=ptb_texts(), test=ptb_texts())
def test_ptb_text_loader(train, test):
    folder = DIR / "ptb"
    folder.mkdir(exist_ok=True)
    for name, data in (("ptb.train.txt", train), ("ptb.test.txt", test)):
        (folder / name).write_bytes(data)
        ptb.SHA256[name] = hashlib.sha256(data).hexdigest()
        ptb.SIZES[name] = len(data)
    ptb._train_cache.clear()
    got, refusal = bounded(ptb.load_data, "train", data_dir=folder)
    if refusal is not None:
        assert "ptb.train.txt" in str(refusal)
        return
    corpus, w2i, i2w = got
    text = train.decode().replace("\n", " <eos> ").split()
    assert [i2w[i] for i in corpus.tolist()] == text
    assert all(w2i[w] == i for i, w in i2w.items())
    got, refusal = bounded(ptb.load_data, "test", data_dir=folder)
    if refusal is not None:
        assert "ptb.test.txt" in str(refusal)
    else:
        assert [i2w[i] for i in got[0].tolist()] == test.decode().replace("\n", " <eos> ").split()


VOCAB = sequence.build(*sequence.parse_lines(ADDITION), seed=0).vocab


@given(st.one_of(st.text(max_size=10), st.lists(st.text(max_size=10), max_size=4),
                 st.lists(st.one_of(st.integers(), st.binary(max_size=3), st.none()), max_size=3)),
       st.booleans())
def test_encode(questions, reverse):
    try:
        ids = VOCAB.encode(questions, reverse=reverse)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    qs = [questions] if isinstance(questions, str) else questions
    back = VOCAB.decode(ids[:, ::-1] if reverse else ids)
    assert back == [q.ljust(VOCAB.question_width) for q in qs]


ids_like = st.one_of(
    st.lists(st.integers(-2 ** 70, 2 ** 70), max_size=6),
    st.lists(st.lists(st.integers(-3, 20), min_size=2, max_size=2), max_size=3),
    st.lists(st.floats(), max_size=4), st.text(max_size=5), st.lists(st.booleans(), max_size=3),
    hnp.arrays(st.sampled_from([np.int8, np.int32, np.int64, np.uint64, np.float32, np.bool_,
                                np.complex64, np.dtype("U2"), object]),
               hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), elements=None))


@given(ids_like)
def test_decode(ids):
    try:
        out = VOCAB.decode(ids)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    a = np.asarray(ids)
    assert (a.size == 0) or (a.dtype.kind in "iu" and a.min() >= 0 and a.max() < len(VOCAB))
    if a.ndim == 2:
        assert isinstance(out, list) and len(out) == a.shape[0]
    else:
        assert isinstance(out, str) and len(out) == a.size
