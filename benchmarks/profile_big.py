"""Where one training iteration's time goes on the big models: a per-op breakdown on the default
engine, against the machine's measured float32 GEMM rate.

    python -m benchmarks.profile_big [--iters 5] [--warmup 2] [--gemm-size 2048]
        [--better-hidden 650] [--attention-hidden 256] [--data-dir DIR]
        [--models better attention g2p] [--g2p-encoder bi] [--g2p-layers 1] [--g2p-dropout 0.3]
        [--g2p-wordvec 128] [--g2p-no-word-dropout]

Three iterations can be profiled: the textbook's BetterRnnlm PTB iteration (batch 20, time 35, two
LSTM layers of 650, V = 10,000, dropout 0.5, tied weights, SGD lr 20, clip 0.25), an
AttentionSeq2seq date iteration (D 16, H 256, batch 128, Adam 0.001, clip 5.0) and a
grapheme-to-phoneme-shaped AttentionSeq2seq iteration (--models g2p: batch 128 of CMUdict words
of 4-15 letters and 3-14 phones, one vocabulary of letters and phones, D --g2p-wordvec, H
--attention-hidden, encoder --g2p-encoder, --g2p-layers, dropout --g2p-dropout, Adam 0.001,
clip 5.0; random words of those lengths when the CMUdict split is absent). The layers'
forward and backward methods are wrapped with timers from here (fastseq's code is unchanged);
"other" is the iteration's time outside every wrapped call (Python glue, copies, the model's own
bookkeeping). GFLOP counts the products each op stands for (2 M K N per (M, K) x (K, N) product;
an LSTM fed by a fused embedding is counted as if its input product ran). The GEMM peak is the
best rate of numpy.matmul on two --gemm-size square float32 matrices, all threads; the floor is
the iteration's GFLOP at that rate.
"""
import argparse
import functools
import time

import numpy as np

from benchmarks.common import TEXTBOOK_DATA, machine_line


