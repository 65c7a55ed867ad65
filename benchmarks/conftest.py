import pytest

from benchmarks.common import set_engine

ENGINES = ["numpy", "cython", "cupy"]


@pytest.fixture(params=ENGINES)
def engine(request):
    if not set_engine(request.param):
        pytest.skip(f"{request.param} engine not available here")
    yield request.param
    set_engine("numpy")
    from fastseq import backend
    backend.use("auto")
