"""Greedy decoding of the 5,000 addition test questions: eval_seq2seq (its default batches) and
model.generate on all 5,000 at once, Seq2seq and PeekySeq2seq (D=16, H=128, random weights).

    python benchmarks/bench_decode.py [--repeats 7]

Prints the median and the best of --repeats timed calls (after one warm-up call) on the
process's engine (FASTSEQ_KERNEL=numpy for the NumPy engine).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import D, H, addition_data, machine_line  # noqa: E402


def timed(f, repeats):
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return np.median(ts), min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import fastseq
    from fastseq.trainer import eval_seq2seq
    data = addition_data()
    q, a = data.x_test[:, ::-1].copy(), data.t_test
    print(machine_line())
    print(f"{fastseq.backend.describe()}; {len(q)} questions")
    print("| model | eval_seq2seq median s | best s | generate (all at once) median s | best s |")
    print("|---|---|---|---|---|")
    for name, cls in (("Seq2seq", fastseq.Seq2seq), ("PeekySeq2seq", fastseq.PeekySeq2seq)):
        m = cls(len(data.vocab), D, H, seed=0)
        ev = timed(lambda: eval_seq2seq(m, q, a), args.repeats)
        gen = timed(lambda: m.generate(q, a[:, 0], a.shape[1] - 1), args.repeats)
        print(f"| {name} | {ev[0]:.3f} | {ev[1]:.3f} | {gen[0]:.3f} | {gen[1]:.3f} |")


if __name__ == "__main__":
    main()
