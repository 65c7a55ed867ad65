"""fastseq.files: atomic, regular-file-only writes; all-or-nothing, bounded, checksummed reads."""
import io
import json
import os
import signal
import tracemalloc
import zipfile

import numpy as np
import pytest

from fastseq import PeekySeq2seq, Rnnlm
from fastseq.files import (CheckpointError, FastseqFileError, Limits, NotRegularFileError, read_npz,
                        write_npz)


def members(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def rezip(path, files):
    """Write ``files`` (name -> bytes) as a stored zip at ``path`` (a hand-made, edited file)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)


def npy(a):
    b = io.BytesIO()
    np.lib.format.write_array(b, np.asarray(a), allow_pickle=False)
    return b.getvalue()


@pytest.fixture(autouse=True)
def no_hang():
    """Every test here must finish in seconds (a FIFO that blocks would hang forever)."""
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("timed out (blocked?)"))
    signal.alarm(20)
    yield
    signal.alarm(0)


def test_roundtrip_keeps_names_order_dtypes_and_meta(tmp_path):
    arrays = {"W": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3),
              "step": np.array(7, dtype=np.int64), "mask": np.array([True, False]),
              "empty": np.zeros((0, 4), dtype=np.float32), "state": np.arange(5, dtype=np.uint32)}
    meta = {"model": "X", "vocab": ["a", "b"], "lr": 1e-3, "nested": {"k": [1, 2, None]}}
    path = write_npz(tmp_path / "f.npz", arrays, meta)
    got, m = read_npz(path)
    assert m == meta and list(got) == list(arrays)
    for k in arrays:
        assert got[k].dtype == arrays[k].dtype and np.array_equal(got[k], arrays[k])
    assert got["W"].flags.writeable
    assert sorted(os.listdir(tmp_path)) == ["f.npz"]  # no temporary left
    with np.load(path) as z:  # still a plain .npz to NumPy, no pickle needed
        assert np.array_equal(z["a000"], arrays["W"])


def test_checksum_covers_metadata(tmp_path):
    path = tmp_path / "m.npz"
    Rnnlm(10, 4, 4, seed=0).save_params(path, meta={"vocab": [f"w{i}" for i in range(10)]})
    files = members(path)
    env = np.load(io.BytesIO(files["__fastseq__.npy"]))
    text = env.tobytes().replace(b'"vocab_size":10', b'"vocab_size":99')
    assert text != env.tobytes()
    files["__fastseq__.npy"] = npy(np.frombuffer(text, np.uint8))
    rezip(path, files)
    with pytest.raises(FastseqFileError, match="checksum mismatch.*metadata"):
        read_npz(path)


def test_error_family():
    assert issubclass(FastseqFileError, ValueError) and issubclass(CheckpointError,
                                                                   FastseqFileError)
    assert issubclass(NotRegularFileError, FastseqFileError)
    assert issubclass(NotRegularFileError, OSError)


def test_reading_a_fifo_or_directory_is_refused_at_once(tmp_path):
    fifo = tmp_path / "model.npz"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFileError, match=r"model.npz: is a FIFO"):
        read_npz(fifo)
    with pytest.raises(NotRegularFileError, match="directory"):
        read_npz(tmp_path)
    with pytest.raises(NotRegularFileError, match="character device"):
        read_npz("/dev/zero")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        read_npz(tmp_path / "nope.npz")


def test_writes_touch_only_regular_files(tmp_path):
    arrays = {"a": np.zeros(2)}
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFileError, match="FIFO"):
        write_npz(fifo, arrays, {})
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(NotRegularFileError, match="directory"):
        write_npz(tmp_path / "dir.npz", arrays, {})
    before = os.stat("/dev/null")
    with pytest.raises(NotRegularFileError, match="character device"):
        write_npz("/dev/null", arrays, {})
    assert os.stat("/dev/null").st_ino == before.st_ino
    # symbolic links: refused (policy), the link and its target stay as they were
    target = tmp_path / "target.npz"
    write_npz(target, {"a": np.ones(2)}, {})
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    with pytest.raises(NotRegularFileError, match="symbolic link"):
        write_npz(link, arrays, {})
    assert link.is_symlink() and np.array_equal(read_npz(link)[0]["a"], np.ones(2))  # reads follow
    assert os.path.exists(fifo) and (tmp_path / "dir.npz").is_dir()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    write_npz(path, {"a": np.ones(3)}, {"v": 1})
    old = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np.lib.format, "write_array", boom)
    with pytest.raises(OSError, match="No space"):
        write_npz(path, {"a": np.zeros(3)}, {"v": 2})
    monkeypatch.undo()
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["m.npz"]
    with pytest.raises(TypeError, match="JSON"):
        write_npz(path, {"a": np.zeros(3)}, {"v": object()})
    with pytest.raises(TypeError, match="dtype"):
        write_npz(path, {"a": np.zeros(3, dtype=complex)}, {})
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["m.npz"]


def _snapshot(model):
    return [p.copy() for p in model.params]


def _unchanged(model, snap):
    return all(np.array_equal(p, s) for p, s in zip(model.params, snap))


@pytest.mark.parametrize("bad", ["int32", "bool", "nan", "inf", "overflow32", "truncated"])
def test_refused_load_changes_no_parameter(tmp_path, bad):
    """The last parameter is the bad one: every earlier one would have been copied by a loader
    that checks as it goes."""
    src = PeekySeq2seq(13, 8, 16, seed=0)
    names = src.param_names
    arrays = {n: p.copy() for n, p in zip(names, src.params)}
    last = names[-1]
    if bad in ("int32", "bool"):
        arrays[last] = arrays[last].astype(bad)
    elif bad == "nan":
        arrays[last] = arrays[last].copy()
        arrays[last][0] = np.nan
    elif bad == "inf":
        arrays[last] = np.full_like(arrays[last], np.inf)
    elif bad == "overflow32":  # finite as float64, inf once converted to the model's float32
        arrays[last] = np.full(arrays[last].shape, 1e300)
    path = tmp_path / "m.npz"
    write_npz(path, arrays, {"model": "PeekySeq2seq", "config": src.config()})
    if bad == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) - 300])
    dst = PeekySeq2seq(13, 8, 16, seed=1)
    snap = _snapshot(dst)
    with pytest.raises(FastseqFileError, match="m.npz") as e:
        dst.load_params(path)
    assert _unchanged(dst, snap)
    assert {"int32": "dtype int32", "bool": "dtype bool", "nan": "non-finite",
            "inf": "non-finite", "overflow32": "non-finite",
            "truncated": "corrupt or truncated"}[bad] in str(e.value)


def test_float64_file_loads_into_float32_model(tmp_path):
    src = Rnnlm(10, 4, 4, seed=0, dtype=np.float64)
    path = tmp_path / "m.npz"
    src.save_params(path)
    dst = Rnnlm(10, 4, 4, seed=1)
    dst.load_params(path)
    assert all(p.dtype == np.float32 for p in dst.params)
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(dst.params, src.params))


def test_declared_sizes_are_checked_before_allocating(tmp_path):
    """A 300-byte file whose .npy header declares an 80 GB array is refused without allocating."""
    path = tmp_path / "m.npz"
    write_npz(path, {"W": np.zeros(4)}, {})
    files = members(path)
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": "<f8", "fortran_order": False,
                                             "shape": (10 ** 10,)})
    files["a000.npy"] = b.getvalue() + bytes(32)
    rezip(path, files)
    tracemalloc.start()
    try:
        with pytest.raises(FastseqFileError, match="declares shape"):
            read_npz(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20


def test_limits_and_foreign_files(tmp_path):
    path = tmp_path / "m.npz"
    write_npz(path, {"W": np.zeros((4, 4))}, {"deep": [[[[1]]]]})
    with pytest.raises(FastseqFileError, match="nests more than 5 levels"):
        read_npz(path, limits=Limits(max_depth=5))
    with pytest.raises(FastseqFileError, match="more than the limit"):
        read_npz(path, limits=Limits(max_file_bytes=100))
    with pytest.raises(FastseqFileError, match="shape"):
        read_npz(path, expected={"W": (4, 5)})
    np.savez(tmp_path / "plain.npz", W=np.zeros(3))
    with pytest.raises(FastseqFileError, match="not a file written by fastseq"):
        read_npz(tmp_path / "plain.npz")
    np.savez_compressed(tmp_path / "c.npz", **{k[:-4]: np.load(io.BytesIO(v))
                                               for k, v in members(path).items()})
    with pytest.raises(FastseqFileError, match="compressed"):
        read_npz(tmp_path / "c.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(FastseqFileError, match="plain.npy: not a readable"):
        read_npz(tmp_path / "plain.npy")
    other = tmp_path / "other.npz"
    np.savez(other, p000=np.zeros(3), __fastseq_meta__=np.array(json.dumps({"names": ["x"]})))
    with pytest.raises(FastseqFileError, match="not a file written by fastseq"):
        read_npz(other)
