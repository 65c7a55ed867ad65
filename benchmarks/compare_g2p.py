"""Grapheme-to-phoneme on the CMUdict split, side by side: fastseq's AttentionSeq2seq, the same
network in PyTorch CPU, and g2p_en's per-word predict, each in its own worker process.

    python -m benchmarks.compare_g2p [--hidden 256] [--wordvec 64] [--encoder uni|bi]
        [--rounds 3] [--batches 0] [--eval-rounds 3] [--sides fastseq torch torch-1 g2p_en]
        [--layers 1] [--dropout 0] [--beam 5]

Data: g014b2b.train (one line per pronunciation: `WORD<TAB>PH ON ES`), the 12,000 test words
g014b2b.words and their references g014b2b.ref, read from the data folder (FASTSEQ_TEXTBOOK_DATA
or ../shared/data, cmudict/); the script stops with a reason when they are absent. One shared
vocabulary of letters and phones (id 0 the pad, id 1 the start symbol); sources are a word's
letters, targets `start + phones`, both padded at their end; the first pad after a target is its
end symbol.

Training: batches of --batch pairs, bucketed by length (pairs sorted by source length with
seeded random tie-breaks, cut into batches, the batch order shuffled), each batch trimmed to its
longest source and target: the same batches in the same order on both sides. Adam 1e-3,
gradient norm clipped to 5, softmax cross-entropy over the target symbols up to each end symbol.
The sides take turns (benchmarks.common.take_turns, order rotating per round) of --batches
batches (0: a whole epoch); reported is seconds per epoch and the median of per-round ratios.

Conversion: greedy search of the 12,000 test words (at most the longest training target + 1
symbols, stopping when every word has ended), batched and sorted by length (fastseq: its
generate, batches of 256; PyTorch: batches of --torch-eval-batch under torch.inference_mode,
as many threads as the process's CPUs, or one for the side torch-1);
g2p_en: its predict, one word at a time (its NumPy GRU, no attention; stress marks dropped when
scoring). Then fastseq's beam search of width --beam over the same words, timed alone. The word error rate printed beside each is that of the model as trained by the turns
above (g2p_en: its shipped weights): a check that the sides decode, not a result.

The PyTorch network is fastseq's AttentionSeq2seq: nn.Embedding + nn.LSTM encoder over packed
sequences (its final state at each word's true end), the decoder nn.LSTM started from that
state with c = 0, dot-product attention over the encoder states with the keys past a word's end
masked, nn.Linear on [context ; h]. --encoder bi: a bidirectional encoder, H/2 per direction,
the two directions' states concatenated (H), the decoder started from [forward state at the
end ; backward state at the start]; --layers L: stacked LSTMs on both sides, each decoder layer
started from the encoder's final state of its layer; --dropout p: on both sides' word vectors,
between layers and on [context ; h]. fastseq's side passes encoder=, layers=, dropout_ratio= to
AttentionSeq2seq only when they differ from uni, 1, 0; a fastseq without those keywords is
reported as unavailable for that setting.
"""
import argparse
import os
import re
import sys

import numpy as np

from benchmarks.common import (TEXTBOOK_DATA, ask, machine_line, ratio_stats, start_workers,
                               stop_workers, take_turns, timed, worker_serve)

PAD, START = 0, 1
FILES = ("cmudict/g014b2b.train", "cmudict/g014b2b.words", "cmudict/g014b2b.ref")
SIDES = ("fastseq", "torch", "torch-1", "g2p_en")
# torch: as many threads as this process may use CPUs (torch.set_num_threads); torch-1: one
# thread (on a loaded machine PyTorch's OpenMP threads wait on each other: the two bracket it)
THREADS_ENV = {"torch-1": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}


# --- data ---------------------------------------------------------------------------------------

def missing_files(folder=TEXTBOOK_DATA):
    return [f for f in FILES if not (folder / f).is_file()]


