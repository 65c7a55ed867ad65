"""Character-level toy transduction data (the textbook's addition.txt format).

Each line is ``question`` + ``answer``: the answer starts at the first ``_`` and runs to the end of
the line, e.g. ``"71+118 _189 "``. Vocabulary ids follow first appearance over question then
answer, line by line; rows are shuffled with ``RandomState(seed)``; the last 10% is the test split.

    (x_train, t_train), (x_test, t_test) = load_data('addition.txt')
    char_to_id, id_to_char = get_vocab()

With no such file, ``addition.txt`` is generated (a, b uniform in 0..999, seeded) - no download.
"""
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..files.core import FastseqFileError, expand_path, open_regular
from ..functions import true_lengths


class DataFormatError(FastseqFileError):
    """A data file line that does not follow the question_answer format."""


@dataclass(frozen=True)
class Vocabulary:
    char_to_id: dict
    id_to_char: dict
    question_width: int
    answer_width: int

    def __len__(self):
        return len(self.char_to_id)

    @cached_property
    def _symbols(self):
        """id -> symbol as an object array (built once: decode indexes it with whole batches)."""
        return np.array([self.id_to_char[i] for i in range(len(self))], dtype=object)

    def encode(self, questions, reverse=False):
        """Question strings -> (N, question_width) ids, padded with spaces as in the data."""
        if isinstance(questions, str):
            questions = [questions]
        questions = list(questions)
        if not all(isinstance(q, str) for q in questions):
            raise TypeError("encode takes a question string or a list of them")
        out = np.empty((len(questions), self.question_width), dtype=np.int32)
        for n, q in enumerate(questions):
            if len(q) > self.question_width:
                raise ValueError(f"question {q!r} has {len(q)} characters but the model's input "
                                 f"width is {self.question_width}")
            q = q.ljust(self.question_width)
            ids = [self.char_to_id.get(ch, -1) for ch in q]
            if -1 in ids:
                bad = sorted({ch for ch in q if ch not in self.char_to_id})
                known = "".join(sorted(self.char_to_id)[:200])
                raise ValueError(f"question {q.rstrip()!r} contains character(s) {bad} outside the "
                                 f"vocabulary {known!r}"
                                 f"{' ...' if len(self) > 200 else ''}")
            out[n] = ids
        return out[:, ::-1].copy() if reverse else out

    def decode(self, ids):
        """A row of integer ids -> string; a 2-D (N, T) batch -> a list of N strings."""
        try:
            a = np.asarray(ids)
        except (ValueError, OverflowError) as e:
            raise ValueError(f"decode takes a row or a 2-D batch of integer ids: {e}") from None
        if a.size == 0 and a.ndim in (1, 2):
            return "" if a.ndim == 1 else [""] * a.shape[0]
        if a.dtype.kind not in "iu":
            raise TypeError(f"decode takes integer ids, got dtype {a.dtype} "
                            f"({str(ids)[:40]!r})")
        if a.ndim not in (1, 2):
            raise ValueError(f"decode takes a row (1-D) or a batch (2-D) of ids, got shape "
                             f"{a.shape}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= len(self):
            bad = lo if lo < 0 else hi
            raise ValueError(f"id {bad} is outside the vocabulary [0, {len(self)})")
        table = self._symbols
        if a.ndim == 1:
            return "".join(table[a])
        return ["".join(row) for row in table[a]]

    # the conversion protocol (fastseq.files.rebuild.LoadedModel, fastseq.generate): every
    # vocabulary a seq2seq model file holds has these four members

    def encode_sources(self, sources):
        """Source strings -> ((N, question_width) int32 ids, number of unknown symbols). These
        character sets have no <unk>: a character outside them is an error, so the count is 0."""
        return self.encode(sources), 0

    def decode_targets(self, ids):
        """(N, T) answer ids (the start symbol not included) -> N strings, padding stripped."""
        return [s.strip() for s in self.decode(np.atleast_2d(ids))]

    @property
    def start_id(self):
        """The id that starts every answer ('_' in the textbook's sets), None without one."""
        return self.char_to_id.get("_")

    @property
    def pad_id(self):
        """The id padding questions and answers at their end (a space), None without one."""
        return self.char_to_id.get(" ")

    @property
    def max_answer_length(self):
        """Symbols decoded per answer: the answer width less its start symbol."""
        return self.answer_width - 1


@dataclass(frozen=True)
class SequenceData:
    x_train: np.ndarray
    t_train: np.ndarray
    x_test: np.ndarray
    t_test: np.ndarray
    vocab: Vocabulary
    source: str


_last = None  # the most recent load, for the textbook's get_vocab(); never mutated


def generate_addition(n=50000, seed=0):
    """Lines like the textbook's addition.txt: 'a+b' padded to 7, '_' + sum padded to 5."""
    rng = np.random.RandomState(seed)
    a = rng.randint(0, 1000, size=n)
    b = rng.randint(0, 1000, size=n)
    return [f"{x}+{y}".ljust(7) + f"_{x + y}".ljust(5) for x, y in zip(a, b)]


_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december")
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def generate_date(n=50000, seed=0):
    """Lines like the textbook's date.txt: a date written one of several ways (``9/27/94``,
    ``Sep 27, 1994``, ``september 27, 1994``, ``TUESDAY, SEPTEMBER 27, 1994``, in lower, title
    or upper case) padded to 29 characters, then ``_1994-09-27``. Dates uniform in 1970-2016."""
    import datetime
    rng = np.random.RandomState(seed)
    first = datetime.date(1970, 1, 1).toordinal()
    days = rng.randint(0, datetime.date(2017, 1, 1).toordinal() - first, size=n)
    forms = rng.randint(0, 4, size=n)
    cases = rng.randint(0, 3, size=n)
    lines = []
    for d, form, case in zip(days, forms, cases):
        day = datetime.date.fromordinal(first + int(d))
        month = _MONTHS[day.month - 1]
        if form == 0:
            q = f"{day.month}/{day.day}/{day.year % 100:02d}"
        else:
            q = f"{month if form > 1 else month[:3]} {day.day}, {day.year}"
            if form == 3:
                q = f"{_WEEKDAYS[day.weekday()]}, {q}"
            q = (str.lower, str.title, str.upper)[case](q)
        lines.append(q.ljust(29) + "_" + day.isoformat())
    return lines


GENERATORS = {"addition.txt": generate_addition, "date.txt": generate_date}


def pad_id(vocab, pad_char=" "):
    """The id that pads questions and answers at their end in this data (the textbook's sets pad
    with spaces), or None when the vocabulary has no such character."""
    return vocab.char_to_id.get(pad_char)


def reverse_padded(ids, pad):
    """Each row's true characters reversed, its trailing pads left at the end
    ("71+118 " -> "811+17 "); with pad None the whole row is reversed (the textbook's way)."""
    ids = np.asarray(ids)
    if pad is None:
        return ids[:, ::-1].copy()
    T = ids.shape[1]
    n = true_lengths(ids, pad)[:, None]
    t = np.arange(T)[None, :]
    cols = np.where(t < n, n - 1 - t, t)
    return np.take_along_axis(ids, cols, axis=1)


def parse_lines(lines, source="<lines>"):
    """(questions, answers) from raw lines, with clear errors on malformed ones."""
    questions, answers = [], []
    for i, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        k = line.find("_")
        if k <= 0:
            raise DataFormatError(f"{source}, line {i}: expected 'question_answer' with a '_' "
                                  f"after a non-empty question, got {line!r}")
        q, a = line[:k], line[k:]
        if questions and (len(q) != len(questions[0]) or len(a) != len(answers[0])):
            raise DataFormatError(
                f"{source}, line {i}: question/answer widths {len(q)}/{len(a)} differ from the first "
                f"line's {len(questions[0])}/{len(answers[0])} (lines must be padded alike): {line!r}")
        questions.append(q)
        answers.append(a)
    if not questions:
        raise DataFormatError(f"{source}: no data lines")
    return questions, answers


MIN_LINES = 10


def build(questions, answers, seed=1984, source="<lines>"):
    char_to_id = {}
    for q, a in zip(questions, answers):
        for ch in q + a:
            if ch not in char_to_id:
                char_to_id[ch] = len(char_to_id)
    id_to_char = {i: ch for ch, i in char_to_id.items()}
    if len(questions) < MIN_LINES:
        raise DataFormatError(f"{source}: {len(questions)} data lines; at least {MIN_LINES} are "
                              f"needed "
                              f"(the last 10% is the test split)")
    x = np.array([[char_to_id[c] for c in q] for q in questions], dtype=np.int32)
    t = np.array([[char_to_id[c] for c in a] for a in answers], dtype=np.int32)
    idx = np.arange(len(x))
    if seed is not None:
        np.random.RandomState(seed).shuffle(idx)
    x, t = x[idx], t[idx]
    split = len(x) - len(x) // 10
    vocab = Vocabulary(char_to_id, id_to_char, x.shape[1], t.shape[1])
    return SequenceData(x[:split], t[:split], x[split:], t[split:], vocab, source)


MAX_DATA_BYTES = 64 << 20  # the textbook's sets are ~1-2 MB


def read_bytes(path, max_bytes=MAX_DATA_BYTES):
    """The bytes of a data file, refused with an error naming it when it is not a regular file
    (a FIFO would block), holds more than ``max_bytes`` or is UTF-16 text."""
    f, size = open_regular(path)
    with f:
        if size > max_bytes:
            raise DataFormatError(f"{path}: {size} bytes is more than the {max_bytes}-byte limit "
                                  f"for a text data set")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataFormatError(f"{path}: more than the {max_bytes}-byte limit for a text data set")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataFormatError(f"{path}: is UTF-16 text; save it as UTF-8")
    return data


def read_text(path, max_bytes=MAX_DATA_BYTES):
    """The text of a UTF-8 file (a leading byte-order mark dropped), with errors that name the
    file: not a regular file (a FIFO would block), too large, not UTF-8 (UTF-16 recognised),
    binary (NUL bytes)."""
    data = read_bytes(path, max_bytes)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                              f"{e.start}); a binary file?") from None
    if "\0" in text:
        raise DataFormatError(f"{path}: contains NUL characters at offset {text.index(chr(0))}; "
                              f"a binary file?")
    return text


