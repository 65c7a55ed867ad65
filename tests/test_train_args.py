"""python -m fastseq.train refuses every bad argument the same way: exit status 2, no traceback,
argparse's usage + error line for a malformed flag, else one line starting 'fastseq:'; and a
run that fails before training leaves no folder behind. The API refuses bad values too."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastseq import SGD, Adam, PeekySeq2seq, RnnlmTrainer, Trainer, eval_seq2seq
from fastseq.models import REGISTRY, register
from fastseq.train import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def run_main(argv, capsys):
    """(exit status, stderr) of main(argv), argparse's SystemExit included."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_usage_error(rc, err, flag):
    assert rc == 2
    assert "usage: python -m fastseq.train" in err and f"error: argument {flag}" in err
    assert "Traceback" not in err


def assert_fastseq_error(rc, err, *words):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastseq: "), err
    for w in words:
        assert w in lines[0]


# (flags, the flag argparse names): each a malformed or out-of-range value
MALFORMED = [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"),
    (["--epochs", "1.5"], "--epochs"), (["--epochs", "many"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size"),
    (["--hidden-size", "0"], "--hidden-size"), (["--hidden-size", "-1"], "--hidden-size"),
    (["--wordvec-size", "0"], "--wordvec-size"),
    (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--lr", "-1"], "--lr"), (["--lr", "fast"], "--lr"),
    (["--max-grad", "0"], "--max-grad"), (["--max-grad", "nan"], "--max-grad"),
    (["--max-grad", "-5"], "--max-grad"),
    (["--task", "ptb", "--time-size", "0"], "--time-size"),
    (["--task", "ptb", "--max-iters", "0"], "--max-iters"),
    (["--task", "ptb", "--eval-max-iters", "-2"], "--eval-max-iters"),
    (["--task", "ptb", "--model", "better", "--dropout", "1"], "--dropout"),
    (["--task", "ptb", "--model", "better", "--dropout", "-0.1"], "--dropout"),
    (["--task", "ptb", "--model", "better", "--dropout", "nan"], "--dropout"),
    (["--seed", "-1"], "--seed"), (["--seed", "x"], "--seed"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--model", "transformer"], "--model"), (["--task", "translate"], "--task"),
    (["--engine", "fortran"], "--engine"),
    (["--task", "date", "--encoder", "both"], "--encoder"),
    (["--task", "date", "--layers", "0"], "--layers"),
    (["--task", "pairs", "--valid-fraction", "0"], "--valid-fraction"),
    (["--task", "pairs", "--valid-fraction", "1"], "--valid-fraction"),
    (["--task", "pairs", "--source-tokens", "word"], "--source-tokens"),
    (["--task", "pairs", "--target-tokens", "phones"], "--target-tokens"),
    (["--task", "pairs", "--max-length", "0"], "--max-length"),
    (["--task", "pairs", "--patience", "0"], "--patience"),
    (["--task", "pairs", "--lr-decay", "0"], "--lr-decay"),
    (["--task", "pairs", "--lr-decay", "1.5"], "--lr-decay"),
    (["--task", "pairs", "--lr-patience", "0"], "--lr-patience"),
]


@pytest.mark.parametrize("argv,flag", MALFORMED, ids=[" ".join(a) for a, _ in MALFORMED])
def test_malformed_flag_is_argparse_usage_error(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(argv + ["--no-progress"], capsys)
    assert_usage_error(rc, err, flag)
    assert list(tmp_path.iterdir()) == []  # no runs/<timestamp> left behind


# (flags, words the one fastseq: line must hold)
REFUSED = [
    (["--max-iters", "3"], ["--max-iters", "addition"]),
    (["--time-size", "5"], ["--time-size", "addition"]),
    (["--dropout", "0.2"], ["--dropout", "addition"]),
    (["--eval-max-iters", "2"], ["--eval-max-iters"]),
    (["--data-dir", "."], ["--data-dir"]),
    (["--task", "ptb", "--dropout", "0.2"], ["--dropout", "rnnlm"]),
    (["--task", "ptb", "--reverse"], ["--reverse", "ptb"]),
    (["--task", "ptb", "--no-reverse"], ["--reverse", "ptb"]),
    (["--task", "ptb", "--data", "x.txt"], ["--data", "ptb"]),
    (["--model", "rnnlm"], ["rnnlm", "seq2seq", "peeky"]),
    (["--task", "ptb", "--model", "peeky"], ["peeky", "rnnlm"]),
    (["--task", "text"], ["--data"]),
    (["--task", "pairs"], ["--task pairs needs --data FILE"]),
    (["--encoder", "bi"], ["--encoder", "addition"]),
    (["--layers", "2"], ["--layers", "addition"]),
    (["--valid", "v.tsv"], ["--valid", "addition"]),
    (["--test", "t.tsv"], ["--test", "addition"]),
    (["--skip-bad-lines"], ["--skip-bad-lines", "addition"]),
    (["--max-length", "9"], ["--max-length", "addition"]),
    (["--task", "ptb", "--patience", "3"], ["--patience", "ptb"]),
    (["--task", "ptb", "--lr-decay", "0.5"], ["--lr-decay", "ptb"]),
    (["--task", "text", "--data", "x.txt", "--valid-fraction", "0.2"],
     ["--valid-fraction", "text"]),
    (["--resume", "nowhere"], ["nowhere", "checkpoint.npz"]),
    (["--resume", ".", "--epochs", "3"], ["--epochs"]),
]


@pytest.mark.parametrize("argv,words", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_flag_that_does_not_apply_is_one_fastseq_line(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(argv + ["--no-progress"], capsys)
    assert_fastseq_error(rc, err, *words)
    assert list(tmp_path.iterdir()) == []


def test_out_onto_a_file_or_unwritable_place(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    rc, err = run_main(["--out", str(f), "--no-progress"], capsys)
    assert_fastseq_error(rc, err, str(f), "not a folder")
    assert f.read_text() == "keep me"
    rc, err = run_main(["--out", "/proc/foo", "--no-progress"], capsys)
    assert_fastseq_error(rc, err, "/proc/foo")


def test_out_holding_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "checkpoint.npz").write_bytes(b"old run")
    rc, err = run_main(["--out", str(tmp_path), "--no-progress"], capsys)
    assert_fastseq_error(rc, err, "already holds a run", "--resume")
    assert (tmp_path / "checkpoint.npz").read_bytes() == b"old run"


def test_bad_data_leaves_no_folder(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("1+1_2\n".encode("utf-16"))
    out = tmp_path / "run"
    rc, err = run_main(["--data", str(bad), "--out", str(out), "--no-progress"], capsys)
    assert_fastseq_error(rc, err)
    assert not out.exists()
    text = tmp_path / "bin.txt"
    text.write_bytes(bytes(range(256)) * 4)
    rc, err = run_main(["--task", "text", "--data", str(text), "--out", str(out),
                        "--no-progress"], capsys)
    assert_fastseq_error(rc, err, str(text))
    assert not out.exists()


def test_batch_larger_than_data_leaves_no_folder(tmp_path, capsys):
    from fastseq.datasets.sequence import generate_addition
    data = tmp_path / "small.txt"
    data.write_text("\n".join(generate_addition(40, seed=1)) + "\n")
    out = tmp_path / "run"
    rc, err = run_main(["--data", str(data), "--batch-size", "64", "--out", str(out),
                        "--no-progress"], capsys)
    assert_fastseq_error(rc, err, "batch_size 64")
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--out", "/proc/foo"],
                                  ["--model", "transformer"], ["--lr", "nan"]])
def test_process_exit_status_and_no_traceback(argv, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastseq.train", "--no-progress"] + argv,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}"
                                f"{os.environ.get('PYTHONPATH', '')}"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fastseq: ") or "error: argument" in last
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["-1", "x"])
def test_negative_seed_names_the_flag_and_what_it_expects(value, capsys):
    rc, err = run_main(["--seed", value], capsys)
    assert rc == 2
    assert f"argument --seed: expected a non-negative integer, got {value}" in err


def test_help_lists_models_and_tasks_from_the_registry(capsys):
    class Toy(PeekySeq2seq):
        pass

    register("toy", Toy, family="seq2seq", defaults={"hidden_size": 4, "wordvec_size": 2},
             help="a registered toy")
    try:
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for name, entry in REGISTRY.items():
            assert name in text and entry.help in text
        assert "a registered toy" in text and "--model toy: 4" in text
        args = build_parser().parse_args(["--model", "toy"])
        from fastseq.train import build, resolve
        cfg = resolve(args)
        assert cfg["hidden_size"] == 4 and cfg["epochs"] == 25  # model's then task's defaults
        model, _ = build(dict(cfg, progress=False), 13)
        assert type(model) is Toy and model.config()["hidden_size"] == 4
    finally:
        del REGISTRY["toy"]


def test_every_flag_is_in_the_reliability_table():
    """docs/RELIABILITY.md lists every flag --help lists (a new flag needs its row)."""
    doc = (ROOT / "docs" / "RELIABILITY.md").read_text()
    flags = [s for a in build_parser()._actions for s in a.option_strings
             if s not in ("-h", "--help")]
    assert len(flags) > 30
    assert [f for f in flags if f"| `{f}`" not in doc and f", `{f}`" not in doc
            and f"/ `{f}`" not in doc] == []


def test_every_registered_model_rebuilds_from_config():
    import inspect
    for name, entry in REGISTRY.items():
        assert entry.task in ("seq2seq", "lm")
        takes = inspect.signature(entry.cls).parameters
        kwargs = {k: v for k, v in entry.defaults.items() if k in takes}
        kwargs.update(wordvec_size=8, hidden_size=8)  # small; equal for tied weights
        model = entry.cls(20, seed=0, **kwargs)
        again = entry.cls(**model.config())
        assert again.config() == model.config(), name
        assert [p.shape for p in again.params] == [p.shape for p in model.params], name


def test_zero_is_a_value_not_the_default():
    from fastseq.train import resolve
    args = build_parser().parse_args(["--task", "ptb", "--model", "better", "--dropout", "0"])
    assert resolve(args)["dropout_ratio"] == 0.0


# --- API ---------------------------------------------------------------------------------------

def _tiny():
    return PeekySeq2seq(13, 4, 8, seed=0), np.zeros((8, 7), np.int32), np.ones((8, 5), np.int32)


@pytest.mark.parametrize("kw,match", [
    ({"batch_size": 0}, "batch_size"), ({"batch_size": -2}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"), ({"max_epoch": 0}, "max_epoch"),
    ({"max_grad": float("nan")}, "max_grad"), ({"max_grad": 0}, "max_grad"),
    ({"eval_interval": 0}, "eval_interval"), ({"batch_size": 9}, "larger than the data"),
])
def test_trainer_fit_refuses_bad_arguments(kw, match):
    model, x, t = _tiny()
    args = dict(max_epoch=1, batch_size=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        Trainer(model, Adam(), seed=0, progress=False).fit(x, t, **args)
    with pytest.raises(ValueError, match="rows"):
        Trainer(model, Adam(), seed=0, progress=False).fit(x, t[:5], 1, 4)


def test_rnnlm_trainer_refuses_bad_arguments():
    from fastseq import Rnnlm
    tr = RnnlmTrainer(Rnnlm(20, 4, 4, seed=0), SGD(1.0), progress=False)
    xs = np.arange(200) % 20
    for kw, match in [({"time_size": 0}, "time_size"), ({"batch_size": 0}, "batch_size"),
                      ({"max_iters": 0}, "max_iters"), ({"max_epoch": -1}, "max_epoch")]:
        with pytest.raises(ValueError, match=match):
            tr.fit(xs, xs, **dict(dict(max_epoch=1, batch_size=2, time_size=5), **kw))


def test_eval_seq2seq_refuses_mismatched_and_empty_inputs():
    model, x, t = _tiny()
    with pytest.raises(ValueError, match="8 questions but 5"):
        eval_seq2seq(model, x, t[:5])
    with pytest.raises(ValueError, match="empty"):
        eval_seq2seq(model, x[:0], t[:0])
    assert eval_seq2seq(model, x[:1], t[:1]) in (0.0, 1.0)
