"""Source-target pairs from tab-separated files, for seq2seq on your own data.

Each line is ``source<TAB>target`` (``source<TAB>target1<TAB>target2 ...`` gives several targets
on one line; a source on several lines has several targets too): every pair is trained on, and
any one target counts as right when scoring. Sides are split into tokens as characters
(``char``) or at whitespace (``space``: phones, words). Empty lines are skipped; a UTF-8
byte-order mark and CRLF line ends are accepted.

    vocab, splits = load_pairs("train.tsv", target_tokens="space", valid_fraction=0.05)
    splits["train"].x, splits["train"].t       # (N, Tx), (N, 1 + Ty + 1) ids, padded at the end
    splits["valid"].x, splits["valid"].refs    # one row per distinct source; its target token lists
    ids, n_unknown = vocab.encode_sources(["HELLO"])
    vocab.decode_targets(model.generate(ids, vocab.start_id, vocab.max_answer_length))

The vocabulary comes from the training file: ``<pad>`` (0: pads every row at its end and, as
the first pad after an answer, ends it), ``<s>`` (1: starts every answer), ``<unk>`` (2: any
symbol the training file lacks), then the training file's symbols in sorted order, sources' and
targets' in one id space.
"""
import warnings
from dataclasses import dataclass

import numpy as np

from .sequence import DataFormatError, read_bytes

PAD, START, UNK = "<pad>", "<s>", "<unk>"
SPECIALS = (PAD, START, UNK)
TOKENS = ("char", "space")
MAX_DATA_BYTES = 128 << 20  # a G2P dictionary is ~3 MB; memory grows ~20x once split into tokens
MAX_LENGTH = 100            # default cap on the symbols of one side


def tokens_of(text, kind):
    """``text`` split into its characters (kind 'char') or at whitespace ('space')."""
    return list(text) if kind == "char" else text.split()


def join_tokens(tokens, kind):
    return ("" if kind == "char" else " ").join(tokens)


class PairsVocabulary:
    """Symbols by id (``symbols[0:3]`` are <pad>, <s>, <unk>), how each side is split into tokens,
    and ``max_answer_length``: the steps to decode (the longest training target and a margin)."""

    pad_id, start_id, unk_id = 0, 1, 2

    def __init__(self, symbols, source_tokens, target_tokens, max_answer_length):
        self.symbols = list(symbols)
        if tuple(self.symbols[:3]) != SPECIALS:
            raise ValueError(f"the first symbols must be {SPECIALS}, got {self.symbols[:3]}")
        for kind in (source_tokens, target_tokens):
            if kind not in TOKENS:
                raise ValueError(f"tokens must be one of {TOKENS}, got {kind!r}")
        self.source_tokens, self.target_tokens = source_tokens, target_tokens
        self.max_answer_length = int(max_answer_length)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self._table = np.array(self.symbols, dtype=object)

    def __len__(self):
        return len(self.symbols)

    def __eq__(self, other):
        return isinstance(other, PairsVocabulary) and self.meta() == other.meta()

    def encode(self, token_lists, width=None):
        """(ids int32 (N, width) padded with pad_id at the end, unknown symbols counted); width:
        the longest list (at least 1) when None."""
        longest = max((len(t) for t in token_lists), default=0)
        width = max(1, longest) if width is None else width
        out = np.full((len(token_lists), width), self.pad_id, dtype=np.int32)
        unknown, get = 0, self.index.get
        for n, toks in enumerate(token_lists):
            ids = [get(s, -1) for s in toks]
            if -1 in ids:
                unknown += ids.count(-1)
                ids = [self.unk_id if i < 0 else i for i in ids]
            out[n, :len(ids)] = ids
        return out, unknown

    def encode_sources(self, sources):
        """Source strings -> (ids int32 (N, T) padded at the end, number of unknown symbols,
        which became <unk>). An empty source is one <unk> (counted)."""
        if isinstance(sources, str):
            sources = [sources]
        lists, empty = [], 0
        for s in sources:
            if not isinstance(s, str):
                raise TypeError(f"encode_sources takes strings, got {type(s).__name__}")
            toks = tokens_of(s, self.source_tokens)
            empty += not toks
            lists.append(toks or [UNK])
        ids, unknown = self.encode(lists)
        return ids, unknown + empty

    def target_lists(self, ids):
        """Rows of target ids (N, T) -> token lists, each ending before its first pad."""
        a = np.asarray(ids)
        if a.ndim != 2 or a.dtype.kind not in "iu":
            raise ValueError(f"target ids must be a 2-D integer array, got {a.dtype}{a.shape}")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= len(self)):
            raise ValueError(f"target ids outside the vocabulary [0, {len(self)})")
        ends = np.where((a == self.pad_id).any(axis=1), (a == self.pad_id).argmax(axis=1),
                        a.shape[1])
        return [list(self._table[row[:e]]) for row, e in zip(a, ends)]

    def decode_targets(self, ids):
        """Rows of target ids (N, T) -> strings (each up to its first pad; tokens joined with ''
        for char targets, ' ' for space targets)."""
        return [join_tokens(t, self.target_tokens) for t in self.target_lists(ids)]

    def meta(self):
        """The model file's metadata for this vocabulary (files.weights: VOCABULARY['pairs'])."""
        return {"pairs": {"symbols": list(self.symbols), "source_tokens": self.source_tokens,
                          "target_tokens": self.target_tokens,
                          "max_answer_length": self.max_answer_length}}


