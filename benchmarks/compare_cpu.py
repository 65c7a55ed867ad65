"""Epoch times of the addition seq2seq models on this CPU, side by side in one run:
fastseq NumPy engine, fastseq Cython engine, PyTorch CPU (nn.LSTM, same model and sizes).

    python benchmarks/compare_cpu.py [--repeats 2] [--models seq2seq peeky] [--iters N]

Each (engine, model) runs in its own process (so peak memory is its own), the runs are
interleaved over the repeats and the fastest epoch of each is reported, with the GFLOP/s achieved
and its fraction of this machine's measured GEMM rate for exactly the products of one iteration.
Memory: "RSS MiB" is the rise of the process's peak resident set during the timed epoch (after a
warm-up); "arrays MiB" is the peak of NumPy array memory (tracemalloc) over 20 further iterations.

    python benchmarks/compare_cpu.py --interleaved 40 [--chunk 25]

runs the engines in one process instead, taking turns of --chunk iterations for 40 rounds, and
reports the median of the per-round time ratios: on a shared machine whose speed drifts by tens of
percent within a minute, turns seconds apart compare the engines under the same conditions.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BATCH, D, H, addition_data, gemm_shapes_per_iter, measure_gemm_rate,  # noqa: E402
                    peak_rss_reset, rss_kib, seq2seq_flops_per_iter, set_engine)


def fastseq_epoch(engine, model_name, iters):
    import fastseq
    if not set_engine(engine):
        return None
    data = addition_data()
    cls = fastseq.PeekySeq2seq if model_name == "peeky" else fastseq.Seq2seq
    model = cls(len(data.vocab), D, H, seed=0)
    trainer = fastseq.Trainer(model, fastseq.Adam(1e-3), seed=0, progress=False)
    x = data.x_train[:, ::-1].copy()
    n = iters * BATCH
    trainer.fit(x[:BATCH * 5], data.t_train[:BATCH * 5], 1, BATCH, 5.0)  # warm-up
    peak_rss_reset()
    base = rss_kib("VmRSS")
    t0 = time.perf_counter()
    trainer.fit(x[:n], data.t_train[:n], 1, BATCH, 5.0)
    seconds = time.perf_counter() - t0
    rss = rss_kib("VmHWM") - base
    # array memory (NumPy reports its buffers to tracemalloc), measured apart from the timing
    import tracemalloc
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    trainer.fit(x[:BATCH * 20], data.t_train[:BATCH * 20], 1, BATCH, 5.0)
    traced = (tracemalloc.get_traced_memory()[1] - base) / 1024
    tracemalloc.stop()
    return seconds, rss, trainer.epoch_losses[-2], traced


def make_torch_runner(model_name):
    """run(n_iters) -> mean loss: PyTorch training of the same model on the same batches (None
    without torch)."""
    try:
        import torch
    except ImportError:
        return None
    from torch import nn
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    data = addition_data()
    Vs = len(data.vocab)
    peeky = model_name == "peeky"

    class TorchSeq2seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_embed = nn.Embedding(Vs, D)
            self.enc = nn.LSTM(D, H, batch_first=True)
            self.dec_embed = nn.Embedding(Vs, D)
            self.dec = nn.LSTM(D + H if peeky else D, H, batch_first=True)
            self.out = nn.Linear(2 * H if peeky else H, Vs)

        def forward(self, xs, ts_in):
            _, (h, _) = self.enc(self.enc_embed(xs))
            e = self.dec_embed(ts_in)
            hh = h[0][:, None, :].expand(-1, e.shape[1], -1)
            if peeky:
                e = torch.cat([hh, e], dim=2)
            out, _ = self.dec(e, (h, torch.zeros_like(h)))
            if peeky:
                out = torch.cat([hh, out], dim=2)
            return self.out(out)

    model = TorchSeq2seq()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lossf = nn.CrossEntropyLoss()
    x = torch.from_numpy(data.x_train[:, ::-1].astype(np.int64).copy())
    t = torch.from_numpy(data.t_train.astype(np.int64))
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(x)))
    state = {"i": 0}

    def run(n_iters):
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

    return run


def make_fastseq_runner(engine, model_name):
    """run(n_iters) -> mean loss: fastseq training on the given engine (switched to before each
    call, so runners of several engines can alternate in one process); None if unavailable."""
    import fastseq
    from fastseq.trainer import train_step
    if not set_engine(engine):
        return None
    data = addition_data()
    cls = fastseq.PeekySeq2seq if model_name == "peeky" else fastseq.Seq2seq
    model = cls(len(data.vocab), D, H, seed=0)
    opt = fastseq.Adam(1e-3)
    params, grads = model.params, model.grads
    x = data.x_train[:, ::-1].copy()
    t = data.t_train
    perm = np.random.RandomState(0).permutation(len(x))
    state = {"i": 0}

    def run(n_iters):
        set_engine(engine)
        total = 0.0
        for _ in range(n_iters):
            i = state["i"] % (len(x) // BATCH)
            state["i"] += 1
            idx = perm[i * BATCH:(i + 1) * BATCH]
            total += train_step(model, opt, params, grads, x[idx], t[idx], 5.0)
        return total / n_iters

    return run


def torch_epoch(model_name, iters):
    run = make_torch_runner(model_name)
    if run is None:
        return None
    run(5)
    peak_rss_reset()
    base = rss_kib("VmRSS")
    t0 = time.perf_counter()
    loss = run(iters)
    return time.perf_counter() - t0, rss_kib("VmHWM") - base, loss, None


PAUSE = 0.1  # seconds between turns (GOMP's idle threads spin for a few ms, then sleep)


def interleaved(model_name, engines, rounds, chunk):
    """All engines in this one process, taking turns: each round runs `chunk` iterations on
    every engine, in an order that rotates from round to round, so slow and fast spells of a
    shared machine hit every engine alike. Returns {engine: [seconds per iteration, per round]}."""
    runners = {}
    for e in engines:
        run = make_torch_runner(model_name) if e == "torch" else make_fastseq_runner(e, model_name)
        if run is not None:
            run(5)  # warm-up
            runners[e] = run
    names = list(runners)
    times = {e: [] for e in names}
    for r in range(rounds):
        for e in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(PAUSE)  # let the previous engine's idle OpenMP/BLAS threads stop spinning
            t0 = time.perf_counter()
            runners[e](chunk)
            times[e].append((time.perf_counter() - t0) / chunk)
    return times


def report_interleaved(model_name, times, iters):
    print(f"{model_name}: interleaved in one process, {len(next(iter(times.values())))} rounds; "
          f"ms per iteration and the epoch it implies ({iters} iterations)")
    print(f"{'engine':8} {'median ms':>10} {'min ms':>8} {'epoch s':>8}")
    for e, v in times.items():
        v = np.array(v) * 1e3
        print(f"{e:8} {np.median(v):10.2f} {v.min():8.2f} {np.median(v) * iters / 1e3:8.2f}")
    if "cython" in times:
        c = np.array(times["cython"])
        for other in ("numpy", "torch"):
            if other in times:
                ratio = np.array(times[other]) / c  # per round: turns seconds apart
                q1, med, q3 = np.percentile(ratio, [25, 50, 75])
                print(f"cython vs {other}: median of per-round ratios {med:.2f}x "
                      f"(quartiles {q1:.2f}-{q3:.2f}x, min {ratio.min():.2f}x, max {ratio.max():.2f}x)")


def worker(engine, model_name, iters):
    res = torch_epoch(model_name, iters) if engine == "torch" else fastseq_epoch(engine, model_name, iters)
    print(json.dumps(None if res is None else {"seconds": res[0], "peak_kib": res[1], "loss": res[2],
                                              "traced_kib": res[3]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["seq2seq", "peeky"])
    ap.add_argument("--engines", nargs="+", default=["numpy", "cython", "torch"])
    ap.add_argument("--iters", type=int, default=45000 // BATCH, help="iterations (default: one epoch)")
    ap.add_argument("--interleaved", type=int, metavar="ROUNDS", default=0,
                    help="instead: all engines in one process taking turns, ROUNDS rounds of "
                         "--chunk iterations each; reports the per-round ratios")
    ap.add_argument("--chunk", type=int, default=25, help="iterations per turn (--interleaved)")
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, args.iters)
    if args.interleaved:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                    if l.startswith("model name")), "unknown CPU")
        print(f"machine: {cpu}, {os.cpu_count()} cores; numpy {np.__version__}; "
              f"batch {BATCH}, D={D}, H={H}; {args.chunk} iterations per turn")
        for model_name in args.models:
            report_interleaved(model_name, interleaved(model_name, args.engines, args.interleaved,
                                                       args.chunk), args.iters)
        return None

    results = {}
    for rep in range(args.repeats):
        for model_name in args.models:
            for engine in args.engines:
                out = subprocess.run([sys.executable, __file__, "--worker", engine, model_name,
                                      "--iters", str(args.iters)], capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if r is None:
                    continue
                key = (model_name, engine)
                best = results.get(key)
                if best is None or r["seconds"] < best["seconds"]:
                    results[key] = r
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               "unknown CPU")
    print(f"machine: {cpu}, {os.cpu_count()} cores; numpy {np.__version__}; "
          f"iterations per epoch: {args.iters} (batch {BATCH}, D={D}, H={H}); best of {args.repeats}")
    print(f"{'model':8} {'engine':7} {'epoch s':>8} {'GFLOP':>7} {'GFLOP/s':>8} {'of GEMM':>8} "
          f"{'RSS MiB':>8} {'arrays MiB':>10} {'vs numpy':>9} {'vs torch':>9}")
    for model_name in args.models:
        flops = seq2seq_flops_per_iter(model_name) * args.iters
        rate = measure_gemm_rate(gemm_shapes_per_iter(model_name))
        for engine in args.engines:
            r = results.get((model_name, engine))
            if r is None:
                print(f"{model_name:8} {engine:7} {'n/a':>8}")
                continue
            s = r["seconds"]
            gfs = flops / s / 1e9
            vs = {}
            for other in ("numpy", "torch"):
                o = results.get((model_name, other))
                vs[other] = f"{o['seconds'] / s:8.2f}x" if o else "      n/a"
            traced = "n/a" if r["traced_kib"] is None else f"{r['traced_kib'] / 1024:.2f}"
            print(f"{model_name:8} {engine:7} {s:8.2f} {flops / 1e9:7.1f} {gfs:8.1f} {gfs / rate:8.0%} "
                  f"{r['peak_kib'] / 1024:8.1f} {traced:>10} {vs['numpy']:>9} {vs['torch']:>9}")
        print(f"{model_name:8} GEMM ceiling: {rate:.1f} GFLOP/s for this iteration's products "
              f"(preallocated, hot), i.e. {flops / rate / 1e9:.2f} s per epoch")


if __name__ == "__main__":
    main()
