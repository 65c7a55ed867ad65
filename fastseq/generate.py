"""The CLI that uses a trained model (the samplers live in fastseq.sampling):

    python -m fastseq.generate --model runs/addition/model.npz --question "71+118"
    python -m fastseq.generate --model runs/ptb/model.npz --start "the meaning of life is" \\
        --length 100 --temperature 0.8 --seed 0 [--top-k 40] [--top-p 0.9] [--greedy]
"""
import argparse
import math
import sys

from .cli import int_at_least, number_in
from .datasets.text import words_to_text as ids_to_text
from .sampling import MIN_TEMPERATURE

DEFAULT_SKIP = ("N", "<unk>", "$")


# ---------------------------------------------------------------------------------------------
# the CLI: answers from a seq2seq model, text from a language model

MAX_LENGTH = 100_000  # words per run: bounded so that no argument makes it run for hours
LM_ONLY = ("start", "length", "temperature", "top_k", "top_p", "seed", "allow_skipped")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m fastseq.generate",
        description="Answer questions with a trained seq2seq model, or generate text with a "
                    "trained "
                    "language model (model.npz or checkpoint.npz from python -m fastseq.train).")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="model.npz or checkpoint.npz written by fastseq.train")
    p.add_argument("--question", action="append", default=None, metavar="TEXT",
                   help="seq2seq models: a question such as '71+118' (repeat for more)")
    p.add_argument("--beam", type=int, default=None, metavar="K",
                   help="seq2seq models: beam search of width K (default: greedy)")
    p.add_argument("--start", default=None,
                   help="language models: start word or phrase (default 'you')")
    p.add_argument("--length", type=int, default=None,
                   help="words to produce from the last start word on, that word included "
                        "(default 100)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"softmax temperature (default 1; 0, or below {MIN_TEMPERATURE}, = greedy)")
    p.add_argument("--top-k", type=int_at_least(1), default=None,
                   help="sample among the k most likely words")
    p.add_argument("--top-p", type=number_in(0, 1, hi_open=False), default=None,
                   help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="always take the most likely word")
    p.add_argument("--seed", type=int_at_least(0), default=None,
                   help="random seed (reproducible samples)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="PTB folder, only needed when the model file holds no vocabulary")
    p.add_argument("--allow-skipped", action="store_true", default=None,
                   help="also sample N, <unk> and $ (skipped by default)")
    return p


def _answers(saved, args):
    if args.question is None:
        raise ValueError(f"{args.model} holds a seq2seq model ({type(saved.model).__name__}); "
                         f"give --question, e.g. --question \"71+118\"")
    given = [f"--{k.replace('_', '-')}" for k in LM_ONLY if getattr(args, k) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: for language models only; "
                         f"{args.model} holds a seq2seq model")
    for q in args.question:
        if not q.strip():
            raise ValueError("--question is empty")
    if args.beam is not None and args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    return "\n".join(saved.answer([q.strip() for q in args.question], beam=args.beam))


def _text(saved, args):
    if args.beam is not None:
        raise ValueError(f"--beam: for seq2seq models only; {args.model} holds a language model")
    if args.question is not None:
        raise ValueError(f"--question needs a seq2seq model; {args.model} holds a language model "
                         f"({type(saved.model).__name__}): give --start")
    length = 100 if args.length is None else args.length
    if not 1 <= length <= MAX_LENGTH:
        raise ValueError(f"--length must be in [1, {MAX_LENGTH}], got {length}")
    t = 1.0 if args.temperature is None else args.temperature
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"--temperature must be a finite number >= 0, got {t}")
    greedy = args.greedy or t < MIN_TEMPERATURE
    vocab = saved.vocab
    word_to_id = {w: i for i, w in enumerate(vocab)}
    words = ("you" if args.start is None else args.start).split()
    if not words:
        raise ValueError("--start is empty")
    for w in words:
        if w not in word_to_id:
            raise ValueError(f"start word {w!r} is not in the model's vocabulary "
                             f"({len(vocab)} words)")
    skip = None if args.allow_skipped else [word_to_id[w] for w in DEFAULT_SKIP if w in word_to_id]
    model = saved.model
    model.reset_state()
    ids = model.generate([word_to_id[w] for w in words], skip_ids=skip, sample_size=length,
                         temperature=1.0 if greedy else t, top_k=args.top_k, top_p=args.top_p,
                         greedy=greedy, seed=args.seed)
    return ids_to_text([vocab[i] for i in ids])


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .files import load
    try:
        saved = load(args.model, data_dir=args.data_dir)
        out = _answers(saved, args) if saved.task == "seq2seq" else _text(saved, args)
    except (ValueError, OSError) as e:
        missing = isinstance(e, FileNotFoundError) and e.filename is not None
        msg = f"{e.filename}: not found" if missing else " ".join(str(e).split())
        print(f"fastseq: {msg}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
