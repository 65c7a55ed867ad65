"""A training run in a folder, as ``python -m fastseq.train`` runs it: the task's data, a model and
trainer built from the registry, callbacks for evaluation, the learning-rate schedule, the best
model, early stopping, checkpoints and Ctrl-C, and the files: metrics.json, model.npz,
checkpoint.npz, curves and, for seq2seq tasks, best.npz (the best epoch by the dev figure: exact
match for addition and date, WER for pairs), with which the test split is scored at the end.

    cfg = configure("date", given={"--epochs": ("epochs", 3)})  # defaults, then the flags given
    run = TrainingRun(cfg, out, load_data(cfg))
    signum = run.train()               # None when every epoch ran; else the stopping signal
    run.finish()                       # test figures, curves, the final metrics.json

A run continued from its folder (``cfg, resume = load_resume(out)``, then
``TrainingRun(cfg, out, load_data(cfg), resume)``) ends bit for bit as the uninterrupted one:
everything that changes while training is in the trainer's state_dict(), which the checkpoint
holds; the checkpoint's metadata is checked as a whole before anything is restored.
"""
import json
import math
import os
import signal
import sys
import time

import numpy as np

from . import backend, checkpoint, files
from . import trainer as trainer_mod
from .callbacks import Callback, EarlyStopping, EveryIterations, LRSchedule, SaveBest, StopOnSignal
from .files.schema import Any, Bool, Choice, Dict, Int, List, Num, Optional, Str

# Per-task defaults. A key here (or in the model's registry defaults) is a setting the task uses;
# its flag is refused on tasks that lack it. None means "not set" (e.g. no cap on iterations).
TASKS = {
    # addition: batches of 64, Adam at 2e-3 halved after 2 epochs without a better dev accuracy
    # (4 seeds against other settings: docs/runs/addition_validation_seeds.txt)
    "addition": {"family": "seq2seq", "model": "peeky", "data": "addition.txt", "reverse": True,
                 "epochs": 25, "batch_size": 64, "optimizer": "adam", "lr": 2e-3,
                 "max_grad": 5.0, "beam": None, "mask": True, "valid_fraction": 0.05,
                 "patience": None, "lr_decay": 0.5, "lr_patience": 2},
    "date": {"family": "seq2seq", "model": "attention", "data": "date.txt", "reverse": True,
             "epochs": 10, "batch_size": 128, "optimizer": "adam", "lr": 1e-3, "max_grad": 5.0,
             "beam": None, "mask": False, "valid_fraction": 0.05, "patience": None,
             "lr_decay": 0.5, "lr_patience": 2},
    # pairs: a 2-layer attention LSTM with a bidirectional encoder, dropout 0.3, Adam at 2e-3
    # halved after each epoch without a better dev WER, the dev-best model kept; chosen on a dev
    # split of CMUdict's training words (docs/runs/g2p_*.txt); model_defaults override the
    # model's own sizes
    "pairs": {"family": "seq2seq", "model": "attention", "data": None, "valid": None,
              "test": None, "valid_fraction": 0.05, "source_tokens": "char",
              "target_tokens": "char", "max_length": 100, "skip_bad_lines": False,
              "reverse": False, "epochs": 30, "batch_size": 128, "optimizer": "adam",
              "lr": 2e-3, "max_grad": 5.0, "beam": None, "patience": 5, "lr_decay": 0.5,
              "lr_patience": 1,
              "model_defaults": {"wordvec_size": 128, "hidden_size": 256, "encoder": "bi",
                                 "layers": 2, "dropout_ratio": 0.3}},
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
                     "5%% validation, 5%% test)",
             "pairs": "seq2seq on your own source<TAB>target lines given with --data (and "
                      "--valid, --test; else --valid-fraction of the sources is held out)"}
EVAL_BATCH_SIZE = 10  # rows of each perplexity evaluation batch

