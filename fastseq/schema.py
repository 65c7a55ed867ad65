"""Declared shapes of JSON metadata, checked in one pass before anything is used.

A schema is built from the helpers below and checked with ``check(value, schema)``, which
raises SchemaError naming the first field that is missing, of the wrong type or out of range
(a dotted path such as ``state.loop.epoch``)::

    POSITION = {"epoch": Int(0), "loss": Float(), "note": Optional(Str())}
"""
import math


class SchemaError(ValueError):
    def __init__(self, field, problem):
        super().__init__(f"field {field or '(top level)'}: {problem}")
        self.field, self.problem = field, problem


def _type_name(v):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


class Int:
    def __init__(self, lo=None, hi=None):
        self.lo, self.hi = lo, hi

    def check(self, v, where):
        if isinstance(v, bool) or not isinstance(v, int):
            raise SchemaError(where, f"expected an integer, got {_type_name(v)}")
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise SchemaError(where, f"{v} is outside [{self.lo}, {self.hi}]")


class Float:
    """A finite number (an integer is accepted) in [lo, hi]; ``positive``: > lo."""

    def __init__(self, lo=None, hi=None, positive=False):
        self.lo, self.hi, self.positive = lo, hi, positive

    def check(self, v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SchemaError(where, f"expected a number, got {_type_name(v)}")
        if not math.isfinite(v):
            raise SchemaError(where, f"expected a finite number, got {v}")
        if (self.lo is not None and (v < self.lo or (self.positive and v == self.lo))) or \
                (self.hi is not None and v > self.hi):
            raise SchemaError(where, f"{v} is outside {'(' if self.positive else '['}{self.lo}, "
                                     f"{self.hi}]")


class Bool:
    def check(self, v, where):
        if not isinstance(v, bool):
            raise SchemaError(where, f"expected true or false, got {_type_name(v)}")


class Str:
    def __init__(self, choices=None, max_len=10_000):
        self.choices, self.max_len = choices, max_len

    def check(self, v, where):
        if not isinstance(v, str):
            raise SchemaError(where, f"expected a string, got {_type_name(v)}")
        if len(v) > self.max_len:
            raise SchemaError(where, f"a string of {len(v)} characters (at most {self.max_len})")
        if self.choices is not None and v not in self.choices:
            raise SchemaError(where, f"{v[:40]!r} is not one of {sorted(self.choices)}")


class Any:
    """Any JSON value."""

    def check(self, v, where):
        pass


class Optional:
    """null or a value of ``schema``."""

    def __init__(self, schema):
        self.schema = schema

    def check(self, v, where):
        if v is not None:
            check(v, self.schema, where)


class List:
    """A list of ``item``s; ``length``: exactly that many."""

    def __init__(self, item, length=None):
        self.item, self.length = item, length

    def check(self, v, where):
        if not isinstance(v, list):
            raise SchemaError(where, f"expected a list, got {_type_name(v)}")
        if self.length is not None and len(v) != self.length:
            raise SchemaError(where, f"expected {self.length} entries, got {len(v)}")
        for i, x in enumerate(v):
            check(x, self.item, f"{where}[{i}]")


class Mapping:
    """An object with any keys (strings) whose values are all ``value`` (anything when None)."""

    def __init__(self, value=None):
        self.value = value

    def check(self, v, where):
        if not isinstance(v, dict):
            raise SchemaError(where, f"expected an object, got {_type_name(v)}")
        if self.value is not None:
            for k, x in v.items():
                check(x, self.value, f"{where}.{k}" if where else k)


class Fields:
    """An object with the ``required`` keys (a dict: key -> schema) and maybe ``optional`` ones;
    other keys are allowed (they are not used)."""

    def __init__(self, required, optional=None):
        self.required, self.optional = required, optional or {}

    def check(self, v, where):
        if not isinstance(v, dict):
            raise SchemaError(where, f"expected an object, got {_type_name(v)}")
        for k, schema in self.required.items():
            field = f"{where}.{k}" if where else k
            if k not in v:
                raise SchemaError(field, "missing")
            check(v[k], schema, field)
        for k, schema in self.optional.items():
            if k in v:
                check(v[k], schema, f"{where}.{k}" if where else k)


def check(value, schema, where=""):
    """Check ``value`` against ``schema`` (a helper above, or a dict: Fields(that dict))."""
    if isinstance(schema, dict):
        schema = Fields(schema)
    schema.check(value, where)
