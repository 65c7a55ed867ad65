"""Addition seq2seq training on this CPU, side by side: fastseq (default, one thread, pure NumPy
engine) and PyTorch CPU, the same model, sizes, batches, Adam and clipping.

    python -m benchmarks.compare_cpu [--load N] [--models seq2seq peeky] [--rounds 20] [--turn 1.0]
    python -m benchmarks.compare_cpu --setups old default torch --old-checkout ../old

--old-checkout PATH: a built checkout of another commit (`python setup.py build_ext --inplace`
there), run as the setup 'old' in the same turns: its speed against PyTorch and against this
checkout's, measured side by side.

Each setup runs in its own worker process; the workers take turns of about --turn seconds, in an
order that rotates every round, so slow and fast spells of a shared machine hit every setup alike.
--load N first starts N CPU-bound processes (`while True: pass`) that compete for the cores for the
whole run. Reported: median ms per iteration, the epoch it implies, and the medians (quartiles) of
the per-round time ratios.
"""
import argparse

import numpy as np

from benchmarks.common import (BATCH, D, H, SETUPS, addition_data, checkouts_line, interleaved,
                               machine_line, ratio_line, setups_env, start_load, stop_load,
                               torch_seq2seq, worker_loop, worker_setup)

EPOCH = 45000 // BATCH  # iterations per epoch of the addition training split


def make_torch_runner(model_name):
    """run(n_iters): PyTorch training of the same model on the same batches."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    data = addition_data()
    Vs = len(data.vocab)
    peeky = model_name == "peeky"
    model = torch_seq2seq(torch, Vs, D, H, peeky)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lossf = nn.CrossEntropyLoss()
    x = torch.from_numpy(data.x_train[:, ::-1].astype(np.int64).copy())
    t = torch.from_numpy(data.t_train.astype(np.int64))
    batches = _batches(len(x))

    def run(n_iters):
        for _ in range(n_iters):
            idx = torch.from_numpy(next(batches))
            score = model(x[idx], t[idx][:, :-1])
            loss = lossf(score.reshape(-1, Vs), t[idx][:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()

    return run


def make_fastseq_runner(model_name):
    """run(n_iters): fastseq training (the engine is the process's default)."""
    import fastseq
    from fastseq.trainer import TrainLoop
    data = addition_data()
    cls = fastseq.PeekySeq2seq if model_name == "peeky" else fastseq.Seq2seq
    model = cls(len(data.vocab), D, H, seed=0)
    loop = TrainLoop(model, fastseq.Adam(1e-3), progress=False)
    x = data.x_train[:, ::-1].copy()
    t = data.t_train
    batches = _batches(len(x))

    def run(n_iters):
        for _ in range(n_iters):
            idx = next(batches)
            loop.step(x[idx], t[idx], 5.0)

    return run


def _batches(n):
    perm = np.random.RandomState(0).permutation(n)
    while True:
        for i in range(n // BATCH):
            yield perm[i * BATCH:(i + 1) * BATCH]


def worker(setup, model_name):
    worker_setup()
    run = make_torch_runner(model_name) if setup == "torch" else make_fastseq_runner(model_name)
    worker_loop(run)


def report(model_name, times, turn):
    print(f"\n{model_name}: {len(next(iter(times.values())))} rounds of ~{turn:g} s per setup")
    print(f"| setup | median ms/iter | epoch s ({EPOCH} iter) |")
    print("|---|---|---|")
    for s, v in times.items():
        med = np.median(v) * 1e3
        print(f"| {SETUPS[s][1]} | {med:.2f} | {med * EPOCH / 1e3:.2f} |")
    pairs = [("default", "one", "default vs one thread (time ratio; <= 1.25 wanted)"),
             ("torch", "default", "PyTorch vs default (speed-up of fastseq)"),
             ("torch", "one", "PyTorch vs one thread"),
             ("torch", "numpy", "PyTorch vs NumPy engine (speed-up of the NumPy engine)"),
             ("numpy", "default", "NumPy engine vs default"),
             ("torch", "old", "PyTorch vs --old-checkout (speed-up of the old fastseq)"),
             ("old", "default", "--old-checkout vs default (speed-up of this checkout)")]
    for slow, fast, label in pairs:
        if slow in times and fast in times:
            print(ratio_line(times, slow, fast, label)[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=int, default=0, help="competing CPU-bound processes")
    ap.add_argument("--models", nargs="+", default=["seq2seq", "peeky"], choices=["seq2seq", "peeky"])
    ap.add_argument("--setups", nargs="+", default=[s for s in SETUPS if s != "old"],
                    choices=list(SETUPS))
    ap.add_argument("--old-checkout", default=None,
                    help="a built checkout run as the setup 'old' (added to --setups)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--turn", type=float, default=1.0, help="seconds per turn")
    ap.add_argument("--worker", nargs=2, metavar=("SETUP", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    env_of = setups_env(ap, args)
    print(machine_line())
    print(f"batch {BATCH}, D={D}, H={H}; competing CPU-bound processes: {args.load}")
    if args.old_checkout:
        print(checkouts_line(args.old_checkout))
    load = start_load(args.load)
    try:
        for model_name in args.models:
            report(model_name, interleaved("compare_cpu", [model_name], args.setups, args.rounds,
                                           args.turn, env_of=env_of), args.turn)
    finally:
        stop_load(load)


if __name__ == "__main__":
    main()