# every setting a run's configuration may hold, declared (resumed configurations are checked)
POSITIVE, RATE, PATH = Int(1), Num(above=0), Str(4096)
SETTING_SCHEMAS = {"epochs": POSITIVE, "batch_size": POSITIVE, "hidden_size": POSITIVE,
                   "wordvec_size": POSITIVE, "lr": RATE, "max_grad": RATE,
                   "beam": Optional(POSITIVE),
                   "time_size": POSITIVE, "dropout_ratio": Num(0, below=1),
                   "encoder": Choice("uni", "bi"), "layers": POSITIVE,
                   "max_iters": Optional(POSITIVE), "eval_max_iters": Optional(POSITIVE),
                   "data": Optional(PATH), "data_dir": Optional(PATH), "reverse": Bool(),
                   "mask": Bool(), "optimizer": Choice("adam", "sgd"),
                   "valid": Optional(PATH), "test": Optional(PATH),
                   "valid_fraction": Num(above=0, below=1),
                   "source_tokens": Choice("char", "space"), "target_tokens": Choice("char", "space"),
                   "max_length": POSITIVE, "skip_bad_lines": Bool(),
                   "patience": Optional(POSITIVE), "lr_decay": Num(above=0, hi=1),
                   "lr_patience": POSITIVE}
NOT_SETTINGS = ("family", "model", "model_defaults")  # a task's keys that are not settings
TRAINING_KEYS = {k for t in TASKS.values() for k in t} - set(NOT_SETTINGS)


class RunError(Exception):
    """A user error found after parsing: one `fastseq:` line, exit status 2."""


def model_keywords(entry, cfg):
    """The constructor keywords of a registered model: its defaults that are not training
    settings, with the values cfg gives them."""
    return {k: cfg[k] for k in entry.defaults if k not in TRAINING_KEYS}


# ---------------------------------------------------------------------------------------------
# configuration

def configure(task, model=None, given=(), seed=None, checkpoint_every=None):
    """A run's full configuration: the task's defaults, the model's (by default the task's
    model), then the settings the user gave (``given``: {flag: (key, value)}); RunError for a
    model of another family, a flag the task and model do not use, or missing data."""
    from .models import REGISTRY
    tdef = TASKS[task]
    name = model or tdef["model"]
    entry = REGISTRY[name]
    if entry.task != tdef["family"]:
        fits = ", ".join(n for n, e in sorted(REGISTRY.items()) if e.task == tdef["family"])
        kind = {"lm": "language"}.get(entry.task, entry.task)
        raise RunError(f"--model {name} is a {kind} model; --task {task} needs one of: {fits}")
    cfg = {k: v for k, v in tdef.items() if k not in NOT_SETTINGS}
    cfg.update(entry.defaults)
    # the task's model sizes (pairs) override the model's own defaults, for the keys it has
    cfg.update({k: v for k, v in tdef.get("model_defaults", {}).items() if k in entry.defaults})
    for flag, (key, value) in dict(given).items():
        if key not in cfg:
            raise RunError(f"{flag} does not apply to --task {task} --model {name}")
        cfg[key] = value
    if task == "text" and not cfg["data"]:
        raise RunError("--task text needs --data FILE (a UTF-8 text file)")
    if task == "pairs" and not cfg["data"]:
        raise RunError("--task pairs needs --data FILE (source<TAB>target lines)")
    cfg.update(task=task, family=tdef["family"], model=name,
               seed=1984 if seed is None else seed, checkpoint_every=checkpoint_every)
    return cfg


def defaults_text(key):
    """A setting's defaults in words, per task and per model ("for ..." where none is set)."""
    from .models import REGISTRY
    where = [f"{t}: {d[key]}" for t, d in TASKS.items() if d.get(key) is not None]
    where += [f"{t}: {d['model_defaults'][key]}" for t, d in TASKS.items()
              if key in d.get("model_defaults", {})]
    where += [f"--model {n}: {e.defaults[key]}" for n, e in REGISTRY.items() if key in e.defaults]
    if where:
        return "; ".join(where)
    used = [t for t, d in TASKS.items() if key in d] + \
           [f"--model {n}" for n, e in REGISTRY.items() if key in e.defaults]
    return "for " + ", ".join(used)


# ---------------------------------------------------------------------------------------------
# engine, output folder, resumed metadata

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
            raise RunError(f"--out {out}: exists and is not a folder")
        for f in (checkpoint.FILE_NAME, "model.npz"):
            if os.path.exists(os.path.join(out, f)):
                raise RunError(f"--out {out}: already holds a run ({f}); continue it with "
                               f"--resume {out} or choose another folder")
        if not os.access(out, os.W_OK):
            raise RunError(f"--out {out}: the folder is not writable")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise RunError(f"--out {out}: cannot create it ({parent} is not a writable folder)")


def make_out(out):
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot create the folder ({e.strerror or e})")


