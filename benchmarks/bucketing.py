"""What bucketing by length saves on a pairs task: seconds per epoch of the pairs task's default
model (AttentionSeq2seq, D 64, H 256, batch 128) with three kinds of batches, on the same rows:

    plain      shuffled rows, every batch as wide as the data's longest row (Trainer)
    shuffled   shuffled rows, each batch cut to its longest row (BucketTrainer, bucket=False)
    bucketed   rows of similar lengths together, each batch cut to its longest row (BucketTrainer)

    python -m benchmarks.bucketing DATA.tsv --target-tokens space [--batches 64] [--rounds 2]

Each measurement runs in its own process, the kinds interleaved round by round; a measurement
trains ``--batches`` batches on a seeded random sample of that many batches' rows (one bucketing
chunk) and the epoch time is scaled from it to the whole training file.
"""
import argparse
import json
import subprocess
import sys
import time

KINDS = ("plain", "shuffled", "bucketed")


def measure(path, target_tokens, kind, batches, bs=128):
    import numpy as np

    from fastseq.datasets.pairs import load_pairs
    from fastseq.models import AttentionSeq2seq
    from fastseq.optim import Adam
    from fastseq.trainer import BucketTrainer, Trainer
    vocab, splits = load_pairs(path, target_tokens=target_tokens, valid_fraction=0.05, seed=1)
    x, t = splits["train"].x, splits["train"].t
    rows = np.random.RandomState(0).choice(len(x), batches * bs, replace=False)
    model = AttentionSeq2seq(len(vocab), 64, 256, seed=1, pad_id=vocab.pad_id)
    opt = Adam(1e-3)
    if kind == "plain":
        tr = Trainer(model, opt, seed=1, progress=False)
    else:
        tr = BucketTrainer(model, opt, vocab.pad_id, seed=1, progress=False,
                           bucket=kind == "bucketed")
    t0 = time.perf_counter()
    tr.fit(x[rows], t[rows], max_epoch=1, batch_size=bs, max_grad=5.0)
    seconds = time.perf_counter() - t0
    return {"kind": kind, "seconds": seconds, "batches": batches,
            "epoch_seconds": seconds * (len(x) // bs) / batches, "loss": tr.epoch_losses[-1]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--target-tokens", default="char", choices=["char", "space"])
    ap.add_argument("--batches", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(measure(a.data, a.target_tokens, a.worker, a.batches)))
        return 0
    results = {k: [] for k in KINDS}
    for r in range(a.rounds):
        for kind in KINDS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bucketing", a.data,
                                  "--target-tokens", a.target_tokens, "--batches", str(a.batches),
                                  "--worker", kind], capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            results[kind].append(m["epoch_seconds"])
            print(f"round {r + 1} {kind:9} {m['epoch_seconds']:8.1f} s/epoch (measured "
                  f"{m['seconds']:.1f} s over {m['batches']} batches, loss {m['loss']:.4f})",
                  flush=True)
    best = {k: min(v) for k, v in results.items()}
    for kind in KINDS:
        print(f"{kind:9} best {best[kind]:8.1f} s/epoch  plain/this {best['plain'] / best[kind]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