def gemm_peak(n, repeats=5):
    """GFLOP/s: the best of `repeats` float32 (n, n) x (n, n) numpy products (all threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)  # warm-up: threads started, pages touched
    best = min(_seconds(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2.0 * n ** 3 / best / 1e9


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Profile:
    """Timers around methods of layer instances: per label, the seconds spent and the calls."""

    def __init__(self):
        self.seconds, self.calls, self.shapes = {}, {}, {}
        self.order = []

    def wrap(self, obj, method, label):
        """Replace obj.method (on the instance) by a timed call adding to `label`; the argument
        shapes of its last call are kept in self.shapes[label]."""
        inner = getattr(obj, method)
        if label not in self.seconds:
            self.seconds[label], self.calls[label] = 0.0, 0
            self.order.append(label)

        @functools.wraps(inner)
        def timed_call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1
                self.shapes[label] = [getattr(a, "shape", None) for a in args]

        setattr(obj, method, timed_call)

    def time(self, label, fn):
        """fn() timed under `label`."""
        if label not in self.seconds:
            self.seconds[label], self.calls[label] = 0.0, 0
            self.order.append(label)
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[label] += time.perf_counter() - t0
            self.calls[label] += 1

    def reset(self):
        for k in self.seconds:
            self.seconds[k], self.calls[k] = 0.0, 0


def _gemm(m, k, n):
    return 2.0 * m * k * n / 1e9


def lstm_gflop(lstm, shape, backward):
    """The products of a TimeLSTM over input `shape` ((N, T, D), or (N, T) ids when fused with its
    embedding): forward x Wx and h Wh at every step; backward dx, dWx, dh and dWh."""
    Wx, Wh = lstm.params[0], lstm.params[1]
    (D, G), H = Wx.shape, Wh.shape[0]
    M = shape[0] * shape[1]
    per = _gemm(M, D, G) + _gemm(M, H, G)
    return 2 * per if backward else per


def better_rnnlm(prof, args):
    """(iteration(), {label: GFLOP}) of BetterRnnlm on PTB, its layers wrapped in prof."""
    from benchmarks.compare_rnnlm import B, CLIP, DROPOUT, LR, T, V, batches, load_corpus
    from fastseq import SGD, BetterRnnlm, clip_grads
    Hd = args.better_hidden
    model = BetterRnnlm(V, Hd, Hd, DROPOUT, seed=0)
    opt = SGD(LR)
    data = batches(load_corpus(args.data_dir))
    for name, layer in (("embedding", model.embed), ("LSTM 1", model.lstm1),
                        ("LSTM 2", model.lstm2), ("affine (tied)", model.affine),
                        ("softmax + loss", model.loss_layer)):
        prof.wrap(layer, "forward", f"{name} forward")
        prof.wrap(layer, "backward", f"{name} backward")
    for d in model.dropout_layers:
        prof.wrap(d, "forward", "dropout forward (3 layers)")
        prof.wrap(d, "backward", "dropout backward (3 layers)")
    M = B * T
    affine = _gemm(M, Hd, V)
    gflop = {"affine (tied) forward": affine, "affine (tied) backward": 2 * affine}
    for name, lstm in (("LSTM 1", model.lstm1), ("LSTM 2", model.lstm2)):
        gflop[f"{name} forward"] = lstm_gflop(lstm, (B, T), False)
        gflop[f"{name} backward"] = lstm_gflop(lstm, (B, T), True)

    def iteration():
        x, t = next(data)
        model.forward(x, t, train_flg=True)
        model.backward()
        prof.time("gradient clipping", lambda: clip_grads(model.grads, CLIP))
        prof.time("optimiser (SGD)", lambda: opt.update(model.params, model.grads))

    title = (f"BetterRnnlm PTB iteration: batch {B} x time {T}, 2 LSTM layers of {Hd}, V {V}, "
             f"dropout {DROPOUT}, tied weights, SGD lr {LR}, clip {CLIP}")
    return title, iteration, gflop


def attention_date(prof, args):
    """(iteration(), {label: GFLOP}) of AttentionSeq2seq on the date task."""
    from benchmarks.compare_attention import BATCH, D, date_data
    from fastseq import clip_grads
    from fastseq.models.attention import AttentionSeq2seq
    from fastseq.optim import Adam
    H = args.attention_hidden
    d, pad, x, _ = date_data()
    model = AttentionSeq2seq(len(d.vocab), D, H, seed=0, pad_id=pad)
    opt = Adam(1e-3)
    enc, dec = model.encoder, model.decoder
    for name, layer in (("encoder embedding", enc.embed), ("encoder LSTM", enc.lstm),
                        ("decoder embedding", dec.embed), ("decoder LSTM", dec.lstm),
                        ("attention", dec.attention), ("affine", dec.affine),
                        ("softmax + loss", model.softmax)):
        prof.wrap(layer, "forward", f"{name} forward")
        prof.wrap(layer, "backward", f"{name} backward")
    perm = np.random.RandomState(0).permutation(len(x))
    n_batches = len(x) // BATCH
    state = {"i": 0}

    def iteration():
        i = state["i"] % n_batches
        state["i"] += 1
        idx = perm[i * BATCH:(i + 1) * BATCH]
        model.forward(x[idx], d.t_train[idx])
        model.backward()
        prof.time("gradient clipping", lambda: clip_grads(model.grads, 5.0))
        prof.time("optimiser (Adam)", lambda: opt.update(model.params, model.grads))

    def gflop():
        """From the shapes of the last profiled iteration (the encoder's length is trimmed to
        the batch's longest question)."""
        out = {}
        for name, lstm in (("encoder LSTM", enc.lstm), ("decoder LSTM", dec.lstm)):
            shape = prof.shapes[f"{name} forward"][0]
            out[f"{name} forward"] = lstm_gflop(lstm, shape, False)
            out[f"{name} backward"] = lstm_gflop(lstm, shape, True)
        hs_enc, hs_dec = prof.shapes["attention forward"][:2]
        (N, Te, Hh), Td = hs_enc, hs_dec[1]
        att = 2 * _gemm(Td, Hh, Te) * N  # scores and context, per batch row
        out["attention forward"], out["attention backward"] = att, 2 * att
        W = dec.affine.params[0]
        aff = _gemm(N * Td, W.shape[0], W.shape[1])
        out["affine forward"], out["affine backward"] = aff, 2 * aff
        return out

    title = (f"AttentionSeq2seq date iteration: batch {BATCH}, D {D}, H {H}, V {len(d.vocab)}, "
             f"Adam 0.001, clip 5.0")
    return title, iteration, gflop


def g2p_batches(rng, batch, path):
    """(vocab size, pad id, next_batch() -> (xs, ts)): batches of CMUdict words (sources of 4-15
    letters, targets of 3-14 phones) padded with id 0 at their end, targets starting with id 1;
    random ones of those lengths (30 letters, 40 phones) when `path` is absent."""
    if path.exists():
        pairs = []
        for line in open(path, encoding="utf-8"):
            word, _, phones = line.rstrip("\n").partition("\t")
            src, tgt = list(word), phones.split()
            if 4 <= len(src) <= 15 and 3 <= len(tgt) <= 14:
                pairs.append((src, tgt))
    else:
        pairs = [([chr(65 + c) for c in rng.randint(0, 30, rng.randint(4, 16))],
                  [f"P{c}" for c in rng.randint(0, 40, rng.randint(3, 15))])
                 for _ in range(20000)]
    pairs = [(src, ["/" + s for s in tgt]) for src, tgt in pairs]  # phones apart from letters
    symbols = sorted({s for src, tgt in pairs for s in src + tgt})
    ids = {s: i + 2 for i, s in enumerate(symbols)}  # 0 pad (and end), 1 start
    xs = np.zeros((len(pairs), 15), np.int64)
    ts = np.zeros((len(pairs), 16), np.int64)
    ts[:, 0] = 1
    for n, (src, tgt) in enumerate(pairs):
        xs[n, :len(src)] = [ids[s] for s in src]
        ts[n, 1:len(tgt) + 1] = [ids[s] for s in tgt]

    def next_batch():
        idx = rng.randint(0, len(pairs), batch)
        return xs[idx], ts[idx]
    return len(symbols) + 2, 0, next_batch


def attention_g2p(prof, args):
    """(iteration(), {label: GFLOP}) of the G2P-shaped AttentionSeq2seq."""
    from fastseq import clip_grads
    from fastseq.models.attention import AttentionSeq2seq
    from fastseq.optim import Adam
    H, D, L, p = args.attention_hidden, args.g2p_wordvec, args.g2p_layers, args.g2p_dropout
    rng = np.random.RandomState(0)
    V, pad, next_batch = g2p_batches(rng, 128, TEXTBOOK_DATA / "cmudict" / "g014b2b.train")
    model = AttentionSeq2seq(V, D, H, seed=0, pad_id=pad, encoder=args.g2p_encoder, layers=L,
                             dropout_ratio=p)
    opt = Adam(1e-3)
    enc, dec = model.encoder, model.decoder
    if p and args.g2p_no_word_dropout:  # what dropout on the word vectors costs
        enc.drops[0].dropout_ratio = dec.drops[0].dropout_ratio = 0.0
    wrapped = [("encoder embedding", enc.embed), ("decoder embedding", dec.embed),
               ("attention", dec.attention), ("affine", dec.affine),
               ("softmax + loss", model.softmax)]
    wrapped += [(f"encoder {name}", lstm) for name, lstm in enc.layers[1:]]
    wrapped += [(f"decoder {name}", lstm) for name, lstm in dec.layers if name.startswith("lstm")]
    for name, layer in wrapped:
        prof.wrap(layer, "forward", f"{name} forward")
        prof.wrap(layer, "backward", f"{name} backward")
    for d in model.dropout_layers:
        prof.wrap(d, "forward", f"dropout forward ({len(model.dropout_layers)} layers)")
        prof.wrap(d, "backward", f"dropout backward ({len(model.dropout_layers)} layers)")
    if enc.directions == 2:  # the reordering of rows for the backward direction
        prof.wrap(enc, "_flipped", "bidirectional gather (flip)")

    def iteration():
        xs, ts = next_batch()
        model.forward(xs, ts)
        model.backward()
        prof.time("gradient clipping", lambda: clip_grads(model.grads, 5.0))
        prof.time("optimiser (Adam)", lambda: opt.update(model.params, model.grads))

    def gflop():
        out = {}
        for name, lstm in wrapped:
            key = f"{name} forward"
            if isinstance(lstm, type(enc.lstm)) and key in prof.shapes:
                shape = prof.shapes[key][0]
                out[key] = lstm_gflop(lstm, shape, False)
                out[f"{name} backward"] = lstm_gflop(lstm, shape, True)
        hs_enc, hs_dec = prof.shapes["attention forward"][:2]
        (N, Te, Hh), Td = hs_enc, hs_dec[1]
        att = 2 * _gemm(Td, Hh, Te) * N
        out["attention forward"], out["attention backward"] = att, 2 * att
        W = dec.affine.params[0]
        aff = _gemm(N * Td, W.shape[0], W.shape[1])
        out["affine forward"], out["affine backward"] = aff, 2 * aff
        return out

    title = (f"AttentionSeq2seq G2P iteration: batch 128, V {V}, D {D}, H {H}, encoder "
             f"{args.g2p_encoder}, layers {L}, dropout {p}"
             f"{' (none on the word vectors)' if p and args.g2p_no_word_dropout else ''}, "
             f"Adam 0.001, clip 5.0")
    return title, iteration, gflop


def profile(make, args):
    prof = Profile()
    title, iteration, gflop = make(prof, args)
    for _ in range(args.warmup):
        iteration()
    prof.reset()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        iteration()
    total = (time.perf_counter() - t0) / args.iters
    gflop = gflop() if callable(gflop) else gflop
    if sum(prof.calls.values()) == 0:
        raise SystemExit("profile_big: none of the wrapped layer methods ran: the model's layers "
                         "are not called the way this profile wraps them")
    return title, total, prof, gflop


def table(title, total, prof, gflop, peak, iters):
    lines = [f"### {title}", "",
             "| op | ms | % of iteration | GFLOP | GFLOP/s | % of GEMM peak |",
             "|---|---|---|---|---|---|"]
    rows = [(k, prof.seconds[k] / iters) for k in prof.order if prof.calls[k]]
    idle = [k for k in prof.order if not prof.calls[k]]
    other = total - sum(s for _, s in rows)
    for k, s in rows + [("other (outside the ops above)", other)]:
        g = gflop.get(k)
        rate = g / s if g and s > 0 else None
        lines.append(f"| {k} | {s * 1e3:.2f} | {100 * s / total:.1f} | "
                     f"{'' if g is None else f'{g:.3f}'} | "
                     f"{'' if rate is None else f'{rate:.1f}'} | "
                     f"{'' if rate is None else f'{100 * rate / peak:.1f}'} |")
    g_total = sum(gflop.values())
    lines.append(f"| **iteration** | **{total * 1e3:.2f}** | 100 | {g_total:.3f} | "
                 f"{g_total / total:.1f} | {100 * g_total / total / peak:.1f} |")
    floor = g_total / peak
    lines += ["", f"GEMM floor: {g_total:.2f} GFLOP / {peak:.1f} GFLOP/s = {floor * 1e3:.1f} ms; "
              f"the iteration takes {total / floor:.2f}x the floor", ""]
    if idle:
        lines[-1:-1] = [f"Not called on this engine (its work is done inside another op): "
                        f"{', '.join(idle)}"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5, help="profiled iterations per model")
    ap.add_argument("--warmup", type=int, default=2, help="iterations before the profiled ones")
    ap.add_argument("--gemm-size", type=int, default=2048, help="square size of the GEMM-peak test")
    ap.add_argument("--better-hidden", type=int, default=650)
    ap.add_argument("--attention-hidden", type=int, default=256)
    ap.add_argument("--models", nargs="+", default=["better", "attention"],
                    choices=["better", "attention", "g2p"])
    ap.add_argument("--g2p-encoder", default="bi", choices=["uni", "bi"])
    ap.add_argument("--g2p-layers", type=int, default=1)
    ap.add_argument("--g2p-dropout", type=float, default=0.3)
    ap.add_argument("--g2p-wordvec", type=int, default=128)
    ap.add_argument("--g2p-no-word-dropout", action="store_true",
                    help="no dropout on the word vectors (the other dropout layers kept)")
    ap.add_argument("--data-dir", default=str(TEXTBOOK_DATA / "ptb"),
                    help="PTB folder (else random ids)")
    args = ap.parse_args(argv)
    for name in ("iters", "gemm_size", "better_hidden", "attention_hidden", "g2p_layers",
                 "g2p_wordvec"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be at least 0")
    from fastseq import backend
    peak = gemm_peak(args.gemm_size)
    print(machine_line())
    print(f"fastseq engine: {backend.config.engine}, {backend.config.threads} threads"
          f"; float32 GEMM peak (numpy.matmul {args.gemm_size}^2, all threads): "
          f"{peak:.1f} GFLOP/s; {args.iters} profiled iterations after {args.warmup} warm-up\n")
    if not 0 <= args.g2p_dropout < 1:
        ap.error("--g2p-dropout must be in [0, 1)")
    makers = {"better": better_rnnlm, "attention": attention_date, "g2p": attention_g2p}
    for m in args.models:
        title, total, prof, gflop = profile(makers[m], args)
        print(table(title, total, prof, gflop, peak, args.iters))


if __name__ == "__main__":
    main()
