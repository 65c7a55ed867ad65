"""Rnnlm or BetterRnnlm training iterations on this CPU, side by side: fastseq (default, one thread,
pure NumPy engine) and PyTorch CPU, the same model, batch layout, SGD and clipping.

    python -m benchmarks.compare_rnnlm [--model rnnlm|better] [--load N] [--rounds 10]
        [--turn 1.0] [--data-dir DIR] [--old-checkout PATH]

One iteration = the next truncated-BPTT batch (B=20, T=35, the textbook's layout), forward,
backward, gradient clipping (0.25) and SGD (lr 20) with softmax cross-entropy; the LSTM state is
carried across batches. --model rnnlm (the default): Embedding(10000, 100) -> LSTM(100) ->
Linear(100, 10000). --model better, the textbook's BetterRnnlm: Embedding(10000, 650) -> dropout
-> LSTM(650) -> dropout -> LSTM(650) -> dropout -> Linear(650, 10000) tied to the embedding,
dropout ratio 0.5 (in PyTorch: nn.LSTM(num_layers=2, dropout=0.5) between the dropouts). Setups
run in worker processes taking turns, as in benchmarks.compare_cpu; --load N adds N CPU-bound
processes. --old-checkout PATH: a built checkout of another commit, run as the setup 'old' in the
same turns.
"""
import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import (SETUPS, TEXTBOOK_DATA, checkouts_line, interleaved, machine_line,
                               ratio_line, setups_env, start_load, stop_load, worker_loop,
                               worker_setup)

V, D, H, B, T = 10000, 100, 100, 20, 35
LR, CLIP = 20.0, 0.25
BETTER_H, DROPOUT = 650, 0.5  # BetterRnnlm: wordvec = hidden = 650


def load_corpus(data_dir):
    if data_dir and Path(data_dir).exists():
        from fastseq.datasets import ptb
        corpus, _, _ = ptb.load_data("train", data_dir=data_dir)
        return np.asarray(corpus)
    return np.random.default_rng(0).integers(0, V, 200_000)


def batches(corpus):
    """The textbook's layout: B rows reading B evenly spaced stretches of the corpus."""
    offsets = np.arange(B) * ((len(corpus) - 1) // B)
    pos = 0
    while True:
        idx = (offsets[:, None] + pos + np.arange(T)) % (len(corpus) - 1)
        yield corpus[idx], corpus[idx + 1]
        pos += T


def make_fastseq_runner(corpus):
    from fastseq import SGD, Rnnlm, clip_grads
    model = Rnnlm(V, D, H, seed=0)
    opt = SGD(LR)
    data = batches(corpus)

    def run(n):
        for _ in range(n):
            x, t = next(data)
            model.forward(x, t)
            model.backward()
            clip_grads(model.grads, CLIP)
            opt.update(model.params, model.grads)

    return run


def make_fastseq_better_runner(corpus, hidden=BETTER_H):
    from fastseq import SGD, BetterRnnlm, clip_grads
    model = BetterRnnlm(V, hidden, hidden, DROPOUT, seed=0)
    opt = SGD(LR)
    data = batches(corpus)

    def run(n):
        for _ in range(n):
            x, t = next(data)
            model.forward(x, t, train_flg=True)
            model.backward()
            clip_grads(model.grads, CLIP)
            opt.update(model.params, model.grads)

    return run


def make_torch_better_runner(corpus, hidden=BETTER_H):
    """BetterRnnlm as PyTorch users write it: nn.Embedding, nn.Dropout, a two-layer nn.LSTM with
    dropout between the layers, and the output nn.Linear sharing the embedding's weight."""
    import torch
    from torch import nn
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, hidden)
            self.drop = nn.Dropout(DROPOUT)
            self.lstm = nn.LSTM(hidden, hidden, num_layers=2, dropout=DROPOUT, batch_first=True)
            self.affine = nn.Linear(hidden, V)
            self.affine.weight = self.embed.weight  # tied

        def forward(self, x, state):
            hs, state = self.lstm(self.drop(self.embed(x)), state)
            return self.affine(self.drop(hs)), state

    return _torch_training(torch, Net(), corpus)