def write_json(path, obj):
    files.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _run_head(REGISTRY):
    """What a checkpoint holds for the run besides the training state: the run's configuration
    (its task's and model's settings are checked by _run_schema, once these are known), metrics
    and vocabulary."""
    config = {"task": Choice(*TASKS), "model": Choice(*REGISTRY),
              "family": Choice("seq2seq", "lm"), "seed": Int(0),
              "checkpoint_every": Optional(POSITIVE),
              "engine": Choice("numpy", "cython", "cupy")}
    epochs = List(Dict({"epoch": POSITIVE, "loss": Num()}, extra=Any()), checkpoint.MAX_ITEMS)
    return Dict({"config": Dict(config, extra=Any()),
                 "metrics": Dict({"config": Dict(extra=Any()), "engine": Dict(extra=Any()),
                                  "epochs": epochs}, extra=Any()),
                 "vocabulary": Dict(extra=Any())}, extra=Any())


EPOCH_FIGURES = {"ptb": ("train_perplexity", "val_perplexity"),
                 "text": ("train_perplexity", "val_perplexity"),
                 "addition": ("test_accuracy", "val_accuracy"),
                 "date": ("test_accuracy", "val_accuracy"),
                 "pairs": ("val_accuracy", "val_wer", "val_ter")}


def monitor(task):
    """(figure, higher is better) that picks the best model, the schedule and early stopping."""
    return {"ptb": ("val_perplexity", False), "text": ("val_perplexity", False),
            "pairs": ("val_wer", False)}.get(task, ("val_accuracy", True))


def _run_schema(task, settings):
    """The settings of the run's task and model, the figures of each epoch and the state of the
    callbacks that follow the validation figure."""
    config = Dict({k: SETTING_SCHEMAS.get(k, Any()) for k in settings}, extra=Any())
    epoch = Dict({k: Num() for k in EPOCH_FIGURES[task]}, extra=Any())
    fields = {"config": config,
              "metrics": Dict({"epochs": List(epoch, checkpoint.MAX_ITEMS)}, extra=Any())}
    best = Dict({"best": Optional(Num())})
    counted = Dict({"best": Optional(Num()), "bad_epochs": Int(0)})
    callbacks = Dict({"save_best": best},
                     optional={"lr_schedule": counted,
                               "early_stopping": Dict({"best": Optional(Num()),
                                                       "bad_epochs": Int(0)})}, extra=Any())
    fields["state"] = Dict({"loop": Dict({"callbacks": callbacks}, extra=Any())}, extra=Any())
    return Dict(fields, extra=Any())


def load_resume(folder):
    """(cfg, (arrays, meta)) of the run saved in ``folder``: the checkpoint's metadata and the
    run's own fields (config, metrics, vocabulary) checked before anything is used."""
    from .models import REGISTRY
    path = os.path.join(folder, checkpoint.FILE_NAME)
    if not os.path.isfile(path):
        raise RunError(f"--resume {folder}: no {checkpoint.FILE_NAME} there")
    arrays, meta = files.load_checkpoint(path)
    checkpoint.validate(meta, arrays, path)
    checkpoint.check(path, meta, _run_head(REGISTRY))
    cfg = meta["config"]
    tdef, entry = TASKS[cfg["task"]], REGISTRY[cfg["model"]]
    if entry.task != tdef["family"] or cfg["family"] != tdef["family"]:
        raise checkpoint.CheckpointError(
            f"{path}: {checkpoint.REFUSED} metadata field 'config.model' is {cfg['model']!r}, "
            f"which is not a model for the task {cfg['task']!r}")
    settings = [k for k in [*tdef, *entry.defaults] if k not in NOT_SETTINGS]
    for k, v in entry.defaults.items():  # a model keyword newer than the run: its default is
        if k not in TRAINING_KEYS:        # the model the run was built with
            cfg.setdefault(k, v)
    checkpoint.check(path, meta, _run_schema(cfg["task"], settings))
    return cfg, (arrays, meta)


# ---------------------------------------------------------------------------------------------
# data

def load_data(cfg):
    return (_lm_data if cfg["family"] == "lm" else _seq2seq_data)(cfg)


