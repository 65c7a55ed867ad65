"""Checkpoints, resume, interrupts and numerical guards of python -m fastseq.train.

A run killed (SIGKILL) or stopped (SIGINT, SIGTERM) mid-epoch and continued with --resume ends with
the same parameters, optimiser state and random-generator states, bit for bit, as the uninterrupted
run: for the NumPy and Cython engines, a seq2seq model and a language model (BetterRnnlm, whose
dropout draws random numbers). The signal is sent by the training process to itself after a given
iteration (a wrapper around TrainLoop.step), so the point of interruption is exact.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastseq import backend, checkpoint, files
from fastseq.train import main

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, sys
from fastseq import trainer
from fastseq.train import main
at, sig = int(os.environ["SIGNAL_AT"]), int(os.environ["SIGNAL"])
times = int(os.environ.get("SIGNAL_TIMES", "1"))
step = trainer.TrainLoop.step

def step_then_signal(self, *args):
    loss = step(self, *args)
    if self.total_iters + 1 == at:
        for _ in range(times):
            os.kill(os.getpid(), sig)
    return loss

trainer.TrainLoop.step = step_then_signal
sys.exit(main(sys.argv[1:]))
"""

ENGINES = ["numpy", pytest.param("cython", marks=pytest.mark.skipif(
    not backend.cython_available(), reason="the Cython engine is not built"))]


def env():
    # the engines split work into pieces fixed by the problem's shape, not by the thread count,
    # so the default threads give the same bits in every process
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fastseq.datasets.sequence import generate_addition
    d = tmp_path_factory.mktemp("data")
    (d / "add.txt").write_text("\n".join(generate_addition(600, seed=5)) + "\n")
    rng = np.random.RandomState(0)
    words = [f"w{i}" for i in range(30)]
    (d / "text.txt").write_text("\n".join(" ".join(rng.choice(words, rng.randint(3, 12)))
                                          for _ in range(240)) + "\n")
    (d / "pairs.tsv").write_text(pairs_lines(300, seed=5))
    return d


