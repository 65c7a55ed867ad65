"""What checkpointing costs next to training, measured side by side in one process.

    python -m benchmarks.checkpoint_cost [--rounds 3] [--lm]

The training CLI saves checkpoint.npz and model.npz after every epoch: it copies the state
(the snapshot, which training waits for) and a writer thread writes the files (checksum, zip,
fsync, rename) while the next epoch runs. Training therefore pays the snapshot plus, at most,
the CPU time of the writes (the fsync's wait for the disk costs no CPU). Addition, the CLI's
default run (PeekySeq2seq, D=16, H=128, batch 128, Adam, 351 iterations per epoch): each round
times one epoch, then five epoch-end saves; cost = (snapshot + write CPU) / epoch, medians.
With --lm, one checkpoint of a language model at PTB sizes (V=10,000; Rnnlm D=H=100 and
BetterRnnlm D=H=650, batch 20, T=35, SGD) against one iteration: the cost of --checkpoint-every
N is that over N iterations.
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from fastseq import backend, checkpoint
from fastseq.train import TASKS, build


def config(task, model, **over):
    from fastseq.models import REGISTRY
    cfg = {k: v for k, v in TASKS[task].items() if k not in ("family", "model")}
    cfg.update(REGISTRY[model].defaults, task=task, family=TASKS[task]["family"], model=model,
               seed=1984, progress=False, checkpoint_every=None, **over)
    return cfg


def save_costs(folder, trainer, meta, n, with_model=True):
    """[(snapshot wall, write wall, write CPU)] of n saves: checkpoint.npz, and model.npz as at
    the end of an epoch."""
    from fastseq.files import write_npz
    from fastseq.checkpoint import host_copy
    model, out = trainer.model, []
    for _ in range(n):
        t0 = time.perf_counter()
        files = [(os.path.join(folder, "checkpoint.npz"), *checkpoint.snapshot(trainer, meta))]
        if with_model:
            files.append((os.path.join(folder, "model.npz"),
                          {k: host_copy(p) for k, p in zip(model.param_names, model.params)},
                          {"model": type(model).__name__, "config": model.config()}))
        t1, c1 = time.perf_counter(), time.process_time()
        for f in files:
            write_npz(*f)
        out.append((t1 - t0, time.perf_counter() - t1, time.process_time() - c1))
    return out


def addition(rounds, folder):
    from fastseq.datasets.sequence import load_dataset
    data = load_dataset("addition.txt")
    x, t = data.x_train[:, ::-1].copy(), data.t_train
    cfg = config("addition", "peeky")
    _, trainer = build(cfg, len(data.vocab))
    vocab = {"chars": [data.vocab.id_to_char[i] for i in range(len(data.vocab))]}
    meta = {"config": cfg, "metrics": {"epochs": []}, "best": None, "vocabulary": vocab}
    epochs, saves = [], []
    for r in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.fit(x, t, max_epoch=1, batch_size=cfg["batch_size"], max_grad=cfg["max_grad"])
        epochs.append(time.perf_counter() - t0)
        cpu = time.process_time() - c0
        saves += save_costs(folder, trainer, meta, 5)
        print(f"  round {r + 1}: epoch {epochs[-1]:.2f} s ({cpu:.2f} s CPU, "
              f"all threads); saves (snapshot, write, write CPU) "
              + ", ".join(f"({a * 1e3:.1f}, {b * 1e3:.1f}, {c * 1e3:.1f})"
                          for a, b, c in saves[-5:]) + " ms", flush=True)
    e = statistics.median(epochs)
    snap, wall, cpu = (statistics.median(v) for v in zip(*saves))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in ("checkpoint.npz", "model.npz"))
    print(f"| addition, PeekySeq2seq | {size / 1e6:.2f} MB | {snap * 1e3:.1f} ms | "
          f"{wall * 1e3:.1f} ms | {cpu * 1e3:.1f} ms | {e:.2f} s | "
          f"**{100 * (snap + cpu) / e:.2f}%** |")


def language_model(model, rounds, folder):
    V = 10000
    cfg = config("ptb", model)
    _, trainer = build(cfg, V)
    rng = np.random.default_rng(0)
    corpus = rng.integers(0, V, 200_000).astype(np.int32)
    meta = {"config": cfg, "metrics": {"epochs": []}, "best": None,
            "vocabulary": {"vocab": [f"w{i}" for i in range(V)]}}
    iters, saves = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        trainer.fit(corpus[:-1], corpus[1:], max_epoch=1, batch_size=cfg["batch_size"],
                    time_size=cfg["time_size"], max_grad=cfg["max_grad"], max_iters=3)
        iters.append((time.perf_counter() - t0) / 3)
        saves += save_costs(folder, trainer, meta, 2, with_model=False)
    i = statistics.median(iters)
    snap, wall, cpu = (statistics.median(v) for v in zip(*saves))
    print(f"| PTB sizes, {type(trainer.model).__name__} | snapshot {snap * 1e3:.0f} ms, write "
          f"{wall * 1e3:.0f} ms ({cpu * 1e3:.0f} ms CPU) | iteration {i * 1e3:.0f} ms | "
          f"--checkpoint-every 100: **{100 * (snap + cpu) / (100 * i):.2f}%** |")


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
