"""A training run in a folder, as ``python -m fastseq.train`` runs it: the task's data, a model and
trainer built from the registry, callbacks for evaluation, the learning-rate schedule, the best
model, checkpoints and Ctrl-C, and the files: metrics.json, model.npz, checkpoint.npz and curves.

    cfg = {...}                        # what fastseq.train resolves from flags and defaults
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
from .callbacks import Callback, EveryIterations, LRSchedule, SaveBest, StopOnSignal
from .files.schema import Any, Bool, Choice, Dict, Int, List, Num, Optional, Str

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

# every setting a run's configuration may hold, declared (resumed configurations are checked)
POSITIVE, RATE, PATH = Int(1), Num(above=0), Str(4096)
SETTING_SCHEMAS = {"epochs": POSITIVE, "batch_size": POSITIVE, "hidden_size": POSITIVE,
                   "wordvec_size": POSITIVE, "lr": RATE, "max_grad": RATE,
                   "beam": Optional(POSITIVE),
                   "time_size": POSITIVE, "dropout_ratio": Num(0, below=1),
                   "encoder": Choice("uni", "bi"), "layers": POSITIVE,
                   "max_iters": Optional(POSITIVE), "eval_max_iters": Optional(POSITIVE),
                   "data": Optional(PATH), "data_dir": Optional(PATH), "reverse": Bool(),
                   "mask": Bool(), "optimizer": Choice("adam", "sgd")}
TRAINING_KEYS = {k for t in TASKS.values() for k in t} - {"family", "model"}


class RunError(Exception):
    """A user error found after parsing: one `fastseq:` line, exit status 2."""


def model_keywords(entry, cfg):
    """The constructor keywords of a registered model: its defaults that are not training
    settings, with the values cfg gives them."""
    return {k: cfg[k] for k in entry.defaults if k not in TRAINING_KEYS}


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


EPOCH_FIGURES = {"lm": ("train_perplexity", "val_perplexity"), "seq2seq": ("test_accuracy",)}


def _run_schema(family, settings):
    """The settings of the run's task and model, the figures of each epoch and, for a language
    model, the state of the callbacks that follow the validation perplexity."""
    config = Dict({k: SETTING_SCHEMAS.get(k, Any()) for k in settings}, extra=Any())
    epoch = Dict({k: Num() for k in EPOCH_FIGURES[family]}, extra=Any())
    fields = {"config": config,
              "metrics": Dict({"epochs": List(epoch, checkpoint.MAX_ITEMS)}, extra=Any())}
    if family == "lm":  # the best model and the schedule follow the val perplexity
        best = Dict({"best": Optional(Num())})
        callbacks = Dict({"save_best": best, "lr_schedule": best}, extra=Any())
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
    settings = [k for k in [*tdef, *entry.defaults] if k not in ("family", "model")]
    for k, v in entry.defaults.items():  # a model keyword newer than the run: its default is
        if k not in TRAINING_KEYS:        # the model the run was built with
            cfg.setdefault(k, v)
    checkpoint.check(path, meta, _run_schema(tdef["family"], settings))
    return cfg, (arrays, meta)


# ---------------------------------------------------------------------------------------------
# data

def load_data(cfg):
    return (_lm_data if cfg["family"] == "lm" else _seq2seq_data)(cfg)


def _seq2seq_data(cfg):
    from .datasets.sequence import load_dataset, pad_id, reverse_padded
    from .models import REGISTRY
    data = load_dataset(cfg["data"])
    vocab = data.vocab
    # a padding-aware model gets the data set's pad id; its questions reverse only their characters
    pad = pad_id(vocab) if REGISTRY[cfg["model"]].pads and cfg.get("mask", True) else None
    x_train, x_test = data.x_train, data.x_test
    if cfg["reverse"]:
        x_train, x_test = reverse_padded(x_train, pad), reverse_padded(x_test, pad)
    return {"x_train": x_train, "t_train": data.t_train, "x_test": x_test, "t_test": data.t_test,
            "source": data.source, "vocab": vocab, "pad_id": pad,
            "vocab_meta": {"chars": [vocab.id_to_char[i] for i in range(len(vocab))],
                           "question_width": vocab.question_width,
                           "answer_width": vocab.answer_width}}


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
    return (f"{type(model).__name__} on {data['source']}: {len(data['x_train'])} train / "
            f"{len(data['x_test'])} test questions, vocabulary {len(data['vocab'])}, "
            f"reverse={cfg['reverse']}")


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
    if cfg["family"] == "seq2seq":
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
        V = len(data["words"]) if self.lm else len(data["vocab"])
        np.random.seed(cfg["seed"])  # whatever draws from the global generator draws the same
        self.model, self.trainer = build(cfg, V, None if self.lm else data["pad_id"])
        self.metrics = {"config": cfg, "engine": backend.info(), "epochs": []}
        self.ckpt_seconds, self.t0 = 0.0, time.perf_counter()
        self.t1 = self.t0  # when the current epoch's training ended
        self.writer = files.Writer()
        self.best_model = SaveBest("val_perplexity", self.save_best) if self.lm else None
        every = EveryIterations(cfg["checkpoint_every"], lambda loop: self.save_checkpoint())
        evaluate = _AtEpochEnd(self.evaluate_lm if self.lm else self.evaluate_seq2seq)
        after = [self.best_model, LRSchedule("val_perplexity", 0.25)] if self.lm else []
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

    def save_model(self, **extra):
        """model.npz of the weights now (the model's own file contents), by the writer thread."""
        t = time.perf_counter()
        meta = {"task": self.cfg["task"], "model_name": self.cfg["model"],
                "epoch": self.trainer.current_epoch, **self.data["vocab_meta"]}
        if self.lm:
            meta["vocab_source"] = self.data["source"]
        else:
            meta["reverse"] = self.cfg["reverse"]
        self.writer.submit(os.path.join(self.out, "model.npz"),
                           *files.model_file(self.model, json.loads(json.dumps(dict(meta, **extra)))))
        self.ckpt_seconds += time.perf_counter() - t

    def save_best(self, loop):
        self.save_model(val_perplexity=loop.epoch_log["val_perplexity"])

    # the epoch's end: timing, evaluation, [best model, schedule], record ---------------------
    def start_epoch_log(self, loop):
        self.t1 = time.perf_counter()
        loop.epoch_log.update(train_seconds=round(self.t1 - self.t0 - self.ckpt_seconds, 4),
                              checkpoint_seconds=round(self.ckpt_seconds, 4),
                              loss=round(loop.epoch_log["loss"], 6))
        self.ckpt_seconds = 0.0

    def evaluate_seq2seq(self, loop):
        d, model, log = self.data, self.model, loop.epoch_log
        acc = trainer_mod.eval_seq2seq(model, d["x_test"], d["t_test"])
        t2 = time.perf_counter()
        log.update(eval_seconds=round(t2 - self.t1, 4), test_accuracy=acc)
        beam = ""
        if self.cfg.get("beam"):
            from .decoding import beam_search
            k = self.cfg["beam"]
            out = beam_search(model, d["x_test"], d["t_test"][:, 0], d["t_test"].shape[1] - 1, k)
            log[f"beam{k}_accuracy"] = float((out == d["t_test"][:, 1:]).all(axis=1).mean())
            log["beam_eval_seconds"] = round(time.perf_counter() - t2, 4)
            beam = f" | beam {k} {log[f'beam{k}_accuracy'] * 100:6.2f}%"
        print(f"epoch {log['epoch']:3d} | loss {log['loss']:.4f} | test accuracy "
              f"{acc * 100:6.2f}%{beam} | train {log['train_seconds']:.2f}s eval "
              f"{t2 - self.t1:.2f}s", flush=True)
        show = np.random.RandomState(self.cfg["seed"]).choice(len(d["x_test"]), 3, replace=False)
        guesses = model.generate(d["x_test"][show], d["t_test"][show, 0],
                                 d["t_test"].shape[1] - 1)
        vocab = d["vocab"]
        for q, t, g in zip(d["x_test"][show], d["t_test"][show], guesses):
            ok = "ok " if (np.asarray(g) == t[1:]).all() else "bad"
            print(f"    {ok} {vocab.decode(self.written(q))!r:12} truth {vocab.decode(t[1:])!r:8} "
                  f"guess {vocab.decode(g)!r}")
        self.save_model()

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
        if remaining <= 0:
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
            label = name + (" + reverse" if self.cfg["reverse"] else "")
            pngs.append(plot_curves({label: [e["test_accuracy"] * 100 for e in epochs]},
                                    "epoch", "test accuracy (%)",
                                    os.path.join(self.out, "accuracy.png"), ylim=(0, 100)))
            if isinstance(self.model, AttentionSeq2seq):
                pngs.append(self.attention_png())
        write_json(os.path.join(self.out, "metrics.json"), self.metrics)
        return [os.path.basename(p) for p in pngs if p]

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
