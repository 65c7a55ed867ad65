"""A small pool of working buffers, keyed by shape, for engines that call the same shapes over
and over: fresh memory costs a page fault and a page clear per 4 KiB, which is a third of a
large-batch LSTM forward. At most MAX_BYTES are kept (least recently returned dropped first).
"""
import threading
from collections import OrderedDict

MAX_BYTES = 256 << 20

_sets = OrderedDict()  # key -> list of buffer tuples, least recently returned first
_bytes = 0
_lock = threading.RLock()  # re-entered if a GC pass inside drops a cache that gives back


def _nbytes(work):
    return sum(a.nbytes for a in work)


def take(key):
    """A tuple of buffers given back under key, or None."""
    global _bytes
    with _lock:
        sets = _sets.get(key)
        if not sets:
            return None
        work = sets.pop()
        if not sets:
            del _sets[key]
        _bytes -= _nbytes(work)
        return work


def give(key, work):
    """Keep a tuple of buffers for the next take(key)."""
    global _bytes
    size = _nbytes(work)
    if size > MAX_BYTES:
        return
    with _lock:
        _sets.setdefault(key, []).append(work)
        _sets.move_to_end(key)
        _bytes += size
        while _bytes > MAX_BYTES:
            old_key, sets = next(iter(_sets.items()))
            _bytes -= _nbytes(sets.pop(0))
            if not sets:
                del _sets[old_key]


def clear():
    """Free the pooled buffers."""
    global _bytes
    with _lock:
        _sets.clear()
        _bytes = 0
