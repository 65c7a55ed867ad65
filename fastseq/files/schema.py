"""Declared schemas for JSON metadata (model files, checkpoints, envelopes), checked in one call
before any field is used.

    SCHEMA = Dict({"model": Str(64), "config": Dict(extra=Int(1, 2 ** 31)),
                   "optimizer": Choice("adam", "sgd"), "lr": Num(above=0),
                   "beta1": Num(0, below=1), "note": Optional(Str(200))},
                  optional={"reverse": Bool()}, extra=Any())
    check_schema(path, meta, SCHEMA)   # FastseqFileError: "m.npz: metadata field 'config.x' ..."

Types are exact (``true`` is not an integer, ``2.0`` is not ``2``; ``Num`` takes both an integer
and a float), numbers finite and in range, strings, lists and objects bounded in length. A
refusal names the file and the first field that does not fit.
"""
import math
import sys

from .core import FastseqFileError


def check_schema(path, value, schema, what="metadata", error=FastseqFileError):
    """Raise ``error`` (a FastseqFileError by default) naming ``path`` and the field unless
    ``value`` fits ``schema``: "<path>: <what> field 'a.b[2]' ..."."""
    problem = schema.problem(value, "")
    if problem is not None:
        raise error(f"{path}: {what} {problem}")


def _got(v):
    text = "null" if v is None else str(v).lower() if isinstance(v, bool) else repr(v)
    return f"{type(v).__name__} {text[:40]}" if v is not None else text


def _field(at):
    return f"field {at!r}" if at else "(the whole object)"


class Spec:
    what = "a value"

    def problem(self, v, at):
        """None if v fits, else what is wrong with field ``at`` (a dotted path)."""
        return None if self.fits(v) else f"{_field(at)} must be {self.what}, got {_got(v)}"

    def fits(self, v):
        return True

    def fits_all(self, items):
        """Whether every item fits: the quick pass over a long list (no field paths built)."""
        return all(self.problem(x, "") is None for x in items)


class Any(Spec):
    pass


class Null(Spec):
    what = "null"

    def fits(self, v):
        return v is None


class Bool(Spec):
    what = "true or false"

    def fits(self, v):
        return type(v) is bool


class Choice(Spec):
    """One of the given values (of the same type: ``1`` is not ``true``)."""

    def __init__(self, *values):
        self.values = values
        self.what = "one of " + ", ".join(repr(c) for c in values)

    def fits(self, v):
        return any(type(v) is type(c) and v == c for c in self.values)


class Const(Choice):
    """Exactly ``value`` (of the same type)."""

    def __init__(self, value):
        super().__init__(value)
        self.what = repr(value)


class Optional(Spec):
    """null or a value that fits ``spec`` (whose own refusal, naming the inner field, is kept)."""

    def __init__(self, spec):
        self.spec, self.what = spec, f"null or {spec.what}"

    def problem(self, v, at):
        return None if v is None else self.spec.problem(v, at)


def _bounds(lo, hi, above, below):
    """' in [lo, hi)', ' > above' ...: lo/hi are included, above/below excluded."""
    left = f"[{lo}" if lo is not None else f"({above}" if above is not None else None
    right = f"{hi}]" if hi is not None else f"{below})" if below is not None else None
    if left and right:
        return f" in {left}, {right}"
    if left:
        return f" >= {lo}" if lo is not None else f" > {above}"
    if right:
        return f" <= {hi}" if hi is not None else f" < {below}"
    return ""


def _finite(v):
    """False for inf, nan, and an integer too large to be a float (math would overflow on it)."""
    return math.isfinite(v) if type(v) is float else abs(v) <= _LARGEST


_LARGEST = int(sys.float_info.max)


class _Range(Spec):
    """A number of one of ``types``, finite, with lo <= v <= hi and above < v < below (each bound
    optional)."""
    types, kind = (), ""

    def __init__(self, lo=None, hi=None, *, above=None, below=None):
        self.lo, self.hi, self.above, self.below = lo, hi, above, below
        self.what = self.kind + _bounds(lo, hi, above, below)

    def problem(self, v, at):
        if type(v) not in self.types or not _finite(v):
            return f"{_field(at)} must be {self.what}, got {_got(v)}"
        if ((self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi)
                or (self.above is not None and v <= self.above)
                or (self.below is not None and v >= self.below)):
            return f"{_field(at)} = {str(v)[:40]} is out of range ({self.what})"
        return None

    def fits_all(self, items):
        """One pass in C over the types and NaNs, then only the extremes need checking."""
        if not set(map(type, items)) <= set(self.types):
            return False
        try:
            if float in self.types and any(map(math.isnan, items)):
                return False
        except OverflowError:  # an integer too large to be a float
            return False
        return not items or (self.problem(min(items), "") is None
                             and self.problem(max(items), "") is None)