class EvalSet:
    """Questions to decode and score: ``x`` (N, T) ids, ``start`` (one id or N ids), ``steps``
    to decode, ``refs`` (each question's references: token lists), ``tokens`` (decoded rows
    (N, steps) -> token lists)."""

    def __init__(self, x, start, steps, refs, tokens):
        self.x, self.start, self.steps, self.refs, self.tokens = x, start, steps, refs, tokens

    def decode(self, model, beam=None):
        """The greedy (or beam-``beam``) answers' ids (N, steps)."""
        if beam:
            from .decoding import beam_search
            return beam_search(model, self.x, self.start, self.steps, beam)
        out = model.generate(self.x, self.start, self.steps)
        return np.asarray(out).reshape(len(self.x), self.steps)

    def score(self, model, beam=None):
        """metrics.score of the answers: accuracy (exact match with any reference), wer, ter."""
        from .metrics import score
        return score(self.tokens(self.decode(model, beam)), self.refs)


def trimmed_rows(end):
    """rows (N, T) -> lists of ids, each up to its first ``end`` id (whole rows when None)."""
    def tokens(rows):
        rows = np.asarray(rows)
        if end is None:
            return [list(r) for r in rows.tolist()]
        stop = np.where((rows == end).any(axis=1), (rows == end).argmax(axis=1), rows.shape[1])
        return [r[:k] for r, k in zip(rows.tolist(), stop)]
    return tokens


def carve_rows(x, t, fraction, seed):
    """(x, t) without a seeded share ``fraction`` of their rows, and those rows (dev split)."""
    n = len(x)
    k = min(n - 1, max(1, int(round(n * fraction))))
    held = np.zeros(n, dtype=bool)
    held[np.random.RandomState(seed).permutation(n)[:k]] = True
    return x[~held], t[~held], x[held], t[held]


def _seq2seq_data(cfg):
    if cfg["task"] == "pairs":
        return _pairs_data(cfg)
    from .datasets.sequence import load_dataset, pad_id, reverse_padded
    from .models import REGISTRY
    data = load_dataset(cfg["data"])
    vocab = data.vocab
    # a padding-aware model gets the data set's pad id; its questions reverse only their characters
    pad = pad_id(vocab) if REGISTRY[cfg["model"]].pads and cfg.get("mask", True) else None
    x_train, x_test = data.x_train, data.x_test
    if cfg["reverse"]:
        x_train, x_test = reverse_padded(x_train, pad), reverse_padded(x_test, pad)
    # the dev split: a seeded share of the training rows (the test split stays the textbook's)
    x_train, t_train, x_valid, t_valid = carve_rows(x_train, data.t_train, cfg["valid_fraction"],
                                                    cfg["seed"])
    tokens = trimmed_rows(pad)

    def split(x, t):
        return EvalSet(x, t[:, 0], t.shape[1] - 1, [[r] for r in tokens(t[:, 1:])], tokens)

    return {"x_train": x_train, "t_train": t_train, "x_test": x_test, "t_test": data.t_test,
            "valid": split(x_valid, t_valid), "test": split(x_test, data.t_test),
            "source": data.source, "vocab": vocab, "pad_id": pad,
            "vocab_meta": {"chars": [vocab.id_to_char[i] for i in range(len(vocab))],
                           "question_width": vocab.question_width,
                           "answer_width": vocab.answer_width}}


def _pairs_data(cfg):
    """The pairs task's splits (fastseq.datasets.pairs): training rows, and the dev and test
    sources with their references."""
    from .datasets.pairs import load_pairs
    if not cfg["data"]:
        raise RunError("--task pairs needs --data FILE (source<TAB>target lines)")
    vocab, splits = load_pairs(
        cfg["data"], cfg["valid"], cfg["test"], source_tokens=cfg["source_tokens"],
        target_tokens=cfg["target_tokens"], valid_fraction=cfg["valid_fraction"],
        seed=cfg["seed"], max_length=cfg["max_length"], skip_bad_lines=cfg["skip_bad_lines"],
        reverse=cfg["reverse"],
        warn=lambda m: print(f"fastseq: warning: {m}", file=sys.stderr, flush=True))
    train = splits["train"]
    if len(train.x) < cfg["batch_size"]:
        raise RunError(f"{cfg['data']}: {len(train.x)} training pairs, fewer than one batch "
                       f"(--batch-size {cfg['batch_size']})")

    def split(s):
        return None if s is None else EvalSet(s.xs, vocab.start_id, vocab.max_answer_length,
                                              s.refs, vocab.target_lists)

    return {"x_train": train.x, "t_train": train.t, "valid": split(splits["valid"]),
            "test": split(splits["test"]), "splits": splits, "source": cfg["data"],
            "vocab": vocab, "pad_id": vocab.pad_id, "vocab_meta": vocab.meta()}


