"""python -m fastseq.train: train a model and write metrics.json, a curve PNG and model.npz.

    python -m fastseq.train                      # PeekySeq2seq + reversed input on generated addition
    python -m fastseq.train --model seq2seq --no-reverse --data ../shared/data/addition.txt
    GPU=1 python -m fastseq.train                # same run on CuPy
    python -m fastseq.train --task ptb --model rnnlm --data-dir ../shared/data/ptb
    python -m fastseq.train --task ptb --model better          # BetterRnnlm, 40 epochs
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from . import backend


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m fastseq.train",
        description="Train a fastseq model. Default: PeekySeq2seq with reversed input on the "
                    "addition task (data generated, no download), 25 epochs.")
    p.add_argument("--task", choices=TASKS, default="addition",
                   help="addition: seq2seq on 'a+b' -> sum (default); ptb: language model on "
                        "the Penn Treebank")
    p.add_argument("--model", default=None,
                   help="addition: seq2seq | peeky (default peeky); ptb: rnnlm | better "
                        "(default rnnlm)")
    p.add_argument("--reverse", dest="reverse", action="store_true", default=True,
                   help="feed each question reversed (default; improves seq2seq accuracy)")
    p.add_argument("--no-reverse", dest="reverse", action="store_false",
                   help="feed questions in their written order")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (addition: 25; ptb: rnnlm 4, better 40)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="mini-batch size (addition: 128; ptb: 20)")
    p.add_argument("--hidden-size", type=int, default=None,
                   help="LSTM hidden size H (addition: 128; ptb: rnnlm 100, better 650)")
    p.add_argument("--wordvec-size", type=int, default=None,
                   help="embedding size D (addition: 16; ptb: rnnlm 100, better 650)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (addition: Adam 1e-3; ptb: SGD 20, divided by 4 whenever "
                        "the validation perplexity gets worse)")
    p.add_argument("--max-grad", type=float, default=None,
                   help="clip gradients to this global norm (addition: 5.0; ptb: 0.25)")
    p.add_argument("--time-size", type=int, default=None,
                   help="ptb: truncated-BPTT length T (default 35)")
    p.add_argument("--dropout", type=float, default=None,
                   help="ptb --model better: dropout ratio (default 0.5)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="ptb: folder holding ptb.{train,valid,test}.txt (default: the download "
                        "cache of fastseq.datasets.ptb)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="ptb: cap the iterations per epoch (quick runs)")
    p.add_argument("--eval-max-iters", type=int, default=None,
                   help="ptb: cap the iterations of each perplexity evaluation (quick runs)")
    p.add_argument("--seed", type=int, default=1984,
                   help="seed for weights, shuffling and generated data (default 1984)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="data file in the textbook's format (default: generated addition data)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder for metrics.json, the curve PNG and model.npz "
                        "(default runs/<timestamp>)")
    p.add_argument("--engine", choices=["auto", "numpy", "cython", "cupy"], default="auto",
                   help="compute engine: auto (GPU=1 -> cupy, else cython when built, else numpy)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def select_engine(name):
    from . import lstm
    if name == "cupy":
        backend.use("cupy")
    elif name in ("numpy", "cython"):
        if backend.requested_gpu():
            raise backend.BackendError(f"--engine {name} contradicts GPU=1 in the environment")
        lstm.set_kernel(name)
    else:
        backend.require_requested_engine()
    backend.info()  # raises BackendError if FASTSEQ_KERNEL names an unbuilt kernel


def write_json(path, obj):
    from .io import atomic_write
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def run_addition(args, out):
    from .datasets.sequence import load_dataset
    from .models import PeekySeq2seq, Seq2seq
    from .optim import Adam
    from .plot import have_matplotlib, plot_curves
    from .trainer import Trainer, eval_seq2seq

    model_name = args.model or "peeky"
    if model_name not in ("seq2seq", "peeky"):
        raise SystemExit(f"error: --model {model_name!r} is not a seq2seq model; use seq2seq or peeky")
    cfg = dict(task="addition", model=model_name, reverse=args.reverse,
               epochs=args.epochs or 25, batch_size=args.batch_size or 128,
               hidden_size=args.hidden_size or 128, wordvec_size=args.wordvec_size or 16,
               lr=args.lr or 1e-3, max_grad=5.0 if args.max_grad is None else args.max_grad,
               seed=args.seed, data=args.data or "generated addition.txt")
    data = load_dataset(args.data or "addition.txt")
    vocab = data.vocab
    x_train, x_test = data.x_train, data.x_test
    if args.reverse:
        x_train, x_test = x_train[:, ::-1].copy(), x_test[:, ::-1].copy()
    cls = PeekySeq2seq if model_name == "peeky" else Seq2seq
    model = cls(len(vocab), cfg["wordvec_size"], cfg["hidden_size"], seed=args.seed)
    trainer = Trainer(model, Adam(cfg["lr"]), seed=args.seed, progress=not args.no_progress)
    print(f"{cls.__name__} on {data.source}: {len(x_train)} train / {len(x_test)} test questions, "
          f"vocabulary {len(vocab)}, reverse={args.reverse}")
    print(backend.describe(), flush=True)
    metrics = {"config": cfg, "engine": backend.info(), "epochs": []}
    show = np.random.RandomState(args.seed).choice(len(x_test), 3, replace=False)
    for epoch in range(1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        trainer.fit(x_train, data.t_train, max_epoch=1, batch_size=cfg["batch_size"],
                    max_grad=cfg["max_grad"])
        t1 = time.perf_counter()
        acc = eval_seq2seq(model, x_test, data.t_test)
        t2 = time.perf_counter()
        metrics["epochs"].append({"epoch": epoch, "train_seconds": round(t1 - t0, 4),
                                  "eval_seconds": round(t2 - t1, 4),
                                  "loss": round(trainer.epoch_losses[-1], 6),
                                  "test_accuracy": acc})
        print(f"epoch {epoch:3d} | loss {trainer.epoch_losses[-1]:.4f} | test accuracy "
              f"{acc * 100:6.2f}% | train {t1 - t0:.2f}s eval {t2 - t1:.2f}s", flush=True)
        guesses = model.generate(x_test[show], data.t_test[show, 0], data.t_test.shape[1] - 1)
        for q, t, g in zip(x_test[show], data.t_test[show], guesses):
            q = q[::-1] if args.reverse else q
            ok = "ok " if (g == t[1:]).all() else "bad"
            print(f"    {ok} {vocab.decode(q)!r:12} truth {vocab.decode(t[1:])!r:8} "
                  f"guess {vocab.decode(g)!r}")
        write_json(os.path.join(out, "metrics.json"), metrics)
    model.save_params(os.path.join(out, "model.npz"),
                      meta={"chars": [vocab.id_to_char[i] for i in range(len(vocab))],
                            "question_width": vocab.question_width,
                            "answer_width": vocab.answer_width, "reverse": args.reverse})
    png = plot_curves({cls.__name__ + (" + reverse" if args.reverse else ""):
                       [e["test_accuracy"] * 100 for e in metrics["epochs"]]},
                      "epoch", "test accuracy (%)", os.path.join(out, "accuracy.png"),
                      ylim=(0, 100))
    if png is None and not have_matplotlib():
        print("note: matplotlib is not installed, so accuracy.png was not drawn "
              "(pip install 'fastseq[plot]')")
    print(f"wrote {out}/metrics.json, model.npz" + (", accuracy.png" if png else ""))
    return metrics


def run_ptb(args, out):
    from . import trainer as trainer_mod
    from .datasets import ptb
    from .models import BetterRnnlm, Rnnlm
    from .optim import SGD
    from .plot import have_matplotlib, plot_curves

    model_name = args.model or "rnnlm"
    if model_name not in ("rnnlm", "better"):
        raise ValueError(f"--model {model_name!r} is not a language model; use rnnlm or better")
    better = model_name == "better"
    size = 650 if better else 100
    cfg = dict(task="ptb", model=model_name,
               epochs=args.epochs or (40 if better else 4),
               batch_size=args.batch_size or 20, time_size=args.time_size or 35,
               hidden_size=args.hidden_size or size, wordvec_size=args.wordvec_size or size,
               lr=args.lr or 20.0, max_grad=0.25 if args.max_grad is None else args.max_grad,
               seed=args.seed, data_dir=args.data_dir, max_iters=args.max_iters,
               eval_max_iters=args.eval_max_iters, eval_batch_size=10)
    if better:
        cfg["dropout"] = 0.5 if args.dropout is None else args.dropout
    for k in ("epochs", "batch_size", "time_size", "hidden_size", "wordvec_size"):
        if cfg[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    if args.max_iters is not None and args.max_iters < 1:
        raise ValueError(f"--max-iters must be >= 1, got {args.max_iters}")

    corpus, word_to_id, id_to_word = ptb.load_data("train", data_dir=args.data_dir)
    corpus_val, _, _ = ptb.load_data("val", data_dir=args.data_dir)
    corpus_test, _, _ = ptb.load_data("test", data_dir=args.data_dir)
    V = len(word_to_id)
    vocab = [id_to_word[i] for i in range(V)]
    if better:
        model = BetterRnnlm(V, cfg["wordvec_size"], cfg["hidden_size"], cfg["dropout"],
                            seed=args.seed)
    else:
        model = Rnnlm(V, cfg["wordvec_size"], cfg["hidden_size"], seed=args.seed)
    optimizer = SGD(cfg["lr"])
    trainer = trainer_mod.RnnlmTrainer(model, optimizer, progress=not args.no_progress)
    xs, ts = corpus[:-1], corpus[1:]
    iters = len(xs) // (cfg["batch_size"] * cfg["time_size"])
    if args.max_iters:
        iters = min(iters, args.max_iters)
    print(f"{type(model).__name__} on PTB: {len(corpus)} train / {len(corpus_val)} val / "
          f"{len(corpus_test)} test words, vocabulary {V}, {iters} iterations per epoch")
    print(backend.describe(), flush=True)

    def evaluate(c, desc):
        return trainer_mod.eval_perplexity(model, c, batch_size=cfg["eval_batch_size"],
                                           time_size=cfg["time_size"],
                                           max_iters=args.eval_max_iters,
                                           progress_bar=not args.no_progress)

    model_path = os.path.join(out, "model.npz")
    metrics = {"config": cfg, "engine": backend.info(), "epochs": []}
    best = None
    lr = cfg["lr"]
    for epoch in range(1, cfg["epochs"] + 1):
        optimizer.lr = lr
        t0 = time.perf_counter()
        trainer.fit(xs, ts, max_epoch=1, batch_size=cfg["batch_size"], time_size=cfg["time_size"],
                    max_grad=cfg["max_grad"], max_iters=args.max_iters)
        t1 = time.perf_counter()
        ppl = float(evaluate(corpus_val, "val"))
        t2 = time.perf_counter()
        loss = float(trainer.epoch_losses[-1])
        metrics["epochs"].append({"epoch": epoch, "train_seconds": round(t1 - t0, 4),
                                  "eval_seconds": round(t2 - t1, 4), "loss": round(loss, 6),
                                  "train_perplexity": round(float(np.exp(loss)), 4),
                                  "val_perplexity": round(ppl, 4), "lr": lr})
        note = ""
        if best is None or ppl < best:
            best = ppl
            model.save_params(model_path, meta={"task": "ptb", "vocab_source": "ptb",
                                                "vocab": vocab, "epoch": epoch,
                                                "val_perplexity": ppl})
            note = " (best, saved)"
        else:
            lr /= 4.0
            note = f" (worse: lr -> {lr:g})"
        print(f"epoch {epoch:3d} | loss {loss:.4f} | train perplexity {np.exp(loss):9.2f} | "
              f"val perplexity {ppl:9.2f} | lr {metrics['epochs'][-1]['lr']:g} | "
              f"train {t1 - t0:.1f}s eval {t2 - t1:.1f}s{note}", flush=True)
        write_json(os.path.join(out, "metrics.json"), metrics)

    model.load_params(model_path)  # the best epoch's weights
    model.reset_state()
    t0 = time.perf_counter()
    test_ppl = float(evaluate(corpus_test, "test"))
    metrics["test_perplexity"] = round(test_ppl, 4)
    write_json(os.path.join(out, "metrics.json"), metrics)
    print(f"test perplexity {test_ppl:.2f} (best model, val perplexity {best:.2f}; "
          f"eval {time.perf_counter() - t0:.1f}s)")
    png = plot_curves({"train": [e["train_perplexity"] for e in metrics["epochs"]],
                       "validation": [e["val_perplexity"] for e in metrics["epochs"]]},
                      "epoch", "perplexity", os.path.join(out, "perplexity.png"),
                      title=f"{type(model).__name__} on PTB (test {test_ppl:.1f})")
    if png is None and not have_matplotlib():
        print("note: matplotlib is not installed, so perplexity.png was not drawn "
              "(pip install 'fastseq[plot]')")
    print(f"wrote {out}/metrics.json, model.npz" + (", perplexity.png" if png else ""))
    return metrics


TASKS = {"addition": run_addition, "ptb": run_ptb}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        select_engine(args.engine)
    except backend.BackendError as e:
        print(f"fastseq: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    try:
        TASKS[args.task](args, out)
    except (OSError, ValueError) as e:  # incl. missing files, checksum and download errors
        print(f"fastseq: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
