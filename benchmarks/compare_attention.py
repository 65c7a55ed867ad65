"""AttentionSeq2seq on the date task, side by side: fastseq engines and PyTorch CPU, each in its own
worker process.

    python -m benchmarks.compare_attention [--rounds 12] [--chunk 10] [--eval-rounds 5]
        [--engines numpy cython torch] [--hidden 256] [--old-checkout PATH]

--old-checkout PATH adds the engine 'old': the Cython engine of a built checkout of another commit
(`python setup.py build_ext --inplace` there), in the same turns as the others.

Every engine runs in a worker process of its own (benchmarks.common.start_workers: PyTorch's
threads and fastseq's helper threads never share a process); the processes take turns.
Training: the engines take turns of --chunk iterations (batch 128, wordvec 16, hidden 256,
Adam 0.001, clip 5.0, reversed questions, padding masked) for --rounds rounds, in an order that
rotates from round to round; reported is the median of the per-round time ratios (turns seconds
apart see the same machine) and the epoch (351 iterations) each median implies.
Evaluation: batched greedy decoding of the 5,000 test questions (10 answer symbols each),
interleaved the same way for --eval-rounds rounds.

The PyTorch model is the same network: nn.Embedding + nn.LSTM encoder, the decoder LSTM
started from the state at each question's true end (c = 0), dot-product attention with padded
keys masked, nn.Linear on [context ; h].
"""
import argparse
import os

import numpy as np

from benchmarks.common import (ask, checkouts_line, machine_line, old_checkout_env, ratio_stats,
                               set_engine, start_workers, stop_workers, take_turns, textbook_file,
                               timed, torch_attention_seq2seq, worker_serve, worker_setup)

BATCH, D, H = 128, 16, 256


def date_data():
    from fastseq.datasets.sequence import load_dataset, pad_id, reverse_padded
    data = load_dataset(textbook_file("date.txt"))
    pad = pad_id(data.vocab)
    return data, pad, reverse_padded(data.x_train, pad), reverse_padded(data.x_test, pad)


