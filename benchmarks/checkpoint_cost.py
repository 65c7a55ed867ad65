"""What checkpoint.npz costs next to training, measured side by side in one process.

    PYTHONPATH=. python benchmarks/checkpoint_cost.py [--rounds 3] [--lm]

Addition (the CLI's default: PeekySeq2seq, D=16, H=128, batch 128, Adam, 351 iterations per
epoch): each round times one training epoch and then five checkpoint writes (the CLI writes one
after every epoch); the cost is the median write over the median epoch. With --lm, the same for
language models at PTB sizes (V=10,000; Rnnlm D=H=100 and BetterRnnlm D=H=650, batch 20, T=35,
SGD): one write against one iteration, i.e. the cost of --checkpoint-every N is write / (N x
iteration).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fastseq import backend, checkpoint  # noqa: E402
from fastseq.train import TASKS, build  # noqa: E402


def config(task, model, **over):
    from fastseq.models import REGISTRY
    cfg = {k: v for k, v in TASKS[task].items() if k not in ("family", "model")}
    cfg.update(REGISTRY[model].defaults, task=task, family=TASKS[task]["family"], model=model,
               seed=1984, progress=False, checkpoint_every=None, **over)
    return cfg


def write_times(path, trainer, meta, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        checkpoint.save(path, trainer, meta)
        times.append(time.perf_counter() - t)
    return times


def addition(rounds, folder):
    from fastseq.datasets.sequence import load_dataset
    data = load_dataset("addition.txt")
    x, t = data.x_train[:, ::-1].copy(), data.t_train
    cfg = config("addition", "peeky")
    _, trainer = build(cfg, len(data.vocab))
    vocab = {"chars": [data.vocab.id_to_char[i] for i in range(len(data.vocab))]}
    meta = {"config": cfg, "metrics": {"epochs": []}, "best": None, "vocabulary": vocab}
    path = os.path.join(folder, "checkpoint.npz")
    epochs, writes = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        trainer.fit(x, t, max_epoch=1, batch_size=cfg["batch_size"], max_grad=cfg["max_grad"])
        epochs.append(time.perf_counter() - t0)
        writes += write_times(path, trainer, meta, 5)
        print(f"  round {r + 1}: epoch {epochs[-1]:.2f} s, writes "
              f"{', '.join(f'{w * 1000:.1f}' for w in writes[-5:])} ms", flush=True)
    e, w = statistics.median(epochs), statistics.median(writes)
    size = os.path.getsize(path)
    print(f"| addition, PeekySeq2seq | {size / 1e6:.2f} MB | {w * 1000:.1f} ms | epoch {e:.2f} s "
          f"| **{100 * w / e:.2f}%** of an epoch |")


def language_model(model, rounds, folder):
    V = 10000
    cfg = config("ptb", model)
    _, trainer = build(cfg, V)
    rng = np.random.default_rng(0)
    corpus = rng.integers(0, V, 200_000).astype(np.int32)
    meta = {"config": cfg, "metrics": {"epochs": []}, "best": None,
            "vocabulary": {"vocab": [f"w{i}" for i in range(V)]}}
    path = os.path.join(folder, "checkpoint.npz")
    iters, writes = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        trainer.fit(corpus[:-1], corpus[1:], max_epoch=1, batch_size=cfg["batch_size"],
                    time_size=cfg["time_size"], max_grad=cfg["max_grad"], max_iters=3)
        iters.append((time.perf_counter() - t0) / 3)
        writes += write_times(path, trainer, meta, 2)
    i, w = statistics.median(iters), statistics.median(writes)
    size = os.path.getsize(path)
    print(f"| PTB sizes, {type(trainer.model).__name__} | {size / 1e6:.1f} MB | {w * 1000:.0f} ms "
          f"| iteration {i * 1000:.0f} ms | one write = {w / i:.2f} iterations; "
          f"--checkpoint-every 100: **{100 * w / (100 * i):.2f}%** |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lm", action="store_true", help="also the language models at PTB sizes")
    args = p.parse_args()
    print(backend.describe())
    with tempfile.TemporaryDirectory() as folder:
        addition(args.rounds, folder)
        if args.lm:
            for model in ("rnnlm", "better"):
                language_model(model, args.rounds, folder)


if __name__ == "__main__":
    main()
