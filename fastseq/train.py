"""python -m fastseq.train: train a model; write metrics.json, a curve PNG, model.npz and, after
every epoch (and every --checkpoint-every iterations), checkpoint.npz.

    python -m fastseq.train                      # PeekySeq2seq, reversed input, generated addition
    python -m fastseq.train --model seq2seq --no-reverse --data addition.txt
    GPU=1 python -m fastseq.train                # same run on CuPy
    python -m fastseq.train --task date --data date.txt --beam 5      # AttentionSeq2seq
    python -m fastseq.train --task ptb --model rnnlm --data-dir ptb   # PTB files read offline
    python -m fastseq.train --task ptb --model better          # BetterRnnlm, 40 epochs
    python -m fastseq.train --task text --data my.txt          # a language model on any text
    python -m fastseq.train --task pairs --data train.tsv --test test.tsv --target-tokens space
                                                  # seq2seq on your own source<TAB>target lines
    python -m fastseq.train --resume runs/20260101-120000      # continue a stopped or killed run

Models, their task family and their defaults come from fastseq.models.REGISTRY; the tasks'
defaults from fastseq.run.TASKS; fastseq.run.configure merges them (a model's defaults override
its task's, a flag overrides both). The run itself is fastseq.run.TrainingRun. Seq2seq runs
score a dev split every epoch (held out of the training data, seeded; pairs: --valid FILE or
--valid-fraction of the sources), keep the best epoch's weights in best.npz, lower the learning
rate when the dev figure stops improving (--lr-decay, --lr-patience), stop early (--patience)
and score the test split with best.npz. Ctrl-C (or SIGTERM) stops at the end of the current
iteration and saves; a second one stops at once.
"""
import argparse
import os
import sys
import time

from . import backend
from .callbacks import Interrupted
from .cli import add_flags, flag_keys, int_at_least, number_in, one_of
from .run import (TASK_HELP, TASKS, RunError, TrainingRun, build,  # noqa: F401 (re-exported)
                  check_out, configure, defaults_text, describe_data, load_data, load_resume,
                  make_out, select_engine)

# ---------------------------------------------------------------------------------------------
# flags

positive_int, positive_float, count = int_at_least(1), number_in(0), int_at_least(0)
probability_lt1 = number_in(0, 1, lo_open=False, hi_open=True)
fraction, factor, tokens = number_in(0, 1), number_in(0, 1, hi_open=False), one_of("char", "space")

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
    "--encoder": ("encoder", one_of("uni", "bi"), "attention: one-directional encoder, or "
                                                  "bidirectional (hidden size / 2 each way)"),
    "--layers": ("layers", positive_int, "attention: stacked LSTM layers on each side"),
    "--max-iters": ("max_iters", positive_int, "cap the iterations per epoch (quick runs)"),
    "--eval-max-iters": ("eval_max_iters", positive_int,
                         "cap the iterations of each perplexity evaluation (quick runs)"),
    "--data": ("data", str, "data file (addition, date: the textbook's question_answer lines; "
                            "text: any UTF-8 text; pairs: source<TAB>target lines, the training "
                            "file)"),
    "--valid": ("valid", str, "pairs: dev file (source<TAB>target); default: --valid-fraction "
                              "of the --data sources"),
    "--test": ("test", str, "pairs: test file (source<TAB>target), scored once with the best "
                            "model"),
    "--valid-fraction": ("valid_fraction", fraction,
                         "share of the training sources (pairs) or rows held out as the dev "
                         "split, seeded"),
    "--source-tokens": ("source_tokens", tokens, "pairs: sources as characters (char) or "
                                                 "whitespace-separated symbols (space)"),
    "--target-tokens": ("target_tokens", tokens, "pairs: targets as characters (char) or "
                                                 "whitespace-separated symbols (space)"),
    "--max-length": ("max_length", positive_int, "pairs: longest side in symbols; longer lines "
                                                 "are bad lines"),
    "--patience": ("patience", positive_int, "stop after N epochs without a better dev figure"),
    "--lr-decay": ("lr_decay", factor, "multiply the learning rate by X once --lr-patience "
                                       "epochs in a row bring no better dev figure (1: never)"),
    "--lr-patience": ("lr_patience", positive_int, "epochs in a row without a better dev figure "
                                                   "before the learning rate falls"),
    "--data-dir": ("data_dir", str, "folder holding ptb.{train,valid,test}.txt (read offline; "
                                    "default: the download cache)"),
}
SWITCHES = {  # key -> help of --key, help of --no-key (a '-' in the flag is '_' in the key)
    "reverse": ("seq2seq: feed each question reversed (addition default)",
                "seq2seq: feed questions in their written order"),
    "mask": ("padding-aware models (attention): give the model the data's pad id (padding "
             "masked; addition default)",
             "padding-aware models: treat pads as data, reverse whole rows (the textbook's "
             "setting; date default: it learns the date task faster)"),
    "skip_bad_lines": ("pairs: leave out bad lines (no tab, an empty side, not UTF-8, over "
                       "--max-length), counted in one warning",
                       "pairs: a bad line is an error naming the file and line (default)")}

