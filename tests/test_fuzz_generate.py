"""Fuzzing python -m fastseq.generate's arguments (in process): every argument list either runs
(exit 0) or is refused with exit 2 -- argparse's usage line for a malformed flag, otherwise one
'fastseq:' line -- within the time and memory bounds, never a traceback."""
import atexit
import contextlib
import io
import shutil
import tempfile
from pathlib import Path

from fuzz_support import bounded
from hypothesis import given
from hypothesis import strategies as st

from fastseq import PeekySeq2seq, Rnnlm
from fastseq.generate import main

DIR = Path(tempfile.mkdtemp(prefix="fastseq-fuzz-generate-"))
atexit.register(shutil.rmtree, DIR, True)
WORDS = ["<eos>", "the", "cat", "sat", "N", "<unk>", "$", "a"]
CHARS = list("0123456789+_ ")


def _files():
    Rnnlm(len(WORDS), 4, 4, seed=0).save_params(DIR / "lm.npz", meta={"vocab": WORDS})
    PeekySeq2seq(len(CHARS), 4, 4, seed=0).save_params(
        DIR / "s2s.npz", meta={"chars": CHARS, "question_width": 7, "answer_width": 5,
                               "reverse": True})
    (DIR / "junk.npz").write_bytes(b"PK\x03\x04 not really")
    return [str(DIR / n) for n in ("lm.npz", "s2s.npz", "junk.npz", "missing.npz")] + [str(DIR)]


MODELS = _files()
numbers = st.one_of(st.integers(-10, 300).map(str), st.floats(allow_nan=True).map(repr),
                    st.sampled_from(["nan", "inf", "-inf", "1e-310", "0", "-0", "1e309", "0x10",
                                     "", " ", "9" * 30, "1_000"]))
texts = st.one_of(st.text(max_size=12), st.sampled_from(["the cat", "71+118", "1+1", "zebra",
                                                          "12*3", "1234+5678", "the\nthe"]))
flags = st.one_of(
    st.tuples(st.sampled_from(["--length", "--temperature", "--top-k", "--top-p", "--seed",
                               "--beam"]), numbers),
    st.tuples(st.sampled_from(["--start", "--question", "--data-dir"]), texts),
    st.tuples(st.sampled_from(["--greedy", "--allow-skipped", "--bogus", "-x"])))


@given(model=st.sampled_from(MODELS + [None]), args=st.lists(flags, max_size=5))
def test_generate_arguments(model, args):
    argv = ([] if model is None else ["--model", model]) + [a for flag in args for a in flag]
    out, err = io.StringIO(), io.StringIO()

    def run():
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                return main(argv)
            except SystemExit as e:  # argparse: a malformed flag
                return e.code
    rc, _ = bounded(run, allowed=())
    assert rc in (0, 2), (argv, rc, err.getvalue())
    if rc == 2:
        lines = err.getvalue().strip().splitlines()
        assert lines and "Traceback" not in err.getvalue()
        assert lines[-1].startswith("fastseq: ") and len(lines) == 1 or "error:" in lines[-1]
        assert out.getvalue() == ""
