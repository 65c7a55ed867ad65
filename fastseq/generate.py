"""The CLI that uses a trained model (the samplers live in fastseq.sampling):

    python -m fastseq.generate --model runs/addition/model.npz --question "71+118"
    python -m fastseq.generate --model best.npz --input words.txt [--output out.tsv] \\
        [--beam K] [--nbest N] [--skip-bad-lines]
    python -m fastseq.generate --model runs/ptb/model.npz --start "the meaning of life is" \\
        --length 100 --temperature 0.8 --seed 0 [--top-k 40] [--top-p 0.9] [--greedy]

--input FILE ('-': standard input): one source per line (UTF-8; a byte-order mark and CRLF line
ends are accepted; the text before a tab, if any, surrounding whitespace dropped). Output, in
input order, to standard output or --output FILE (written to a temporary file renamed at the
end: on an error or Ctrl-C the target is left as it was):

    source<TAB>answer                     one line per source (greedy, or --beam K)
    source<TAB>answer<TAB>log-probability  --nbest N: N lines per source, best first

The log-probability is the answer's summed natural-log probability under the model, its end
symbol included (4 decimals). A line that cannot be converted (empty, not UTF-8, refused by
the vocabulary) stops the run with one error naming the file and line (exit status 2), or with
--skip-bad-lines is left out and counted in one warning. Symbols unknown to a vocabulary that
has <unk> become <unk>, counted in one warning. A progress bar is drawn on standard error when
it is a terminal. The answers are fastseq.load(FILE).answer(sources)'s (the same batches).
"""
import argparse
import math
import signal
import sys

from .cli import int_at_least, number_in
from .files.rebuild import BATCH, WINDOW_BATCHES
from .datasets.text import words_to_text as ids_to_text
from .sampling import MIN_TEMPERATURE

DEFAULT_SKIP = ("N", "<unk>", "$")


# ---------------------------------------------------------------------------------------------
# the CLI: answers from a seq2seq model, text from a language model

