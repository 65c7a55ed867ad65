"""The attention seq2seq in PyTorch 2.13 CPU, trained with the recipe of attention_accuracy.py
(unmasked: pads are data and whole rows are reversed), for the accuracy side by side (DATA as
in benchmarks.attention_accuracy).

    python -m benchmarks.torch_attention_accuracy --data DATA/addition.txt \\
        --epochs 25 --hidden-size 128 --json runs/torch_attention_addition.json

Same network as fastseq's AttentionSeq2seq (benchmarks/common.torch_attention_seq2seq) with
PyTorch's own initialisation (fastseq's model has its init="unit"); batch 128, Adam 0.001,
gradient clip 5.0, a new shuffle each epoch; greedy exact-match accuracy on the test split after
each epoch.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import torch_attention_seq2seq
from fastseq.datasets.sequence import load_dataset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--wordvec-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the per-epoch metrics here")
    args = ap.parse_args(argv)
    import torch
    from torch import nn
    torch.manual_seed(args.seed)
    data = load_dataset(args.data)
    V = len(data.vocab)

    def ids(a):
        return torch.from_numpy(np.ascontiguousarray(a).astype(np.int64))

    x, t = ids(data.x_train[:, ::-1]), ids(data.t_train)
    x_test, t_test = ids(data.x_test[:, ::-1]), ids(data.t_test)
    model = torch_attention_seq2seq(torch, V, args.wordvec_size, args.hidden_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.RandomState(args.seed)
    epochs = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.from_numpy(rng.permutation(len(x)))
        total, n = 0.0, len(x) // args.batch_size
        for i in range(n):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            score = model(x[idx], t[idx, :-1])
            loss = loss_fn(score.reshape(-1, V), t[idx, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += loss.item()
        guess = model.generate(x_test, t_test[:, :1], t_test.shape[1] - 1)
        acc = float((guess == t_test[:, 1:]).all(dim=1).float().mean())
        epochs.append({"epoch": epoch, "loss": round(total / n, 6), "test_accuracy": acc,
                       "seconds": round(time.perf_counter() - t0, 2)})
        print(f"epoch {epoch:2d} | loss {total / n:.4f} | greedy test accuracy {acc * 100:7.3f}%",
              flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"config": vars(args), "torch": torch.__version__,
                                                   "epochs": epochs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
