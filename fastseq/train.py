"""python -m fastseq.train: train a model; write metrics.json, a curve PNG, model.npz and, after
every epoch (and every --checkpoint-every iterations), checkpoint.npz.

    python -m fastseq.train                      # PeekySeq2seq, reversed input, generated addition
    python -m fastseq.train --model seq2seq --no-reverse --data ../shared/data/addition.txt
    GPU=1 python -m fastseq.train                # same run on CuPy
    python -m fastseq.train --task date --data ../shared/data/date.txt --beam 5   # AttentionSeq2seq
    python -m fastseq.train --task ptb --model rnnlm --data-dir ../shared/data/ptb
    python -m fastseq.train --task ptb --model better          # BetterRnnlm, 40 epochs
    python -m fastseq.train --task text --data my.txt          # a language model on any text
    python -m fastseq.train --resume runs/20260101-120000      # continue a stopped or killed run

Models, their task family and their defaults come from fastseq.models.REGISTRY; the tasks'
defaults from TASKS below (a model's defaults override its task's, a flag overrides both).
Ctrl-C (or SIGTERM) stops at the end of the current iteration and saves; a second one stops at once.
"""
import argparse
import inspect
import json
import math
import os
import signal
import sys
import time

import numpy as np

from . import backend

# Per-task defaults. A key here (or in the model's registry defaults) is a setting the task uses;
# its flag is refused on tasks that lack it. None means "not set" (e.g. no cap on iterations).
TASKS = {
    "addition": {"family": "seq2seq", "model": "peeky", "data": "addition.txt", "reverse": True,
                 "epochs": 25, "batch_size": 128, "optimizer": "adam", "lr": 1e-3,
                 "max_grad": 5.0, "beam": None, "mask": True},
    "date": {"family": "seq2seq", "model": "attention", "data": "date.txt", "reverse": True,
             "epochs": 10, "batch_size": 128, "optimizer": "adam", "lr": 1e-3, "max_grad": 5.0,
             "beam": None, "mask": False},
    "ptb": {"family": "lm", "model": "rnnlm", "data_dir": None, "epochs": 4, "batch_size": 20,
            "time_size": 35, "optimizer": "sgd", "lr": 20.0, "max_grad": 0.25, "max_iters": None,
            "eval_max_iters": None},
    "text": {"family": "lm", "model": "rnnlm", "data": None, "epochs": 4, "batch_size": 20,
             "time_size": 35, "optimizer": "sgd", "lr": 20.0, "max_grad": 0.25, "max_iters": None,
             "eval_max_iters": None},
}
TASK_HELP = {"addition": "seq2seq on 'a+b' -> sum (default; data generated, no download)",
             "date": "seq2seq on dates written many ways -> YYYY-MM-DD (data generated, no "
                     "download; the textbook's date.txt with --data)",
             "ptb": "language model on the Penn Treebank (downloaded, checksummed, cached)",
             "text": "language model on any text file given with --data (last 10%% of the lines: "
                     "5%% validation, 5%% test)"}
EVAL_BATCH_SIZE = 10  # rows of each perplexity evaluation batch


