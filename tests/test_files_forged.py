"""Forged fastseq files: envelopes and metadata with a valid checksum (anyone can compute one).
Every loader either loads them or refuses them with a FastseqFileError naming the file and the
field; memory stays bounded at the metadata limits (measured in a child process); nothing is
written or changed by a refused load."""
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastseq
from fastseq import PeekySeq2seq, Rnnlm, files
from fastseq.datasets import ptb
from fastseq.datasets.sequence import Vocabulary
from fastseq.files import DEFAULT_LIMITS, FastseqFileError, check_schema, read_npz, write_npz
from fastseq.files import jsontext
from fastseq.files.schema import Any, Bool, Dict, Float, Int, List, Num, Str

WORDS = [f"w{i}" for i in range(12)]
CHARS = list("0123456789+_ ")
PEAK_MB = 500  # above the child's baseline


def npy(a):
    b = io.BytesIO()
    np.lib.format.write_array(b, np.asarray(a), allow_pickle=False)
    return b.getvalue()


def forge(path, text, arrays=()):
    """A file whose envelope is the bytes ``text`` (anything at all) with a valid checksum."""
    h = hashlib.sha256(text)
    for a in arrays:
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    members = {"__fastseq__.npy": npy(np.frombuffer(text, np.uint8)),
               "__fastseq_sha256__.npy": npy(np.frombuffer(h.hexdigest().encode(), np.uint8))}
    members.update({f"a{i:03d}.npy": npy(a) for i, a in enumerate(arrays)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def envelope(meta, named=(), /, **fields):
    env = {"format": "fastseq.npz", "version": 2,
           "arrays": [[n, a.dtype.str, list(a.shape)] for n, a in named], "meta": meta}
    env.update(fields)
    return json.dumps(env).encode()


def meta_text(value_bytes):
    """An envelope whose meta is {"x": <value_bytes>}, as raw JSON."""
    return b'{"format":"fastseq.npz","version":2,"arrays":[],"meta":{"x":' + value_bytes + b"}}"


# ---------------------------------------------------------------------------------------------
# memory at the limits, measured in a child process

LIMIT = DEFAULT_LIMITS.max_envelope_bytes
ROOM = LIMIT - len(meta_text(b""))
N = DEFAULT_LIMITS.max_values // 2 - 10  # "{}" counts an opening bracket and a comma


def _keys(n):
    return b"{" + b",".join(b'"%x":0' % i for i in range(n)) + b"}"


AT_THE_LIMIT = {
    "one long string": (b'"' + b"x" * (ROOM - 2) + b'"', True),
    "one long string of escapes": (b'"' + b"\\n" * ((ROOM - 2) // 2) + b'"', True),
    "millions of tiny values": (b"[" + b",".join([b"0"] * ((ROOM - 1) // 2)) + b"]", False),
    "as many empty objects as allowed": (b"[" + b",".join([b"{}"] * N) + b"]", True),
    "as many distinct keys as allowed": (_keys(DEFAULT_LIMITS.max_keys - 10), True),
    "more distinct keys than allowed": (_keys(DEFAULT_LIMITS.max_values - 10), False),
    "deep nesting": (b"[" * ROOM, False),
    "one long number": (b"1" * ROOM, False),
}

CHILD = """
import sys
from fastseq.files import FastseqFileError, read_npz

def kb(field):  # this process's own figures (ru_maxrss would count the parent's before exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
before = kb("VmRSS:")
try:
    read_npz(sys.argv[1])
    outcome = "loaded"
except FastseqFileError as e:
    outcome = "refused " + str(e)
print((kb("VmHWM:") - before) // 1024, outcome)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="measures a process's own peak memory through Linux's /proc")
@pytest.mark.parametrize("case", sorted(AT_THE_LIMIT))
def test_memory_at_the_metadata_limit(tmp_path, case):
    value, loads = AT_THE_LIMIT[case]
    text = meta_text(value)
    assert len(text) <= LIMIT
    path = forge(tmp_path / "m.npz", text)
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    mb, outcome = r.stdout.split(" ", 1)
    assert int(mb) < PEAK_MB, f"{case}: {mb} MB above the baseline"
    assert outcome.strip() == "loaded" if loads else outcome.startswith(f"refused {path}: ")


def test_metadata_limits_refuse_before_parsing(tmp_path):
    path = forge(tmp_path / "m.npz", meta_text(b"[" * 40 + b"]" * 40))
    with pytest.raises(FastseqFileError, match="m.npz: metadata nests more than 32 levels"):
        read_npz(path)
    path = forge(tmp_path / "m.npz", meta_text(b"[" + b",".join([b"0"] * 1_000_001) + b"]"))
    with pytest.raises(FastseqFileError, match=r"m.npz: metadata holds about 100000\d values, "
                                               r"more than the limit of 1000000"):
        read_npz(path)
    path = forge(tmp_path / "m.npz", meta_text(_keys(DEFAULT_LIMITS.max_keys + 1)))
    # the envelope adds 5 keys of its own
    with pytest.raises(FastseqFileError, match=r"m.npz: metadata holds 262150 object keys, "
                                               r"more than the limit of 262144"):
        read_npz(path)
    path = forge(tmp_path / "m.npz", meta_text(b'"[[[[\\"[[[["') + b" ")
    assert read_npz(path)[1] == {"x": '[[[["[[[['}  # brackets inside strings do not count


def _depth_values_keys(v):
    if isinstance(v, (list, dict)):
        children = [_depth_values_keys(c) for c in (v.values() if isinstance(v, dict) else v)]
        return (1 + max([d for d, _, _ in children], default=0),
                1 + sum(n for _, n, _ in children),
                (len(v) if isinstance(v, dict) else 0) + sum(k for _, _, k in children))
    return 0, 1, 0


any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
    st.text(alphabet='[]{}",:\\ab\n\u00e9', max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(alphabet='[]{}":\\a', max_size=4), inner, max_size=4), max_leaves=20)


@given(value=any_json, chunk=st.sampled_from([1, 2, 3, 7, 1 << 18]), ascii=st.booleans())
def test_scan_depth_and_keys_are_exact_and_values_an_upper_bound(value, chunk, ascii):
    """Brackets, colons, quotes and runs of backslashes inside strings, split across chunk
    edges."""
    depth, values, keys = jsontext.scan(json.dumps(value, ensure_ascii=ascii).encode(),
                                        chunk=chunk)
    want_depth, want_values, want_keys = _depth_values_keys(value)
    assert depth == want_depth and want_values <= values <= 2 * want_values + 1
    assert keys == want_keys


def test_writer_refuses_metadata_the_reader_would_refuse(tmp_path):
    path = tmp_path / "m.npz"
    with pytest.raises(ValueError, match="nests more than 32 levels.*could not be read back"):
        write_npz(path, {}, {"x": json.loads("[" * 34 + "0" + "]" * 34)})
    with pytest.raises(ValueError, match="values, more than the limit"):
        write_npz(path, {}, {"x": [0] * 1_000_001})
    with pytest.raises(ValueError, match="object keys, more than the limit"):
        write_npz(path, {}, {"x": {str(i): 0 for i in range(DEFAULT_LIMITS.max_keys)}})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# the envelope's own fields

@pytest.mark.parametrize("field,value,message", [
    ("version", 2.0, "field 'version' must be 2, got float 2.0"),
    ("version", True, "field 'version' must be 2, got bool true"),
    ("version", 3, "field 'version' must be 2, got int 3"),
    ("arrays", {}, "field 'arrays' must be a list"),
    ("arrays", [["a", "<f4", [2.0]]], r"field 'arrays\[0\]\[2\]\[0\]' must be an integer"),
    ("arrays", [["a", "<f4", [-1]]], r"field 'arrays\[0\]\[2\]\[0\]' = -1 is out of range"),
    ("arrays", [["", "<f4", [2]]], r"field 'arrays\[0\]\[0\]' must be a string of 1 to"),
    ("meta", [], "field 'meta' must be a JSON object, got list"),
])
def test_envelope_fields_are_checked_by_type_and_range(tmp_path, field, value, message):
    path = forge(tmp_path / "m.npz", envelope({}, **{field: value}))
    with pytest.raises(FastseqFileError, match=f"m.npz: envelope {message}"):
        read_npz(path)


def test_check_schema_names_file_and_field():
    schema = Dict({"model": Str(64, 1), "config": Dict({"n": Int(1, 10)})},
                  optional={"reverse": Bool(), "vocab": List(Str(8, 1), 4, unique=True)})
    check_schema("f.npz", {"model": "M", "config": {"n": 3}, "reverse": False}, schema)
    for meta, message in [
        ({"config": {"n": 3}}, "field 'model' is missing"),
        ({"model": "M", "config": {}}, "field 'config.n' is missing"),
        ({"model": "M", "config": {"n": True}}, "field 'config.n' must be an integer in"),
        ({"model": "M", "config": {"n": 3.0}}, "field 'config.n' must be an integer in"),
        ({"model": "M", "config": {"n": 11}}, r"field 'config.n' = 11 is out of range"),
        ({"model": "M", "config": {"n": 1, "m": 2}}, "field 'config.m' is not expected"),
        ({"model": "M", "config": {"n": 1}, "reverse": "yes"}, "field 'reverse' must be true"),
        ({"model": "M", "config": {"n": 1}, "vocab": ["a", "a"]}, "field 'vocab' lists an item"),
        ({"model": "M", "config": {"n": 1}, "other": 1}, "field 'other' is not expected"),
    ]:
        with pytest.raises(FastseqFileError, match=f"^f.npz: metadata {message}"):
            check_schema("f.npz", meta, schema)
    check_schema("f.npz", {"anything": [1, {"x": None}]}, Dict(extra=Any()))


# ---------------------------------------------------------------------------------------------
# random forged envelopes and metadata, every loader

def _model_arrays(model):
    return list(zip(model.param_names, model.params))


LM, S2S = Rnnlm(len(WORDS), 4, 5, seed=0), PeekySeq2seq(len(CHARS), 4, 5, seed=0)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3), max_leaves=8)
MODEL_META = {"model": st.sampled_from(["Rnnlm", "PeekySeq2seq", "Nope"]) | json_values,
              "config": st.fixed_dictionaries({}, optional={
                  "vocab_size": st.sampled_from([12, 13, 0, -1, 2 ** 40]) | json_values,
                  "wordvec_size": st.sampled_from([4, 5]) | json_values,
                  "hidden_size": st.sampled_from([5, 4]) | json_values}) | json_values,
              "vocab": st.just(WORDS) | json_values, "chars": st.just(CHARS) | json_values,
              "question_width": st.sampled_from([7, 0]) | json_values,
              "answer_width": st.sampled_from([5, 70000]) | json_values,
              "reverse": st.booleans() | json_values, "vocab_source": json_values,
              "format": st.just("fastseq-checkpoint-1") | json_values,
              "model_class": st.sampled_from(["Rnnlm", "PeekySeq2seq"]) | json_values,
              "model_config": json_values, "vocabulary": json_values}
forged_meta = st.fixed_dictionaries({}, optional=MODEL_META)
forged_envelope = st.fixed_dictionaries({}, optional={
    "format": st.just("fastseq.npz") | json_values,
    "version": st.sampled_from([2, 2.0]) | json_values,
    "arrays": st.just(None) | json_values, "meta": forged_meta | json_values})


def _try(fn, path):
    """fn(path), or None when it refused with a FastseqFileError naming the file (or, for a
    language model stored without its vocabulary, the missing PTB file of an empty data_dir)."""
    try:
        return fn(path)
    except FastseqFileError as e:
        assert str(e).startswith(f"{path}: "), e
    except FileNotFoundError as e:
        assert "ptb.train.txt not found" in str(e), e
    return None


def _load_every_way(path):
    folder = path.parent
    before = sorted(os.listdir(folder)), path.read_bytes()
    _try(read_npz, path)
    _try(lambda p: fastseq.load(p, data_dir=folder / "no-ptb"), path)
    _try(files.load_checkpoint, path)
    for model in (LM, S2S):
        snap = [p.copy() for p in model.params]
        if _try(model.load_params, path) is None:
            assert all(np.array_equal(a, b) for a, b in zip(model.params, snap))
        else:
            for p, s in zip(model.params, snap):
                p[...] = s
    assert (sorted(os.listdir(folder)), path.read_bytes()) == before  # nothing written


@settings(max_examples=150, deadline=None)
@given(env=forged_envelope, which=st.sampled_from(["lm", "s2s"]))
def test_forged_envelopes(tmp_path_factory, env, which):
    arrays = _model_arrays(LM if which == "lm" else S2S)
    if env.get("arrays") is None:
        env["arrays"] = [[n, a.dtype.str, list(a.shape)] for n, a in arrays]
    path = forge(tmp_path_factory.mktemp("forged") / "m.npz", json.dumps(env).encode(),
                 [a for _, a in arrays])
    _load_every_way(path)


@settings(max_examples=150, deadline=None)
@given(meta=forged_meta, which=st.sampled_from(["lm", "s2s"]),
       prefix=st.sampled_from(["", "param/"]))
def test_forged_model_and_checkpoint_metadata(tmp_path_factory, meta, which, prefix):
    arrays = [(prefix + n, a) for n, a in _model_arrays(LM if which == "lm" else S2S)]
    path = forge(tmp_path_factory.mktemp("forged") / "m.npz", envelope(meta, arrays),
                 [a for _, a in arrays])
    _load_every_way(path)


@pytest.mark.parametrize("change,field", [
    ({"config": {"wordvec_size": 4, "hidden_size": 5}}, "field 'config.vocab_size' is missing"),
    ({"reverse": 1}, "field 'reverse' must be true or false, got int 1"),
    ({"question_width": 0}, "field 'question_width' = 0 is out of range"),
])
def test_generate_refuses_forged_metadata_in_one_line(tmp_path, change, field):
    arrays = _model_arrays(S2S)
    meta = {"model": "PeekySeq2seq", "config": S2S.config(), "chars": CHARS,
            "question_width": 7, "answer_width": 5, "reverse": True}
    meta.update(change)
    path = forge(tmp_path / "m.npz", envelope(meta, arrays), [a for _, a in arrays])
    r = subprocess.run([sys.executable, "-m", "fastseq.generate", "--model", str(path),
                        "--question", "1+2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"{path}: metadata {field}" in r.stderr


# ---------------------------------------------------------------------------------------------
# user paths, vocabularies

def test_user_paths_are_expanded_inside_the_error_family(tmp_path, monkeypatch):
    nobody = "~nobody_fastseq_x"
    with pytest.raises(FastseqFileError, match="cannot expand '~nobody_fastseq_x'"):
        ptb.load_data(data_dir=f"{nobody}/ptb")
    with pytest.raises(FastseqFileError, match="no home folder is known"):
        read_npz(f"{nobody}/m.npz")
    with pytest.raises(FastseqFileError, match=nobody):
        fastseq.load(f"{nobody}/m.npz")
    with pytest.raises(FastseqFileError, match=nobody):
        write_npz(f"{nobody}/m.npz", {}, {})
    monkeypatch.setenv("HOME", str(tmp_path))
    LM.save_params("~/lm.npz", meta={"vocab": WORDS})
    assert (tmp_path / "lm.npz").is_file() and fastseq.load("~/lm.npz").vocab == WORDS


class CountingDict(dict):
    reads = 0

    def __getitem__(self, k):
        CountingDict.reads += 1
        return super().__getitem__(k)


def test_vocabulary_builds_its_table_once():
    chars = [" "] + [chr(0x4e00 + i) for i in range(4999)]
    v = Vocabulary({c: i for i, c in enumerate(chars)}, CountingDict(enumerate(chars)), 4, 4)
    ids = np.array([[0, 1, 4999], [2, 3, 4]])
    assert v.decode(ids) == [chars[0] + chars[1] + chars[4999], "".join(chars[2:5])]
    first = CountingDict.reads
    assert first == 5000
    assert v.decode(ids[0]) == chars[0] + chars[1] + chars[4999]
    assert v.encode([chars[7] + chars[9]]).tolist() == [[7, 9, 0, 0]]
    assert CountingDict.reads == first  # no rebuild on later calls
    with pytest.raises(ValueError, match=r"outside the vocabulary ' \u4e00.* \.\.\.$"):
        v.encode(["x"])


scalars = st.none() | st.booleans() | st.integers(-2 ** 1100, 2 ** 1100) | st.floats() | \
    st.text(alphabet=" ab\t", max_size=5)
NUMBERS = [0, 1, 0.5, -3, 12, 2 ** 1100, 1e308, float("nan"), float("inf"), -float("inf"), True]
STRINGS = ["", " ", "ab", "abcde", "\t"]
SPECS = [(Int(0, 10), NUMBERS), (Num(), NUMBERS), (Num(above=0, below=1), NUMBERS),
         (Float(-1, 1), NUMBERS), (Str(3), STRINGS), (Str(4, 1, blank=False), STRINGS),
         (Bool(), [True, False, 0]), (Any(), NUMBERS)]


def _same_first_problem(spec, items):
    first = next((p for i, x in enumerate(items) if (p := spec.problem(x, f"a[{i}]"))), None)
    assert List(spec, 10).problem(items, "a") == first
    assert spec.fits_all(items) == (first is None)
    return first


@pytest.mark.parametrize("spec,pool", SPECS)
@settings(max_examples=200)
@given(data=st.data())
def test_long_list_pass_finds_the_same_first_problem(spec, pool, data):
    """List's quick pass over every item (fits_all) agrees with checking them one by one."""
    _same_first_problem(spec, data.draw(st.lists(st.sampled_from(pool + [None]), max_size=6) |
                                        st.lists(scalars, max_size=6)))


@pytest.mark.parametrize("spec,items,problem", [
    (Num(), [0, float("nan")], "'a[1]' must be a finite number"),
    (Num(), [0.5, float("inf")], "'a[1]' must be a finite number"),
    (Num(), [0, 2 ** 1100], "'a[1]' must be a finite number"),
    (Int(0, 10), [1, -3], "'a[1]' = -3 is out of range"),
    (Int(0, 10), [1, 12], "'a[1]' = 12 is out of range"),
    (Int(0, 10), [1, True], "'a[1]' must be an integer"),
    (Float(-1, 1), [0.5, 0], "'a[1]' must be a finite floating-point number"),
    (Str(4, 1, blank=False), ["ab", " "], "'a[1]' must be a string of 1 to 4 characters, not"),
    (Str(4, 1), ["ab", ""], "'a[1]' must be a string of 1 to 4"),
    (Str(4, 1), ["ab", "abcde"], "'a[1]' must be a string of 1 to 4"),
    (Str(4), ["ab", 1], "'a[1]' must be a string of 0 to 4"),
])
def test_long_list_pass_refuses_what_one_item_would(spec, items, problem):
    assert problem in _same_first_problem(spec, items)
