"""The textbook .pkl loader against hostile pickles: tiny files declaring huge allocations, deep
nesting, non-float arrays (refused, never cast), and hypothesis-damaged or -generated pickles.
Every input is read as the float arrays it holds or refused with a FastseqFileError."""
import io
import pickle
import struct

import numpy as np
import pytest
from fuzz_support import bounded
from hypothesis import given
from hypothesis import strategies as st

from fastseq._textbook import UnsafePickleError, load_textbook_params, restricted_load
from fastseq.files import FastseqFileError

RECON = b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"


def _dtype(code, order=b"<"):
    return (b"cnumpy\ndtype\nX" + struct.pack("<I", len(code)) + code + b"\x89\x88\x87R"
            b"(K\x03X\x01\x00\x00\x00" + order + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")


def _array(shape, dtype_code, raw, order=b"<"):
    """Protocol-2 opcodes for one ndarray: _reconstruct, BUILD (1, shape, dtype, False, raw)."""
    shp = b"(" + b"".join(b"J" + struct.pack("<i", d) if d < 2 ** 31 else
                          b"\x8a\x08" + struct.pack("<q", d) for d in shape) + b"t"
    return (RECON + b"(K\x01" + shp + _dtype(dtype_code, order) + b"\x89C"
            + bytes([len(raw)]) + raw + b"tb")


def _list(*items):
    return b"\x80\x02]q\x00(" + b"".join(items) + b"e."


def _refused(data, match=None):
    _, refusal = bounded(restricted_load, io.BytesIO(data))
    assert isinstance(refusal, FastseqFileError), refusal
    if match:
        assert match in str(refusal), str(refusal)
    return refusal


def test_hand_made_pickle_is_read():
    data = _list(_array((2,), b"f4", np.array([1.5, -2.0], "<f4").tobytes()))
    (a,) = restricted_load(io.BytesIO(data))
    assert a.dtype == np.float32 and a.tolist() == [1.5, -2.0]
    (b,) = restricted_load(io.BytesIO(_list(_array((2,), b"f4", np.array([1.5, -2.0], ">f4")
                                                   .tobytes(), order=b">"))))
    assert b.tolist() == [1.5, -2.0] and b.dtype.isnative


def test_small_file_declaring_a_huge_object_array():
    """~200 bytes asking NumPy for an object array of 3e8 entries (2.4 GB): refused at the dtype."""
    data = _list(_array((300_000_000,), b"O8", b""))
    assert len(data) < 300
    _refused(data, "dtype object")


@pytest.mark.parametrize("shape", [(10 ** 10,), (2 ** 40, 2 ** 40), (0, 2 ** 62), (3, -1)])
def test_shapes_that_do_not_match_the_bytes(shape):
    _refused(_list(_array(shape, b"f8", b"\x00" * 8)), "shape")


@pytest.mark.parametrize("payload,match", [
    (b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 62) + b"xyz", "bytes8"),      # BINBYTES8 of 2^62
    (b"\x80\x04\x95" + struct.pack("<Q", 2 ** 40) + b"]." , "frame"),        # FRAME of 2^40
    (b"\x80\x02]r\xff\xff\xff\xff.", "memo index"),                          # LONG_BINPUT 2^32-1
    (b"\x80\x02" + b"(" * 5000 + b"l" * 5000 + b".", "nests"),               # 5,000 nested lists
    (b"\x80\x05\x96" + struct.pack("<Q", 2 ** 61) + b".", "bytearray8"),     # BYTEARRAY8
    (b"\x80\x04\x8d" + struct.pack("<Q", 2 ** 61) + b".", "unicodestring8"),  # BINUNICODE8
    (b"\x80\x02X" + struct.pack("<I", 2 ** 31) + b"ab.", "unicodestring4"),  # BINUNICODE 2 GB
])
def test_declared_sizes_beyond_the_file(payload, match):
    _refused(payload, match)


def test_dtype_nested_2000_deep():
    """dtype states whose subarray field holds another dtype, 2,000 deep: refused, no recursion."""
    inner = b"cnumpy\ndtype\nX\x02\x00\x00\x00f4\x89\x88\x87R"
    d = inner
    for _ in range(2000):
        d = (b"cnumpy\ndtype\nX\x02\x00\x00\x00V8\x89\x88\x87R(K\x03X\x01\x00\x00\x00|"
             + d + b"K\x01\x85\x86NNJ\x08\x00\x00\x00J\x01\x00\x00\x00K\x00tb")
    _refused(b"\x80\x02]q\x00(" + RECON + b"(K\x01(K\x01t" + d + b"\x89C\x00tbe.")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64,
                                   np.complex128, np.dtype([("a", "<f4"), ("b", "<f4")]),
                                   np.dtype("U2"), np.dtype("S2"), np.dtype("M8[s]")])
