"""What the command-line tools share: argparse types that name what they expect, and flags built
from tables of settings."""
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
    parse.__name__, parse.metavar = "integer", "N"
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
    """An argparse type: one of the strings ``choices`` (the error lists them)."""
    def parse(s):
        if s not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {s!r}")
        return s
    parse.__name__ = "choice"
    parse.metavar = "{" + ",".join(choices) + "}"
    return parse


def dashed(key):
    """The flag spelling of a configuration key: batch_size -> batch-size."""
    return key.replace("_", "-")


def flag_keys(settings, switches):
    """flag -> key of every flag that add_flags makes (a switch as '--key/--no-key')."""
    flags = {f: key for f, (key, _, _) in settings.items()}
    flags.update({f"--{dashed(k)}/--no-{dashed(k)}": k for k in switches})
    return flags


def add_flags(p, settings, switches, defaults_text):
    """Add to parser ``p`` a flag per setting ({flag: (key, type, help)}) and a --key/--no-key
    pair per switch ({key: (help of --key, help of --no-key)}); each is None when not given.
    ``defaults_text(key)`` words a setting's defaults, shown at the end of its help line."""
    for key, (on, off) in switches.items():
        p.add_argument(f"--{dashed(key)}", dest=key, action="store_const", const=True,
                       default=None, help=on)
        p.add_argument(f"--no-{dashed(key)}", dest=key, action="store_const", const=False,
                       help=off)
    for flag, (key, parse, text) in settings.items():
        metavar = getattr(parse, "metavar", None) or ("PATH" if parse is str else "X")
        p.add_argument(flag, dest=key, type=parse, default=None, metavar=metavar,
                       help=f"{text} ({defaults_text(key)})")
