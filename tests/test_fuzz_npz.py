"""Fuzzing model.npz and checkpoint.npz: truncated, bit-flipped, overwritten files; foreign zips
and arrays; wrong metadata under a valid checksum. Every input is either loaded exactly as saved or
refused with a FastseqFileError / OSError, within the time and memory bounds, changing nothing."""
import atexit
import io
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fuzz_support import bounded
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastseq
from fastseq import PeekySeq2seq, Rnnlm
from fastseq.files import read_npz, write_npz

WORDS = [f"w{i}" for i in range(12)]
CHARS = list("0123456789+_ ")
DIR = Path(tempfile.mkdtemp(prefix="fastseq-fuzz-npz-"))
atexit.register(shutil.rmtree, DIR, True)


def _lm():
    return Rnnlm(len(WORDS), 4, 5, seed=0)


def _s2s():
    return PeekySeq2seq(len(CHARS), 4, 5, seed=0)


def _model_file():
    path = DIR / "lm.npz"
    _lm().save_params(path, meta={"vocab": WORDS})
    return path.read_bytes()


def _s2s_file():
    path = DIR / "s2s.npz"
    _s2s().save_params(path, meta={"chars": CHARS, "question_width": 7, "answer_width": 5,
                                   "reverse": True})
    return path.read_bytes()


def _checkpoint_arrays_meta():
    m = _s2s()
    arrays = {f"param/{n}": p for n, p in zip(m.param_names, m.params)}
    for i, p in enumerate(m.params):
        arrays[f"optim/m/{i}"] = np.zeros_like(p)
        arrays[f"optim/v/{i}"] = np.ones_like(p)
    arrays["rng/shuffle"] = np.random.RandomState(0).get_state()[1]
    arrays["order"] = np.arange(40, dtype=np.int64)
    meta = {"format": "fastseq-checkpoint-1", "model_class": "PeekySeq2seq",
            "param_names": m.param_names, "model_config": m.config(),
            "config": {"model": "peeky", "reverse": True, "wordvec_size": 4, "hidden_size": 5},
            "vocabulary": {"chars": CHARS, "question_width": 7, "answer_width": 5},
            "position": {"epoch": 1, "iteration": 3}, "metrics": {"loss": [1.5, float("nan")]}}
    return arrays, meta


def _checkpoint_file():
    path = DIR / "checkpoint.npz"
    write_npz(path, *_checkpoint_arrays_meta())
    return path.read_bytes()


BASES = {"model": _model_file(), "seq2seq": _s2s_file(), "checkpoint": _checkpoint_file()}
ORIGINAL = {"model": _lm().params, "seq2seq": _s2s().params, "checkpoint": _s2s().params}


@st.composite
def mutated(draw, base):
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete"]))
        n = len(data)
        if n == 0:
            break
        i = draw(st.integers(0, n - 1))
        if kind == "truncate":
            del data[i:]
        elif kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[i:i + len(chunk)] = chunk
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[i:i + draw(st.integers(1, 64))]
    return bytes(data)


def _write(name, data):
    path = DIR / name
    path.write_bytes(data)
    return path


def _load_all_ways(path, which):
    """read_npz, fastseq.load and Model.load_params: loaded exactly as saved, or refused with
    the model's parameters untouched."""
    bounded(read_npz, path)
    saved, refusal = bounded(fastseq.load, path)
    if refusal is None:
        assert all(np.array_equal(a, b) for a, b in zip(saved.model.params, ORIGINAL[which]))
    if which != "checkpoint":
        target = _lm() if which == "model" else _s2s()
        for p in target.params:
            p[...] = 7.0
        _, refusal = bounded(target.load_params, path)
        expect = [np.full_like(p, 7.0) for p in target.params] if refusal else ORIGINAL[which]
        assert all(np.array_equal(a, b) for a, b in zip(target.params, expect))


@pytest.mark.parametrize("which", sorted(BASES))
@given(data=st.data())
def test_damaged_files(which, data):
    _load_all_ways(_write(f"damaged-{which}.npz", data.draw(mutated(BASES[which]))), which)


