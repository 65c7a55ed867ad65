"""Shared by the fuzz tests: run a loader on one hostile input within the reliability bounds
(memory here; the time each worst case takes is measured by ``python -m benchmarks.forged_files``)."""
import tracemalloc

from fastseq.files import FastseqFileError

PEAK_BYTES = 500 << 20  # a refusal (or a load) allocates less than this beyond what the process holds


def bounded(fn, *args, allowed=(FastseqFileError, OSError), **kwargs):
    """(result, None) or (None, refusal) of fn(*args, **kwargs). Any exception outside
    ``allowed`` (MemoryError, RecursionError, OverflowError, KeyError, TypeError, zlib.error,
    NotImplementedError, a bare ValueError ...) propagates and fails the test; so does a call that
    allocates more than PEAK_BYTES."""
    tracemalloc.start()
    try:
        try:
            result, refusal = fn(*args, **kwargs), None
        except allowed as e:
            result, refusal = None, e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"allocated {peak / 2**20:.0f} MB"
    if refusal is not None:
        assert str(refusal).strip(), f"{type(refusal).__name__} without a message"
    return result, refusal
