"""The restricted unpickler for the textbook's weight files, and the shape-checked loader."""
import io
import os
import pickle
import pickletools

import numpy as np
import pytest

from fastseq._textbook import UnsafePickleError, load_textbook_params, restricted_load


def _arrays(rng, dtype=np.float16):
    return [rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal((3, 12)).astype(dtype),
            rng.standard_normal(12).astype(dtype), np.asfortranarray(rng.standard_normal((4, 6))).astype(dtype),
            np.zeros((0, 2), dtype)]


def _dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


class _Command:
    """Unpickling this with plain pickle.load would run a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class DummyModel:
    textbook_tied = ()

    def __init__(self, shapes, dtype=np.float32, tied=None):
        self.params = [np.full(s, -1.0, dtype) for s in shapes]
        if tied is not None:
            self.textbook_tied = tied


# ---------------------------------------------------------------------------------------------
# restricted_load

@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_round_trip_float16(tmp_path, protocol):
    arrays = _arrays(np.random.default_rng(protocol))
    out = restricted_load(_dump(tmp_path / "w.pkl", arrays, protocol))
    assert isinstance(out, list) and len(out) == len(arrays)
    for a, b in zip(arrays, out):
        assert b.dtype == np.float16 and b.shape == a.shape and np.array_equal(a, b)


@pytest.mark.parametrize("protocol", [0, 1])
def test_round_trip_old_protocols_and_tuple(tmp_path, protocol):
    arrays = tuple(_arrays(np.random.default_rng(0), np.float32))
    out = restricted_load(_dump(tmp_path / "w.pkl", arrays, protocol))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, out))


def test_numpy1_module_names(tmp_path):
    """Files written under NumPy 1 (as the textbook's were) name numpy.core, not numpy._core."""
    arrays = _arrays(np.random.default_rng(11))
    data = pickle.dumps(arrays, protocol=2)
    if b"numpy._core" in data:
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in data and b"numpy._core" not in data
    out = restricted_load(io.BytesIO(data))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, out))


def test_file_object_accepted():
    arrays = _arrays(np.random.default_rng(1))
    out = restricted_load(io.BytesIO(pickle.dumps(arrays)))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, out))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_command_payload_is_refused_and_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = _dump(tmp_path / "evil.pkl", [np.ones(3, np.float16), _Command(f"touch {marker}")], protocol)
    # sanity: the payload really names os.system
    assert "system" in "".join(str(arg) for _, arg, _ in pickletools.genops(path.read_bytes()))
    with pytest.raises(UnsafePickleError) as e:
        restricted_load(path)
    assert "system" in str(e.value) and str(path) in str(e.value)
    assert isinstance(e.value, ValueError)
    assert not marker.exists()


@pytest.mark.parametrize("target", [("builtins", "eval"), ("builtins", "getattr"),
                                     ("subprocess", "Popen"), ("numpy", "load"),
                                     ("numpy.testing", "measure"), ("_codecs", "decode")])
def test_other_globals_refused(target):
    module, name = target
    payload = f"c{module}\n{name}\n(S'1'\ntR.".encode()  # protocol 0: GLOBAL, MARK, STRING, TUPLE, REDUCE
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        restricted_load(io.BytesIO(payload))


def test_codecs_encode_only_as_numpy_uses_it():
    payload = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    with pytest.raises(UnsafePickleError, match="latin1"):
        restricted_load(io.BytesIO(payload))


@pytest.mark.parametrize("obj, match", [({"W": np.ones(2)}, "list of NumPy arrays"),
                                        ([np.ones(2), 3.0], "entry 1"),
                                        ([np.float32(1.0)], "entry 0"),
                                        ([np.array([1, "a"], dtype=object)], "dtype object")])
def test_result_must_be_list_of_numeric_arrays(obj, match):
    with pytest.raises(ValueError, match=match):
        restricted_load(io.BytesIO(pickle.dumps(obj)))


def test_garbage_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="bad.pkl"):
        restricted_load(tmp_path / "bad.pkl")


