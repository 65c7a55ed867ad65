"""Shared by the fuzz tests: run a loader on one hostile input within the reliability bounds."""
import time
import tracemalloc

from fastseq.files import FastseqFileError

SECONDS = 2.0          # a refusal (or a load) of a small hostile file takes less than this
PEAK_BYTES = 500 << 20  # and allocates less than this beyond what the process already holds


def bounded(fn, *args, allowed=(FastseqFileError, OSError), **kwargs):
    """(result, None) or (None, refusal) of fn(*args, **kwargs). Any exception outside
    ``allowed`` (MemoryError, RecursionError, OverflowError, KeyError, TypeError, zlib.error,
    NotImplementedError, a bare ValueError ...) propagates and fails the test; so does a call that
    takes longer than SECONDS or allocates more than PEAK_BYTES."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        try:
            result, refusal = fn(*args, **kwargs), None
        except allowed as e:
            result, refusal = None, e
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < SECONDS, f"took {elapsed:.2f} s"
    assert peak < PEAK_BYTES, f"allocated {peak / 2**20:.0f} MB"
    if refusal is not None:
        assert str(refusal).strip(), f"{type(refusal).__name__} without a message"
    return result, refusal