class UsageError(Exception):
    """A user error found after parsing: one `fastseq:` line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# flags

def _int_at_least(lo):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def _float_range(lo, hi=math.inf, lo_open=True, hi_open=True):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi \
                or (hi_open and v == hi):
            raise argparse.ArgumentTypeError(
                f"must be a finite number in {'(' if lo_open else '['}{lo:g}, "
                f"{hi:g}{')' if hi_open else ']'}, got {s}")
        return v
    parse.__name__ = "number"
    return parse


positive_int, positive_float = _int_at_least(1), _float_range(0)
probability_lt1 = _float_range(0, 1, lo_open=False, hi_open=True)

# flag -> (key, parser, help); the defaults in each help line come from TASKS and REGISTRY
SETTINGS = {
    "--epochs": ("epochs", positive_int, "training epochs"),
    "--batch-size": ("batch_size", positive_int, "mini-batch size"),
    "--hidden-size": ("hidden_size", positive_int, "LSTM hidden size H"),
    "--wordvec-size": ("wordvec_size", positive_int, "embedding size D"),
    "--lr": ("lr", positive_float, "learning rate (ptb/text: SGD, divided by 4 whenever the "
                                    "validation perplexity gets worse; seq2seq: Adam)"),
    "--max-grad": ("max_grad", positive_float, "clip gradients to this global norm"),
    "--beam": ("beam", positive_int, "seq2seq: also evaluate with beam search of width K "
                                     "(greedy decoding is always reported)"),
    "--time-size": ("time_size", positive_int, "truncated-BPTT length T"),
    "--dropout": ("dropout_ratio", probability_lt1, "dropout ratio in [0, 1)"),
    "--max-iters": ("max_iters", positive_int, "cap the iterations per epoch (quick runs)"),
    "--eval-max-iters": ("eval_max_iters", positive_int,
                         "cap the iterations of each perplexity evaluation (quick runs)"),
    "--data": ("data", str, "data file (seq2seq: the textbook's question_answer lines; text: "
                            "any UTF-8 text)"),
    "--data-dir": ("data_dir", str, "folder holding ptb.{train,valid,test}.txt (read offline; "
                                    "default: the download cache)"),
}


def _defaults_text(key):
    from .models import REGISTRY
    where = [f"{t}: {d[key]}" for t, d in TASKS.items() if d.get(key) is not None]
    where += [f"--model {n}: {e.defaults[key]}" for n, e in REGISTRY.items() if key in e.defaults]
    used = [t for t, d in TASKS.items() if key in d] + \
           [f"--model {n}" for n, e in REGISTRY.items() if key in e.defaults]
    if where:
        return "; ".join(where)
    return "for " + ", ".join(used)


def build_parser():
    from .models import REGISTRY
    p = argparse.ArgumentParser(
        prog="python -m fastseq.train",
        description="Train a fastseq model. Default: PeekySeq2seq with reversed input on the "
                    "addition task (data generated, no download), 25 epochs. Exit status: 0 done, "
                    "2 bad arguments or data, 1 training diverged, 130/143 stopped by "
                    "SIGINT/SIGTERM (checkpoint saved; continue with --resume).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="models (--model):\n" + "\n".join(
            f"  {n:10} {e.task:8} {e.help}" for n, e in sorted(REGISTRY.items())))
    p.add_argument("--task", choices=list(TASKS), default=None,
                   help="; ".join(f"{t}: {h}" for t, h in TASK_HELP.items()))
    p.add_argument("--model", choices=sorted(REGISTRY), default=None,
                   help="model from the registry (default: " +
                        ", ".join(f"{t}: {d['model']}" for t, d in TASKS.items()) + ")")
    p.add_argument("--reverse", dest="reverse", action="store_const", const=True, default=None,
                   help="seq2seq: feed each question reversed (addition default)")
    p.add_argument("--no-reverse", dest="reverse", action="store_const", const=False,
                   help="seq2seq: feed questions in their written order")
    p.add_argument("--mask", dest="mask", action="store_const", const=True, default=None,
                   help="padding-aware models (attention): give the model the data's pad id "
                        "(padding masked; addition default)")
    p.add_argument("--no-mask", dest="mask", action="store_const", const=False,
                   help="padding-aware models: treat pads as data, reverse whole rows (the "
                        "textbook's setting; date default: it learns the date task faster)")
    for flag, (key, parse, text) in SETTINGS.items():
        p.add_argument(flag, dest=key, type=parse, default=None,
                       metavar={str: "PATH", positive_int: "N"}.get(parse, "X"),
                       help=f"{text} ({_defaults_text(key)})")
    p.add_argument("--seed", type=_int_at_least(0), default=None,
                   help="seed for weights and shuffling (default 1984)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="also write checkpoint.npz every N iterations (default: after each epoch "
                        "only)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default runs/<timestamp>); must not hold a run already")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run saved in DIR/checkpoint.npz with its own settings")
    p.add_argument("--engine", choices=["auto", "numpy", "cython", "cupy"], default=None,
                   help="compute engine: auto (GPU=1 -> cupy, else cython when built, else "
                        "numpy); --resume uses the run's engine unless given")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def resolve(args):
    """The run's full configuration from the flags, the task's defaults and the model's."""
    from .models import REGISTRY
    task = args.task or "addition"
    tdef = TASKS[task]
    name = args.model or tdef["model"]
    entry = REGISTRY[name]
    if entry.task != tdef["family"]:
        fits = ", ".join(n for n, e in sorted(REGISTRY.items()) if e.task == tdef["family"])
        kind = {"lm": "language"}.get(entry.task, entry.task)
        raise UsageError(f"--model {name} is a {kind} model; --task {task} needs one of: {fits}")
    cfg = {k: v for k, v in tdef.items() if k not in ("family", "model")}
    cfg.update(entry.defaults)
    flags = {f: key for f, (key, _, _) in SETTINGS.items()}
    flags["--reverse/--no-reverse"] = "reverse"
    flags["--mask/--no-mask"] = "mask"
    for flag, key in flags.items():
        value = getattr(args, key)
        if value is None:
            continue
        if key not in cfg:
            raise UsageError(f"{flag} does not apply to --task {task} --model {name}")
        cfg[key] = value
    if task == "text" and not cfg["data"]:
        raise UsageError("--task text needs --data FILE (a UTF-8 text file)")
    cfg.update(task=task, family=tdef["family"], model=name,
               seed=1984 if args.seed is None else args.seed,
               checkpoint_every=args.checkpoint_every)
    return cfg


