"""Accuracy runs of AttentionSeq2seq (the textbook's chapter 8 setup) with greedy and beam decoding.

    python -m benchmarks.attention_accuracy --data DATA/date.txt --epochs 10 \\
        --hidden-size 256 --out runs/attention_date
    python -m benchmarks.attention_accuracy --data DATA/addition.txt --epochs 25 \\
        --hidden-size 128 --out runs/attention_addition
    python -m benchmarks.attention_accuracy --data DATA/date.txt --no-mask ...

DATA: the textbook's dataset/ folder (github.com/oreilly-japan/deep-learning-from-scratch-2);
a bare date.txt or addition.txt is fastseq's generated set of that name.

Reversed input, wordvec 16, batch 128, Adam 0.001, gradient clip 5.0, seed 1984. With masking (the
default) the data set's pad id is declared to the model and only the true characters of each
question are reversed; --no-mask feeds the padded rows reversed whole, as the textbook does.
Writes metrics.json (per epoch: loss, greedy test accuracy, seconds) and model.npz to --out; then
evaluates the final model with greedy decoding and beam search (--beam widths).
"""
import argparse
import json
import os
import time

import numpy as np

from fastseq import backend
from fastseq.datasets.sequence import load_dataset, pad_id, reverse_padded
from fastseq.models.attention import AttentionSeq2seq
from fastseq.optim import Adam
from fastseq.trainer import Trainer, eval_seq2seq


def exact_match(guesses, answers):
    return float((np.asarray(guesses) == answers).all(axis=1).mean())


def write_attention_png(model, data, x_test, pad, path, n=4):
    """Attention maps of the first n test questions, columns in the questions' written order."""
    from fastseq.datasets.sequence import reverse_padded, true_lengths
    from fastseq.plot import plot_attention_maps
    xs, v = x_test[:n], data.vocab
    out, w = model.attention_map(xs, data.t_test[:n, 0], data.t_test.shape[1] - 1)
    maps = []
    for q, a, wq in zip(xs, out, w):
        T = len(q)
        L = T if pad is None else int(true_lengths(q[None], pad)[0])
        cols = np.arange(T)
        cols = np.where(cols < L, L - 1 - cols, cols)  # fed position of each written character
        maps.append((wq[:, cols], v.decode(reverse_padded(q[None], pad)[0]), v.decode(a)))
    return plot_attention_maps(maps, path)


def load_weights(model, path):
    """model.load_params, or (a file this script wrote with an earlier fastseq, whose format
    load_params no longer reads) the arrays by name from our own trusted file."""
    from fastseq.files import FastseqFileError
    try:
        model.load_params(path)
    except FastseqFileError:
        with np.load(path, allow_pickle=False) as f:
            for i, p in enumerate(model.params):
                p[...] = f[f"p{i:03d}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--wordvec-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1984)
    ap.add_argument("--no-mask", action="store_true", help="textbook padding: no pad id, whole-row reversal")
    ap.add_argument("--beam", type=int, nargs="*", default=[5], help="beam widths for the final evaluation")
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-only", action="store_true", help="load --out/model.npz and only evaluate")
    args = ap.parse_args()

    data = load_dataset(args.data)
    pad = None if args.no_mask else pad_id(data.vocab)
    x_train, x_test = reverse_padded(data.x_train, pad), reverse_padded(data.x_test, pad)
    model = AttentionSeq2seq(len(data.vocab), args.wordvec_size, args.hidden_size, seed=args.seed,
                             pad_id=pad)
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.json")
    metrics = {"config": vars(args), "engine": backend.info(), "epochs": []}
    if args.eval_only:
        load_weights(model, os.path.join(args.out, "model.npz"))
        with open(metrics_path) as f:
            metrics = json.load(f)
    else:
        trainer = Trainer(model, Adam(1e-3), seed=args.seed, progress=False)
        for epoch in range(1, args.epochs + 1):
            t0 = time.perf_counter()
            trainer.fit(x_train, data.t_train, max_epoch=1, batch_size=args.batch_size, max_grad=5.0)
            t1 = time.perf_counter()
            acc = eval_seq2seq(model, x_test, data.t_test)
            t2 = time.perf_counter()
            metrics["epochs"].append({"epoch": epoch, "loss": round(trainer.epoch_losses[-1], 6),
                                      "test_accuracy": acc, "train_seconds": round(t1 - t0, 2),
                                      "eval_seconds": round(t2 - t1, 2)})
            print(f"epoch {epoch:2d} | loss {trainer.epoch_losses[-1]:.4f} | greedy test accuracy "
                  f"{acc * 100:7.3f}% | train {t1 - t0:.1f}s eval {t2 - t1:.1f}s", flush=True)
            with open(metrics_path, "w") as f:
                json.dump(metrics, f, indent=2)
            model.save_params(os.path.join(args.out, "model.npz"), meta={"pad_id": pad})
    from fastseq.decoding import beam_search, greedy_search
    start, answers, width = data.t_test[:, 0], data.t_test[:, 1:], data.t_test.shape[1] - 1
    final = {}
    t0 = time.perf_counter()
    final["greedy"] = exact_match(greedy_search(model, x_test, start, width), answers)
    final["greedy_seconds"] = round(time.perf_counter() - t0, 2)
    for k in args.beam:
        t0 = time.perf_counter()
        final[f"beam{k}"] = exact_match(beam_search(model, x_test, start, width, k), answers)
        final[f"beam{k}_seconds"] = round(time.perf_counter() - t0, 2)
    metrics["final"] = final
    write_attention_png(model, data, x_test, pad, os.path.join(args.out, "attention.png"))
    print("final test accuracy: " + ", ".join(f"{k} {v * 100:.3f}%" for k, v in final.items()
                                               if not k.endswith("seconds")))
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=2)


if __name__ == "__main__":
    main()