def _lm_data(cfg):
    if cfg["task"] == "ptb":
        from .datasets import ptb
        train, w2i, i2w = ptb.load_data("train", data_dir=cfg["data_dir"])
        val = ptb.load_data("val", data_dir=cfg["data_dir"])[0]
        test = ptb.load_data("test", data_dir=cfg["data_dir"])[0]
        words, source = [i2w[i] for i in range(len(w2i))], "PTB"
    else:
        from .datasets.text import load_text_corpus
        (train, val, test), words = load_text_corpus(cfg["data"])
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


def describe_data(cfg, data, model):
    if cfg["family"] == "lm":
        return (f"{type(model).__name__} on {data['source']}: {len(data['train'])} train / "
                f"{len(data['val'])} val / {len(data['test'])} test words, vocabulary "
                f"{len(data['words'])}")
    test = data["test"]
    return (f"{type(model).__name__} on {data['source']}: {len(data['x_train'])} train rows / "
            f"{len(data['valid'].x)} dev / {0 if test is None else len(test.x)} test "
            f"{'sources' if cfg['task'] == 'pairs' else 'questions'}, vocabulary "
            f"{len(data['vocab'])}, reverse={cfg['reverse']}")


# ---------------------------------------------------------------------------------------------
# the run

def build(cfg, vocab_size, pad_id=None):
    """Model and trainer for cfg (model keywords: the registry defaults that are not training
    settings, and the data's pad id for a padding-aware model)."""
    from .models import REGISTRY
    from .optim import SGD, Adam
    entry = REGISTRY[cfg["model"]]
    kwargs = model_keywords(entry, cfg)
    if pad_id is not None and entry.pads:
        kwargs["pad_id"] = pad_id
    model = entry.cls(vocab_size, seed=cfg["seed"], **kwargs)
    optimizer = {"adam": Adam, "sgd": SGD}[cfg["optimizer"]](cfg["lr"])
    if cfg["task"] == "pairs":  # rows of similar lengths batched together
        trainer = trainer_mod.BucketTrainer(model, optimizer, pad_id, seed=cfg["seed"],
                                            progress=cfg["progress"])
    elif cfg["family"] == "seq2seq":
        trainer = trainer_mod.Trainer(model, optimizer, seed=cfg["seed"],
                                      progress=cfg["progress"])
    else:
        trainer = trainer_mod.RnnlmTrainer(model, optimizer, progress=cfg["progress"])
    return model, trainer


class _AtEpochEnd(Callback):
    """Calls ``fn(loop)`` at the end of every epoch (a step of the run's epoch-end sequence)."""

    def __init__(self, fn):
        self.fn = fn

    def on_epoch_end(self, loop):
        self.fn(loop)