MAX_LENGTH = 100_000  # words per run: bounded so that no argument makes it run for hours
LM_ONLY = ("start", "length", "temperature", "top_k", "top_p", "seed", "allow_skipped")
INPUT_ONLY = ("output", "nbest", "skip_bad_lines")


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
    p.add_argument("--input", default=None, metavar="FILE",
                   help="seq2seq models: convert every line of FILE ('-': standard input), "
                        "writing 'source<TAB>answer' lines in input order (the source is the "
                        "line's text before any tab, surrounding whitespace dropped)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="with --input: write to FILE (replaced whole at the end, never left "
                        "half-written) instead of standard output")
    p.add_argument("--nbest", type=int_at_least(1), default=None, metavar="N",
                   help="with --input: the N best answers of a beam search (width --beam, "
                        "default N), N lines per source, best first: "
                        "'source<TAB>answer<TAB>log-probability'")
    p.add_argument("--skip-bad-lines", action="store_true", default=None,
                   help="with --input: skip lines that cannot be converted (empty, not UTF-8, "
                        "refused by the vocabulary), counted in one warning, instead of "
                        "stopping at the first")
    p.add_argument("--batch-size", type=int_at_least(1), default=BATCH, metavar="B",
                   help=f"with --input: sources converted together (default {BATCH})")
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


def _flags(args, names):
    return [f"--{k.replace('_', '-')}" for k in names if getattr(args, k) is not None]


def _answers(saved, args):
    if args.question is None and args.input is None:
        raise ValueError(f"{args.model} holds a seq2seq model ({type(saved.model).__name__}); "
                         f"give --question, e.g. --question \"71+118\", or --input FILE")
    given = _flags(args, LM_ONLY)
    if given:
        raise ValueError(f"{', '.join(given)}: for language models only; "
                         f"{args.model} holds a seq2seq model")
    if args.question is not None and args.input is not None:
        raise ValueError("give --question or --input, not both")
    if args.beam is not None and args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    if args.input is not None:
        return _convert_input(saved, args)
    given = _flags(args, INPUT_ONLY)
    if given:
        raise ValueError(f"{', '.join(given)}: with --input only")
    for q in args.question:
        if not q.strip():
            raise ValueError("--question is empty")
    if args.beam is not None and args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    return "\n".join(saved.answer([q.strip() for q in args.question], beam=args.beam))


def _text(saved, args):
    given = _flags(args, ("beam", "input") + INPUT_ONLY)
    if given:
        raise ValueError(f"{', '.join(given)}: for seq2seq models only; {args.model} holds a "
                         f"language model")
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
        with _terminate_as_interrupt():
            saved = load(args.model, data_dir=args.data_dir)
            out = _answers(saved, args) if saved.task == "seq2seq" else _text(saved, args)
    except KeyboardInterrupt as e:
        print("fastseq: interrupted", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        _silence_stdout()
        return 141
    except (ValueError, OSError) as e:
        missing = isinstance(e, FileNotFoundError) and e.filename is not None
        msg = f"{e.filename}: not found" if missing else " ".join(str(e).split())
        print(f"fastseq: {msg}", file=sys.stderr)
        return 2
    if out is not None:
        print(out)
    return 0


# ---------------------------------------------------------------------------------------------
# --input: a file of sources converted in bounded memory
#
# Lines are read one window (WINDOW_BATCHES batches) at a time; within a window the sources are
# sorted by length and converted in batches of --batch-size (similar lengths pad little), and the
# window is written back in input order (LoadedModel.convert_window). Memory holds one window,
# whatever the file's size.

MAX_LINE_BYTES = 1 << 20  # a longer line is a bad line (memory stays bounded on any input)


class BadLine(ValueError):
    """An input line that cannot be converted; the message names the file and line."""


class _Lines:
    """(line number, source) of each usable line of a binary stream; a bad line raises BadLine,
    or with ``skip`` is counted (``skipped``, ``first_bad``) and left out."""

    def __init__(self, f, name, skip, progress=None):
        self.f, self.name, self.skip, self.progress = f, name, skip, progress
        self.skipped, self.first_bad = 0, None

    def bad(self, line_no, problem):
        msg = f"{self.name}, line {line_no}: {problem}"
        if not self.skip:
            raise BadLine(f"{msg} (--skip-bad-lines skips such lines)")
        self.skipped += 1
        self.first_bad = self.first_bad or msg

    def __iter__(self):
        line_no = 0
        while True:
            raw = self.f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            line_no += 1
            if self.progress is not None:
                self.progress.update(len(raw))
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := self.f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass  # the rest of the over-long line
                self.bad(line_no, f"longer than {MAX_LINE_BYTES} bytes")
                continue
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self.bad(line_no, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                                  f"{e.start + 1} of the line)")
                continue
            source = text.split("\t", 1)[0].strip()  # (strip: the line end, CR included)
            if not source:
                self.bad(line_no, "empty line" if not text.strip() else "empty source before "
                                                                         "the tab")
                continue
            yield line_no, source


def _windows(lines, size):
    window = []
    for item in lines:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _refused(saved, sources):
    """[(index, message)] of the sources the vocabulary refuses, in order."""
    out = []
    for i, s in enumerate(sources):
        try:
            saved.vocab.encode_sources([s])
        except ValueError as e:
            out.append((i, " ".join(str(e).split())))
    return out


def _convert_window(saved, window, lines, beam, nbest, batch_size):
    """Hypotheses per (line number, source) of the window, and the unknown-symbol count;
    sources the vocabulary refuses are bad lines (left out of the window when skipped)."""
    while window:
        try:
            hyps, unknown = saved.convert_window([s for _, s in window], beam, nbest, batch_size)
            return hyps, unknown, window
        except ValueError:
            refused = _refused(saved, [s for _, s in window])
            if not refused:
                raise  # not a source's fault
            for i, problem in refused:
                lines.bad(window[i][0], problem)
            drop = {i for i, _ in refused}
            window = [w for i, w in enumerate(window) if i not in drop]
    return [], 0, window


def convert_stream(saved, f, write, name, *, beam=None, nbest=None, skip_bad=False,
                   batch_size=BATCH, progress=None):
    """Convert each line of the binary stream f, calling write(bytes) once per window of lines:
    'source<TAB>answer\n' per line in input order, or with nbest N lines per source
    'source<TAB>answer<TAB>log-probability\n', best first. The windows and batches are
    LoadedModel.convert's, so the answers are saved.answer's over the same lines. Returns
    (lines written, lines skipped, the first skipped line's problem, unknown symbols turned
    into <unk>)."""
    if nbest is not None and beam is None:
        beam = nbest
    if nbest is not None and nbest > beam:
        raise ValueError(f"--nbest {nbest} needs a beam at least as wide (--beam {beam})")
    lines = _Lines(f, name, skip_bad, progress)
    done = unknown = 0
    for window in _windows(lines, batch_size * WINDOW_BATCHES):
        hyps, n_unknown, kept = _convert_window(saved, window, lines, beam, nbest, batch_size)
        unknown += n_unknown
        out = []
        for (_, source), h in zip(kept, hyps):
            for answer, score in h:
                out.append(f"{source}\t{answer}\n" if nbest is None
                           else f"{source}\t{answer}\t{score:.4f}\n")
        write("".join(out).encode("utf-8"))
        done += len(kept)
    return done, lines.skipped, lines.first_bad, unknown


def _convert_input(saved, args):
    """--input: convert the file (or standard input) to standard output or --output."""
    import os

    def run(out):
        if args.input == "-":
            return _run(sys.stdin.buffer, "<stdin>", None, out)
        with open(args.input, "rb") as f:
            return _run(f, args.input, os.fstat(f.fileno()).st_size, out)

    def _run(f, name, size, out):
        progress = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            progress = tqdm(total=size or None, unit="B", unit_scale=True, file=sys.stderr,
                            desc="converting", leave=False, dynamic_ncols=True)
        try:
            return convert_stream(saved, f, out, name, beam=args.beam, nbest=args.nbest,
                                  skip_bad=bool(args.skip_bad_lines), batch_size=args.batch_size,
                                  progress=progress)
        finally:
            if progress is not None:
                progress.close()

    if args.output is None:
        def write(data):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        result = run(write)
    else:
        from .files import atomic_write
        box = []
        atomic_write(args.output, lambda f: box.append(run(f.write)))
        result = box[0]
    _, skipped, first_bad, unknown = result
    if skipped:
        print(f"fastseq: warning: skipped {skipped} bad line(s) (the first: {first_bad})",
              file=sys.stderr)
    if unknown:
        print(f"fastseq: warning: {unknown} unknown symbol(s) in the sources became <unk>",
              file=sys.stderr)
    return None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt."""


class _terminate_as_interrupt:
    """SIGTERM raises _Terminated while inside (a temporary output file is then removed, as on
    Ctrl-C); the previous handler is restored after."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)

    @staticmethod
    def _raise(signum, frame):
        raise _Terminated


def _silence_stdout():
    import os
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
