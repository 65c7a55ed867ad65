"""How fast can a trained attention model convert a file at best? The products' FLOP of a greedy
and a beam conversion, against the machine's float32 GEMM rate, beside the measured times.

    python -m benchmarks.conversion_floor --model best.npz [--words FILE] [--beam 5]
        [--batch-size 256] [--rounds 3] [--gemm-size 2048]

--words: one source per line (default: the CMUdict test words, cmudict/g014b2b.words in the
data folder, FASTSEQ_TEXTBOOK_DATA or ../shared/data). The model is an AttentionSeq2seq model
file (fastseq.train --task pairs). Its greedy answers give each source's number of decoder
steps (answer length + the end symbol); a beam of width k steps k rows per source for as long.

Products counted (multiply-adds x 2), per source symbol and per decoder step, with E the
embedding, Hd = H / 2 per direction for a bidirectional encoder (H for a one-way one):
  encoder layer 1: h Wh (Hd x 4 Hd) per direction; x Wx is read from a table E Wx
  encoder layer l > 1: [x ; h] (H + Hd) x 4 Hd per direction
  decoder layer 1: h Wh (H x 4H) (x Wx from the table E Wx); layer l > 1: 2H x 4H
  attention: 2 T H (scores and context over the source's T states); affine: 2H x V
The floor is those FLOP at the GEMM rate (NumPy's float32 (n, n) x (n, n) product on all
threads): no engine does fewer products, and none runs them faster than that rate.
"""
import argparse
import time

import numpy as np

from benchmarks.common import TEXTBOOK_DATA, machine_line
from benchmarks.profile_big import gemm_peak


def conversion_flop(cfg, V, src_lengths, steps, k=1):
    """(encoder FLOP, decoder FLOP) of converting sources of src_lengths (n,) whose answers
    take steps (n,) decoder steps, k rows per source."""
    H, L = cfg["hidden_size"], cfg["layers"]
    dirs = 2 if cfg["encoder"] == "bi" else 1
    Hd = H // dirs
    per_symbol = dirs * (Hd * 4 * Hd + (L - 1) * (H + Hd) * 4 * Hd)
    enc = 2.0 * per_symbol * np.sum(src_lengths)
    per_step = H * 4 * H + (L - 1) * 2 * H * 4 * H + 2 * H * V
    dec = 2.0 * k * (per_step * np.sum(steps) + 2 * H * np.sum(src_lengths * steps))
    return enc, dec


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an AttentionSeq2seq model file")
    ap.add_argument("--words", default=str(TEXTBOOK_DATA / "cmudict" / "g014b2b.words"))
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gemm-size", type=int, default=2048)
    args = ap.parse_args(argv)

    import fastseq
    loaded = fastseq.load(args.model)
    cfg, V = loaded.model.config(), loaded.model.vocab_size
    with open(args.words, encoding="utf-8") as f:
        words = [w.strip() for w in f if w.strip()]
    src = np.array([len(w) for w in words], dtype=np.float64)  # char sources

    print(machine_line())
    print(f"{args.model}: {type(loaded.model).__name__} V={V} D={cfg['wordvec_size']} "
          f"H={cfg['hidden_size']} encoder {cfg['encoder']} layers {cfg['layers']}; "
          f"{len(words)} sources from {args.words}, batches of {args.batch_size}")
    answer = loaded.answer(words, batch_size=args.batch_size)  # warm-up, and the answer lengths
    spaced = any(" " in a for a in answer)  # space-separated symbols (phones), else characters
    steps = np.array([len(a.split()) if spaced else len(a) for a in answer], float) + 1
    peak = gemm_peak(args.gemm_size)
    print(f"GEMM rate: {peak:.1f} GFLOP/s (float32 {args.gemm_size}^2 product, all threads)")
    print("| conversion | encoder GFLOP | decoder GFLOP | floor s | measured s (median) | "
          "GFLOP/s | % of GEMM rate |")
    print("|---|---|---|---|---|---|---|")
    for k in (1, args.beam):
        enc, dec = conversion_flop(cfg, V, src, steps, k)
        beam = None if k == 1 else k
        secs = [timed(lambda: loaded.answer(words, beam=beam, batch_size=args.batch_size))[0]
                for _ in range(args.rounds)]
        s = float(np.median(secs))
        total = (enc + dec) / 1e9
        print(f"| {'greedy' if k == 1 else f'beam {k}'} | {enc / 1e9:.1f} | {dec / 1e9:.1f} | "
              f"{total / peak:.2f} | {s:.2f} | {total / s:.1f} | {100 * total / s / peak:.0f}% |")


if __name__ == "__main__":
    main()