def fastseq_runners(engine, data, hidden=H):
    """(train(n_iters) -> mean loss, evaluate() -> greedy answers) on one engine, or None."""
    from fastseq.decoding import greedy_search
    from fastseq.models.attention import AttentionSeq2seq
    from fastseq.optim import Adam
    from fastseq.trainer import Trainer
    if not set_engine(engine):
        return None
    d, pad, x, x_test = data
    model = AttentionSeq2seq(len(d.vocab), D, hidden, seed=0, pad_id=pad)
    trainer = Trainer(model, Adam(1e-3), seed=0, progress=False)  # its step: the epoch's work
    perm = np.random.RandomState(0).permutation(len(x))
    state = {"i": 0}

    def train(n_iters):
        set_engine(engine)
        total = 0.0
        for _ in range(n_iters):
            i = state["i"] % (len(x) // BATCH)
            state["i"] += 1
            idx = perm[i * BATCH:(i + 1) * BATCH]
            total += trainer.step(x[idx], d.t_train[idx], 5.0)
        return total / n_iters

    def evaluate():
        set_engine(engine)
        return greedy_search(model, x_test, d.t_test[:, 0], d.t_test.shape[1] - 1)

    return train, evaluate


def torch_runners(data, eval_batch, hidden=H):
    try:
        import torch
    except ImportError:
        return None
    from torch import nn
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    d, pad, x_np, x_test_np = data
    Vs = len(d.vocab)

    model = torch_attention_seq2seq(torch, Vs, D, hidden, pad)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lossf = nn.CrossEntropyLoss()
    x = torch.from_numpy(x_np.astype(np.int64))
    t = torch.from_numpy(d.t_train.astype(np.int64))
    x_test = torch.from_numpy(x_test_np.astype(np.int64))
    t_test = torch.from_numpy(d.t_test.astype(np.int64))
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(x)))
    state = {"i": 0}

    def train(n_iters):
        total = 0.0
        for _ in range(n_iters):
            i = state["i"] % (len(x) // BATCH)
            state["i"] += 1
            idx = perm[i * BATCH:(i + 1) * BATCH]
            xb, tb = x[idx], t[idx]
            score = model(xb, tb[:, :-1])
            loss = lossf(score.reshape(-1, Vs), tb[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += float(loss.detach())
        return total / n_iters

    def evaluate():
        width = t_test.shape[1] - 1
        return torch.cat([model.generate(x_test[s:s + eval_batch], t_test[s:s + eval_batch, :1], width)
                          for s in range(0, len(x_test), eval_batch)]).numpy()

    return train, evaluate


def serve(engine, torch_eval_batch, hidden):
    """The worker of one engine: `train N` -> seconds and mean loss of N training iterations;
    `eval` -> seconds and greedy accuracy of one evaluation of the test questions."""
    worker_setup()  # the engine 'old': fastseq from --old-checkout, its Cython engine
    data = date_data()
    r = (torch_runners(data, torch_eval_batch, hidden) if engine == "torch"
         else fastseq_runners("cython" if engine == "old" else engine, data, hidden))
    if r is None:
        raise SystemExit(f"{engine}: not available here")
    train, evaluate = r
    answers = data[0].t_test[:, 1:]

    def train_turn(n):
        seconds, loss = timed(lambda: train(int(n)))
        return f"{seconds:.9f}", f"{loss:.6f}"

    def eval_turn():
        seconds, out = timed(evaluate)
        return f"{seconds:.9f}", float((out == answers).all(axis=1).mean())

    worker_serve({"train": train_turn, "eval": eval_turn}, ready=lambda: train(3))  # warm-up


def turns(workers, rounds, command):
    """{engine: seconds of its worker's reply to `command` per round}, the engines taking turns."""
    times = take_turns(lambda e: float(ask(workers[e], *command)[0]), workers, rounds)
    return {e: np.array(v) for e, v in times.items()}


def report(title, times, scale, unit):
    print(title)
    print(f"{'engine':8} {'median ' + unit:>12} {'min ' + unit:>10}")
    for e, v in times.items():
        print(f"{e:8} {np.median(v) * scale:12.2f} {v.min() * scale:10.2f}")
    for slow, fast in (("torch", "cython"), ("torch", "numpy"), ("torch", "old"),
                       ("old", "cython")):
        if fast in times and slow in times:
            q1, med, q3, lo, hi = ratio_stats(times[slow], times[fast])
            print(f"{fast} vs {slow}: median of per-round ratios {med:.2f}x "
                  f"(quartiles {q1:.2f}-{q3:.2f}x, min {lo:.2f}x, max {hi:.2f}x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=["cython", "torch"])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=10, help="training iterations per turn")
    ap.add_argument("--eval-rounds", type=int, default=5)
    ap.add_argument("--torch-eval-batch", type=int, default=500)
    ap.add_argument("--hidden", type=int, default=H, help="hidden size of both LSTMs")
    ap.add_argument("--old-checkout", default=None,
                    help="a built checkout whose Cython engine runs as the engine 'old'")
    ap.add_argument("--worker", metavar="ENGINE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hidden < 1:
        ap.error("--hidden must be at least 1")
    if args.worker:
        return serve(args.worker, args.torch_eval_batch, args.hidden)
    env_of = lambda e: {}  # noqa: E731
    if args.old_checkout:
        old_env = old_checkout_env(args.old_checkout)
        env_of = lambda e: old_env(e) if e == "old" else {}  # noqa: E731
        args.engines += [] if "old" in args.engines else ["old"]
    elif "old" in args.engines:
        ap.error("the engine 'old' needs --old-checkout")
    workers = start_workers("compare_attention", ["--torch-eval-batch", str(args.torch_eval_batch),
                                                  "--hidden", str(args.hidden)],
                            args.engines, env_of=env_of)
    try:
        measure(args, workers)
    finally:
        stop_workers(workers)


def measure(args, workers):
    for e in args.engines:
        if e not in workers:
            print(f"{e}: not available here, skipped")
    d = date_data()[0]
    iters = len(d.x_train) // BATCH
    print(f"{machine_line()}; date task, batch {BATCH}, D={D}, H={args.hidden}; "
          f"{args.chunk} iterations per turn; each engine in its own process")
    if args.old_checkout:
        print(checkouts_line(args.old_checkout))
    if args.rounds:
        times = turns(workers, args.rounds, ("train", args.chunk))
        report(f"training, {args.rounds} rounds: seconds per epoch ({iters} iterations) implied",
               {e: v / args.chunk for e, v in times.items()}, iters, "s")
    if args.eval_rounds:
        for e, w in workers.items():
            acc = float(ask(w, "eval")[1])  # warm-up
            print(f"{e}: greedy test accuracy {acc * 100:.2f}% after the training above")
        times = turns(workers, args.eval_rounds, ("eval",))
        report(f"greedy evaluation of {len(d.t_test)} test questions, {args.eval_rounds} rounds",
               times, 1.0, "s")

if __name__ == "__main__":
    main()
