"""Forged checkpoints with a valid checksum (written by the library's own writer): random edits
of the metadata tree and of the arrays. Resuming either works or is refused with a
CheckpointError (a FastseqFileError) naming the file, within the reliability bounds, and
nothing is restored from a checkpoint the schema refuses."""
import shutil
import tempfile
from pathlib import Path

import numpy as np
from fuzz_support import bounded
from hypothesis import given
from hypothesis import strategies as st

from fastseq import Adam, PeekySeq2seq, Trainer, checkpoint, files
from fastseq.datasets.sequence import build, generate_addition, parse_lines
from fastseq.run import RunError, load_resume

DATA = build(*parse_lines(generate_addition(300, seed=4)), seed=0)


def _loop():
    model = PeekySeq2seq(len(DATA.vocab), 4, 8, seed=1)
    return Trainer(model, Adam(1e-2), seed=5, progress=False)


def _original():
    loop = _loop()
    loop.fit(DATA.x_train, DATA.t_train, max_epoch=1, batch_size=64)
    return checkpoint.snapshot(loop, {"note": "fuzz"})


ARRAYS, META = _original()


def _paths(tree, prefix=()):
    """Every (container path, key) in a JSON tree."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        yield prefix, k
        if isinstance(v, (dict, list)):
            yield from _paths(v, prefix + (k,))


PATHS = list(_paths(META))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                              max_size=3), max_leaves=6)
arrays = st.builds(lambda shape, dtype: np.zeros(shape, dtype),
                   st.lists(st.integers(0, 5), max_size=3).map(tuple),
                   st.sampled_from([np.float32, np.float64, np.int64, np.uint32, np.bool_]))
edits = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
    st.tuples(st.just("replace"), st.sampled_from(PATHS), json_values),
    st.tuples(st.just("array"), st.sampled_from(sorted(ARRAYS)), arrays))


def _forge(edit_list):
    meta = checkpoint.json.loads(checkpoint.json.dumps(META))
    arrs = dict(ARRAYS)
    for kind, where, value in edit_list:
        if kind == "array":
            arrs[where] = value
            continue
        node = meta
        try:
            for k in where[0]:
                node = node[k]
            if kind == "delete":
                del node[where[1]]
            else:
                node[where[1]] = value
        except (KeyError, IndexError, TypeError):  # an earlier edit removed the place
            pass
    return arrs, meta


@given(st.lists(edits, min_size=1, max_size=3))
def test_forged_checkpoint_is_restored_or_refused(edit_list):
    arrs, meta = _forge(edit_list)
    loop = _loop()
    before = [p.copy() for p in loop.model.params]
    _, refusal = bounded(checkpoint.restore, loop, arrs, meta, "c.npz",
                         allowed=(checkpoint.CheckpointError,))
    if refusal is not None:
        assert str(refusal).startswith("c.npz: ")
        if "not a usable checkpoint" in str(refusal):  # refused before anything was restored
            assert all(np.array_equal(a, b) for a, b in zip(before, loop.model.params))


FOLDER = Path(tempfile.mkdtemp(prefix="fastseq-fuzz-checkpoint-"))


@given(st.lists(edits, min_size=1, max_size=3))
def test_forged_run_checkpoint_is_loaded_or_refused_in_one_line(edit_list):
    arrs, meta = _forge(edit_list)
    meta.update(config={"task": "addition"}, metrics={}, vocabulary={})
    shutil.rmtree(FOLDER, ignore_errors=True)
    FOLDER.mkdir()
    files.write_npz(FOLDER / "checkpoint.npz", arrs, meta)
    written = (FOLDER / "checkpoint.npz").read_bytes()
    _, refusal = bounded(load_resume, str(FOLDER),
                         allowed=(checkpoint.CheckpointError, files.FastseqFileError, RunError))
    assert refusal is not None  # the run's own fields are incomplete in every forgery here
    assert "\n" not in str(refusal) and "checkpoint.npz" in str(refusal)
    assert (FOLDER / "checkpoint.npz").read_bytes() == written  # nothing overwritten