def pairs_lines(n, seed):
    """n source<TAB>target lines: a word of 2-7 letters, its letters reversed as space tokens;
    every tenth word has a second target (its letters in order)."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        w = "".join(rng.choice(list("abcdefgh"), rng.randint(2, 8)))
        out.append(f"{w}\t{' '.join(reversed(w))}")
        if i % 10 == 0:
            out.append(f"{w}\t{' '.join(w)}")
    return "\n".join(out) + "\n"


def task_args(task, data):
    if task == "seq2seq":  # 540 training rows / 32 = 16 iterations per epoch
        return ["--data", str(data / "add.txt"), "--model", "peeky", "--epochs", "2",
                "--batch-size", "32", "--hidden-size", "8", "--wordvec-size", "4",
                "--checkpoint-every", "4", "--seed", "7"]
    if task == "pairs":  # 285 training sources (~314 rows) / 32 = 9 iterations per epoch; the
        # dev WER stays at 100%: the learning rate halves every epoch, early stopping at the 3rd
        return ["--task", "pairs", "--data", str(data / "pairs.tsv"), "--target-tokens", "space",
                "--epochs", "4", "--batch-size", "32", "--hidden-size", "8",
                "--wordvec-size", "4", "--patience", "2", "--checkpoint-every", "3",
                "--seed", "7"]
    return ["--task", "text", "--data", str(data / "text.txt"), "--model", "better",
            "--epochs", "3", "--max-iters", "12", "--batch-size", "4", "--time-size", "5",
            "--hidden-size", "8", "--wordvec-size", "8", "--eval-max-iters", "2",
            "--checkpoint-every", "3", "--seed", "7"]


def every(task):
    args = task_args(task, Path("."))
    return int(args[args.index("--checkpoint-every") + 1])


def train(argv, signal_at=None, sig=signal.SIGKILL, times=1, **extra_env):
    if signal_at is None:
        cmd = [sys.executable, "-m", "fastseq.train"] + argv
        e = dict(env(), **extra_env)
    else:
        cmd = [sys.executable, "-c", CHILD] + argv
        e = dict(env(), SIGNAL_AT=str(signal_at), SIGNAL=str(int(sig)), SIGNAL_TIMES=str(times),
                 **extra_env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=e)


def arrays_of(path):
    arrays, meta = files.load_checkpoint(path) if path.name == "checkpoint.npz" else (None, None)
    if arrays is None:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if not k.startswith("__")}
    return arrays


def assert_same_run(a, b):
    names = ["checkpoint.npz", "model.npz"] + (["best.npz"] if (a / "best.npz").exists() else [])
    for name in names:
        x, y = arrays_of(a / name), arrays_of(b / name)
        assert sorted(x) == sorted(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), f"{name}: {k} differs"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert [e["loss"] for e in ma["epochs"]] == [e["loss"] for e in mb["epochs"]]
    assert "stopped" not in mb


_baselines = {}


def baseline(engine, task, data, tmp_path_factory):
    key = (engine, task)
    if key not in _baselines:
        out = tmp_path_factory.mktemp(f"base-{engine}-{task}")
        os.rmdir(out)
        r = train(task_args(task, data) + ["--engine", engine, "--out", str(out),
                                           "--no-progress"])
        assert r.returncode == 0, r.stderr
        _baselines[key] = out
    return _baselines[key]


@pytest.mark.parametrize("task,signal_at,ckpt_at", [("seq2seq", 22, 20), ("lm", 17, 15),
                                                    ("pairs", 14, 12)])
@pytest.mark.parametrize("engine", ENGINES)
def test_sigkill_mid_epoch_then_resume_is_bit_identical(engine, task, signal_at, ckpt_at, data,
                                                        tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    r = train(task_args(task, data) + ["--engine", engine, "--out", str(out), "--no-progress"],
              signal_at=signal_at)
    assert r.returncode == -signal.SIGKILL
    _, meta = files.load_checkpoint(out / "checkpoint.npz")
    # the last checkpoint that reached the disk before the kill (a writer thread writes the
    # files behind training, at most two files behind)
    assert 0 < meta["state"]["loop"]["total_iters"] <= ckpt_at
    assert meta["state"]["loop"]["total_iters"] % every(task) == 0
    assert meta["config"]["engine"] == engine and meta["fastseq_version"]
    r = train(["--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert f"resuming {out}" in r.stdout
    assert_same_run(baseline(engine, task, data, tmp_path_factory), out)


@pytest.mark.parametrize("task,signal_at", [("seq2seq", 22), ("lm", 17), ("pairs", 14)])
@pytest.mark.parametrize("engine", ENGINES)
def test_sigint_saves_state_reached_then_resume_is_bit_identical(engine, task, signal_at, data,
                                                                 tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    r = train(task_args(task, data) + ["--engine", engine, "--out", str(out), "--no-progress"],
              signal_at=signal_at, sig=signal.SIGINT)
    assert r.returncode == 130 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "SIGINT received" in lines[0] and "stopped at" in lines[1]
    _, meta = files.load_checkpoint(out / "checkpoint.npz")
    assert meta["state"]["loop"]["total_iters"] == signal_at  # the state reached, not a periodic
    m = json.loads((out / "metrics.json").read_text())
    assert m["stopped"]["signal"] == "SIGINT" and m["stopped"]["total_iterations"] == signal_at
    assert (out / "model.npz").exists()
    r = train(["--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert_same_run(baseline(engine, task, data, tmp_path_factory), out)


def test_sigterm_exits_143_and_resumes_with_another_thread_count(data, tmp_path,
                                                                   tmp_path_factory):
    engine = "cython" if backend.cython_available() else "numpy"
    out = tmp_path / "run"
    r = train(task_args("seq2seq", data) + ["--engine", engine, "--out", str(out),
                                            "--no-progress"], signal_at=5, sig=signal.SIGTERM)
    assert r.returncode == 143 and "Traceback" not in r.stderr and "SIGTERM" in r.stderr
    # the kernels' results do not depend on the thread count: resume single-threaded
    assert train(["--resume", str(out), "--no-progress"], FASTSEQ_THREADS="1").returncode == 0
    assert_same_run(baseline(engine, "seq2seq", data, tmp_path_factory), out)


def test_second_sigint_stops_at_once(data, tmp_path):
    out = tmp_path / "run"
    r = train(task_args("seq2seq", data) + ["--engine", "numpy", "--out", str(out),
                                            "--no-progress"], signal_at=7, sig=signal.SIGINT,
              times=2)
    assert r.returncode == 130 and "Traceback" not in r.stderr
    assert "stopped at once" in r.stderr.strip().splitlines()[-1]
    _, meta = files.load_checkpoint(out / "checkpoint.npz")
    assert meta["state"]["loop"]["total_iters"] == 4  # the last periodic checkpoint, untouched


def test_sigint_from_outside(data, tmp_path):
    out = tmp_path / "run"
    args = task_args("seq2seq", data)
    args[args.index("--epochs") + 1] = "1000"
    p = subprocess.Popen([sys.executable, "-m", "fastseq.train"] + args +
                         ["--out", str(out), "--no-progress"], env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.npz").exists() and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=60)[1]
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err
    m = json.loads((out / "metrics.json").read_text())
    _, meta = files.load_checkpoint(out / "checkpoint.npz")
    assert m["stopped"]["total_iterations"] == meta["state"]["loop"]["total_iters"] > 0


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data, tmp_path, capsys, monkeypatch):
    from fastseq import PeekySeq2seq
    forward, calls = PeekySeq2seq.forward, []

    def diverging_forward(self, xs, ts):
        calls.append(1)
        loss = forward(self, xs, ts)
        return float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(PeekySeq2seq, "forward", diverging_forward)
    out = tmp_path / "run"
    rc = main(task_args("seq2seq", data) + ["--engine", "numpy", "--out", str(out),
                                            "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("fastseq: training stopped: the loss is nan at epoch 1, iteration 7")
    _, meta = files.load_checkpoint(out / "checkpoint.npz")
    assert meta["state"]["loop"]["total_iters"] == 4  # the last good checkpoint, intact
    assert not (out / "model.npz").exists()


def test_non_finite_gradient_names_the_parameter():
    from fastseq import SGD, Trainer
    from fastseq.models import Model as FastseqModel
    from fastseq.trainer import TrainingDiverged

    class Layer:
        param_names = ("W", "b")

        def __init__(self):
            self.params = [np.ones((2, 2)), np.ones(2)]
            self.grads = [np.zeros((2, 2)), np.zeros(2)]

    class Model(FastseqModel):
        def __init__(self):
            self.layers = [("layer", Layer())]
            self.calls = 0

        def forward(self, x, t):
            return 1.0

        def backward(self):
            self.calls += 1
            self.grads[1][...] = np.nan if self.calls == 3 else 0.5

    m = Model()
    with pytest.raises(TrainingDiverged, match=r"epoch 1, iteration 3, in parameter layer\.b"):
        Trainer(m, SGD(0.1), seed=0, progress=False).fit(np.zeros((8, 2)), np.zeros((8, 2)),
                                                         max_epoch=1, batch_size=2)
    assert np.allclose(m.params[1], 0.9) and np.all(m.params[0] == 1)  # no bad update


def test_resume_of_a_finished_run_rewrites_nothing_but_the_final_files(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = task_args("seq2seq", data)
    args[args.index("--epochs") + 1] = "1"
    assert main(args + ["--engine", "numpy", "--out", str(out), "--no-progress"]) == 0
    before = arrays_of(out / "checkpoint.npz")
    assert main(["--resume", str(out), "--no-progress"]) == 0
    after = arrays_of(out / "checkpoint.npz")
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_resume_refuses_a_changed_data_file(data, tmp_path, capsys):
    from fastseq.datasets.sequence import generate_addition
    src = tmp_path / "add.txt"
    src.write_text((data / "add.txt").read_text())
    out = tmp_path / "run"
    args = task_args("seq2seq", data)
    args[args.index("--data") + 1] = str(src)
    args[args.index("--epochs") + 1] = "1"
    assert main(args + ["--engine", "numpy", "--out", str(out), "--no-progress"]) == 0
    src.write_text("\n".join(x.replace("+", "-") for x in generate_addition(600, seed=5)))
    capsys.readouterr()
    assert main(["--resume", str(out), "--no-progress"]) == 2
    assert "vocabulary differs" in capsys.readouterr().err


def test_non_finite_validation_perplexity_is_never_the_best_model(data, tmp_path, capsys,
                                                                  monkeypatch):
    import fastseq.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "eval_perplexity", lambda *a, **k: float("nan"))
    out = tmp_path / "run"
    rc = main(task_args("lm", data) + ["--engine", "numpy", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "validation perplexity is nan after epoch 1" in err
    assert not (out / "model.npz").exists()


def test_resume_from_a_damaged_checkpoint_is_one_fastseq_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = task_args("seq2seq", data)
    args[args.index("--epochs") + 1] = "1"
    assert main(args + ["--engine", "numpy", "--out", str(out), "--no-progress"]) == 0
    blob = (out / "checkpoint.npz").read_bytes()
    (out / "checkpoint.npz").write_bytes(blob[: len(blob) // 2])
    capsys.readouterr()
    assert main(["--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastseq: ") and "checkpoint.npz" in err[0]


# --- forged checkpoints: a valid checksum, metadata that does not fit the declared schema -------

FORGERIES = [  # (what is changed, the field the one error line must name)
    (lambda m, a: m["state"]["loop"].pop("epoch"), "state.loop.epoch"),
    (lambda m, a: m["state"]["loop"].update(iteration="3"), "state.loop.iteration"),
    (lambda m, a: m["state"]["loop"].update(epoch=-1), "state.loop.epoch"),
    (lambda m, a: m["state"]["loop"].update(window=[1.0]), "state.loop.window"),
    (lambda m, a: m["state"]["loop"]["global_rng"].update(pos=10 ** 6),
     "state.loop.global_rng.pos"),
    (lambda m, a: m["state"]["optimizer"].update(lr=0), "state.optimizer.lr"),
    (lambda m, a: m["state"]["optimizer"].update(iter=1.5), "state.optimizer.iter"),
    (lambda m, a: m["state"]["optimizer"].update(beta1=2), "state.optimizer.beta1"),
    (lambda m, a: m["state"]["optimizer"].update(beta2=1), "state.optimizer.beta2"),
    (lambda m, a: m["state"]["optimizer"].update(lr=10 ** 400), "state.optimizer.lr"),
    (lambda m, a: m["state"]["optimizer"].update(extra=1), "state.optimizer.extra"),
    (lambda m, a: m.pop("model_class"), "model_class"),
    (lambda m, a: m.update(trainer_class="Other"), "trainer_class"),
    (lambda m, a: m.update(state=[]), "state"),
    (lambda m, a: m["config"].pop("task"), "config.task"),
    (lambda m, a: m["config"].update(seed=-5), "config.seed"),
    (lambda m, a: m["config"].update(epochs="many"), "config.epochs"),
    (lambda m, a: m["config"].update(lr=float("inf")), "config.lr"),
    (lambda m, a: m["metrics"]["epochs"][0].pop("test_accuracy"),
     "metrics.epochs[0].test_accuracy"),
    (lambda m, a: m.pop("vocabulary"), "vocabulary"),
    (lambda m, a: m["state"]["model"]["params"].update(
        {next(iter(m["state"]["model"]["params"])): {"array": "nowhere"}}),
     "state.model.params"),
    (lambda m, a: a.update({"state/loop/global_rng/keys": np.zeros(3, np.uint32)}),
     "624 integer keys"),
    (lambda m, a: a.update({"param/" + m["param_names"][0]: np.zeros(2, np.float32)}),
     "parameter"),
]


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    os.rmdir(out)
    args = task_args("seq2seq", data)
    args[args.index("--epochs") + 1] = "1"
    r = train(args + ["--engine", "numpy", "--out", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("forge,field", FORGERIES)
def test_resume_of_a_forged_checkpoint_is_one_line_naming_the_field(forge, field, finished_run,
                                                                    tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    arrays, meta = files.load_checkpoint(out / "checkpoint.npz")
    forge(meta, arrays)
    files.write_npz(out / "checkpoint.npz", arrays, meta)  # the library's writer: a valid checksum
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastseq: "), err
    assert "checkpoint.npz" in err[0] and field in err[0], err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten


def test_restore_refuses_forged_state_before_changing_anything(finished_run):
    from fastseq import PeekySeq2seq, Trainer, Adam
    arrays, meta = files.load_checkpoint(finished_run / "checkpoint.npz")
    del meta["state"]["loop"]["total_iters"]
    model = PeekySeq2seq(13, 4, 8, seed=7)
    before = [p.copy() for p in model.params]
    with pytest.raises(checkpoint.CheckpointError, match=r"c\.npz: .*state\.loop\.total_iters"):
        checkpoint.restore(Trainer(model, Adam(), seed=7, progress=False), arrays, meta, "c.npz")
    assert all(np.array_equal(a, b) for a, b in zip(before, model.params))


def test_process_resume_of_a_forged_checkpoint_exits_2_without_traceback(finished_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    arrays, meta = files.load_checkpoint(out / "checkpoint.npz")
    del meta["state"]["optimizer"]["m"]
    files.write_npz(out / "checkpoint.npz", arrays, meta)
    r = train(["--resume", str(out), "--no-progress"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.npz" in lines[0] and "state.optimizer.m" in lines[0]


def test_resume_of_a_language_model_checkpoint_without_its_schedule_is_refused(data, tmp_path,
                                                                              capsys):
    out = tmp_path / "run"
    args = task_args("lm", data)
    args[args.index("--epochs") + 1] = "1"
    assert main(args + ["--engine", "numpy", "--out", str(out), "--no-progress"]) == 0
    arrays, meta = files.load_checkpoint(out / "checkpoint.npz")
    assert set(meta["state"]["loop"]["callbacks"]) == {"save_best", "lr_schedule"}
    del meta["state"]["loop"]["callbacks"]["save_best"]
    files.write_npz(out / "checkpoint.npz", arrays, meta)
    capsys.readouterr()
    assert main(["--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "field 'state.loop.callbacks.save_best' is missing" in err[0]
