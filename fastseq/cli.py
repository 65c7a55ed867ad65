"""What the command-line tools share: argparse types that name what they expect."""
import argparse
import math


def int_at_least(lo):
    """An argparse type: an integer >= lo (the error names what was expected)."""
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(lo, f"an integer >= {lo}")

    def parse(s):
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {s}")
        return v
    parse.__name__ = "integer"
    return parse


def number_in(lo, hi=math.inf, lo_open=True, hi_open=True):
    """An argparse type: a finite number in the interval from lo to hi (open ends by default)."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi \
                or (hi_open and v == hi):
            raise argparse.ArgumentTypeError(
                f"must be a finite number in {'(' if lo_open else '['}{lo:g}, "
                f"{hi:g}{')' if hi_open else ']'}, got {s}")
        return v
    parse.__name__ = "number"
    return parse


def one_of(*choices):
    """An argparse type: one of the given words (the error lists them)."""
    def parse(s):
        if s not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {s!r}")
        return s
    parse.__name__ = "choice"
    return parse
