import contextlib
import os
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

# The textbook's own data files (addition.txt, date.txt, ptb/ptb.*.txt from
# https://github.com/oreilly-japan/deep-learning-from-scratch-2, dataset/): the few tests of facts
# about those exact files look in FASTSEQ_TEXTBOOK_DATA (default: shared/data beside the
# repository's folder) and skip, naming what is missing, where they are absent.
TEXTBOOK_DATA = Path(os.environ.get("FASTSEQ_TEXTBOOK_DATA")
                     or Path(__file__).resolve().parents[2] / "shared" / "data")

# Hypothesis: "ci" (the default) runs a few dozen derandomised cases per fuzz test; "full"
# (HYPOTHESIS_PROFILE=full) runs >= 2,000 random cases per loader (docs/RELIABILITY.md).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a dev dependency; the fuzz tests import it themselves
    settings = None
if settings is not None:
    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                              database=None, suppress_health_check=_quiet)
    settings.register_profile("full", max_examples=2000, deadline=None,
                              suppress_health_check=_quiet)
    settings.register_profile("dev", max_examples=300, deadline=None, suppress_health_check=_quiet)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# FASTSEQ_KERNEL=numpy runs the whole suite with the compiled extension unimportable, proving the
# numpy engine pure; tests that need the cython engine then skip, saying so.
if os.environ.get("FASTSEQ_KERNEL", "").strip().lower() == "numpy":
    sys.modules["fastseq._ext"] = None


PTB_FILES = ("ptb/ptb.train.txt", "ptb/ptb.valid.txt", "ptb/ptb.test.txt")


def needs_textbook(*names):
    """Skips the test it marks, naming the files, where any of the textbook's data files
    ``names`` (paths under TEXTBOOK_DATA) is absent."""
    missing = [n for n in names if not (TEXTBOOK_DATA / n).is_file()]
    return pytest.mark.skipif(bool(missing), reason=(
        f"needs the textbook's data file(s) {', '.join(missing)} (set FASTSEQ_TEXTBOOK_DATA to "
        f"the folder holding them; looked in {TEXTBOOK_DATA})"))


@pytest.fixture
def numpy_kernel():
    """Run the test on the numpy engine, restore the configuration after."""
    from fastseq import backend
    with backend.using("numpy"):
        yield


@pytest.fixture
def cython_engine():
    """Run the test on the cython engine; skipped, saying why, where fastseq._ext is not
    importable (a failure instead under FASTSEQ_REQUIRE_EXT=1, unless FASTSEQ_KERNEL=numpy
    blocked it on purpose)."""
    from fastseq import backend
    if not backend.cython_available():
        blocked = sys.modules.get("fastseq._ext", True) is None
        if os.environ.get("FASTSEQ_REQUIRE_EXT") == "1" and not blocked:
            pytest.fail("FASTSEQ_REQUIRE_EXT=1 but fastseq._ext is not fully built")
        pytest.skip("the cython engine (fastseq._ext) is not importable here")
    with backend.using("cython"):
        yield


def numerical_grad(f, x, eps=1e-6):
    """Central differences of scalar f() w.r.t. every element of x (modified in place, restored)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def rel_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if denom == 0 else float(np.linalg.norm(a - b) / denom)


@contextlib.contextmanager
def local_http_server(handler):
    """Serve ``handler`` (a request handler class or factory) on 127.0.0.1 in a thread; yields
    the base URL and shuts the server down afterwards."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
