"""File-to-file conversion: python -m fastseq.generate --input (stdin, --output written atomically,
--beam, --nbest, bad lines, BOM and CRLF, unknown symbols, bounded reading), LoadedModel.answer
and nbest, and beam_search's n-best."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest

import fastseq
from fastseq import generate
from fastseq.datasets import sequence
from fastseq.decoding import beam_search, sequence_log_prob
from fastseq.files import rebuild
from fastseq.generate import convert_stream, main
from fastseq.train import main as train


@pytest.fixture(scope="module", params=["attention", "peeky"])
def model_file(request, tmp_path_factory):
    """A model trained briefly by python -m fastseq.train on generated addition data (attention:
    padding masked and an end symbol; peeky: whole rows reversed, fixed-length answers)."""
    tmp = tmp_path_factory.mktemp(request.param)
    data = tmp / "addition.txt"
    data.write_text("\n".join(sequence.generate_addition(1500, seed=3)) + "\n")
    assert train(["--task", "addition", "--model", request.param, "--data", str(data),
                  "--epochs", "3", "--lr", "0.01", "--hidden-size", "24", "--wordvec-size", "8",
                  "--batch-size", "32", "--no-progress", "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "model.npz"


def sources(n, seed=0):
    rng = np.random.RandomState(seed)
    a, b = rng.randint(0, 1000, size=(2, n)) // rng.choice([1, 10, 100], size=(2, n))
    return [f"{x}+{y}" for x, y in zip(a, b)]


def run_cli(capsys, *argv):
    rc = main(list(map(str, argv)))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("beam", [None, 3])
def test_input_file_matches_answer_line_for_line(model_file, tmp_path, capsys, beam):
    srcs = sources(500)
    (tmp_path / "in.txt").write_text("\n".join(srcs) + "\n")
    argv = ["--model", model_file, "--input", tmp_path / "in.txt", "--batch-size", 7]
    rc, out, err = run_cli(capsys, *argv, *(["--beam", beam] if beam else []))
    assert rc == 0 and err == ""
    saved = fastseq.load(model_file)
    answers = saved.answer(srcs, beam=beam, batch_size=7)
    expected = [f"{s}\t{a}\n" for s, a in zip(srcs, answers)]
    assert out.splitlines(keepends=True) == expected
    assert len({a for a in saved.answer(srcs)}) > 5  # (a model that answers more than one way)


def test_stdin_and_output_file(model_file, tmp_path, capsys):
    srcs = sources(60, seed=1)
    text = "\n".join(srcs) + "\n"
    (tmp_path / "in.txt").write_text(text)
    rc, expected, _ = run_cli(capsys, "--model", model_file, "--input", tmp_path / "in.txt")
    assert rc == 0
    r = subprocess.run([sys.executable, "-m", "fastseq.generate", "--model", str(model_file),
                        "--input", "-"], input=text.encode(), capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout.decode() == expected
    assert r.stderr == b""  # stderr is not a terminal: no progress bar
    out = tmp_path / "sub" / "out.tsv"
    rc, printed, _ = run_cli(capsys, "--model", model_file, "--input", tmp_path / "in.txt",
                             "--output", out)
    assert rc == 0 and printed == "" and out.read_text() == expected
    assert os.listdir(out.parent) == ["out.tsv"]


def test_output_untouched_on_error_and_interrupt(model_file, tmp_path, capsys, monkeypatch):
    good = "\n".join(sources(3000, seed=2)) + "\n"
    (tmp_path / "bad.txt").write_text(good + "\n1+1\n")  # an empty line near the end
    out = tmp_path / "out.tsv"
    out.write_text("old\n")
    rc, printed, err = run_cli(capsys, "--model", model_file, "--input", tmp_path / "bad.txt",
                               "--output", out, "--batch-size", 16)
    assert rc == 2 and printed == "" and "bad.txt, line 3001: empty line" in err
    assert out.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["bad.txt", "out.tsv"]

    (tmp_path / "in.txt").write_text(good)
    calls = []
    real = rebuild.LoadedModel.convert_batch

    def interrupted(self, *a, **k):  # Ctrl-C in the middle of the file
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(rebuild.LoadedModel, "convert_batch", interrupted)
    rc, printed, err = run_cli(capsys, "--model", model_file, "--input", tmp_path / "in.txt",
                               "--output", out, "--batch-size", 16)
    assert rc == 130 and err == "fastseq: interrupted\n" and len(calls) == 3
    assert out.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["bad.txt", "in.txt", "out.tsv"]


def test_nbest_lines_and_scores(model_file, tmp_path, capsys):
    srcs = sources(40, seed=3)
    (tmp_path / "in.txt").write_text("\n".join(srcs) + "\n")
    rc, out, _ = run_cli(capsys, "--model", model_file, "--input", tmp_path / "in.txt",
                         "--nbest", 3, "--beam", 4, "--batch-size", 6)
    assert rc == 0
    rows = [line.split("\t") for line in out.splitlines()]
    assert len(rows) == 3 * len(srcs) and all(len(r) == 3 for r in rows)
    saved = fastseq.load(model_file)
    nbest = saved.nbest(srcs, 3, beam=4, batch_size=6)
    best = saved.answer(srcs, beam=4, batch_size=6)
    for i, s in enumerate(srcs):
        mine = rows[3 * i:3 * i + 3]
        assert [r[0] for r in mine] == [s] * 3
        assert [r[1] for r in mine] == [a for a, _ in nbest[i]] and mine[0][1] == best[i]
        scores = [float(r[2]) for r in mine]
        assert scores == sorted(scores, reverse=True) and all(x <= 0 for x in scores)
        assert scores == pytest.approx([p for _, p in nbest[i]], abs=6e-5)
    rc, out1, _ = run_cli(capsys, "--model", model_file, "--input", tmp_path / "in.txt",
                          "--nbest", 1)  # beam defaults to N
    assert [line.split("\t")[1] for line in out1.splitlines()] == saved.answer(srcs, beam=1)


def test_nbest_scores_are_the_answers_log_probabilities(model_file):
    saved = fastseq.load(model_file)
    v, m = saved.vocab, saved.model
    xs, _ = v.encode_sources(sources(30, seed=4))
    xs = sequence.reverse_padded(xs, m.config().get("pad_id"))
    seqs, scores = beam_search(m, xs, v.start_id, v.max_answer_length, k=4, nbest=4)
    assert seqs.shape == (30, 4, v.max_answer_length) and scores.shape == (30, 4)
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert np.array_equal(seqs[:, 0], beam_search(m, xs, v.start_id, v.max_answer_length, k=4))
    for j in range(4):
        lp = sequence_log_prob(m, xs, v.start_id, seqs[:, j])
        assert np.allclose(lp, scores[:, j], atol=1e-4)
    for i in range(30):  # the n hypotheses of a question differ
        assert len({tuple(s) for s in seqs[i]}) == 4
    with pytest.raises(ValueError, match="nbest must be an integer in"):
        beam_search(m, xs, v.start_id, 3, k=2, nbest=3)


def test_bad_lines_stop_with_file_and_line_or_are_skipped(model_file, tmp_path, capsys):
    path = tmp_path / "in.txt"
    base = ["--model", model_file, "--input", path]
    cases = [(b"1+2\n\n3+4\n", "line 2: empty line"),
             (b"1+2\n3+4\n\xff\xfe5\n", "line 3: not UTF-8 text (byte 0xff at byte 1"),
             (b"1+2\n   \t7\n", "line 2: empty source before the tab"),
             (b"1+2\n1234+5678\n", "line 2: question '1234+5678' has 9 characters but the "
                                   "model's input width is 7"),
             (b"1+2\n3+4\n9*9\n", "line 3: question '9*9' contains character(s) ['*']")]
    for data, message in cases:
        path.write_bytes(data)
        rc, out, err = run_cli(capsys, *base)
        assert rc == 2 and out == "" and len(err.splitlines()) == 1, (data, err)
        assert err.startswith(f"fastseq: {path}, {message}"), err
        assert "--skip-bad-lines skips such lines" in err
    path.write_bytes(b"1+2\n\n\xff\n4+4\n1234+5678\n  \n9*9\n5+5")
    rc, out, err = run_cli(capsys, *base, "--skip-bad-lines")
    saved = fastseq.load(model_file)
    assert rc == 0 and out.splitlines() == [f"{s}\t{a}" for s, a in
                                            zip(["1+2", "4+4", "5+5"],
                                                saved.answer(["1+2", "4+4", "5+5"]))]
    assert err == (f"fastseq: warning: skipped 5 bad line(s) (the first: {path}, line 2: "
                   f"empty line)\n")


def test_bom_crlf_tabs_and_spaces(model_file, tmp_path, capsys):
    srcs = ["1+2", "71+118", "5+5"]
    clean, messy = tmp_path / "clean.txt", tmp_path / "messy.txt"
    clean.write_text("\n".join(srcs) + "\n")
    messy.write_bytes(b"\xef\xbb\xbf1+2\r\n  71+118 \r\n5+5\tignored\r\n")
    rc1, out1, _ = run_cli(capsys, "--model", model_file, "--input", clean)
    rc2, out2, _ = run_cli(capsys, "--model", model_file, "--input", messy)
    assert rc1 == rc2 == 0 and out1 == out2 and out1.splitlines()[1].startswith("71+118\t")


def test_argument_refusals(model_file, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("1+2\n")
    inp = ["--input", tmp_path / "in.txt"]
    for argv, message in [(["--question", "1+2", "--nbest", 2], "--nbest: with --input only"),
                          (["--question", "1+2", "--output", tmp_path / "o"],
                           "--output: with --input only"),
                          ([*inp, "--question", "1+2"], "give --question or --input, not both"),
                          ([*inp, "--nbest", 3, "--beam", 2], "--nbest 3 needs a beam at least as"),
                          ([*inp, "--start", "the"], "--start: for language models only"),
                          (["--input", tmp_path / "missing.txt"], "missing.txt: not found"),
                          (["--input", tmp_path], "Is a directory")]:
        rc, out, err = run_cli(capsys, "--model", model_file, *argv)
        assert rc == 2 and out == "" and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("flag", ["--nbest", "--batch-size"])
def test_counts_below_one_are_usage_errors(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "m.npz"), "--input", "-", flag, "0"])
    assert e.value.code == 2
    assert f"error: argument {flag}: expected a positive integer, got 0" in capsys.readouterr().err


class UnkVocabulary:
    """The conversion protocol over the char vocabulary, with an <unk> id (here: the id of '0')
    for unknown characters, as a data vocabulary with <unk> behaves."""

    def __init__(self, v):
        self.v, self.start_id, self.pad_id = v, v.start_id, v.pad_id
        self.max_answer_length = v.max_answer_length

    def encode_sources(self, srcs):
        unk = sum(ch not in self.v.char_to_id for s in srcs for ch in s)
        return self.v.encode([''.join(c if c in self.v.char_to_id else '0' for c in s)
                              for s in srcs]), unk

    def decode_targets(self, ids):
        return self.v.decode_targets(ids)


def test_unknown_symbols_become_unk_and_are_counted_once(model_file, capsys):
    saved = fastseq.load(model_file)
    saved.vocab = UnkVocabulary(saved.vocab)
    chunks = []
    f = io.BytesIO(b"1+2\n7x+1\n" * 300 + b"yy+z\n")
    done, skipped, _, unknown = convert_stream(saved, f, chunks.append, "in.txt", batch_size=8)
    assert (done, skipped, unknown) == (601, 0, 303)
    lines = b"".join(chunks).decode().splitlines()
    assert lines[1] == f"7x+1\t{saved.answer(['70+1'])[0]}" and lines[-1].startswith("yy+z\t")
    with pytest.warns(UserWarning, match="answer: 2 unknown symbol"):
        saved.answer(["ab+1"])


def test_char_models_refuse_unknown_characters_clearly(model_file):
    saved = fastseq.load(model_file)
    with pytest.raises(ValueError, match=r"contains character\(s\) \['x'\] outside the vocabulary"):
        saved.answer(["7x+1"])


class CountingReader(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.lines = 0

    def readline(self, *a):
        line = super().readline(*a)
        self.lines += bool(line)
        return line


def test_reading_is_bounded_by_one_window(model_file):
    """The first output is written after at most one window of lines has been read, and every
    write holds at most one window: memory does not grow with the file."""
    saved = fastseq.load(model_file)
    f = CountingReader(("\n".join(sources(1000, seed=5)) + "\n").encode())
    window = 4 * generate.WINDOW_BATCHES
    seen = []
    done, *_ = convert_stream(saved, f, lambda b: seen.append((f.lines, b.count(b"\n"))),
                              "in.txt", batch_size=4)
    assert done == 1000 and seen[0][0] <= window + 1
    assert all(n <= window for _, n in seen) and sum(n for _, n in seen) == 1000


def test_over_long_line_is_a_bad_line(model_file, monkeypatch):
    monkeypatch.setattr(generate, "MAX_LINE_BYTES", 64)
    saved = fastseq.load(model_file)
    f = io.BytesIO(b"1+2\n" + b"9" * 500 + b"\n3+4\n")
    chunks = []
    done, skipped, first, _ = convert_stream(saved, f, chunks.append, "in.txt", skip_bad=True)
    assert (done, skipped) == (2, 1) and first == "in.txt, line 2: longer than 64 bytes"
    assert [line.split("\t")[0] for line in b"".join(chunks).decode().splitlines()] == \
        ["1+2", "3+4"]


def test_progress_bar_when_stderr_is_a_terminal(model_file, tmp_path):
    """(test_stdin_and_output_file: none when it is not)"""
    import pty
    import select
    (tmp_path / "in.txt").write_text("\n".join(sources(50)) + "\n")
    import fcntl
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80 columns
    p = subprocess.Popen([sys.executable, "-m", "fastseq.generate", "--model", str(model_file),
                          "--input", str(tmp_path / "in.txt")], stdout=subprocess.PIPE,
                         stderr=slave)
    os.close(slave)
    err = b""
    try:
        while True:  # read the terminal while the child writes to it
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child has closed the terminal
                    break
                if not chunk:
                    break
                err += chunk
            elif p.poll() is not None:
                break
        out = p.stdout.read()
        assert p.wait(timeout=120) == 0
    finally:
        os.close(master)
        p.stdout.close()
    assert len(out.splitlines()) == 50 and b"converting" in err


def test_sigterm_leaves_no_output_behind(model_file, tmp_path):
    import signal
    import time
    out = tmp_path / "out" / "result.tsv"
    out.parent.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "fastseq.generate", "--model", str(model_file),
                          "--input", "-", "--output", str(out)], stdin=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        p.stdin.write(b"1+2\n3+4\n")  # stdin stays open: the child waits for more lines
        p.stdin.flush()
        deadline = time.monotonic() + 120
        while not os.listdir(out.parent):  # its temporary file appears once it reads input
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 143
        assert p.stderr.read() == b"fastseq: interrupted\n"
    finally:
        p.kill()
        p.stdin.close()
        p.stderr.close()
    assert os.listdir(out.parent) == []


def test_char_vocabulary_conversion_protocol():
    d = sequence.build(*sequence.parse_lines(sequence.generate_addition(40, seed=5)
                                             + ["71+118 _189 "]), seed=None)
    v = d.vocab
    assert v.start_id == v.char_to_id["_"] and v.pad_id == v.char_to_id[" "]
    assert v.max_answer_length == 4
    ids, unknown = v.encode_sources(["71+118", "1+2"])
    assert unknown == 0 and ids.dtype == np.int32 and ids.shape == (2, 7)
    assert v.decode(ids) == ["71+118 ", "1+2    "]
    answers = np.array([[v.char_to_id[c] for c in "189 "], [v.char_to_id[c] for c in "3   "]])
    assert v.decode_targets(answers) == ["189", "3"]
    no_pad = sequence.Vocabulary({"a": 0, "b": 1}, {0: "a", 1: "b"}, 3, 2)
    assert no_pad.start_id is None and no_pad.pad_id is None