def read_pairs(path):
    """[(word, [phones])] of a `WORD<TAB>PH ON ES` file, one pair per line."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            word, _, phones = line.rstrip("\n").partition("\t")
            if word and phones.split():
                pairs.append((word, phones.split()))
    return pairs


def read_refs(path):
    """{word: set of reference phone tuples} of a `WORD<TAB>REF1[<TAB>REF2...]` file."""
    refs = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            word, *prons = line.rstrip("\n").split("\t")
            refs[word] = {tuple(p.split()) for p in prons}
    return refs


class G2PData:
    """The split as ids: training sources X (N, Ts) and targets T (N, Tt), test sources, the
    vocabulary, and the bucketed batches."""

    def __init__(self, folder=TEXTBOOK_DATA, limit=None):
        train = read_pairs(folder / FILES[0])[:limit]
        with open(folder / FILES[1], encoding="utf-8") as f:
            self.test_words = [w.strip() for w in f if w.strip()][:limit]
        self.refs = read_refs(folder / FILES[2])
        letters = sorted({c for w, _ in train for c in w} | {c for w in self.test_words for c in w})
        phones = sorted({p for _, ps in train for p in ps})
        self.symbols = [" ", "_"] + sorted(set(letters) | set(phones))
        self.ids = {s: i for i, s in enumerate(self.symbols)}
        self.X = self.pad([[self.ids[c] for c in w] for w, _ in train])
        self.T = self.pad([[START] + [self.ids[p] for p in ps] for _, ps in train], extra=1)
        self.X_test = self.pad([[self.ids[c] for c in w] for w in self.test_words])
        self.steps = self.T.shape[1] - 1  # the longest target and its end symbol

    @staticmethod
    def pad(rows, extra=0):
        out = np.full((len(rows), max(map(len, rows)) + extra), PAD, dtype=np.int32)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    def batches(self, batch, seed=0):
        """[(sources, targets)] for one epoch: bucketed by source length, trimmed, shuffled."""
        rng = np.random.RandomState(seed)
        src_len = (self.X != PAD).sum(axis=1)
        tgt_len = (self.T != PAD).sum(axis=1)
        order = np.lexsort((rng.random_sample(len(src_len)), src_len))
        chunks = [order[s:s + batch] for s in range(0, len(order), batch)]
        rng.shuffle(chunks)
        return [(self.X[c, :src_len[c].max()], self.T[c, :tgt_len[c].max() + 1]) for c in chunks]

    def wer(self, words, outputs):
        """Word error rate (%) of phone-sequence outputs against the references."""
        wrong = sum(tuple(o) not in self.refs.get(w, ()) for w, o in zip(words, outputs))
        return 100.0 * wrong / max(len(words), 1)

    def phones(self, ids):
        """Rows of output ids -> phone lists, each cut at its end symbol."""
        out = []
        for row in np.asarray(ids):
            ends = np.flatnonzero(row == PAD)
            out.append([self.symbols[i] for i in row[:ends[0] if len(ends) else len(row)]])
        return out


# --- the sides ----------------------------------------------------------------------------------

def fastseq_model(V, D, H, encoder="uni", layers=1, dropout=0.0):
    """fastseq's AttentionSeq2seq with the benchmark's sizes; the extended model's keywords are
    passed only when set. None when this fastseq does not take them."""
    from fastseq.models.attention import AttentionSeq2seq
    extra = {}
    if encoder != "uni":
        extra["encoder"] = encoder
    if layers != 1:
        extra["layers"] = layers
    if dropout:
        extra["dropout_ratio"] = dropout
    try:
        return AttentionSeq2seq(V, D, H, seed=0, pad_id=PAD, **extra)
    except TypeError as e:
        print(f"fastseq: {', '.join(f'{k}={v}' for k, v in extra.items())} not available: {e}",
              file=sys.stderr)
        return None


def fastseq_runners(data, args, side):
    """(train(n batches) -> mean loss, convert() -> output ids (N, steps)), or None."""
    from fastseq.optim import Adam
    from fastseq.trainer import Trainer
    model = fastseq_model(len(data.symbols), args.wordvec, args.hidden, args.encoder,
                          args.layers, args.dropout)
    if model is None:
        return None
    trainer = Trainer(model, Adam(1e-3), seed=0, progress=False)
    batches = data.batches(args.batch)
    pos = {"i": 0}

    def train(n):
        total = 0.0
        for _ in range(n):
            xs, ts = batches[pos["i"] % len(batches)]
            pos["i"] += 1
            total += trainer.step(xs, ts, 5.0)
        return total / n

    def convert(beam=None):
        if beam:
            from fastseq.decoding import beam_search
            return beam_search(model, data.X_test, START, data.steps, k=beam)
        return model.generate(data.X_test, START, data.steps)

    return train, convert


def torch_model(torch, V, D, H, bi, layers=1, dropout=0.0):
    """fastseq's AttentionSeq2seq in PyTorch (see the module's docstring), with its extensions:
    a bidirectional encoder, stacked layers (each decoder layer starts from the encoder's final
    state of the same layer), dropout on both sides' word vectors, between layers and on
    [context ; h] (off in eval())."""
    nn = torch.nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class TorchG2P(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_embed = nn.Embedding(V, D)
            self.enc = nn.LSTM(D, H // 2 if bi else H, num_layers=layers, batch_first=True,
                               bidirectional=bi, dropout=dropout if layers > 1 else 0.0)
            self.dec_embed = nn.Embedding(V, D)
            self.dec = nn.LSTM(D, H, num_layers=layers, batch_first=True,
                               dropout=dropout if layers > 1 else 0.0)
            self.drop = nn.Dropout(dropout)
            self.out = nn.Linear(2 * H, V)

        def encode(self, xs, lengths):
            """Encoder states (N, T, H), the key mask (N, T), the decoder's first state."""
            packed = pack_padded_sequence(self.drop(self.enc_embed(xs)), lengths,
                                          batch_first=True, enforce_sorted=False)
            out, (h, _) = self.enc(packed)
            hs, _ = pad_packed_sequence(out, batch_first=True, total_length=xs.shape[1])
            if bi:  # (2 L, N, H/2), directions of a layer side by side -> (L, N, H)
                h = torch.cat([h[0::2], h[1::2]], dim=2)
            keys = torch.arange(xs.shape[1])[None, :] < lengths[:, None]
            return hs, keys, (h.contiguous(), torch.zeros_like(h))

        def scores(self, dec, hs, keys):
            s = torch.bmm(dec, hs.transpose(1, 2)).masked_fill(~keys[:, None, :], float("-inf"))
            context = torch.bmm(torch.softmax(s, dim=2), hs)
            return self.out(self.drop(torch.cat([context, dec], dim=2)))

        def forward(self, xs, lengths, ts_in):
            hs, keys, state = self.encode(xs, lengths)
            dec, _ = self.dec(self.drop(self.dec_embed(ts_in)), state)
            return self.scores(dec, hs, keys)

        def greedy(self, xs, lengths, steps):
            hs, keys, state = self.encode(xs, lengths)
            ids = torch.full((xs.shape[0], 1), START, dtype=torch.long)
            done = torch.zeros(xs.shape[0], dtype=torch.bool)
            cols = []
            for _ in range(steps):
                dec, state = self.dec(self.dec_embed(ids), state)
                ids = self.scores(dec, hs, keys).argmax(dim=2)                    # (N, 1)
                ids = ids.masked_fill(done[:, None], PAD)
                done |= ids[:, 0] == PAD
                cols.append(ids)
                if bool(done.all()):
                    break
            out = torch.cat(cols, dim=1)
            return torch.nn.functional.pad(out, (0, steps - out.shape[1]), value=PAD)

    return TorchG2P()