def test_no_plain_pickle_load(monkeypatch, tmp_path):
    def forbidden(*a, **k):
        raise AssertionError("plain pickle.load used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    path = _dump(tmp_path / "w.pkl", _arrays(np.random.default_rng(2)))
    assert len(restricted_load(path)) == 5


# ---------------------------------------------------------------------------------------------
# load_textbook_params

def test_load_into_model_in_place(tmp_path):
    arrays = _arrays(np.random.default_rng(3))
    model = DummyModel([a.shape for a in arrays])
    before = [id(p) for p in model.params]
    assert load_textbook_params(model, _dump(tmp_path / "w.pkl", arrays)) is model
    assert [id(p) for p in model.params] == before  # same arrays, filled in place
    for p, a in zip(model.params, arrays):
        assert p.dtype == np.float32 and np.array_equal(p, a.astype(np.float32))


def test_count_mismatch(tmp_path):
    arrays = _arrays(np.random.default_rng(4))
    model = DummyModel([a.shape for a in arrays[:-1]])
    with pytest.raises(ValueError, match=r"5 arrays.*4 parameters"):
        load_textbook_params(model, _dump(tmp_path / "w.pkl", arrays))
    assert all(np.all(p == -1) for p in model.params)  # nothing copied


def test_shape_mismatch_names_entry_and_shapes(tmp_path):
    arrays = _arrays(np.random.default_rng(5))
    shapes = [a.shape for a in arrays]
    shapes[2] = (13,)
    model = DummyModel(shapes)
    with pytest.raises(ValueError, match=r"entry 2: expected shape \(13,\), found shape \(12,\)"):
        load_textbook_params(model, _dump(tmp_path / "w.pkl", arrays))
    assert all(np.all(p == -1) for p in model.params)


def _better_rnnlm_like(rng, V=11, D=4, H=4):
    """The textbook's BetterRnnlm layout: entry 7 is the embedding (entry 0) transposed."""
    embed = (rng.standard_normal((V, D)) * 0.1).astype(np.float16)
    lstm = [rng.standard_normal(s).astype(np.float16)
            for s in [(D, 4 * H), (H, 4 * H), (4 * H,), (H, 4 * H), (H, 4 * H), (4 * H,)]]
    affine_b = rng.standard_normal(V).astype(np.float16)
    return [embed, *lstm, embed.T.copy(), affine_b]


def test_tied_layout_accepted(tmp_path):
    arrays = _better_rnnlm_like(np.random.default_rng(6))
    kept = arrays[:7] + arrays[8:]
    model = DummyModel([a.shape for a in kept], tied=[(0, 7)])
    load_textbook_params(model, _dump(tmp_path / "BetterRnnlm.pkl", arrays))
    for p, a in zip(model.params, kept):
        assert np.array_equal(p, a.astype(np.float32))


def test_tied_layout_must_really_be_tied(tmp_path):
    arrays = _better_rnnlm_like(np.random.default_rng(7))
    arrays[7] = arrays[7].copy()
    arrays[7][1, 2] += np.float16(1)
    model = DummyModel([a.shape for a in arrays[:7] + arrays[8:]], tied=[(0, 7)])
    with pytest.raises(ValueError, match=r"entry 7 should equal entry 0 transposed"):
        load_textbook_params(model, _dump(tmp_path / "w.pkl", arrays))
    assert all(np.all(p == -1) for p in model.params)


def test_tied_layout_wrong_transposed_shape(tmp_path):
    arrays = _better_rnnlm_like(np.random.default_rng(8))
    model = DummyModel([a.shape for a in arrays[:7] + arrays[8:]], tied=[(0, 6)])
    with pytest.raises(ValueError, match=r"entry 6 should be entry 0 transposed.*expected shape \(4, 11\)"):
        load_textbook_params(model, _dump(tmp_path / "w.pkl", arrays))


def test_tied_layout_shape_mismatch_after_drop(tmp_path):
    arrays = _better_rnnlm_like(np.random.default_rng(9))
    shapes = [a.shape for a in arrays[:7] + arrays[8:]]
    shapes[7] = (12,)  # the model's affine bias; it is file entry 8
    model = DummyModel(shapes, tied=[(0, 7)])
    with pytest.raises(ValueError, match=r"parameter 7 \(file entry 8\): expected shape \(12,\), "
                                         r"found shape \(11,\)"):
        load_textbook_params(model, _dump(tmp_path / "w.pkl", arrays))


def test_tied_layout_count_mismatch(tmp_path):
    arrays = _better_rnnlm_like(np.random.default_rng(10))
    model = DummyModel([a.shape for a in arrays[:6]], tied=[(0, 7)])
    with pytest.raises(ValueError, match=r"9 arrays \(8 after dropping.*6 parameters"):
        load_textbook_params(model, _dump(tmp_path / "w.pkl", arrays))


def test_unsafe_file_refused_by_loader(tmp_path):
    marker = tmp_path / "pwned"
    model = DummyModel([(3,)])
    path = _dump(tmp_path / "evil.pkl", [_Command(f"touch {marker}")])
    with pytest.raises(UnsafePickleError):
        load_textbook_params(model, path)
    assert not marker.exists()