class TrainingRun:
    """One training run: data, model, trainer, metrics, and the files in ``out``."""

    def __init__(self, cfg, out, data, resume=None):
        self.cfg, self.out, self.data = cfg, out, data
        self.lm = cfg["family"] == "lm"
        self.pairs = cfg["task"] == "pairs"
        V = len(data["words"]) if self.lm else len(data["vocab"])
        np.random.seed(cfg["seed"])  # whatever draws from the global generator draws the same
        self.model, self.trainer = build(cfg, V, None if self.lm else data["pad_id"])
        self.metrics = {"config": cfg, "engine": backend.info(), "epochs": []}
        self.ckpt_seconds, self.t0 = 0.0, time.perf_counter()
        self.t1 = self.t0  # when the current epoch's training ended
        self.writer = files.Writer()
        figure, higher = monitor(cfg["task"])
        self.best_model = SaveBest(figure, self.save_best, higher=higher)
        every = EveryIterations(cfg["checkpoint_every"], lambda loop: self.save_checkpoint())
        evaluate = _AtEpochEnd(self.evaluate_lm if self.lm else self.evaluate_seq2seq)
        after = [self.best_model]
        if self.lm:
            after.append(LRSchedule(figure, 0.25))
        elif cfg["lr_decay"] < 1:  # the learning rate falls whenever the dev figure does not improve
            after.append(LRSchedule(figure, cfg["lr_decay"], higher=higher,
                                    patience=cfg["lr_patience"]))
        self.early = None
        if not self.lm and cfg["patience"]:
            self.early = EarlyStopping(figure, cfg["patience"], higher=higher)
            after.append(self.early)
        self.trainer.callbacks += [every, _AtEpochEnd(self.start_epoch_log), evaluate, *after,
                                   _AtEpochEnd(self.end_epoch)]
        if resume is not None:
            arrays, meta = resume
            checkpoint.restore(self.trainer, arrays, meta,
                               os.path.join(out, checkpoint.FILE_NAME))
            self.metrics = meta["metrics"]
            self.metrics.pop("stopped", None)

    # files ------------------------------------------------------------------------------------
    def save_checkpoint(self):
        """Snapshot the training state now; the writer thread writes it (the copies are what
        training waits for: ckpt_seconds)."""
        t = time.perf_counter()
        arrays, meta = checkpoint.snapshot(
            self.trainer, {"config": self.cfg, "metrics": self.metrics,
                           "vocabulary": self.data["vocab_meta"]})
        self.writer.submit(os.path.join(self.out, checkpoint.FILE_NAME), arrays, meta)
        self.ckpt_seconds += time.perf_counter() - t

    def save_model(self, name="model.npz", **extra):
        """``name`` (model.npz) of the weights now (the model's own file contents), by the writer
        thread."""
        t = time.perf_counter()
        meta = {"task": self.cfg["task"], "model_name": self.cfg["model"],
                "epoch": self.trainer.current_epoch, **self.data["vocab_meta"]}
        if self.lm:
            meta["vocab_source"] = self.data["source"]
        else:
            meta["reverse"] = self.cfg["reverse"]
        self.writer.submit(os.path.join(self.out, name),
                           *files.model_file(self.model, json.loads(json.dumps(dict(meta, **extra)))))
        self.ckpt_seconds += time.perf_counter() - t

    def save_best(self, loop):
        """The language model's model.npz, a seq2seq model's best.npz: the best epoch's."""
        log = loop.epoch_log
        if self.lm:
            self.save_model(val_perplexity=log["val_perplexity"])
        else:
            self.save_model("best.npz", **{k: log[k] for k in EPOCH_FIGURES[self.cfg["task"]]
                                           if k.startswith("val_")})

    # the epoch's end: timing, evaluation, [best model, schedule], record ---------------------
    def start_epoch_log(self, loop):
        self.t1 = time.perf_counter()
        loop.epoch_log.update(train_seconds=round(self.t1 - self.t0 - self.ckpt_seconds, 4),
                              checkpoint_seconds=round(self.ckpt_seconds, 4),
                              loss=round(loop.epoch_log["loss"], 6))
        self.ckpt_seconds = 0.0

    def evaluate_seq2seq(self, loop):
        """The dev figures (and, on the textbook's tasks, the test accuracy, for the record: the
        best model is chosen on the dev figure), then model.npz of this epoch."""
        d, model, log = self.data, self.model, loop.epoch_log
        s = d["valid"].score(model)
        log["val_accuracy"] = s["accuracy"]
        if self.pairs:
            log.update(val_wer=s["wer"], val_ter=s["ter"])
        else:
            log["test_accuracy"] = trainer_mod.eval_seq2seq(model, d["x_test"], d["t_test"])
        t2 = time.perf_counter()
        log["eval_seconds"] = round(t2 - self.t1, 4)
        if self.cfg.get("beam") and not self.pairs:
            from .decoding import beam_search
            k = self.cfg["beam"]
            out = beam_search(model, d["x_test"], d["t_test"][:, 0], d["t_test"].shape[1] - 1, k)
            log[f"beam{k}_accuracy"] = float((out == d["t_test"][:, 1:]).all(axis=1).mean())
            log["beam_eval_seconds"] = round(time.perf_counter() - t2, 4)
        self.save_model()

    def print_seq2seq(self, log):
        note = " (best, saved)" if log.get("best") else \
            f" ({log['lr_note']})" if log.get("lr_note") else ""
        times = f"train {log['train_seconds']:.2f}s eval {log['eval_seconds']:.2f}s"
        if self.pairs:
            ter = "CER" if self.cfg["target_tokens"] == "char" else "PER"
            print(f"epoch {log['epoch']:3d} | loss {log['loss']:.4f} | dev WER "
                  f"{log['val_wer'] * 100:6.2f}% {ter} {log['val_ter'] * 100:6.2f}% | lr "
                  f"{log.get('lr', self.trainer.optimizer.lr):g} | {times}{note}", flush=True)
        else:
            k = self.cfg.get("beam")
            beam = f" | beam {k} {log[f'beam{k}_accuracy'] * 100:6.2f}%" if k else ""
            print(f"epoch {log['epoch']:3d} | loss {log['loss']:.4f} | dev accuracy "
                  f"{log['val_accuracy'] * 100:6.2f}% | test accuracy "
                  f"{log['test_accuracy'] * 100:6.2f}%{beam} | {times}{note}", flush=True)
        self.show_examples()

    def show_examples(self, n=3):
        """n dev (pairs) or test questions, their truth and the greedy guess."""
        d, vocab = self.data, self.data["vocab"]
        if self.pairs:
            ev, sources = d["valid"], d["splits"]["valid"].sources
            show = np.random.RandomState(self.cfg["seed"]).choice(len(ev.x), min(n, len(ev.x)),
                                                                  replace=False)
            sub = EvalSet(ev.x[show], ev.start, ev.steps, [ev.refs[i] for i in show], ev.tokens)
            join = " ".join if self.cfg["target_tokens"] == "space" else "".join
            for i, g, refs in zip(show, sub.tokens(sub.decode(self.model)), sub.refs):
                ok = "ok " if g in refs else "bad"
                print(f"    {ok} {sources[i]!r:16} truth {join(refs[0])!r} guess {join(g)!r}")
            return
        show = np.random.RandomState(self.cfg["seed"]).choice(len(d["x_test"]), n, replace=False)
        guesses = self.model.generate(d["x_test"][show], d["t_test"][show, 0],
                                      d["t_test"].shape[1] - 1)
        for q, t, g in zip(d["x_test"][show], d["t_test"][show], guesses):
            ok = "ok " if (np.asarray(g) == t[1:]).all() else "bad"
            print(f"    {ok} {vocab.decode(self.written(q))!r:12} truth {vocab.decode(t[1:])!r:8} "
                  f"guess {vocab.decode(g)!r}")

    def evaluate_lm(self, loop):
        log = loop.epoch_log
        ppl = self.perplexity(self.data["val"])
        if not math.isfinite(ppl):
            raise trainer_mod.TrainingDiverged(f"the validation perplexity is {ppl} after epoch "
                                               f"{log['epoch']}")
        log.update(eval_seconds=round(time.perf_counter() - self.t1, 4),
                   train_perplexity=round(float(np.exp(log["loss"])), 4),
                   val_perplexity=round(ppl, 4))

    def end_epoch(self, loop):
        log = loop.epoch_log
        entry = {k: v for k, v in log.items() if k not in ("best", "lr_note")}
        if self.lm:
            note = " (best, saved)" if log.get("best") else f" ({log['lr_note']})"
            print(f"epoch {log['epoch']:3d} | loss {log['loss']:.4f} | train perplexity "
                  f"{log['train_perplexity']:9.2f} | val perplexity {log['val_perplexity']:9.2f} "
                  f"| lr {log['lr']:g} | train {log['train_seconds']:.1f}s eval "
                  f"{log['eval_seconds']:.1f}s{note}", flush=True)
        else:
            self.print_seq2seq(log)
        if loop.stop_reason and self.early is not None and self.early.stopped():
            print(f"fastseq: {loop.stop_reason}", flush=True)
        self.metrics["epochs"].append(entry)
        write_json(os.path.join(self.out, "metrics.json"), self.metrics)
        self.save_checkpoint()
        self.t0 = time.perf_counter()

    def written(self, q):
        """A fed question's ids in their written order."""
        from .datasets.sequence import reverse_padded
        return reverse_padded(q[None], self.data["pad_id"])[0] if self.cfg["reverse"] else q

    def perplexity(self, corpus):
        return float(trainer_mod.eval_perplexity(
            self.model, corpus, batch_size=EVAL_BATCH_SIZE, time_size=self.cfg["time_size"],
            max_iters=self.cfg["eval_max_iters"], progress_bar=self.cfg["progress"]))

    # driving ----------------------------------------------------------------------------------
    def train(self):
        """Train the remaining epochs; returns the stopping signal's number or None."""
        cfg, tr = self.cfg, self.trainer
        remaining = cfg["epochs"] - tr.current_epoch
        if remaining <= 0 or (self.early is not None and self.early.stopped()):
            return None
        self.t0 = time.perf_counter()
        with StopOnSignal(tr) as stopper:
            if self.lm:
                xs, ts = self.data["train"][:-1], self.data["train"][1:]
                tr.fit(xs, ts, max_epoch=remaining, batch_size=cfg["batch_size"],
                       time_size=cfg["time_size"], max_grad=cfg["max_grad"],
                       max_iters=cfg["max_iters"])
            else:
                d = self.data
                tr.fit(d["x_train"], d["t_train"], max_epoch=remaining,
                       batch_size=cfg["batch_size"], max_grad=cfg["max_grad"])
            if stopper.signum is not None:
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
        """Test figures, curves and the final metrics.json; returns the curve files' names."""
        from .models import AttentionSeq2seq
        from .plot import plot_curves
        self.metrics.pop("stopped", None)
        name, epochs = type(self.model).__name__, self.metrics["epochs"]
        self.writer.flush()
        pngs = []
        if self.lm:
            self.model.load_params(os.path.join(self.out, "model.npz"))  # the best epoch's weights
            self.model.reset_state()
            t0 = time.perf_counter()
            test_ppl = self.perplexity(self.data["test"])
            self.metrics["test_perplexity"] = round(test_ppl, 4)
            best = self.best_model.best
            print(f"test perplexity {test_ppl:.2f} (best model, val perplexity "
                  f"{'none' if best is None else f'{best:.2f}'}; eval "
                  f"{time.perf_counter() - t0:.1f}s)")
            pngs.append(plot_curves({"train": [e["train_perplexity"] for e in epochs],
                                     "validation": [e["val_perplexity"] for e in epochs]},
                                    "epoch", "perplexity", os.path.join(self.out, "perplexity.png"),
                                    title=f"{name} on {self.data['source']} (test {test_ppl:.1f})"))
        else:
            self.score_best()
            label = name + (" + reverse" if self.cfg["reverse"] else "")
            if self.pairs:
                ter = "CER" if self.cfg["target_tokens"] == "char" else "PER"
                pngs.append(plot_curves({"dev WER": [e["val_wer"] * 100 for e in epochs],
                                         f"dev {ter}": [e["val_ter"] * 100 for e in epochs]},
                                        "epoch", "error rate (%)",
                                        os.path.join(self.out, "error.png"), title=label))
            else:
                pngs.append(plot_curves({f"{label}, dev": [e["val_accuracy"] * 100 for e in epochs],
                                         f"{label}, test": [e["test_accuracy"] * 100
                                                            for e in epochs]},
                                        "epoch", "accuracy (%)",
                                        os.path.join(self.out, "accuracy.png"), ylim=(0, 100)))
            if isinstance(self.model, AttentionSeq2seq) and not self.pairs:
                pngs.append(self.attention_png())
        write_json(os.path.join(self.out, "metrics.json"), self.metrics)
        return [os.path.basename(p) for p in pngs if p]

    def score_best(self):
        """The test split scored with best.npz (the best dev epoch's weights), into metrics."""
        meta = self.model.load_params(os.path.join(self.out, "best.npz"))
        self.metrics["best_epoch"] = meta["epoch"]
        figure = monitor(self.cfg["task"])[0]
        test = self.data["test"]
        if test is None:
            print(f"best model: epoch {meta['epoch']} ({figure} {meta[figure]:.4f}); no test "
                  f"split (--test FILE) to score", flush=True)
            return
        t0 = time.perf_counter()
        s = test.score(self.model)
        fig = {"n": s["n"], "accuracy": s["accuracy"], "wer": s["wer"], "ter": s["ter"],
               "seconds": round(time.perf_counter() - t0, 4)}
        k = self.cfg.get("beam")
        if k:
            b = test.score(self.model, k)
            fig.update({f"beam{k}_accuracy": b["accuracy"], f"beam{k}_wer": b["wer"],
                        f"beam{k}_ter": b["ter"]})
        self.metrics["test"] = fig
        self.metrics["test_accuracy"] = s["accuracy"]
        if self.pairs:
            ter = "CER" if self.cfg["target_tokens"] == "char" else "PER"
            text = f"test WER {s['wer'] * 100:.2f}% {ter} {s['ter'] * 100:.2f}%"
        else:
            text = f"test accuracy {s['accuracy'] * 100:.2f}%"
        print(f"{text} (best model: epoch {meta['epoch']}, {figure} {meta[figure]:.4f}; "
              f"{s['n']} {'sources' if self.pairs else 'questions'})", flush=True)

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