@pytest.mark.parametrize("protocol", [2, 5])
def test_non_float_arrays_refused_not_cast(dtype, protocol):
    data = pickle.dumps([np.ones(3, np.float16), np.zeros(3, dtype)], protocol=protocol)
    r = _refused(data)
    assert "dtype" in str(r) or "entry 1" in str(r)


def test_nan_weights_refused_by_the_model_loader(tmp_path):
    class M:
        textbook_tied = ()
        params = [np.zeros(3, np.float32), np.zeros(2, np.float32)]
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps([np.ones(3, np.float16), np.array([1, np.nan], np.float16)]))
    with pytest.raises(FastseqFileError, match="non-finite"):
        load_textbook_params(M(), path)
    assert all(not p.any() for p in M.params)  # nothing copied


def test_file_larger_than_the_model_needs_is_refused_before_reading(tmp_path):
    class M:
        textbook_tied = ()
        params = [np.zeros(3, np.float32)]
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps([np.zeros(3, np.float16)]) + b"\x00" * (2 << 20))
    with pytest.raises(FastseqFileError, match="more than the limit"):
        load_textbook_params(M(), path)


# ---------------------------------------------------------------------------------------------
# hypothesis

def _valid(seed, protocol, dtype):
    rng = np.random.default_rng(seed)
    return pickle.dumps([rng.standard_normal((3, 4)).astype(dtype),
                         np.asfortranarray(rng.standard_normal((2, 3))).astype(dtype),
                         np.zeros(0, dtype)], protocol=protocol)


VALID = [_valid(p, p, dt) for p in range(6) for dt in (np.float16, np.float32)]


@st.composite
def damaged_pickles(draw):
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1)) if data else 0
        kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "insert", "opcode"]))
        if kind == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[i:]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=9))
            data[i:i + len(chunk)] = chunk
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=9))
        else:  # an opcode byte with a large little-endian argument
            data[i:i] = bytes([draw(st.integers(0, 255))]) + struct.pack(
                "<Q", draw(st.sampled_from([0, 1, 255, 2 ** 31, 2 ** 32 - 1, 2 ** 40, 2 ** 62])))
    return bytes(data)


@given(damaged_pickles())
def test_damaged_pickles(data):
    result, refusal = bounded(restricted_load, io.BytesIO(data))
    if refusal is None:
        assert isinstance(result, list)
        assert all(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in result)


OPCODES = [b"(", b")", b"]", b"}", b"N", b"\x88", b"\x89", b"t", b"l", b"d", b"e", b"a", b"s",
           b"u", b"R", b"b", b"0", b"1", b"2", b"\x85", b"\x86", b"\x87", b"\x94", b".",
           b"K\x05", b"J\xff\xff\xff\x7f", b"M\xff\xff", b"h\x00", b"q\x00", b"j\x00\x00\x00\x00",
           b"C\x02ab", b"X\x01\x00\x00\x00<", b"X\x02\x00\x00\x00f4", b"X\x02\x00\x00\x00O8",
           b"X\x02\x00\x00\x00V8", b"X\x06\x00\x00\x00latin1",
           b"cnumpy\ndtype\n", b"cnumpy\nndarray\n", b"cnumpy._core.multiarray\n_reconstruct\n",
           b"cnumpy._core.multiarray\nscalar\n", b"cnumpy._core.numeric\n_frombuffer\n",
           b"c_codecs\nencode\n", b"c__builtin__\nbytes\n", b"cos\nsystem\n",
           b"\x8a\x08" + struct.pack("<q", 2 ** 62), b"\x8a\x01\xff"]


@given(st.lists(st.sampled_from(OPCODES), max_size=60), st.sampled_from([b"\x80\x02", b"\x80\x05",
                                                                          b""]))
def test_generated_opcode_streams(ops, proto):
    result, refusal = bounded(restricted_load, io.BytesIO(proto + b"".join(ops) + b"."))
    if refusal is None:
        assert all(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in result)
    elif any(op.startswith(b"cos") for op in ops) and isinstance(refusal, UnsafePickleError):
        assert "os.system" in str(refusal)