class Int(_Range):
    types, kind = (int,), "an integer"


class Num(_Range):
    types, kind = (int, float), "a finite number"


class Float(_Range):
    types, kind = (float,), "a finite floating-point number"


class Str(Spec):
    def __init__(self, max_len, min_len=0, blank=True):
        self.max_len, self.min_len, self.blank = max_len, min_len, blank
        self.what = (f"a string of {min_len} to {max_len} characters"
                     + ("" if blank else ", not only whitespace"))

    def fits(self, v):
        return (type(v) is str and self.min_len <= len(v) <= self.max_len
                and (self.blank or not v.isspace()))

    def fits_all(self, items):
        """One pass in C each over the types, the lengths and (if refused) blank strings."""
        if not items:
            return True
        if set(map(type, items)) != {str}:
            return False
        lengths = list(map(len, items))
        return (self.min_len <= min(lengths) and max(lengths) <= self.max_len
                and (self.blank or not any(map(str.isspace, items))))


class OneOf(Spec):
    def __init__(self, *specs):
        self.specs = specs
        self.what = " or ".join(s.what for s in specs)

    def problem(self, v, at):
        problems = [s.problem(v, at) for s in self.specs]
        if None in problems:
            return None
        in_range = [p for p in problems if "out of range" in p]  # the type fits, the value not
        return in_range[0] if in_range else f"{_field(at)} must be {self.what}, got {_got(v)}"


class List(Spec):
    def __init__(self, item, max_len, min_len=0, unique=False):
        self.item, self.max_len, self.min_len, self.unique = item, max_len, min_len, unique
        self.what = f"a list of {min_len} to {max_len} items, each {item.what}"

    def problem(self, v, at):
        if type(v) is not list:
            return f"{_field(at)} must be {self.what}, got {_got(v)}"
        if not self.min_len <= len(v) <= self.max_len:
            return f"{_field(at)} has {len(v)} items (allowed: {self.min_len} to {self.max_len})"
        if not self.item.fits_all(v):
            for i, x in enumerate(v):  # the first item that does not fit, named
                p = self.item.problem(x, f"{at}[{i}]")
                if p is not None:
                    return p
        if self.unique and len(set(v)) != len(v):
            return f"{_field(at)} lists an item twice"
        return None


class Tuple(Spec):
    """A list of fixed length whose items fit ``items`` in order."""

    def __init__(self, *items):
        self.items = items
        self.what = f"a list [{', '.join(s.what for s in items)}]"

    def problem(self, v, at):
        if type(v) is not list or len(v) != len(self.items):
            return f"{_field(at)} must be {self.what}, got {_got(v)}"
        for i, (spec, x) in enumerate(zip(self.items, v)):
            p = spec.problem(x, f"{at}[{i}]")
            if p is not None:
                return p
        return None


class Dict(Spec):
    """A JSON object: ``fields`` must be present, ``optional`` may be; any other key must fit
    ``extra`` (None: no other key is allowed)."""

    def __init__(self, fields=None, optional=None, extra=None, max_len=1 << 16):
        self.fields, self.optional = dict(fields or {}), dict(optional or {})
        self.extra, self.max_len = extra, max_len
        self.what = "a JSON object"

    def problem(self, v, at):
        if type(v) is not dict:
            return f"{_field(at)} must be {self.what}, got {_got(v)}"
        if len(v) > self.max_len:
            return f"{_field(at)} has {len(v)} keys (at most {self.max_len})"
        for k in self.fields:
            if k not in v:
                return f"{_field(_join(at, k))} is missing"
        for k, x in v.items():
            spec = self.fields.get(k) or self.optional.get(k) or self.extra
            if spec is None:
                return f"{_field(_join(at, k))} is not expected here"
            p = spec.problem(x, _join(at, k))
            if p is not None:
                return p
        return None


def _join(at, key):
    return f"{at}.{key}" if at else str(key)