def test_the_undamaged_files_load():
    for which, base in BASES.items():
        saved = fastseq.load(_write(f"ok-{which}.npz", base))
        assert all(np.array_equal(a, b) for a, b in zip(saved.model.params, ORIGINAL[which]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)

META_KEYS = ["model", "config", "vocab", "chars", "question_width", "answer_width", "reverse",
             "vocab_source", "format", "model_class", "model_config", "vocabulary", "param_names"]
SIZE_KEYS = ["vocab_size", "wordvec_size", "hidden_size", "dropout_ratio", "seed", "extra"]
sizes = st.one_of(st.integers(-5, 40), st.integers(-2 ** 64, 2 ** 64), st.sampled_from(
    [25_000_000, 2 ** 31, 2 ** 31 + 1, 2 ** 62]), json_values)
array_dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8,
                                np.bool_])
random_arrays = hnp.arrays(array_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
                           elements=None)


@st.composite
def edited(draw, which):
    """A file with valid checksum whose metadata and arrays were edited."""
    arrays, meta = read_npz(_write("src.npz", BASES[which]))
    arrays, meta = dict(arrays), dict(meta)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["meta", "config", "drop_meta", "array", "drop_array",
                                     "extra_array", "nan"]))
        if kind == "meta":
            meta[draw(st.sampled_from(META_KEYS))] = draw(json_values)
        elif kind == "config":
            key = "model_config" if which == "checkpoint" else "config"
            cfg = dict(meta.get(key) or {}) if isinstance(meta.get(key), dict) else {}
            cfg[draw(st.sampled_from(SIZE_KEYS))] = draw(sizes)
            meta[key] = cfg
        elif kind == "drop_meta" and meta:
            meta.pop(draw(st.sampled_from(sorted(meta))))
        elif kind == "array" and arrays:
            arrays[draw(st.sampled_from(sorted(arrays)))] = draw(random_arrays)
        elif kind == "drop_array" and arrays:
            arrays.pop(draw(st.sampled_from(sorted(arrays))))
        elif kind == "extra_array":
            arrays[draw(st.text(min_size=1, max_size=10))] = draw(random_arrays)
        elif kind == "nan" and arrays:
            name = draw(st.sampled_from(sorted(arrays)))
            a = arrays[name].copy()
            if a.size and a.dtype.kind == "f":
                a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(
                    st.sampled_from([np.nan, np.inf, -np.inf]))
            arrays[name] = a
    return arrays, meta


@pytest.mark.parametrize("which", sorted(BASES))
@given(data=st.data())
def test_wrong_metadata_and_foreign_arrays(which, data):
    arrays, meta = data.draw(edited(which))
    path = DIR / f"edited-{which}.npz"
    try:
        write_npz(path, arrays, meta)
    except (TypeError, ValueError):
        return  # not storable (e.g. a name clash); nothing to load
    _, refusal = bounded(fastseq.load, path)
    if which != "checkpoint":
        target = _lm() if which == "model" else _s2s()
        snap = [p.copy() for p in target.params]
        _, refusal = bounded(target.load_params, path)
        if refusal is not None:
            assert all(np.array_equal(a, b) for a, b in zip(target.params, snap))


foreign = st.dictionaries(
    st.text(alphabet="abcdefghij_.0123456789", min_size=1, max_size=12),
    st.one_of(random_arrays,
              hnp.arrays(st.sampled_from([np.complex64, np.dtype("U3"), np.dtype("S2"),
                                          np.dtype([("a", "<i4"), ("b", "<f4")])]),
                         hnp.array_shapes(max_dims=2, max_side=3)),
              st.just(np.array([{"x": 1}, None], dtype=object))),
    max_size=4)


@given(members=foreign, compress=st.booleans())
def test_foreign_npz_files(members, compress):
    """np.savez files (object arrays pickled inside them included) are refused, unpickled never."""
    path = DIR / "foreign.npz"
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **members)
    path.write_bytes(buf.getvalue())
    _, refusal = bounded(read_npz, path)
    assert refusal is not None
    _, refusal = bounded(fastseq.load, path)
    assert refusal is not None


@pytest.mark.filterwarnings("ignore:Duplicate name")
@given(names=st.lists(st.sampled_from(["__fastseq__.npy", "__fastseq_sha256__.npy", "a000.npy",
                                       "a001.npy", "a1.npy", "../x", "a000.npy"]), max_size=6),
       payload=st.binary(max_size=200))
def test_hand_made_zips(names, payload):
    path = DIR / "handmade.npz"
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            z.writestr(n, payload)
    _, refusal = bounded(read_npz, path)
    assert refusal is not None
