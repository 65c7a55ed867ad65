import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_engine  # noqa: E402

ENGINES = ["numpy", "cython", "cupy"]


@pytest.fixture(params=ENGINES)
def engine(request):
    if not set_engine(request.param):
        pytest.skip(f"{request.param} engine not available here")
    yield request.param
    set_engine("numpy")
    from fastseq import backend
    backend.use("auto")
