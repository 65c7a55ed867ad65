"""python -m fastseq.train end to end on a small configuration."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastseq import PeekySeq2seq
from fastseq.datasets.sequence import generate_addition
from fastseq.train import main


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """2,000 generated addition lines: the CLI end to end in seconds."""
    path = tmp_path_factory.mktemp("data") / "addition-small.txt"
    path.write_text("\n".join(generate_addition(2000, seed=3)) + "\n")
    return str(path)


def test_train_cli_writes_outputs(tmp_path, capsys, small_data):
    out = tmp_path / "run"
    rc = main(["--data", small_data, "--epochs", "2", "--hidden-size", "16", "--wordvec-size", "8",
               "--batch-size", "64", "--out", str(out), "--no-progress", "--seed", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "engine:" in text and "test accuracy" in text and "truth" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["model"] == "peeky" and m["config"]["reverse"] is True
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    for e in m["epochs"]:
        assert set(e) - {"lr_note"} == {"epoch", "train_seconds", "checkpoint_seconds",
                                        "eval_seconds", "loss", "test_accuracy", "val_accuracy",
                                        "lr"}
        assert 0.0 <= e["test_accuracy"] <= 1.0 and 0.0 <= e["val_accuracy"] <= 1.0
    # the best epoch by dev accuracy (the first of equals) is best.npz, and the test figure is its
    best = max(range(2), key=lambda i: (m["epochs"][i]["val_accuracy"], -i)) + 1
    assert m["best_epoch"] == best
    assert m["test_accuracy"] == m["epochs"][best - 1]["test_accuracy"] == m["test"]["accuracy"]
    assert PeekySeq2seq(13, 8, 16).load_params(out / "best.npz")["epoch"] == best
    assert m["epochs"][1]["loss"] < m["epochs"][0]["loss"]
    assert m["engine"]["engine"] in ("numpy", "cython", "cupy")
    model = PeekySeq2seq(13, 8, 16)
    meta = model.load_params(out / "model.npz")
    assert meta["reverse"] is True and len(meta["chars"]) == 13
    pytest.importorskip("matplotlib")
    assert (out / "accuracy.png").stat().st_size > 1000


def test_train_cli_same_seed_same_run(tmp_path, small_data):
    args = ["--data", small_data, "--epochs", "1", "--hidden-size", "8", "--wordvec-size", "4",
            "--batch-size", "64",
            "--no-progress", "--model", "seq2seq", "--no-reverse"]
    main(args + ["--out", str(tmp_path / "a")])
    main(args + ["--out", str(tmp_path / "b")])
    la = json.loads((tmp_path / "a/metrics.json").read_text())["epochs"][0]["loss"]
    lb = json.loads((tmp_path / "b/metrics.json").read_text())["epochs"][0]["loss"]
    assert la == lb
    with np.load(tmp_path / "a/model.npz") as a, np.load(tmp_path / "b/model.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_gpu_without_cupy_exits_2(tmp_path):
    pytest.importorskip("numpy")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k != "FASTSEQ_KERNEL"}
    env["GPU"] = "1"
    r = subprocess.run([sys.executable, "-m", "fastseq.train", "--epochs", "1", "--out",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and "CuPy" in lines[0] and "Traceback" not in r.stderr


def test_bad_data_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1+1_2\nbroken\n")
    assert main(["--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "line 2" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,expected", [
    ("--seed", "-1", "expected a non-negative integer, got -1"),
    ("--top-k", "0", "expected a positive integer, got 0"),
    ("--top-p", "0", "must be a finite number in (0, 1], got 0")])
def test_generate_flags_name_themselves(flag, value, expected, tmp_path, capsys):
    from fastseq import Rnnlm
    from fastseq.generate import main as generate
    Rnnlm(3, 4, 4, seed=0).save_params(tmp_path / "lm.npz", meta={"vocab": ["<eos>", "a", "b"]})
    with pytest.raises(SystemExit) as e:
        generate(["--model", str(tmp_path / "lm.npz"), "--start", "a", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {expected}" in capsys.readouterr().err
