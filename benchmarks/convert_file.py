"""File-to-file conversion at scale: `python -m fastseq.generate --input` over a file of generated
addition questions, in a child process, with its speed and peak memory.

    python -m benchmarks.convert_file [--lines 1000000] [--model model.npz] [--beam K]
        [--check N] [--train-iters 351]

Without --model, a PeekySeq2seq (reversed questions, H 128, the default `python -m fastseq.train`
model) is trained for --train-iters iterations on generated addition data and saved. The input
file holds --lines questions such as `71+118` (a, b uniform in 0..999, seeded). The child runs
`generate --input FILE --output FILE`; reported are its wall time, lines per second, and its peak
resident memory (the kernel's maximum RSS of that process, from wait4) beside the same child's
on a file 100 times smaller (memory bounded: the two peaks are close). Then the output is checked
line for line against fastseq.load(model).answer(...) over the first --check lines (0: all),
answered in chunks of whole windows (98,304 lines).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import ROOT, machine_line
from fastseq.files.rebuild import BATCH, WINDOW_BATCHES

CHUNK = 12 * BATCH * WINDOW_BATCHES  # answer()'s windows then line up with generate's


def questions(n, seed=0):
    """n addition questions 'a+b' (a, b uniform in 0..999), as one text block of lines."""
    rng = np.random.RandomState(seed)
    a, b = rng.randint(0, 1000, size=(2, n))
    return "".join(f"{x}+{y}\n" for x, y in zip(a.tolist(), b.tolist()))


def train_model(path, iters, seed=0):
    """A PeekySeq2seq on reversed addition (the default training job's model), trained for
    `iters` iterations of batch 128, saved as a model file."""
    from fastseq import Adam, PeekySeq2seq, Trainer
    from fastseq.datasets import sequence
    lines = sequence.generate_addition(max(128 * iters, 1280), seed=seed)
    d = sequence.build(*sequence.parse_lines(lines), seed=None)
    x = np.concatenate([d.x_train, d.x_test])[:, ::-1].copy()
    t = np.concatenate([d.t_train, d.t_test])
    m = PeekySeq2seq(len(d.vocab), 16, 128, seed=seed)
    if iters:
        Trainer(m, Adam(1e-3), seed=seed, progress=False).fit(x[:128 * iters], t[:128 * iters],
                                                              1, 128, 5.0)
    v = d.vocab
    m.save_params(path, meta={"chars": [v.id_to_char[i] for i in range(len(v))],
                              "question_width": v.question_width,
                              "answer_width": v.answer_width, "reverse": True})


def run_child(model, inp, out, beam=None):
    """(seconds, peak RSS in MiB) of `python -m fastseq.generate --input inp --output out`."""
    cmd = [sys.executable, "-m", "fastseq.generate", "--model", model, "--input", inp,
           "--output", out]
    if beam:
        cmd += ["--beam", str(beam)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"generate failed (exit {p.returncode}): {err.strip()}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def check(model, inp, out, n, beam=None):
    """Lines of out compared with fastseq.load(model).answer over the first n lines of inp
    (0: all), in chunks; returns the number of lines checked (a mismatch stops the run)."""
    import fastseq
    saved = fastseq.load(model)
    checked = 0
    with open(inp, encoding="utf-8") as fi, open(out, encoding="utf-8") as fo:
        while n == 0 or checked < n:
            want = CHUNK if n == 0 else min(CHUNK, n - checked)
            sources = [line.rstrip("\n") for _, line in zip(range(want), fi)]
            if not sources:
                break
            got = [line.rstrip("\n") for _, line in zip(range(len(sources)), fo)]
            expected = [f"{s}\t{a}" for s, a in zip(sources, saved.answer(sources, beam=beam))]
            if got != expected:
                i = next(i for i, (g, e) in enumerate(zip(got + [""] * len(expected), expected))
                         if g != e)
                raise SystemExit(f"line {checked + i + 1}: generate wrote {got[i]!r} where "
                                 f"answer() gives {expected[i]!r}" if i < len(got) else
                                 f"generate wrote {checked + len(got)} lines, fewer than the input")
            checked += len(sources)
        if n == 0 and fo.readline():
            raise SystemExit("generate wrote more lines than the input has")
    return checked


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--model", default=None, help="a seq2seq model file over the addition "
                                                  "characters (default: one trained here)")
    ap.add_argument("--train-iters", type=int, default=351,
                    help="iterations to train the model made without --model (351: one epoch)")
    ap.add_argument("--beam", type=int, default=None)
    ap.add_argument("--check", type=int, default=0,
                    help="lines checked against answer() (0: all)")
    args = ap.parse_args(argv)
    if args.lines < 100:
        ap.error("--lines must be at least 100")
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="fastseq-convert-") as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "model.npz")
            train_model(model, args.train_iters)
        small, big = os.path.join(tmp, "small.txt"), os.path.join(tmp, "big.txt")
        with open(small, "w") as f:
            f.write(questions(args.lines // 100, seed=1))
        with open(big, "w") as f:
            for s in range(0, args.lines, 100_000):  # in chunks: this process stays small
                f.write(questions(min(100_000, args.lines - s), seed=2 + s // 100_000))
        out = os.path.join(tmp, "out.tsv")
        how = f"beam {args.beam}" if args.beam else "greedy"
        t_small, rss_small = run_child(model, small, out, args.beam)
        t_big, rss_big = run_child(model, big, out, args.beam)
        print(f"generate --input, {how}: {args.lines} lines in {t_big:.1f} s "
              f"({args.lines / t_big:,.0f} lines/s, process start and model load included); "
              f"peak RSS {rss_big:.0f} MiB")
        print(f"same, {args.lines // 100} lines: {t_small:.1f} s; peak RSS {rss_small:.0f} MiB "
              f"(ratio of peaks {rss_big / rss_small:.2f})")
        n = check(model, big, out, args.check, args.beam)
        print(f"output matches fastseq.load(model).answer(...) line for line: {n} lines checked")


if __name__ == "__main__":
    main()