# ---------------------------------------------------------------------------------------------
# engine, output folder

def select_engine(name):
    """Use engine ``name`` ('auto': the environment's choice); returns the engine in use."""
    if name in ("numpy", "cython") and backend.requested_gpu():
        raise backend.BackendError(f"--engine {name} contradicts GPU=1 in the environment")
    if name == "auto":
        backend.require_requested_engine()
    backend.use(name)
    return backend.config.engine


def check_out(out):
    """Refuse an output folder that cannot be one, or that holds a run already."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out}: exists and is not a folder")
        for f in ("checkpoint.npz", "model.npz"):
            if os.path.exists(os.path.join(out, f)):
                raise UsageError(f"--out {out}: already holds a run ({f}); continue it with "
                                 f"--resume {out} or choose another folder")
        if not os.access(out, os.W_OK):
            raise UsageError(f"--out {out}: the folder is not writable")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: cannot create it ({parent} is not a writable folder)")


def make_out(out):
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the folder ({e.strerror or e})")


def write_json(path, obj):
    from .io import atomic_write
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


# ---------------------------------------------------------------------------------------------
# data

def load_seq2seq_data(cfg):
    from .datasets.sequence import load_dataset, pad_id, reverse_padded
    from .models import REGISTRY
    data = load_dataset(cfg["data"])
    vocab = data.vocab
    # a padding-aware model gets the data set's pad id; its questions reverse only their characters
    takes_pad = "pad_id" in inspect.signature(REGISTRY[cfg["model"]].cls).parameters
    pad = pad_id(vocab) if takes_pad and cfg.get("mask", True) else None
    x_train, x_test = data.x_train, data.x_test
    if cfg["reverse"]:
        x_train, x_test = reverse_padded(x_train, pad), reverse_padded(x_test, pad)
    return {"x_train": x_train, "t_train": data.t_train, "x_test": x_test, "t_test": data.t_test,
            "source": data.source, "vocab": vocab, "pad_id": pad,
            "vocab_meta": {"chars": [vocab.id_to_char[i] for i in range(len(vocab))],
                           "question_width": vocab.question_width,
                           "answer_width": vocab.answer_width}}


def _text_corpora(path):
    """train / val / test word ids of a text file: lines split on whitespace, '<eos>' after each
    line; the last 10% of the lines are 5% validation and 5% test; unseen words become <unk>."""
    from .datasets.sequence import read_text  # regular files only, bounded, BOM dropped
    lines = read_text(path).splitlines()
    n = len(lines)
    cut1, cut2 = n - n // 10, n - n // 20
    if cut1 < 1 or cut2 - cut1 < 1 or n - cut2 < 1:
        raise ValueError(f"{path}: {n} lines are too few to hold out validation and test lines "
                         f"(needs >= 20)")
    word_to_id = {"<unk>": 0, "<eos>": 1}
    splits = []
    for part, grow in ((lines[:cut1], True), (lines[cut1:cut2], False), (lines[cut2:], False)):
        ids = []
        for line in part:
            for w in line.split() + ["<eos>"]:
                i = word_to_id.get(w)
                if i is None:
                    i = len(word_to_id) if grow else 0
                    if grow:
                        word_to_id[w] = i
                ids.append(i)
        splits.append(np.array(ids, dtype=np.int32))
    words = sorted(word_to_id, key=word_to_id.get)
    return splits, words


def load_lm_data(cfg):
    if cfg["task"] == "ptb":
        from .datasets import ptb
        train, w2i, i2w = ptb.load_data("train", data_dir=cfg["data_dir"])
        val = ptb.load_data("val", data_dir=cfg["data_dir"])[0]
        test = ptb.load_data("test", data_dir=cfg["data_dir"])[0]
        words, source = [i2w[i] for i in range(len(w2i))], "PTB"
    else:
        (train, val, test), words = _text_corpora(cfg["data"])
        source = cfg["data"]
    need = cfg["batch_size"] * cfg["time_size"] + 1
    if len(train) < need:
        raise ValueError(f"{source}: the training split has {len(train)} words, fewer than one "
                         f"batch ({cfg['batch_size']} x {cfg['time_size']} + 1)")
    for name, c in (("validation", val), ("test", test)):
        if len(c) < EVAL_BATCH_SIZE * cfg["time_size"] + 1:
            raise ValueError(f"{source}: the {name} split has {len(c)} words, fewer than one "
                             f"evaluation batch ({EVAL_BATCH_SIZE} x {cfg['time_size']} + 1)")
    return {"train": train, "val": val, "test": test, "source": source, "words": words,
            "vocab_meta": {"vocab": words}}


# ---------------------------------------------------------------------------------------------
# the run

def build(cfg, vocab_size, pad_id=None):
    """Model, optimiser and trainer for cfg (model keywords: the registry defaults that the
    class's constructor takes, and the data's pad id for a padding-aware model)."""
    from .models import REGISTRY
    from .optim import SGD, Adam
    from .trainer import RnnlmTrainer, Trainer
    entry = REGISTRY[cfg["model"]]
    takes = inspect.signature(entry.cls).parameters
    kwargs = {k: cfg[k] for k in entry.defaults if k in takes}
    if pad_id is not None and "pad_id" in takes:
        kwargs["pad_id"] = pad_id
    model = entry.cls(vocab_size, seed=cfg["seed"], **kwargs)
    optimizer = {"adam": Adam, "sgd": SGD}[cfg["optimizer"]](cfg["lr"])
    if cfg["family"] == "seq2seq":
        trainer = Trainer(model, optimizer, seed=cfg["seed"], progress=cfg["progress"])
    else:
        trainer = RnnlmTrainer(model, optimizer, progress=cfg["progress"])
    return model, trainer


class Stopper:
    """SIGINT/SIGTERM: the first asks the loop to stop after this iteration, a second stops
    at once (KeyboardInterrupt / SystemExit out of wherever the run is)."""

    def __init__(self, loop):
        self.loop, self.signum, self.saved = loop, None, {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.saved[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        self.loop.stop_reason = signal.Signals(signum).name
        print(f"\nfastseq: {signal.Signals(signum).name} received: stopping after this iteration "
              f"and saving (again to stop at once)", file=sys.stderr, flush=True)


class Interrupted(BaseException):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class Run:
    """One training run: data, model, trainer, metrics, and the files in ``out``."""

    def __init__(self, cfg, out, data, resume=None):
        self.cfg, self.out, self.data = cfg, out, data
        self.lm = cfg["family"] == "lm"
        V = len(data["words"]) if self.lm else len(data["vocab"])
        np.random.seed(cfg["seed"])  # whatever draws from the global generator draws the same
        self.model, self.trainer = build(cfg, V, None if self.lm else data["pad_id"])
        self.metrics = {"config": cfg, "engine": backend.info(), "epochs": []}
        self.best = None
        self.ckpt_seconds = 0.0
        from .checkpoint import Writer
        self.writer = Writer()
        if resume is not None:
            from . import checkpoint
            arrays, meta = resume
            checkpoint.restore(self.trainer, arrays, meta, os.path.join(out, "checkpoint.npz"))
            self.metrics = meta["metrics"]
            self.metrics.pop("stopped", None)
            self.best = meta["best"]
        self.trainer.hooks.append(self.on_event)
        self.t0 = time.perf_counter()

    # files ------------------------------------------------------------------------------------
    def model_meta(self):
        meta = {"task": self.cfg["task"], "model_name": self.cfg["model"],
                "epoch": self.trainer.current_epoch, **self.data["vocab_meta"]}
        if self.lm:
            meta["vocab_source"] = self.data["source"]
        else:
            meta["reverse"] = self.cfg["reverse"]
        return meta

    def save_checkpoint(self):
        """Snapshot the training state now; the writer thread writes it (the copies are what
        training waits for: ckpt_seconds)."""
        from . import checkpoint
        t = time.perf_counter()
        arrays, meta = checkpoint.snapshot(
            self.trainer, {"config": self.cfg, "metrics": self.metrics, "best": self.best,
                           "vocabulary": self.data["vocab_meta"]})
        self.writer.submit(os.path.join(self.out, checkpoint.FILE_NAME), arrays, meta)
        self.ckpt_seconds += time.perf_counter() - t

    def save_model(self, **extra):
        """model.npz of the weights now, in Model.save_params's format, by the writer thread."""
        from .checkpoint import host_copy
        t = time.perf_counter()
        m = self.model
        arrays = {n: host_copy(p) for n, p in zip(m.param_names, m.params)}
        meta = {"model": type(m).__name__, "config": m.config(), **self.model_meta(), **extra}
        self.writer.submit(os.path.join(self.out, "model.npz"), arrays,
                           json.loads(json.dumps(meta)))
        self.ckpt_seconds += time.perf_counter() - t

    # hooks ------------------------------------------------------------------------------------
    def on_event(self, loop, event):
        every = self.cfg["checkpoint_every"]
        if event == "iteration":
            if every and loop.total_iters % every == 0:
                self.save_checkpoint()
            return
        t1 = time.perf_counter()
        train_s, ckpt_s = t1 - self.t0 - self.ckpt_seconds, self.ckpt_seconds
        self.ckpt_seconds = 0.0
        entry = {"epoch": loop.current_epoch, "train_seconds": round(train_s, 4),
                 "checkpoint_seconds": round(ckpt_s, 4),
                 "loss": round(loop.epoch_losses[-1], 6)}
        (self.end_lm_epoch if self.lm else self.end_seq2seq_epoch)(entry, t1)
        self.metrics["epochs"].append(entry)
        write_json(os.path.join(self.out, "metrics.json"), self.metrics)
        self.save_checkpoint()
        self.t0 = time.perf_counter()

    def end_seq2seq_epoch(self, entry, t1):
        from .trainer import eval_seq2seq
        d, model = self.data, self.model
        acc = eval_seq2seq(model, d["x_test"], d["t_test"])
        t2 = time.perf_counter()
        entry.update(eval_seconds=round(t2 - t1, 4), test_accuracy=acc)
        beam = ""
        if self.cfg.get("beam"):
            from .decoding import beam_search
            k = self.cfg["beam"]
            out = beam_search(model, d["x_test"], d["t_test"][:, 0], d["t_test"].shape[1] - 1, k)
            entry[f"beam{k}_accuracy"] = float((out == d["t_test"][:, 1:]).all(axis=1).mean())
            entry["beam_eval_seconds"] = round(time.perf_counter() - t2, 4)
            beam = f" | beam {k} {entry[f'beam{k}_accuracy'] * 100:6.2f}%"
        print(f"epoch {entry['epoch']:3d} | loss {entry['loss']:.4f} | test accuracy "
              f"{acc * 100:6.2f}%{beam} | train {entry['train_seconds']:.2f}s eval "
              f"{t2 - t1:.2f}s", flush=True)
        show = np.random.RandomState(self.cfg["seed"]).choice(len(d["x_test"]), 3, replace=False)
        guesses = model.generate(d["x_test"][show], d["t_test"][show, 0],
                                 d["t_test"].shape[1] - 1)
        vocab = d["vocab"]
        for q, t, g in zip(d["x_test"][show], d["t_test"][show], guesses):
            q = self.written(q)
            ok = "ok " if (np.asarray(g) == t[1:]).all() else "bad"
            print(f"    {ok} {vocab.decode(q)!r:12} truth {vocab.decode(t[1:])!r:8} "
                  f"guess {vocab.decode(g)!r}")
        self.save_model()

    def written(self, q):
        """A fed question's ids in their written order."""
        from .datasets.sequence import reverse_padded
        return reverse_padded(q[None], self.data["pad_id"])[0] if self.cfg["reverse"] else q

    def attention_png(self, n=4):
        """attention.png: attention maps of the first n test questions (attention models)."""
        from .datasets.sequence import true_lengths
        from .plot import plot_attention_maps
        d = self.data
        xs, vocab = d["x_test"][:n], d["vocab"]
        out, w = self.model.attention_map(xs, d["t_test"][:n, 0], d["t_test"].shape[1] - 1)
        maps = []
        for q, a, wq in zip(xs, out, w):
            T = len(q)
            cols = np.arange(T)
            if self.cfg["reverse"]:  # fed position of each written character
                L = T if d["pad_id"] is None else int(true_lengths(q[None], d["pad_id"])[0])
                cols = np.where(cols < L, L - 1 - cols, cols)
            maps.append((wq[:, cols], vocab.decode(self.written(q)), vocab.decode(a)))
        return plot_attention_maps(maps, os.path.join(self.out, "attention.png"))

    def perplexity(self, corpus):
        from . import trainer as trainer_mod
        return float(trainer_mod.eval_perplexity(
            self.model, corpus, batch_size=EVAL_BATCH_SIZE, time_size=self.cfg["time_size"],
            max_iters=self.cfg["eval_max_iters"], progress_bar=self.cfg["progress"]))

    def end_lm_epoch(self, entry, t1):
        from .trainer import TrainingDiverged
        opt = self.trainer.optimizer
        ppl = self.perplexity(self.data["val"])
        t2 = time.perf_counter()
        if not math.isfinite(ppl):
            raise TrainingDiverged(f"the validation perplexity is {ppl} after epoch "
                                   f"{entry['epoch']}")
        lr = opt.lr
        entry.update(eval_seconds=round(t2 - t1, 4),
                     train_perplexity=round(float(np.exp(entry["loss"])), 4),
                     val_perplexity=round(ppl, 4), lr=lr)
        if self.best is None or ppl < self.best:
            self.best = ppl
            self.save_model(val_perplexity=ppl)
            note = " (best, saved)"
        else:
            opt.lr = lr / 4.0
            note = f" (worse: lr -> {opt.lr:g})"
        print(f"epoch {entry['epoch']:3d} | loss {entry['loss']:.4f} | train perplexity "
              f"{entry['train_perplexity']:9.2f} | val perplexity {ppl:9.2f} | lr {lr:g} | "
              f"train {entry['train_seconds']:.1f}s eval {t2 - t1:.1f}s{note}", flush=True)

    # driving ----------------------------------------------------------------------------------
    def train(self):
        """Train the remaining epochs; returns the stopping signal's number or None."""
        cfg, tr = self.cfg, self.trainer
        remaining = cfg["epochs"] - tr.current_epoch
        if remaining <= 0:
            return None
        self.t0 = time.perf_counter()
        with Stopper(tr) as stopper:
            if self.lm:
                xs, ts = self.data["train"][:-1], self.data["train"][1:]
                tr.fit(xs, ts, max_epoch=remaining, batch_size=cfg["batch_size"],
                       time_size=cfg["time_size"], max_grad=cfg["max_grad"],
                       max_iters=cfg["max_iters"])
            else:
                d = self.data
                tr.fit(d["x_train"], d["t_train"], max_epoch=remaining,
                       batch_size=cfg["batch_size"], max_grad=cfg["max_grad"])
            if stopper.signum is None:
                return None
            self.stop(stopper.signum)
            return stopper.signum

    def stop(self, signum):
        tr = self.trainer
        self.metrics["stopped"] = {"signal": signal.Signals(signum).name,
                                   "epochs_finished": tr.current_epoch,
                                   "iteration": tr.iteration, "total_iterations": tr.total_iters}
        write_json(os.path.join(self.out, "metrics.json"), self.metrics)
        self.save_model(stopped=self.metrics["stopped"])
        self.save_checkpoint()
        self.writer.flush()
        print(f"fastseq: stopped at epoch {tr.current_epoch + (1 if tr.iteration else 0)}, "
              f"iteration {tr.iteration}; saved {self.out}/checkpoint.npz and model.npz "
              f"(continue with --resume {self.out})", file=sys.stderr, flush=True)

    def finish(self):
        from .plot import have_matplotlib, plot_curves
        self.metrics.pop("stopped", None)
        name = type(self.model).__name__
        self.writer.flush()
        if self.lm:
            self.model.load_params(os.path.join(self.out, "model.npz"))  # the best epoch's weights
            self.model.reset_state()
            t0 = time.perf_counter()
            test_ppl = self.perplexity(self.data["test"])
            self.metrics["test_perplexity"] = round(test_ppl, 4)
            print(f"test perplexity {test_ppl:.2f} (best model, val perplexity {self.best:.2f}; "
                  f"eval {time.perf_counter() - t0:.1f}s)")
            png = plot_curves({"train": [e["train_perplexity"] for e in self.metrics["epochs"]],
                               "validation": [e["val_perplexity"] for e in self.metrics["epochs"]]},
                              "epoch", "perplexity", os.path.join(self.out, "perplexity.png"),
                              title=f"{name} on {self.data['source']} (test {test_ppl:.1f})")
        else:
            label = name + (" + reverse" if self.cfg["reverse"] else "")
            png = plot_curves({label: [e["test_accuracy"] * 100 for e in self.metrics["epochs"]]},
                              "epoch", "test accuracy (%)", os.path.join(self.out, "accuracy.png"),
                              ylim=(0, 100))
            if hasattr(self.model, "attention_map") and self.attention_png():
                png += ", attention.png"
        write_json(os.path.join(self.out, "metrics.json"), self.metrics)
        if png is None and not have_matplotlib():
            print(f"note: matplotlib is not installed, so no curve was drawn "
                  f"(pip install 'fastseq[plot]')")
        print(f"wrote {self.out}/metrics.json, model.npz, checkpoint.npz" +
              (f", {os.path.basename(png)}" if png else ""))


