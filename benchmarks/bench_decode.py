"""Greedy decoding of the 5,000 addition test questions: eval_seq2seq (its default batches) and
model.generate on all 5,000 at once, Seq2seq and PeekySeq2seq (D=16, H=128, random weights).

    python -m benchmarks.bench_decode [--repeats 7]
    python -m benchmarks.bench_decode --old-checkout ../old [--rounds 15] [--cpu-time]

Prints the median and the best of --repeats timed calls (after one warm-up call each; the four
calls take turns, in an order rotating from round to round) on the process's engine
(FASTSEQ_KERNEL=numpy for the NumPy engine).

--old-checkout PATH: this checkout and a built checkout of another commit (`python setup.py
build_ext --inplace` there), each in a worker process of its own, take turns for --rounds rounds
of eval_seq2seq per model (the best of 2 calls per turn); printed are each side's median and the
median (quartiles) of the per-round ratios old / this. --cpu-time times the calling thread's CPU
time instead of the wall clock: on a shared machine, with FASTSEQ_THREADS=1, it leaves out the
time other processes hold the core.
"""
import argparse
import time

import numpy as np

from benchmarks.common import (D, H, addition_data, ask, checkouts_line, machine_line,
                               old_checkout_env, ratio_stats, start_workers, stop_workers,
                               take_turns, timed, worker_serve, worker_setup)

MODELS = ("Seq2seq", "PeekySeq2seq")


def models(data):
    import fastseq
    return {name: getattr(fastseq, name)(len(data.vocab), D, H, seed=0) for name in MODELS}


def worker(cpu_time):
    """Serve `eval MODEL`: the best of 2 timed eval_seq2seq calls, in seconds."""
    worker_setup()
    from fastseq.trainer import eval_seq2seq
    data = addition_data()
    ms = models(data)
    clock = time.thread_time if cpu_time else time.perf_counter

    def best(name):
        runs = []
        for _ in range(2):
            t0 = clock()
            eval_seq2seq(ms[name], data.x_test, data.t_test)
            runs.append(clock() - t0)
        return (f"{min(runs):.9f}",)

    worker_serve({"eval": best}, ready=lambda: [best(n) for n in MODELS])


def side_by_side(args):
    env_of = old_checkout_env(args.old_checkout)
    setups = ["old", "default"]
    extra = ["--cpu-time"] if args.cpu_time else []
    workers = start_workers("bench_decode", extra, setups, env_of)
    try:
        if set(workers) != set(setups):
            raise SystemExit("bench_decode: a worker could not start")
        times = take_turns(lambda s: [float(ask(workers[s], "eval", n)[0]) for n in MODELS],
                           setups, args.rounds, pause=0)
    finally:
        stop_workers(workers)
    print(machine_line())
    print(checkouts_line(args.old_checkout))
    print(f"eval_seq2seq of 5,000 addition questions, best of 2 calls per turn, {args.rounds} "
          f"rounds, {'thread CPU' if args.cpu_time else 'wall'} time")
    print("| model | old median ms | this median ms | old / this (median of rounds) | quartiles |")
    print("|---|---|---|---|---|")
    for i, name in enumerate(MODELS):
        old, new = (np.array([r[i] for r in times[s]]) for s in setups)
        q1, med, q3, _, _ = ratio_stats(old, new)
        print(f"| {name} | {np.median(old) * 1e3:.1f} | {np.median(new) * 1e3:.1f} | {med:.3f}x "
              f"| {q1:.2f}-{q3:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--old-checkout", default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cpu-time", action="store_true")
    ap.add_argument("--worker", nargs=1, metavar="SETUP", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.cpu_time)
    if args.old_checkout:
        return side_by_side(args)
    import fastseq
    from fastseq.trainer import eval_seq2seq
    data = addition_data()
    q, a = data.x_test[:, ::-1].copy(), data.t_test
    print(machine_line())
    print(f"{fastseq.backend.describe()}; {len(q)} questions")
    print("| model | eval_seq2seq median s | best s | generate (all at once) median s | best s |")
    print("|---|---|---|---|---|")
    calls = {}
    for name, m in models(data).items():
        calls[name, "eval"] = lambda m=m: eval_seq2seq(m, q, a)
        calls[name, "generate"] = lambda m=m: m.generate(q, a[:, 0], a.shape[1] - 1)
    for call in calls.values():
        call()  # warm-up
    times = take_turns(lambda k: timed(calls[k])[0], calls, args.repeats, pause=0)
    for name in MODELS:
        ev, gen = times[name, "eval"], times[name, "generate"]
        print(f"| {name} | {np.median(ev):.3f} | {min(ev):.3f} | {np.median(gen):.3f} | "
              f"{min(gen):.3f} |")


if __name__ == "__main__":
    main()
