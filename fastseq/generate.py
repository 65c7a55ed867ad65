"""The text generation CLI (the samplers live in fastseq.sampling).

    python -m fastseq.generate --model runs/ptb/model.npz --start "the meaning of life is" \\
        --length 100 --temperature 0.8 --seed 0 [--top-k 40] [--top-p 0.9] [--greedy]
"""
import argparse
import os
import sys

from .sampling import (make_sampler, sample_from_logits, softmax_temperature,  # noqa: F401
                       top_k_filter, top_p_filter)

DEFAULT_SKIP = ("N", "<unk>", "$")


# ---------------------------------------------------------------------------------------------
# loading a trained model and its vocabulary

def load_language_model(path, data_dir=None):
    """(model, id_to_word list) from a model.npz written by ``python -m fastseq.train --task ptb``."""
    from . import models
    from .io import read_npz
    _, meta = read_npz(path)
    name = meta.get("model")
    cls = {"Rnnlm": models.Rnnlm, "BetterRnnlm": models.BetterRnnlm}.get(name)
    if cls is None:
        raise ValueError(f"{path}: holds a {name!r} model, not a language model (Rnnlm or BetterRnnlm)")
    config = meta.get("config") or {}
    model = cls(**config)
    model.load_params(path)
    vocab = meta.get("vocab")
    if vocab is None:
        if meta.get("vocab_source", "ptb") != "ptb":
            raise ValueError(f"{path}: no vocabulary stored and unknown vocab_source "
                             f"{meta.get('vocab_source')!r}")
        from .datasets import ptb
        _, _, id_to_word = ptb.load_data("train", data_dir=data_dir)
        vocab = [id_to_word[i] for i in range(len(id_to_word))]
    if len(vocab) != model.vocab_size:
        raise ValueError(f"{path}: the vocabulary has {len(vocab)} words but the model "
                         f"{model.vocab_size}")
    return model, list(vocab)


def ids_to_text(words):
    """Words joined by spaces, with <eos> as a line break."""
    lines, cur = [], []
    for w in words:
        if w == "<eos>":
            lines.append(" ".join(cur))
            cur = []
        else:
            cur.append(w)
    lines.append(" ".join(cur))
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastseq.generate",
                                description="Generate text with a trained language model "
                                            "(model.npz from python -m fastseq.train --task ptb).")
    p.add_argument("--model", required=True, metavar="PATH", help="model.npz written by fastseq.train")
    p.add_argument("--start", default="you", help="start word or phrase (default 'you')")
    p.add_argument("--length", type=int, default=100,
                   help="words to produce from the last start word on, that word included (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely words")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="always take the most likely word")
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible samples)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="PTB folder, only needed when the model file holds no vocabulary")
    p.add_argument("--allow-skipped", action="store_true",
                   help="also sample N, <unk> and $ (skipped by default)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    prog = "fastseq.generate"
    try:
        if args.length < 1:
            raise ValueError(f"--length must be >= 1, got {args.length}")
        if not os.path.exists(args.model):
            raise FileNotFoundError(f"model file {args.model} not found")
        model, vocab = load_language_model(args.model, data_dir=args.data_dir)
        word_to_id = {w: i for i, w in enumerate(vocab)}
        words = args.start.split()
        if not words:
            raise ValueError("--start is empty")
        for w in words:
            if w not in word_to_id:
                raise ValueError(f"start word {w!r} is not in the model's vocabulary "
                                 f"({len(vocab)} words)")
        skip = None if args.allow_skipped else [word_to_id[w] for w in DEFAULT_SKIP if w in word_to_id]
        model.reset_state()
        ids = model.generate([word_to_id[w] for w in words], skip_ids=skip, sample_size=args.length,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             greedy=args.greedy, seed=args.seed)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(ids_to_text([vocab[i] for i in ids]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
