"""Greedy decoding of the 5,000 addition test questions: eval_seq2seq (its default batches) and
model.generate on all 5,000 at once, Seq2seq and PeekySeq2seq (D=16, H=128, random weights).

    python -m benchmarks.bench_decode [--repeats 7]

Prints the median and the best of --repeats timed calls (after one warm-up call each; the four
calls take turns, in an order rotating from round to round) on the process's engine
(FASTSEQ_KERNEL=numpy for the NumPy engine).
"""
import argparse

import numpy as np

from benchmarks.common import D, H, addition_data, machine_line, take_turns, timed


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
    calls = {}
    for name, cls in (("Seq2seq", fastseq.Seq2seq), ("PeekySeq2seq", fastseq.PeekySeq2seq)):
        m = cls(len(data.vocab), D, H, seed=0)
        calls[name, "eval"] = lambda m=m: eval_seq2seq(m, q, a)
        calls[name, "generate"] = lambda m=m: m.generate(q, a[:, 0], a.shape[1] - 1)
    for call in calls.values():
        call()  # warm-up
    times = take_turns(lambda k: timed(calls[k])[0], calls, args.repeats, pause=0)
    for name in ("Seq2seq", "PeekySeq2seq"):
        ev, gen = times[name, "eval"], times[name, "generate"]
        print(f"| {name} | {np.median(ev):.3f} | {min(ev):.3f} | {np.median(gen):.3f} | "
              f"{min(gen):.3f} |")


if __name__ == "__main__":
    main()