@dataclass
class Split:
    """Training rows ``x`` (N, Tx) and ``t`` (N, 1 + Ty + 1: <s>, the target, then pads), and
    the distinct sources: ``sources`` (strings), ``xs`` (their ids) and ``refs`` (each one's
    target token lists, in file order)."""
    x: np.ndarray
    t: np.ndarray
    sources: list
    xs: np.ndarray
    refs: list
    unknown: int = 0


def _decode_line(raw):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    if "\0" in line:
        return None, "holds a NUL character (a binary file?)"
    return line, None


def read_pairs(path, source_tokens="char", target_tokens="char", max_length=MAX_LENGTH,
               skip_bad_lines=False, max_bytes=MAX_DATA_BYTES, hint=True):
    """([(source text, source tokens, [target token lists])...] in line order, a source's lines
    merged at its first; skipped) from a file. A bad line (no tab, an empty side, not UTF-8, a
    side over ``max_length`` symbols, a reserved symbol) raises DataFormatError naming the file
    and line (``hint``: the message names --skip-bad-lines), or with ``skip_bad_lines`` is left
    out: skipped = (count, first problem)."""
    data = read_bytes(path, max_bytes)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    by_source, skipped, first = {}, 0, None
    for i, raw in enumerate(data.split(b"\n"), 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            continue
        line, problem = _decode_line(raw)
        if problem is None:
            problem, pair = _parse(line, source_tokens, target_tokens, max_length)
        if problem is not None:
            message = f"{path}, line {i}: {problem}"
            if not skip_bad_lines:
                raise DataFormatError(message + (" (--skip-bad-lines leaves such lines out)"
                                                 if hint else ""))
            skipped += 1
            first = first or message
            continue
        src, toks, targets = pair
        entry = by_source.setdefault(src, (src, toks, []))
        entry[2].extend(targets)
    if not by_source:
        raise DataFormatError(f"{path}: no pairs" + (f" ({skipped} bad lines skipped; first: "
                                                     f"{first})" if skipped else ""))
    return list(by_source.values()), (skipped, first)


def _parse(line, source_tokens, target_tokens, max_length):
    """(problem, None) or (None, (source, source tokens, [target token lists]))."""
    fields = line.split("\t")
    if len(fields) < 2:
        return f"no tab: expected 'source<TAB>target', got {line[:60]!r}", None
    src, targets = fields[0], fields[1:]
    toks = tokens_of(src, source_tokens)
    lists = [tokens_of(t, target_tokens) for t in targets]
    if not toks:
        return "the source is empty", None
    for k, tl in enumerate(lists):
        if not tl:
            return f"target {k + 1} is empty" if len(lists) > 1 else "the target is empty", None
    for what, tl in [("the source", toks)] + [("a target", t) for t in lists]:
        if len(tl) > max_length:
            return (f"{what} has {len(tl)} symbols, more than --max-length {max_length}", None)
        for s in (PAD, START):
            if s in tl:
                return f"{what} holds the reserved symbol {s}", None
    return None, (src, toks, lists)


def build_vocabulary(entries, source_tokens, target_tokens):
    """A PairsVocabulary of every symbol in entries (sorted, after the three specials);
    max_answer_length: the longest target, plus a quarter of it and at least 2 more steps."""
    seen = set()
    longest = 0
    for _, toks, targets in entries:
        seen.update(toks)
        for t in targets:
            seen.update(t)
            longest = max(longest, len(t))
    seen.difference_update(SPECIALS)
    margin = max(2, longest // 4)
    return PairsVocabulary([*SPECIALS, *sorted(seen)], source_tokens, target_tokens,
                           longest + 1 + margin)


def make_split(vocab, entries, reverse=False):
    """A Split of entries (sources, their target lists): one training row per target."""
    from .sequence import reverse_padded
    sources = [e[0] for e in entries]
    xs, unknown = vocab.encode([e[1] for e in entries])
    rows = np.repeat(np.arange(len(entries)), [len(e[2]) for e in entries])
    targets = [[START, *t] for e in entries for t in e[2]]
    t, unk_t = vocab.encode(targets, max(len(t) for t in targets) + 1)  # >= 1 pad: the end
    if reverse:
        xs = reverse_padded(xs, vocab.pad_id)
    refs = [[list(t) for t in e[2]] for e in entries]
    return Split(xs[rows], t, sources, xs, refs, unknown + unk_t)


def carve(entries, fraction, seed):
    """(train, valid) entries: a seeded share ``fraction`` of the distinct sources (at least one,
    never all) held out; each source with all its targets on one side."""
    n = len(entries)
    if n < 2:
        raise DataFormatError(f"{n} distinct source: too few to hold out a validation share")
    k = min(n - 1, max(1, int(round(n * fraction))))
    held = np.zeros(n, dtype=bool)
    held[np.random.RandomState(seed).permutation(n)[:k]] = True
    return ([e for e, h in zip(entries, held) if not h],
            [e for e, h in zip(entries, held) if h])


def load_pairs(train, valid=None, test=None, source_tokens="char", target_tokens="char",
               valid_fraction=0.05, seed=1984, max_length=MAX_LENGTH, skip_bad_lines=False,
               reverse=False, warn=None):
    """(vocab, {'train', 'valid', 'test'}: Split or None) from the files; the vocabulary from the
    training file; without ``valid`` a seeded ``valid_fraction`` of the training file's distinct
    sources is held out (carve). Lines skipped as bad are reported in one warning (``warn``:
    a function of the message; default warnings.warn)."""
    read = dict(source_tokens=source_tokens, target_tokens=target_tokens,
                max_length=max_length, skip_bad_lines=skip_bad_lines)
    files = {"train": train, "valid": valid, "test": test}
    entries, skipped = {}, []
    for name, path in files.items():
        if path is not None:
            entries[name], (count, first) = read_pairs(path, **read)
            if count:
                skipped.append((path, count, first))
    vocab = build_vocabulary(entries["train"], source_tokens, target_tokens)
    if valid is None:
        entries["train"], entries["valid"] = carve(entries["train"], valid_fraction, seed)
    if skipped:
        total = sum(c for _, c, _ in skipped)
        message = (f"skipped {total} bad line{'s' * (total != 1)} ("
                   + ", ".join(f"{p}: {c}" for p, c, _ in skipped)
                   + f"); the first: {skipped[0][2]}")
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    splits = {name: make_split(vocab, e, reverse) if e is not None else None
              for name, e in ((n, entries.get(n)) for n in files)}
    return vocab, splits
