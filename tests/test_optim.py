"""Optimisers follow the textbook's formulas; the fused Adam matches the NumPy expressions."""
import os

import numpy as np
import pytest

from fastseq import SGD, Adam, clip_grads
from fastseq import optim


def _params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(5, 7), (7,), (3, 4, 2)]]


def test_adam_matches_textbook_formula():
    p = _params(np.float64)
    g = _params(np.float64, 1)
    ref = [a.copy() for a in p]
    m = [np.zeros_like(a) for a in p]
    v = [np.zeros_like(a) for a in p]
    opt = Adam(lr=0.01, fused=False)
    for t in range(1, 4):
        opt.update(p, g)
        lr_t = 0.01 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        for i in range(3):
            m[i] += (1 - 0.9) * (g[i] - m[i])
            v[i] += (1 - 0.999) * (g[i] ** 2 - v[i])
            ref[i] -= lr_t * m[i] / (np.sqrt(v[i]) + 1e-7)
    for a, b in zip(p, ref):
        np.testing.assert_allclose(a, b, rtol=1e-13)


def test_fused_extension_built_when_required():
    if os.environ.get("FASTSEQ_REQUIRE_EXT") == "1":
        assert optim._optim_cpu is not None


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
def test_fused_adam_matches_numpy(dtype, rtol):
    if optim._optim_cpu is None:
        pytest.skip("fused optimiser extension not built")
    p1, p2 = _params(dtype), _params(dtype)
    fused, plain = Adam(0.01), Adam(0.01, fused=False)
    assert fused.fused and not plain.fused
    for step in range(5):
        g = _params(dtype, step + 1)
        fused.update(p1, g)
        plain.update(p2, g)
    for a, b in zip(p1, p2):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


def test_adam_non_contiguous_falls_back():
    base = np.zeros((4, 6))
    p = [base[:, ::2]]  # a strided view: updated through the NumPy path, in place
    Adam(0.1).update(p, [np.ones((4, 3))])
    assert np.allclose(base[:, ::2], -0.1 * 1 / (1 + 1e-7 / 1), atol=1e-6) and np.all(base[:, 1::2] == 0)


def test_sgd_and_clip():
    p = [np.ones(3)]
    SGD(0.5).update(p, [np.array([1.0, 2.0, 3.0])])
    assert np.allclose(p[0], [0.5, 0.0, -0.5])
    g = [np.array([3.0, 4.0])]
    total = clip_grads(g, 1.0)
    assert abs(total - 5.0) < 1e-12 and np.allclose(g[0], [3 / (5 + 1e-6), 4 / (5 + 1e-6)])
    g = [np.array([0.3, 0.4])]
    clip_grads(g, 1.0)
    assert np.allclose(g[0], [0.3, 0.4])  # below the threshold: untouched
