"""Time Rnnlm training iterations: fastseq vs PyTorch (CPU), same model, batch layout, SGD and clip.

    python benchmarks/compare_rnnlm.py [--iters 30] [--warmup 5] [--data-dir ../shared/data/ptb]

One iteration = next truncated-BPTT batch (B=20, T=35, textbook layout), forward, backward,
gradient clipping (0.25) and SGD (lr 20) on Embedding(10000, 100) -> LSTM(100) -> Linear(100, 10000)
with softmax cross-entropy. The PyTorch model (nn.Embedding + nn.LSTM + nn.Linear) carries its LSTM
state across batches (detached), like fastseq's stateful TimeLSTM. PyTorch is optional
(``pip install torch``); it is never a dependency of fastseq. The rounds alternate between the
engines so that a busy machine slows them alike; the table shows the median ms/iteration.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED_PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"
V, D, H, B, T = 10000, 100, 100, 20, 35
LR, CLIP = 20.0, 0.25


def load_corpus(data_dir):
    if data_dir and Path(data_dir).exists():
        from fastseq.datasets import ptb
        corpus, w2i, _ = ptb.load_data("train", data_dir=data_dir)
        return corpus, f"PTB train ({len(corpus)} words)"
    rng = np.random.default_rng(0)
    return rng.integers(0, V, 200_000).astype(np.int32), "random ids (PTB not found)"


def batches(corpus, n):
    """The textbook layout, via RnnlmTrainer.get_batch (n consecutive batches)."""
    from fastseq import SGD, RnnlmTrainer
    tr = RnnlmTrainer(None, SGD(LR), progress=False)
    xs, ts = corpus[:-1], corpus[1:]
    return [tr.get_batch(xs, ts, B, T) for _ in range(n)]


class FastseqRunner:
    def __init__(self, kernel=None):
        from fastseq import SGD, Rnnlm, lstm
        from fastseq.functions import clip_grads
        self.kernel = kernel
        if kernel:
            lstm.set_kernel(kernel)
        self.name = f"fastseq ({lstm.kernel_name()} LSTM)"
        lstm.set_kernel(None)
        self.model = Rnnlm(V, D, H, seed=0)
        self.opt = SGD(LR)
        self.clip = clip_grads

    def step(self, bx, bt):
        from fastseq import lstm
        lstm.set_kernel(self.kernel)
        m = self.model
        loss = m.forward(bx, bt)
        m.backward()
        self.clip(m.grads, CLIP)
        self.opt.update(m.params, m.grads)
        lstm.set_kernel(None)
        return loss


class TorchRunner:
    def __init__(self):
        import torch
        from torch import nn
        self.torch = torch
        torch.manual_seed(0)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(V, D)
                self.lstm = nn.LSTM(D, H, batch_first=True)
                self.affine = nn.Linear(H, V)

            def forward(self, x, state):
                hs, state = self.lstm(self.embed(x), state)
                return self.affine(hs), state

        self.net = Net()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=LR)
        self.loss_fn = nn.CrossEntropyLoss()
        self.state = None
        self.name = f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)"

    def step(self, bx, bt):
        torch = self.torch
        x = torch.from_numpy(np.asarray(bx, dtype=np.int64))
        t = torch.from_numpy(np.asarray(bt, dtype=np.int64))
        if self.state is not None:
            self.state = tuple(s.detach() for s in self.state)
        scores, self.state = self.net(x, self.state)
        loss = self.loss_fn(scores.reshape(-1, V), t.reshape(-1))
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), CLIP)
        self.opt.step()
        return loss.item()


def time_runner(runner, data, start, n):
    times, losses = [], []
    for k in range(n):
        bx, bt = data[(start + k) % len(data)]
        t0 = time.perf_counter()
        losses.append(runner.step(bx, bt))
        times.append(time.perf_counter() - t0)
    return times, losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=30, help="timed iterations per engine (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternate the engines this many times, iters/rounds each (default 3)")
    p.add_argument("--data-dir", default=str(SHARED_PTB), help="PTB folder (default ../shared/data/ptb)")
    p.add_argument("--no-numpy-kernel", action="store_true",
                   help="skip the extra fastseq row with the NumPy LSTM kernel")
    args = p.parse_args(argv)

    corpus, source = load_corpus(args.data_dir)
    data = batches(corpus, args.warmup + args.iters)
    from fastseq import backend, lstm
    runners = [FastseqRunner()]
    if lstm.kernel_name() == "numpy" and not lstm.cython_available():
        # the Cython kernel may be built but not picked up by fastseq.lstm's import; load it
        # explicitly so that its row shows up (labelled) when it exists
        import importlib
        try:
            importlib.import_module("fastseq.lstm._cython")
        except ImportError:
            pass
        if lstm.cython_available():
            print("note: the Cython LSTM kernel is built but fastseq.lstm did not load it "
                  "automatically; it was imported explicitly for the 'cython' row")
            runners.append(FastseqRunner("cython"))
    elif not args.no_numpy_kernel and lstm.kernel_name() != "numpy":
        runners.append(FastseqRunner("numpy"))
    try:
        runners.append(TorchRunner())
    except ImportError:
        print("note: torch is not importable; PyTorch row skipped (pip install torch)")
    print(f"Rnnlm V={V} D={D} H={H}, batch {B} x time {T}, SGD lr {LR}, clip {CLIP}; data: {source}")
    print(f"{backend.describe()}; {os.cpu_count()} CPUs; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for r in runners:
        time_runner(r, data, 0, args.warmup)
    per_round = max(1, args.iters // args.rounds)
    times = {r.name: [] for r in runners}
    losses = {r.name: [] for r in runners}
    for rd in range(args.rounds):
        for r in runners:
            t, l = time_runner(r, data, args.warmup + rd * per_round, per_round)
            times[r.name] += t
            losses[r.name] += l
    ref = statistics.median(times[runners[-1].name]) if len(runners) > 1 else None
    print()
    print(f"{'engine':42s} {'median ms/iter':>15s} {'mean ms/iter':>13s} {'vs last row':>12s} "
          f"{'mean loss':>10s}")
    for r in runners:
        med = statistics.median(times[r.name]) * 1000
        mean = statistics.fmean(times[r.name]) * 1000
        ratio = f"{med / (ref * 1000):.2f}x" if ref else "-"
        print(f"{r.name:42s} {med:15.1f} {mean:13.1f} {ratio:>12s} "
              f"{statistics.fmean(losses[r.name]):10.3f}")
    print(f"({len(times[runners[0].name])} timed iterations each after {args.warmup} warm-up, "
          f"in {args.rounds} alternating rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
