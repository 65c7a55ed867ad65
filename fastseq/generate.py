"""Sampling from language-model scores, and the text generation CLI.

    python -m fastseq.generate --model runs/ptb/model.npz --start "the meaning of life is" \\
        --length 100 --temperature 0.8 --seed 0 [--top-k 40] [--top-p 0.9] [--greedy]

Functions (NumPy, on one score vector of length V):
    softmax_temperature(logits, temperature)  probabilities of logits / temperature
    top_k_filter(logits, k)                   keep the k largest logits, the rest -> -inf
    top_p_filter(logits, p)                   keep the smallest set of most likely words whose
                                              probability sums to >= p (nucleus), the rest -> -inf
    sample_from_logits(logits, ...)           one id (temperature / top-k / top-p / greedy)
    make_sampler(V, ...)                      the same as a fast closure (checks done once)
"""
import argparse
import os
import sys

import numpy as np

DEFAULT_SKIP = ("N", "<unk>", "$")


def make_rng(seed=None, rng=None):
    """A NumPy random generator: ``rng`` as given, else one seeded with ``seed``, else NumPy's
    global RandomState (so np.random.seed works as in the textbook)."""
    if rng is not None:
        if seed is not None:
            raise ValueError("give seed or rng, not both")
        return rng
    if seed is not None:
        return np.random.default_rng(seed)
    return np.random.mtrand._rand


def _check_temperature(temperature):
    t = float(temperature)
    if not t >= 0 or t == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    return t


def _check_top_k(top_k, V):
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    return min(int(top_k), V)


def _check_top_p(top_p):
    if top_p is None:
        return None
    p = float(top_p)
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return p


def softmax_temperature(logits, temperature=1.0):
    """Probabilities (float64) of logits / temperature; temperature 0 puts all mass on the argmax
    (the first one on ties). -inf logits get probability 0."""
    z = np.asarray(logits, dtype=np.float64)
    t = _check_temperature(temperature)
    if t == 0:
        p = np.zeros(z.shape)
        p[int(np.argmax(z))] = 1.0
        return p
    z = z / t
    z -= z.max()
    np.exp(z, out=z)
    z /= z.sum()
    return z


def top_k_filter(logits, k):
    """A copy of logits with all but the k largest set to -inf (exactly k kept, ties broken by
    position)."""
    z = np.array(logits, dtype=np.float64)
    k = _check_top_k(k, z.size)
    if k < z.size:
        drop = np.argpartition(z, z.size - k)[:z.size - k]
        z[drop] = -np.inf
    return z


def top_p_filter(logits, p, temperature=1.0):
    """A copy of logits keeping only the nucleus: the most likely words (at ``temperature``) in
    order of probability until their total reaches p (at least one word); the rest -> -inf."""
    z = np.array(logits, dtype=np.float64)
    p = _check_top_p(p)
    probs = softmax_temperature(z, temperature if _check_temperature(temperature) > 0 else 1.0)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n_keep = min(int(np.searchsorted(cum, p * cum[-1] * (1 - 1e-12))) + 1, z.size)
    z[order[n_keep:]] = -np.inf
    return z


def _draw(probs_unnorm, rng):
    """Index drawn with probability proportional to the non-negative weights."""
    cdf = np.cumsum(probs_unnorm)
    u = rng.random() * cdf[-1]
    i = int(np.searchsorted(cdf, u, side="right"))
    if i >= cdf.size:  # u rounded up to the total
        i = int(np.flatnonzero(probs_unnorm)[-1])
    return i


def make_sampler(vocab_size, skip_ids=None, temperature=1.0, top_k=None, top_p=None, greedy=False,
                 seed=None, rng=None):
    """A function logits (V,) -> sampled id, with every option checked once here."""
    V = int(vocab_size)
    t = _check_temperature(temperature)
    k = _check_top_k(top_k, V)
    p = _check_top_p(top_p)
    greedy = bool(greedy) or t == 0
    gen = make_rng(seed, rng)
    skip = None
    if skip_ids is not None:
        skip = np.unique(np.asarray(list(skip_ids), dtype=np.int64))
        if skip.size and (skip[0] < 0 or skip[-1] >= V):
            raise ValueError(f"skip_ids must be in [0, {V}), got {skip.tolist()}")
        if skip.size >= V:
            raise ValueError("skip_ids exclude the whole vocabulary")
        if not skip.size:
            skip = None

    def sample(logits):
        z = np.array(logits, dtype=np.float64).reshape(-1)  # a fresh float64 copy
        if z.size != V:
            raise ValueError(f"expected {V} scores, got {z.size}")
        if skip is not None:
            z[skip] = -np.inf
        if greedy:
            return int(np.argmax(z))
        if t != 1.0:
            z *= 1.0 / t
        if k is not None and k < V:
            drop = np.argpartition(z, V - k)[:V - k]
            z[drop] = -np.inf
        z -= z.max()
        np.exp(z, out=z)
        if p is not None and p < 1:
            order = np.argsort(-z, kind="stable")
            cum = np.cumsum(z[order])
            n_keep = min(int(np.searchsorted(cum, p * cum[-1] * (1 - 1e-12))) + 1, V)
            z[order[n_keep:]] = 0.0
        return _draw(z, gen)

    return sample


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, rng=None,
                       seed=None, skip_ids=None):
    """One id sampled from softmax(logits / temperature) after top-k / top-p filtering and removing
    skip_ids; greedy (or temperature 0) returns the argmax."""
    logits = np.asarray(logits)
    return make_sampler(logits.size, skip_ids=skip_ids, temperature=temperature, top_k=top_k,
                        top_p=top_p, greedy=greedy, seed=seed, rng=rng)(logits)


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