def read_text_lines(path, max_bytes=MAX_DATA_BYTES):
    """read_text's lines (split at "\n"; a trailing "\r" is dropped by parse_lines)."""
    return read_text(path, max_bytes).split("\n")


def load_dataset(file_name_or_path="addition.txt", seed=1984):
    """A SequenceData (arrays + its own Vocabulary) from a file, or generated when absent."""
    global _last
    path = expand_path(file_name_or_path)
    if os.path.lexists(path):
        q, a = parse_lines(read_text_lines(path), path)
        data = build(q, a, seed, path)
    elif os.path.basename(path) in GENERATORS and os.path.dirname(path) == "":
        lines = GENERATORS[path](seed=0)
        data = build(*parse_lines(lines, f"generated {path}"), seed, f"generated {path}")
    else:
        raise FileNotFoundError(f"data file {path!r} not found (built-in generated sets: "
                                f"{', '.join(GENERATORS)})")
    _last = data
    return data


def load_data(file_name_or_path="addition.txt", seed=1984):
    """The textbook's interface: ((x_train, t_train), (x_test, t_test))."""
    d = load_dataset(file_name_or_path, seed)
    return (d.x_train, d.t_train), (d.x_test, d.t_test)


def get_vocab():
    """(char_to_id, id_to_char) of the most recent load_data, as fresh dicts."""
    if _last is None:
        raise RuntimeError("get_vocab() called before load_data()")
    return dict(_last.vocab.char_to_id), dict(_last.vocab.id_to_char)
