"""Score a converted file against references: ``python -m fastseq.score REFS PREDICTIONS``.

    python -m fastseq.generate --model best.npz --input g014b2b.words > predictions.tsv
    python -m fastseq.score g014b2b.ref predictions.tsv --tokens space

REFS holds ``source<TAB>reference`` lines (several lines, or several tab-separated references,
for a source with more than one correct answer); PREDICTIONS holds ``source<TAB>prediction``
lines as ``generate --input`` writes them (n-best output: the first line of each source counts).
Every source of REFS must have a prediction. Prints exact match, WER and the token error rate
(PER for phones, CER for characters; fastseq.metrics) and, with --json, writes them as JSON.
"""
import argparse
import json
import sys

from .cli import one_of
from .datasets.pairs import TOKENS, read_pairs, tokens_of
from .datasets.sequence import DataFormatError, read_bytes
from .metrics import score


def read_predictions(path, kind):
    """{source: prediction tokens} from ``source<TAB>prediction[<TAB>score]`` lines (the first
    line of a source counts)."""
    data = read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = {}
    for i, raw in enumerate(data.split(b"\n"), 1):
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            fields = line.decode("utf-8").split("\t")
        except UnicodeDecodeError:
            raise DataFormatError(f"{path}, line {i}: is not UTF-8") from None
        if len(fields) < 2:
            raise DataFormatError(f"{path}, line {i}: no tab: expected 'source<TAB>prediction'")
        out.setdefault(fields[0].strip(), tokens_of(fields[1], kind))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastseq.score", description=__doc__.split("\n")[0])
    p.add_argument("refs", help="source<TAB>reference lines (the test file)")
    p.add_argument("predictions", help="source<TAB>prediction lines (generate --input's output)")
    p.add_argument("--tokens", type=one_of(*TOKENS), default="char",
                   help="compare characters (char, default) or space-separated symbols (space)")
    p.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = p.parse_args(argv)
    try:
        refs, _ = read_pairs(args.refs, args.tokens, args.tokens, max_length=10**6,
                             hint=False)
        preds = read_predictions(args.predictions, args.tokens)
        missing = [src for src, _, _ in refs if src not in preds]
        if missing:
            raise DataFormatError(f"{args.predictions}: no prediction for {len(missing)} of the "
                                  f"{len(refs)} sources of {args.refs} (first: {missing[0]!r})")
        s = score([preds[src] for src, _, _ in refs], [r for _, _, r in refs])
    except (ValueError, OSError) as e:
        print(f"fastseq: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    ter = "PER" if args.tokens == "space" else "CER"
    print(f"{s['n']} sources: exact {s['accuracy']:.2%}  WER {s['wer']:.2%}  "
          f"{ter} {s['ter']:.2%} ({s['errors']} edits / {s['ref_tokens']} reference symbols)")
    if args.json:
        from .files import atomic_write
        atomic_write(args.json, lambda f: f.write(json.dumps(s, indent=2).encode() + b"\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