def describe_data(cfg, data, model):
    if cfg["family"] == "lm":
        return (f"{type(model).__name__} on {data['source']}: {len(data['train'])} train / "
                f"{len(data['val'])} val / {len(data['test'])} test words, vocabulary "
                f"{len(data['words'])}")
    return (f"{type(model).__name__} on {data['source']}: {len(data['x_train'])} train / "
            f"{len(data['x_test'])} test questions, vocabulary {len(data['vocab'])}, "
            f"reverse={cfg['reverse']}")


def prepare(args):
    """(cfg, out, resume state) from the flags, or UsageError."""
    if args.resume is None:
        cfg = resolve(args)
        out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        check_out(out)
        return cfg, out, None
    given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
             if v not in (None, False) and k not in ("resume", "engine", "no_progress")]
    if given:
        raise UsageError(f"--resume continues a run with its own settings; drop {', '.join(given)}")
    from . import checkpoint
    path = os.path.join(args.resume, checkpoint.FILE_NAME)
    if not os.path.isfile(path):
        raise UsageError(f"--resume {args.resume}: no {checkpoint.FILE_NAME} there")
    arrays, meta = checkpoint.load(path)
    return meta["config"], args.resume, (arrays, meta)


def main(argv=None):
    args = build_parser().parse_args(argv)
    out, created, run = None, False, None
    try:
        cfg, out, resume = prepare(args)
        engine = args.engine or (cfg.get("engine") if resume else None) or "auto"
        cfg["engine"] = select_engine(engine)
        cfg["progress"] = not args.no_progress
        data = (load_lm_data if cfg["family"] == "lm" else load_seq2seq_data)(cfg)
        if resume and resume[1]["vocabulary"] != data["vocab_meta"]:
            raise UsageError(f"--resume {out}: the data's vocabulary differs from the one the "
                             f"run was trained with")
        created = not os.path.exists(out)
        make_out(out)
        run = Run(cfg, out, data, resume)
        print(describe_data(cfg, data, run.model))
        print(backend.describe(), flush=True)
        if resume:
            tr = run.trainer
            print(f"resuming {out} at epoch {tr.current_epoch + 1}, iteration {tr.iteration}",
                  flush=True)
        signum = run.train()
        if signum is not None:
            return 128 + signum
        run.finish()
        run.writer.close()
        return 0
    except (UsageError, OSError, ValueError, backend.BackendError) as e:  # incl. bad data, no GPU
        print(f"fastseq: {e}", file=sys.stderr)
    except FloatingPointError as e:  # TrainingDiverged: nothing written after the last good state
        saved = out and os.path.exists(os.path.join(out, "checkpoint.npz"))
        print(f"fastseq: training stopped: {e}; " +
              (f"the last checkpoint in {out} is intact" if saved else "nothing was saved"),
              file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        saved = out and os.path.exists(os.path.join(out, "checkpoint.npz"))
        print(f"fastseq: stopped at once by {signal.Signals(signum).name}" +
              (f"; {out}/checkpoint.npz holds the last saved state" if saved else ""),
              file=sys.stderr)
        return 128 + signum
    finally:
        if run is not None:
            try:
                run.writer.close()  # what was saved before an error or a stop reaches the disk
            except (OSError, ValueError) as e:
                print(f"fastseq: {e}", file=sys.stderr)
        if created and out and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # a run that failed before writing anything leaves no folder
    return 2


if __name__ == "__main__":
    sys.exit(main())
