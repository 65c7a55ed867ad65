"""JSON text parsed in memory bounded by a small multiple of its size, and in bounded time.

``json.loads`` itself needs memory in proportion to the values it builds: about 90 bytes for an
empty ``{}`` written in 3 bytes. So the text is first scanned in fixed-size chunks (memory
independent of its length, no regular expression, no recursion) for its nesting depth, the
number of values and the number of object keys it holds, and parsed only when all three are
within the limits. Keys have their own, lower limit because they cost the most time: each
distinct key is a new string hashed into the object and into the parser's key memo, about
three times the time of a list item (benchmarks/forged_files.py measures each worst case).
"""
import json

import numpy as np

CHUNK = 1 << 18
MAX_DIGITS = 4300  # Python's own default limit for str -> int
_OPEN, _CLOSE = np.zeros(256, bool), np.zeros(256, bool)
_OPEN[[ord("["), ord("{")]] = True
_CLOSE[[ord("]"), ord("}")]] = True
_QUOTE, _BACKSLASH, _COMMA, _COLON = ord('"'), ord("\\"), ord(","), ord(":")


def scan(raw, max_depth=None, chunk=CHUNK):
    """(depth, values, keys) of JSON text ``raw`` (bytes): the deepest nesting of [ and {, an
    upper bound on the number of values (one per opening bracket and per comma, plus one) and the
    number of object keys (one per colon), counting only what lies outside strings. Stops early
    once the depth passes ``max_depth``."""
    b = np.frombuffer(raw, dtype=np.uint8)
    depth = deepest = 0
    values, keys = 1, 0
    quotes = 0      # unescaped quotes so far (odd: inside a string)
    backslashes = 0  # the run of backslashes that ends the previous chunk
    for start in range(0, len(b), chunk):
        c = b[start:start + chunk]
        idx = np.arange(len(c), dtype=np.int32)
        # run[i]: length of the run of backslashes ending at i (0 where c[i] is not one)
        last_other = np.maximum.accumulate(np.where(c == _BACKSLASH, -1, idx))
        run = (idx - last_other).astype(np.int64)
        run[last_other < 0] += backslashes
        before = np.empty_like(run)  # backslashes right before each byte
        before[0], before[1:] = backslashes, run[:-1]
        quote = (c == _QUOTE) & (before % 2 == 0)
        outside = (np.cumsum(quote, dtype=np.int64) + quotes) % 2 == 0
        opens, closes = _OPEN[c] & outside, _CLOSE[c] & outside
        level = np.cumsum(opens.astype(np.int8) - closes, dtype=np.int64) + depth
        deepest = max(deepest, int(level.max(initial=depth)))
        depth = int(level[-1])
        values += int(opens.sum()) + int(((c == _COMMA) & outside).sum())
        keys += int(((c == _COLON) & outside).sum())
        quotes += int(quote.sum())
        backslashes = int(run[-1])
        if max_depth is not None and deepest > max_depth:
            break
    return deepest, values, keys


def _int(text):
    """An integer literal of at most MAX_DIGITS digits (longer ones take quadratic time)."""
    if len(text) > MAX_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_DIGITS})")
    return int(text)


def check(raw, max_depth, max_values, max_keys):
    """A ValueError saying which limit JSON text ``raw`` (bytes) is over, if any."""
    depth, values, keys = scan(raw, max_depth)
    if depth > max_depth:
        raise ValueError(f"nests more than {max_depth} levels deep (limit {max_depth})")
    if values > max_values:
        raise ValueError(f"holds about {values} values, more than the limit of {max_values}")
    if keys > max_keys:
        raise ValueError(f"holds {keys} object keys, more than the limit of {max_keys}")


def loads(raw, max_depth, max_values, max_keys):
    """The value of JSON text ``raw`` (UTF-8 bytes), or a ValueError saying why not (too deep,
    too many values or keys, not JSON)."""
    check(raw, max_depth, max_values, max_keys)
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_int)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"is not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
