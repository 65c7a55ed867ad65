"""--task pairs: the reader of source<TAB>target files, its vocabulary and model-file metadata,
the dev split carved by source, bucketed batches, bad lines, and the CLI end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastseq
from fastseq import files
from fastseq.datasets.pairs import (PairsVocabulary, build_vocabulary, carve, load_pairs,
                                    read_pairs)
from fastseq.datasets.sequence import DataFormatError
from fastseq.files import FastseqFileError
from fastseq.models import AttentionSeq2seq
from fastseq.optim import Adam
from fastseq.train import main
from fastseq.trainer import BucketTrainer

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="d.tsv"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(p)


def word_pairs(n, seed=0):
    """n lines: a 2-7 letter word and its letters reversed as space tokens; every fifth word
    also has its letters in order as a second target, on another line."""
    rng = np.random.RandomState(seed)
    lines = []
    for i in range(n):
        w = "".join(rng.choice(list("abcdef"), rng.randint(2, 8)))
        lines.append(f"{w}\t{' '.join(reversed(w))}")
        if i % 5 == 0:
            lines.append(f"{w}\t{' '.join(w)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the reader and the vocabulary

def test_several_targets_bom_crlf_and_tokens(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbfREAD\tR IY D\r\nLEAD\tL IY D\r\nREAD\tR EH D\r\n\r\n"
                           b"AB\tEY\tAA B\n")
    entries, (skipped, first) = read_pairs(path, "char", "space")
    assert skipped == 0 and first is None
    assert [e[0] for e in entries] == ["READ", "LEAD", "AB"]  # a source's lines merged at its first
    assert entries[0][1] == list("READ")
    assert entries[0][2] == [["R", "IY", "D"], ["R", "EH", "D"]]
    assert entries[2][2] == [["EY"], ["AA", "B"]]             # several targets on one line
    vocab = build_vocabulary(entries, "char", "space")
    assert vocab.symbols[:3] == ["<pad>", "<s>", "<unk>"]
    assert vocab.symbols[3:] == sorted(set("READLB") | {"R", "IY", "D", "L", "EH", "EY", "AA", "B"})
    assert (vocab.pad_id, vocab.start_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.max_answer_length == 3 + 1 + 2  # longest target, the end symbol, a margin


def test_encode_sources_counts_unknown_symbols_and_decode_stops_at_the_end(tmp_path):
    vocab = PairsVocabulary(["<pad>", "<s>", "<unk>", "A", "B", "AH", "B_"], "char", "space", 5)
    ids, unknown = vocab.encode_sources(["AB", "BAZ", "", "A"])
    assert ids.dtype == np.int32 and ids.shape == (4, 3)
    assert ids.tolist() == [[3, 4, 0], [4, 3, 2], [2, 0, 0], [3, 0, 0]]
    assert unknown == 2  # 'Z', and the empty source (one <unk>)
    out = np.array([[5, 4, 0, 5], [6, 6, 6, 6], [0, 3, 3, 3]])
    assert vocab.decode_targets(out) == ["AH B", "B_ B_ B_ B_", ""]
    chars = PairsVocabulary(["<pad>", "<s>", "<unk>", "a", "b"], "char", "char", 4)
    assert chars.decode_targets(np.array([[3, 4, 3, 0]])) == ["aba"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chars.decode_targets(np.array([[9]]))


def test_splits_arrays_and_the_dev_split_is_carved_by_source(tmp_path):
    path = write(tmp_path, word_pairs(200))
    vocab, s = load_pairs(path, target_tokens="space", valid_fraction=0.2, seed=3)
    train, valid = s["train"], s["valid"]
    assert s["test"] is None
    assert not set(train.sources) & set(valid.sources)
    assert len(valid.sources) == round(0.2 * (len(train.sources) + len(valid.sources)))
    # every target of a source is a training row; rows: <s>, the target, then pads (>= 1)
    assert len(train.x) == sum(len(r) for r in train.refs)
    assert (train.t[:, 0] == vocab.start_id).all() and (train.t[:, -1] == vocab.pad_id).all()
    row = list(train.t[0])
    assert vocab.decode_targets(train.t[:1, 1:]) == [" ".join(train.refs[0][0])]
    assert row.index(vocab.pad_id) == 1 + len(train.refs[0][0])
    # the same seed holds out the same sources; another seed others
    again = load_pairs(path, target_tokens="space", valid_fraction=0.2, seed=3)[1]["valid"]
    other = load_pairs(path, target_tokens="space", valid_fraction=0.2, seed=4)[1]["valid"]
    assert again.sources == valid.sources and other.sources != valid.sources
    # a source with two targets keeps both on its side
    both = [r for r in valid.refs + train.refs if len(r) == 2]
    assert both


def test_valid_and_test_files_and_unknown_symbols(tmp_path):
    train = write(tmp_path, "ab\ta b\nba\tb a\n", "train.tsv")
    valid = write(tmp_path, "abz\ta b z\n", "valid.tsv")
    vocab, s = load_pairs(train, valid, valid, target_tokens="space")
    assert s["train"].sources == ["ab", "ba"]  # nothing carved when --valid is given
    assert s["valid"].sources == ["abz"] and s["valid"].refs == [[["a", "b", "z"]]]
    assert s["valid"].unknown == 2 and vocab.unk_id in s["valid"].xs


def test_carve_needs_two_sources():
    with pytest.raises(DataFormatError, match="1 distinct source"):
        carve([("a", ["a"], [["b"]])], 0.5, 0)


BAD = [  # (file bytes, what the error says about line 2)
    (b"ab\ta b\nno tab here\n", "line 2: no tab"),
    (b"ab\ta b\n\tx\n", "line 2: the source is empty"),
    (b"ab\ta b\nab\t  \n", "line 2: the target is empty"),
    (b"ab\ta b\nab\tx\t\n", "line 2: target 2 is empty"),
    (b"ab\ta b\nc\xff\tx\n", "line 2: is not UTF-8 (byte 0xff at column 2)"),
    (b"ab\ta b\n" + b"x" * 9 + b"\tx\n", "line 2: the source has 9 symbols, more than "
                                         "--max-length 8"),
    (b"ab\ta b\nab\tx <s>\n", "line 2: a target holds the reserved symbol <s>"),
]


@pytest.mark.parametrize("content,message", BAD)
def test_bad_lines_name_file_and_line(tmp_path, content, message):
    path = write(tmp_path, content + b"cd\tc d\n")
    with pytest.raises(DataFormatError) as e:
        read_pairs(path, "char", "space", max_length=8)
    assert str(e.value).startswith(f"{path}, {message}")
    entries, (skipped, first) = read_pairs(path, "char", "space", max_length=8,
                                           skip_bad_lines=True)
    assert [e[0] for e in entries] == ["ab", "cd"] and skipped == 1 and message in first


def test_skipped_lines_are_counted_in_one_warning(tmp_path):
    train = write(tmp_path, "ab\ta b\nbad\nba\tb a\n\tx\ncd\tc d\n", "t.tsv")
    valid = write(tmp_path, "ab\ta b\nnope\n", "v.tsv")
    with pytest.warns(UserWarning) as w:
        load_pairs(train, valid, target_tokens="space", skip_bad_lines=True)
    assert len(w) == 1
    text = str(w[0].message)
    assert text.startswith("skipped 3 bad lines") and f"{train}: 2" in text and \
        f"{valid}: 1" in text and f"{train}, line 2: no tab" in text


def test_whole_file_problems(tmp_path):
    with pytest.raises(DataFormatError, match="is UTF-16 text"):
        read_pairs(write(tmp_path, "a\tb\n".encode("utf-16")))
    with pytest.raises(DataFormatError, match="no pairs"):
        read_pairs(write(tmp_path, "\n\r\n"))
    with pytest.raises(DataFormatError, match="byte limit"):
        read_pairs(write(tmp_path, "a\tb\n" * 10), max_bytes=20)
    with pytest.raises(FileNotFoundError):
        read_pairs(str(tmp_path / "missing.tsv"))


# ---------------------------------------------------------------------------------------------
# bucketed batches

def bucket_setup(tmp_path, bucket=True, seed=0):
    path = write(tmp_path, word_pairs(400, seed=1))
    vocab, s = load_pairs(path, target_tokens="space")
    model = AttentionSeq2seq(len(vocab), 4, 8, seed=0, pad_id=vocab.pad_id)
    tr = BucketTrainer(model, Adam(1e-3), vocab.pad_id, seed=seed, progress=False, chunk=4,
                       bucket=bucket)
    return tr, s["train"]


def test_bucketed_order_is_a_permutation_of_similar_lengths(tmp_path):
    tr, train = bucket_setup(tmp_path)
    from fastseq.callbacks import Callback
    seen, widths = [], []

    class Record(Callback):
        def on_epoch_begin(self, loop):
            seen.append(loop.order.copy())

    step = tr.step

    def spy(x, t, max_grad):
        widths.append((x.shape[1], t.shape[1]))
        return step(x, t, max_grad)

    tr.step = spy
    tr.callbacks.append(Record())
    tr.fit(train.x, train.t, max_epoch=2, batch_size=16)
    for order in seen:
        assert np.array_equal(np.sort(order), np.arange(len(train.x)))
    assert not np.array_equal(seen[0], seen[1])
    lengths = (train.x != 0).sum(axis=1) + (train.t != 0).sum(axis=1)
    batches = seen[0][:len(train.x) // 16 * 16].reshape(-1, 16)
    spread = np.ptp(lengths[batches], axis=1).mean()
    plain = np.ptp(lengths[np.random.RandomState(0).permutation(len(train.x))[:len(batches) * 16]
                           .reshape(-1, 16)], axis=1).mean()
    assert spread < plain / 2  # rows of a batch have similar lengths
    # each batch is cut to its longest row (plus the end symbol of the target)
    assert len(set(widths)) > 3
    assert all(w[0] <= train.x.shape[1] and w[1] <= train.t.shape[1] for w in widths)


def test_bucketed_training_resumes_bit_identically(tmp_path):
    tr, train = bucket_setup(tmp_path, seed=5)
    tr.fit(train.x, train.t, max_epoch=1, batch_size=16)
    state = fastseq.checkpoint.snapshot(tr)
    tr.fit(train.x, train.t, max_epoch=1, batch_size=16)
    b, _ = bucket_setup(tmp_path, seed=99)
    arrays, meta = state
    fastseq.checkpoint.restore(b, arrays, meta)
    b.fit(train.x, train.t, max_epoch=1, batch_size=16)
    for p, q in zip(tr.model.params, b.model.params):
        assert np.array_equal(p, q)


# ---------------------------------------------------------------------------------------------
# the CLI end to end, the model file's vocabulary

@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    train = write(d, word_pairs(300, seed=2), "train.tsv")
    test = write(d, word_pairs(40, seed=9), "test.tsv")
    out = d / "run"
    rc = main(["--task", "pairs", "--data", train, "--test", test, "--target-tokens", "space",
               "--epochs", "3", "--batch-size", "32", "--hidden-size", "16",
               "--wordvec-size", "8", "--out", str(out), "--no-progress", "--seed", "2"])
    assert rc == 0
    return out, train, test


def test_pairs_cli_writes_dev_figures_best_model_and_test(pairs_run):
    out, _, test = pairs_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["model"] == "attention" and m["config"]["wordvec_size"] == 8
    for e in m["epochs"]:
        assert {"val_accuracy", "val_wer", "val_ter", "lr"} <= set(e)
        assert e["val_wer"] == pytest.approx(1 - e["val_accuracy"])
    best = min(range(3), key=lambda i: (m["epochs"][i]["val_wer"], i)) + 1
    assert m["best_epoch"] == best
    sources = {line.split("\t")[0] for line in Path(test).read_text().splitlines()}
    assert set(m["test"]) >= {"n", "accuracy", "wer", "ter"} and m["test"]["n"] == len(sources)
    saved = fastseq.load(out / "best.npz")
    assert isinstance(saved.vocab, PairsVocabulary) and saved.vocab.target_tokens == "space"
    assert saved.meta["epoch"] == best
    assert fastseq.load(out / "checkpoint.npz").vocab == saved.vocab
    pytest.importorskip("matplotlib")
    assert (out / "error.png").stat().st_size > 1000


def test_the_test_figures_are_the_best_models(pairs_run):
    """metrics.json's test figures are best.npz's, scored again here from the file."""
    from fastseq.metrics import score
    out, train, test = pairs_run
    saved = fastseq.load(out / "best.npz")
    vocab, s = load_pairs(train, None, test, target_tokens="space", seed=2)
    assert vocab == saved.vocab
    t = s["test"]
    guesses = saved.model.generate(t.xs, vocab.start_id, vocab.max_answer_length)
    expect = score(vocab.target_lists(np.asarray(guesses)), t.refs)
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["wer"] == expect["wer"] and m["test"]["ter"] == expect["ter"]


def _forged(tmp_path, path, edit):
    arrays, meta = files.read_npz(path)
    edit(meta["pairs"])
    out = tmp_path / "forged.npz"
    files.write_npz(out, arrays, meta)  # a valid checksum: only the schema and checks refuse it
    return out


@pytest.mark.parametrize("edit,field", [
    (lambda p: p["symbols"].__setitem__(0, "<PAD>"), "'pairs.symbols[0]' must be '<pad>'"),
    (lambda p: p["symbols"].pop(), "'pairs.symbols' has"),
    (lambda p: p["symbols"].__setitem__(5, "a b"), "'pairs.symbols[5]'"),
    (lambda p: p["symbols"].__setitem__(4, p["symbols"][3]), "'pairs.symbols' lists an item twice"),
    (lambda p: p.__setitem__("target_tokens", "word"), "'pairs.target_tokens' must be one of"),
    (lambda p: p.__setitem__("max_answer_length", 0), "'pairs.max_answer_length' = 0 is out"),
    (lambda p: p.pop("source_tokens"), "'pairs.source_tokens' is missing"),
    (lambda p: p.__setitem__("extra", 1), "'pairs.extra' is not expected"),
])
def test_a_tampered_vocabulary_is_refused_naming_the_field(pairs_run, tmp_path, edit, field):
    out, _, _ = pairs_run
    forged = _forged(tmp_path, out / "best.npz", edit)
    with pytest.raises(FastseqFileError) as e:
        fastseq.load(forged)
    assert str(e.value).startswith(str(forged)) and field in str(e.value)


def run_cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "fastseq.train", "--task", "pairs",
                           "--out", str(tmp_path / "o"), "--no-progress", *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("content,message", BAD)
def test_cli_bad_line_is_one_line_exit_2(tmp_path, content, message):
    path = write(tmp_path, content + b"cd\tc d\n")
    r = run_cli(["--data", path, "--target-tokens", "space", "--max-length", "8"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastseq: {path}, {message}")
    assert not (tmp_path / "o").exists()


def test_cli_skip_bad_lines_warns_once_and_trains(tmp_path):
    good = word_pairs(60).encode()
    path = write(tmp_path, b"bad line\n" + good + b"x\t\n")
    r = run_cli(["--data", path, "--target-tokens", "space", "--skip-bad-lines", "--epochs", "1",
                 "--batch-size", "16", "--hidden-size", "8", "--wordvec-size", "4"], tmp_path)
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if "warning" in l]
    assert len(warnings) == 1 and "skipped 2 bad lines" in warnings[0]
    assert f"{path}, line 1: no tab" in warnings[0]


def test_cli_pairs_flag_errors(tmp_path):
    r = run_cli([], tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == \
        "fastseq: --task pairs needs --data FILE (source<TAB>target lines)"
    r = run_cli(["--data", "x.tsv", "--target-tokens", "phones"], tmp_path)
    assert r.returncode == 2 and "expected one of char, space" in r.stderr
    r = run_cli(["--data", str(tmp_path / "none.tsv")], tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "fastseq.train", "--source-tokens", "space",
                        "--out", str(tmp_path / "p")], capture_output=True, text=True,
                       timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "--source-tokens does not apply to --task addition" in r.stderr