def make_torch_runner(corpus):
    import torch
    from torch import nn
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

    return _torch_training(torch, Net(), corpus)


def _torch_training(torch, net, corpus):
    """run(n): n SGD iterations of net on the next truncated-BPTT batches, state carried over."""
    from torch import nn
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    data = batches(corpus)
    state = [None]

    def run(n):
        for _ in range(n):
            x, t = next(data)
            x, t = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(t.astype(np.int64))
            if state[0] is not None:
                state[0] = tuple(s.detach() for s in state[0])
            scores, state[0] = net(x, state[0])
            loss = loss_fn(scores.reshape(-1, V), t.reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), CLIP)
            opt.step()

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["rnnlm", "better"], default="rnnlm",
                    help="Rnnlm (H 100) or BetterRnnlm (2 x LSTM 650, dropout, tied weights)")
    ap.add_argument("--hidden", type=int, default=BETTER_H,
                    help="BetterRnnlm's wordvec and hidden size (--model better)")
    ap.add_argument("--load", type=int, default=0, help="competing CPU-bound processes")
    ap.add_argument("--setups", nargs="+", default=[s for s in SETUPS if s != "old"],
                    choices=list(SETUPS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--turn", type=float, default=1.0, help="seconds per turn")
    ap.add_argument("--data-dir", default=str(TEXTBOOK_DATA / "ptb"),
                    help="PTB folder (else random ids)")
    ap.add_argument("--old-checkout", default=None,
                    help="a built checkout run as the setup 'old' (added to --setups)")
    ap.add_argument("--worker", metavar="SETUP", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hidden < 1:
        ap.error("--hidden must be at least 1")
    if args.worker:
        worker_setup()
        corpus = load_corpus(args.data_dir)
        if args.model == "better":
            make = (make_torch_better_runner if args.worker == "torch"
                    else make_fastseq_better_runner)
            return worker_loop(make(corpus, args.hidden))
        make = make_torch_runner if args.worker == "torch" else make_fastseq_runner
        return worker_loop(make(corpus))
    env_of = setups_env(ap, args)
    print(machine_line())
    if args.old_checkout:
        print(checkouts_line(args.old_checkout))
    if args.model == "better":
        print(f"BetterRnnlm V={V} D=H={args.hidden}, 2 LSTM layers, dropout {DROPOUT}, "
              f"tied weights, batch {B} x time {T}, SGD lr {LR}, clip {CLIP}; "
              f"competing CPU-bound processes: {args.load}")
        worker_args = ["--data-dir", args.data_dir, "--model", "better",
                       "--hidden", str(args.hidden)]
    else:
        print(f"Rnnlm V={V} D={D} H={H}, batch {B} x time {T}, SGD lr {LR}, clip {CLIP}; "
              f"competing CPU-bound processes: {args.load}")
        worker_args = ["--data-dir", args.data_dir]
    load = start_load(args.load)
    try:
        times = interleaved("compare_rnnlm", worker_args, args.setups, args.rounds, args.turn,
                            env_of=env_of)
    finally:
        stop_load(load)
    print(f"\n{args.rounds} rounds of ~{args.turn:g} s per setup")
    print("| setup | median ms/iter |")
    print("|---|---|")
    for s, v in times.items():
        print(f"| {SETUPS[s][1]} | {np.median(v) * 1e3:.1f} |")
    for slow, fast, label in [("torch", "default", "PyTorch vs default (speed-up of fastseq)"),
                              ("torch", "old", "PyTorch vs --old-checkout (speed-up of the old fastseq)"),
                              ("old", "default", "--old-checkout vs default (speed-up of this checkout)"),
                              ("default", "one", "default vs one thread (time ratio)"),
                              ("torch", "numpy", "PyTorch vs NumPy engine")]:
        if slow in times and fast in times:
            print(ratio_line(times, slow, fast, label)[0])


if __name__ == "__main__":
    main()
