"""Smoke tests of the side-by-side scripts (compare_rnnlm --model better, compare_attention) and of
profile_big, at tiny sizes: they run end to end and print the tables they promise. A PyTorch side
is checked where torch is installed (the scripts skip it otherwise)."""
import argparse
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from benchmarks.common import ROOT, TEXTBOOK_DATA, cpuinfo_flags, machine_line

HAS_TORCH = importlib.util.find_spec("torch") is not None


def run_script(module, *args):
    env = {**os.environ, "FASTSEQ_TEXTBOOK_DATA": str(TEXTBOOK_DATA)}
    p = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_machine_line_names_the_vector_flags():
    flags = cpuinfo_flags()
    if flags is None:
        pytest.skip("no flags line in /proc/cpuinfo here")
    line = machine_line()
    for f in ("avx2", "avx512f", "fma"):
        assert (f"no {f}" in line) == (f not in flags), line
        assert re.search(rf"\b{f}\b", line), line


def test_compare_rnnlm_better_prints_both_sides():
    out = run_script("compare_rnnlm", "--model", "better", "--hidden", "8", "--rounds", "1",
                     "--turn", "0.01", "--setups", "one", "torch")
    assert "BetterRnnlm V=10000 D=H=8, 2 LSTM layers, dropout 0.5, tied weights" in out
    rows = dict(re.findall(r"^\| (fastseq pinned to one thread|PyTorch CPU, default threads) "
                           r"\| ([0-9.]+) \|$", out, re.M))
    assert float(rows["fastseq pinned to one thread"]) > 0
    assert ("PyTorch CPU, default threads" in rows) == HAS_TORCH, out


def test_compare_rnnlm_rejects_a_zero_hidden_size():
    p = subprocess.run([sys.executable, "-m", "benchmarks.compare_rnnlm", "--model", "better",
                        "--hidden", "0"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "--hidden must be at least 1" in p.stderr


def test_compare_attention_runs_each_engine_in_its_own_process():
    out = run_script("compare_attention", "--engines", "numpy", "torch", "--rounds", "1",
                     "--chunk", "1", "--eval-rounds", "1", "--hidden", "8")
    assert "each engine in its own process" in out and "H=8" in out
    assert re.search(r"^numpy +[0-9.]+ +[0-9.]+$", out, re.M), out
    assert re.search(r"^numpy: greedy test accuracy [0-9.]+%", out, re.M), out
    assert re.search(r"^greedy evaluation of [0-9]+ test questions, 1 rounds$", out, re.M), out
    assert bool(re.search(r"^numpy vs torch: median of per-round ratios", out, re.M)) == HAS_TORCH


def test_compare_cpu_runs_an_old_checkout_beside_this_one():
    """--old-checkout (here this very checkout) adds the setup 'old', imported from that path,
    in the same turns; its ratio to this checkout is printed."""
    out = run_script("compare_cpu", "--models", "seq2seq", "--setups", "default", "--rounds", "1",
                     "--turn", "0.01", "--old-checkout", str(ROOT))
    assert re.search(rf"^old: {re.escape(str(ROOT))} at \S+; this checkout at \S+$", out, re.M)
    assert re.search(r"^\| fastseq of --old-checkout, default engine and threads \| [0-9.]+ \|",
                     out, re.M), out
    assert "--old-checkout vs default (speed-up of this checkout): " in out
    p = subprocess.run([sys.executable, "-m", "benchmarks.compare_cpu", "--old-checkout",
                        str(ROOT / "fastseq")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "no fastseq package there" in p.stderr


def test_compare_rnnlm_runs_an_old_checkout_beside_this_one():
    out = run_script("compare_rnnlm", "--setups", "default", "--rounds", "1", "--turn", "0.01",
                     "--old-checkout", str(ROOT))
    assert re.search(rf"^old: {re.escape(str(ROOT))} at \S+; this checkout at \S+$", out, re.M)
    assert re.search(r"^\| fastseq of --old-checkout, default engine and threads \| [0-9.]+ \|",
                     out, re.M), out
    assert "--old-checkout vs default (speed-up of this checkout): " in out


def test_compare_attention_runs_an_old_checkout_as_an_engine():
    from fastseq import backend
    if not backend.cython_available():
        pytest.skip("the Cython engine is not built here (the engine 'old' is the checkout's)")
    out = run_script("compare_attention", "--engines", "cython", "--rounds", "1", "--chunk", "1",
                     "--eval-rounds", "1", "--hidden", "8", "--old-checkout", str(ROOT))
    assert re.search(r"^old +[0-9.]+ +[0-9.]+$", out, re.M), out
    assert re.search(r"^cython vs old: median of per-round ratios", out, re.M), out


def test_bench_decode_runs_an_old_checkout_beside_this_one():
    out = run_script("bench_decode", "--old-checkout", str(ROOT), "--rounds", "1", "--cpu-time")
    assert "thread CPU time" in out
    for name in ("Seq2seq", "PeekySeq2seq"):
        assert re.search(rf"^\| {name} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \|", out, re.M), out


def test_profile_big_counts_the_products_and_times_every_op(capsys):
    from benchmarks import profile_big
    profile_big.main(["--iters", "1", "--warmup", "0", "--gemm-size", "64",
                      "--better-hidden", "8", "--attention-hidden", "8"])
    out = capsys.readouterr().out
    assert "float32 GEMM peak (numpy.matmul 64^2, all threads)" in out
    better, attention = out.split("### ")[1:]
    rows = {m[0]: m[1:] for m in re.findall(
        r"^\| ([^|*]+?) \| ([0-9.-]+) \| ([0-9.-]+) \| ([0-9.]*) \|", better, re.M)}
    lstm_fwd = 2 * (2 * 700 * 8 * 32) / 1e9  # x Wx and h Wh over 20 x 35 positions, H 8
    assert float(rows["LSTM 1 forward"][2]) == pytest.approx(lstm_fwd, abs=1e-3)
    assert float(rows["affine (tied) backward"][2]) == pytest.approx(2 * 2 * 700 * 8 * 1e4 / 1e9,
                                                                     abs=1e-3)
    for op in ("embedding forward", "dropout forward (3 layers)", "softmax + loss forward",
               "gradient clipping", "optimiser (SGD)", "other (outside the ops above)"):
        assert op in rows, better
    assert sum(float(r[1]) for r in rows.values()) == pytest.approx(100, abs=1.0)
    assert "GEMM floor:" in better
    assert "attention forward" in attention and "optimiser (Adam)" in attention
    assert "GEMM floor:" in attention


def test_better_rnnlm_is_56_gflop_of_products():
    from benchmarks.profile_big import Profile, better_rnnlm
    args = argparse.Namespace(better_hidden=650, data_dir=str(TEXTBOOK_DATA / "ptb"))
    _, _, gflop = better_rnnlm(Profile(), args)
    assert sum(gflop.values()) == pytest.approx(55.7, abs=0.1)