def torch_runners(data, args, side):
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.set_num_threads(1 if side == "torch-1" else len(os.sched_getaffinity(0)))
    V = len(data.symbols)
    model = torch_model(torch, V, args.wordvec, args.hidden, args.encoder == "bi", args.layers,
                        args.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def prepare(xs, ts):
        x = torch.from_numpy(xs.astype(np.int64))
        t = torch.from_numpy(ts.astype(np.int64))
        lengths = (x != PAD).sum(dim=1)
        targets = t[:, 1:].clone()
        ends = (t != PAD).sum(dim=1)  # index in t of each row's end symbol
        targets[torch.arange(t.shape[1] - 1)[None, :] + 1 > ends[:, None]] = -1
        return x, lengths, t[:, :-1], targets

    batches = [prepare(xs, ts) for xs, ts in data.batches(args.batch)]
    x_test = torch.from_numpy(data.X_test.astype(np.int64))
    test_lengths = (x_test != PAD).sum(dim=1)
    order = torch.argsort(test_lengths, stable=True)
    pos = {"i": 0}

    def train(n):
        model.train()
        total = 0.0
        for _ in range(n):
            x, lengths, t_in, targets = batches[pos["i"] % len(batches)]
            pos["i"] += 1
            scores = model(x, lengths, t_in)
            loss = torch.nn.functional.cross_entropy(scores.reshape(-1, V), targets.reshape(-1),
                                                     ignore_index=-1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += float(loss.detach())
        return total / n

    def convert():
        model.eval()
        out = torch.empty((len(x_test), data.steps), dtype=torch.long)
        b = args.torch_eval_batch
        with torch.inference_mode():
            for s in range(0, len(order), b):
                rows = order[s:s + b]
                L = test_lengths[rows]
                out[rows] = model.greedy(x_test[rows, :int(L.max())], L, data.steps)
        return out.numpy()

    return train, convert


def g2p_en_model():
    """g2p_en's G2p with its shipped weights, built without its NLTK data: predict needs only
    the weights (checkpoint20.npz), while importing the module would download the tagger and
    CMUdict corpora and the constructor would load the latter (absent here, no network)."""
    import types
    import nltk
    nltk.download = lambda *a, **k: False  # the import's fallback when the data is missing
    from g2p_en import g2p as g2p_module
    g2p_module.cmudict = types.SimpleNamespace(dict=dict)  # no dictionary look-ups: predict only
    return g2p_module.G2p()


def g2p_en_runners(data, args, side):
    try:
        model = g2p_en_model()
    except ImportError as e:
        print(f"g2p_en: cannot be imported: {e}", file=sys.stderr)
        return None
    words = [w.lower() for w in data.test_words]

    def convert():
        return [model.predict(w) for w in words]

    return None, convert


RUNNERS = {"fastseq": fastseq_runners, "torch": torch_runners, "torch-1": torch_runners,
           "g2p_en": g2p_en_runners}


def serve(side, args):
    """A side's worker: `train N` -> seconds and mean loss of N batches; `convert` -> seconds
    and word error rate (%) of one greedy conversion of the test words (`convert K`: beam
    search of width K, fastseq only)."""
    data = G2PData(limit=args.limit)
    r = RUNNERS[side](data, args, side)
    if r is None:
        raise SystemExit(f"{side}: not available here")
    train, convert = r

    def train_turn(n):
        seconds, loss = timed(lambda: train(int(n)))
        return f"{seconds:.9f}", f"{loss:.6f}"

    def convert_turn(beam=None):
        seconds, out = timed(lambda: convert(int(beam)) if beam else convert())
        if side == "g2p_en":  # ARPAbet with stress digits: dropped, as in the references
            phones = [[re.sub(r"\d", "", p) for p in o] for o in out]
        else:
            phones = data.phones(out)
        return f"{seconds:.9f}", f"{data.wer(data.test_words, phones):.2f}"

    commands = {"convert": convert_turn}
    if train is not None:
        commands["train"] = train_turn
    worker_serve(commands, ready=(lambda: train(2)) if train is not None else None)


# --- the run ------------------------------------------------------------------------------------

def report(title, times, unit="s"):
    print(title)
    print(f"| side | median {unit} | min {unit} |")
    print("|---|---|---|")
    for s, v in times.items():
        print(f"| {s} | {np.median(v):.2f} | {np.min(v):.2f} |")
    if "fastseq" in times:
        for other in ("torch", "torch-1", "g2p_en"):
            if other in times:
                q1, med, q3, lo, hi = ratio_stats(times[other], times["fastseq"])
                print(f"fastseq vs {other}: {med:.2f}x faster (median of per-round ratios; "
                      f"quartiles {q1:.2f}-{q3:.2f}x, min {lo:.2f}x, max {hi:.2f}x)")


def measure(args, workers, data):
    n_batches = len(data.batches(args.batch))
    per_turn = args.batches or n_batches
    print(f"{machine_line()}")
    print(f"G2P, CMUdict g014b2b: {len(data.X)} training pairs ({n_batches} batches of "
          f"{args.batch}, bucketed), {len(data.test_words)} test words, vocabulary "
          f"{len(data.symbols)}; D={args.wordvec}, H={args.hidden}, encoder {args.encoder}, "
          f"layers {args.layers}, dropout {args.dropout}; each side in its own process")
    trainers = {s: w for s, w in workers.items() if s != "g2p_en"}
    if args.rounds and trainers:
        times = take_turns(lambda s: float(ask(trainers[s], "train", per_turn)[0]), trainers,
                           args.rounds)
        scale = n_batches / per_turn
        report(f"training, {args.rounds} rounds of {per_turn} batches: seconds per epoch",
               {s: np.array(v) * scale for s, v in times.items()})
    if args.eval_rounds:
        for s, w in workers.items():  # a warm-up, and each side's word error rate
            print(f"{s}: greedy test WER {float(ask(w, 'convert')[1]):.2f}% "
                  f"({'shipped weights' if s == 'g2p_en' else 'after the training above'})")
        times = take_turns(lambda s: float(ask(workers[s], "convert")[0]), workers,
                           args.eval_rounds)
        report(f"greedy conversion of the {len(data.test_words)} test words, {args.eval_rounds} "
               f"rounds: seconds", {s: np.array(v) for s, v in times.items()})
    if args.beam and "fastseq" in workers:
        w = workers["fastseq"]
        wer = float(ask(w, "convert", args.beam)[1])
        seconds = [float(ask(w, "convert", args.beam)[0]) for _ in range(args.eval_rounds)]
        print(f"fastseq: beam search (width {args.beam}) over the {len(data.test_words)} test "
              f"words: median {np.median(seconds):.2f} s, min {min(seconds):.2f} s "
              f"({args.eval_rounds} rounds; WER {wer:.2f}%)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=["fastseq", "torch", "g2p_en"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--wordvec", type=int, default=64)
    ap.add_argument("--encoder", choices=("uni", "bi"), default="bi")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="training rounds")
    ap.add_argument("--batches", type=int, default=0,
                    help="training batches per turn (0: one epoch)")
    ap.add_argument("--eval-rounds", type=int, default=3)
    ap.add_argument("--torch-eval-batch", type=int, default=500)
    ap.add_argument("--beam", type=int, default=5,
                    help="also time fastseq's beam search of this width (0: not)")
    ap.add_argument("--limit", type=int, default=None,
                    help="only the first N training pairs and test words (smoke tests)")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("hidden", "wordvec", "batch", "layers", "torch_eval_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.encoder == "bi" and args.hidden % 2:
        ap.error("--encoder bi needs an even --hidden (H/2 per direction)")
    missing = missing_files()
    if missing:
        print(f"skipped: the CMUdict split is not here ({', '.join(missing)} under "
              f"{TEXTBOOK_DATA}; set FASTSEQ_TEXTBOOK_DATA to the folder holding cmudict/)")
        return 0
    if args.worker:
        return serve(args.worker, args)
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    workers = start_workers("compare_g2p", passed, args.sides,
                            env_of=lambda s: THREADS_ENV.get(s, {}))
    try:
        measure(args, workers, G2PData(limit=args.limit))
    finally:
        stop_workers(workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