FLAGS = flag_keys(SETTINGS, SWITCHES)  # flag -> key of every flag that sets part of a run


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
    add_flags(p, SETTINGS, SWITCHES, defaults_text)
    p.add_argument("--seed", type=count, default=None,
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
    given = {f: (key, getattr(args, key)) for f, key in FLAGS.items()
             if getattr(args, key) is not None}
    return configure(args.task or "addition", args.model, given, args.seed, args.checkpoint_every)


# ---------------------------------------------------------------------------------------------
# the run

def prepare(args):
    """(cfg, out, resume state) from the flags, or RunError."""
    if args.resume is None:
        cfg = resolve(args)
        out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        check_out(out)
        return cfg, out, None
    others = {"--task": "task", "--model": "model", "--seed": "seed", "--out": "out",
              "--checkpoint-every": "checkpoint_every"}
    given = [f for f, key in dict(others, **FLAGS).items() if getattr(args, key) is not None]
    if given:
        raise RunError(f"--resume continues a run with its own settings; drop {', '.join(given)}")
    cfg, resume = load_resume(args.resume)
    return cfg, args.resume, resume


def main(argv=None):
    args = build_parser().parse_args(argv)
    out, created, run = None, False, None
    try:
        cfg, out, resume = prepare(args)
        engine = args.engine or (cfg["engine"] if resume else None) or "auto"
        cfg["engine"] = select_engine(engine)
        cfg["progress"] = not args.no_progress
        data = load_data(cfg)
        if resume and resume[1]["vocabulary"] != data["vocab_meta"]:
            raise RunError(f"--resume {out}: the data's vocabulary differs from the one the run "
                           f"was trained with")
        created = not os.path.exists(out)
        make_out(out)
        run = TrainingRun(cfg, out, data, resume)
        print(describe_data(cfg, data, run.model))
        print(backend.describe(), flush=True)
        if resume:
            tr = run.trainer
            print(f"resuming {out} at epoch {tr.current_epoch + 1}, iteration {tr.iteration}",
                  flush=True)
        signum = run.train()
        if signum is not None:
            return 128 + signum
        pngs = run.finish()
        run.writer.close()
        from .plot import have_matplotlib
        if not pngs and not have_matplotlib():
            print("note: matplotlib is not installed, so no curve was drawn "
                  "(pip install 'fastseq[plot]')")
        print(f"wrote {out}/metrics.json, model.npz, checkpoint.npz" +
              "".join(f", {p}" for p in pngs))
        return 0
    except (RunError, OSError, ValueError, backend.BackendError) as e:  # bad data, no GPU, ...
        print(f"fastseq: {e}", file=sys.stderr)
    except FloatingPointError as e:  # TrainingDiverged: nothing written after the last good state
        saved = out and os.path.exists(os.path.join(out, "checkpoint.npz"))
        print(f"fastseq: training stopped: {e}; " +
              (f"the last checkpoint in {out} is intact" if saved else "nothing was saved"),
              file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        import signal
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
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
