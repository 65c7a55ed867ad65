"""Dropout masks from a counter-based hash (fastseq.ops._numpy_math.dropout_mask): the compiled
kernel against the NumPy reference, the reference against the formula written out in plain
Python, the masks' statistics, and TimeDropout's forward/backward/state with them."""
import numpy as np
import pytest

from fastseq import backend
from fastseq.layers import TimeDropout
from fastseq.ops import _numpy_math


def _fmix(z):
    z ^= z >> 16
    z = (z * 0x85EBCA6B) & 0xFFFFFFFF
    z ^= z >> 13
    z = (z * 0xC2B2AE35) & 0xFFFFFFFF
    return z ^ (z >> 16)


def _kept(i, key, keep):
    """The formula of _numpy_math's comment, one element, in Python integers."""
    a, b = key & 0xFFFFFFFF, key >> 32
    z = _fmix((_fmix(((i * 0x9E3779B9) & 0xFFFFFFFF) ^ a) + b) & 0xFFFFFFFF)
    return (z >> 8) < -int(-keep * 2 ** 24 // 1)


@pytest.mark.parametrize("key", [0, 1, 2 ** 32 + 7, 2 ** 53 - 1, 987654321012345])
def test_reference_mask_is_the_stated_formula(key):
    keep = 0.7
    m = _numpy_math.dropout_mask((5, 41), np.float32, keep, key)
    want = [_kept(i, key, keep) for i in range(m.size)]
    assert np.array_equal(m.reshape(-1) > 0, want)
    assert set(np.unique(m).tolist()) <= {0.0, float(np.float32(1) / np.float32(keep))}


@pytest.mark.parametrize("keep", [0.5, 0.7, 0.9])
def test_masks_keep_the_right_share_independently_of_the_key(keep):
    a = _numpy_math.dropout_mask((1000, 1000), np.float64, keep, 11) > 0
    b = _numpy_math.dropout_mask((1000, 1000), np.float64, keep, 12) > 0
    assert abs(a.mean() - keep) < 0.003
    assert abs((a & b).mean() - keep * keep) < 0.003  # two draws: independent-looking
    assert abs(np.corrcoef(a.reshape(-1)[1:], a.reshape(-1)[:-1])[0, 1]) < 0.005


def test_bad_key_is_refused():
    with pytest.raises(ValueError, match="dropout key"):
        _numpy_math.dropout_mask((3,), np.float32, 0.5, 2 ** 53)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_matches_the_reference(cython_engine, dtype, threads):
    from fastseq.ops import _cython
    rng = np.random.default_rng(threads)
    with backend.using("cython", threads=threads):
        for shape in [(0, 3), (7, 13, 33), (64, 9, 300), (200001,)]:
            x = rng.standard_normal(shape).astype(dtype)
            key = int(rng.integers(0, 2 ** 53))
            keep = float(rng.uniform(0.05, 0.95))
            want = _numpy_math.dropout(x, keep, key)
            assert np.array_equal(_cython.dropout(x, keep, key), want)
            y = x.copy()
            assert _cython.dropout(y, keep, key, out=y) is y and np.array_equal(y, want)
            if x.ndim == 3:  # strided input: the mask still follows the logical C order
                xt = np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2)
                assert np.array_equal(_cython.dropout(xt, keep, key), want)
        z = x.copy()
        _numpy_math.dropout(z, keep, key, out=z)
        assert np.array_equal(z, want)


@pytest.mark.parametrize("engine", ["numpy", "cython"])
def test_time_dropout_backward_uses_the_forward_mask(engine):
    if engine == "cython" and not backend.cython_available():
        pytest.skip("the cython engine (fastseq._ext) is not importable here")
    rng = np.random.default_rng(0)
    with backend.using(engine):
        layer = TimeDropout(0.3, seed=4)
        x = rng.standard_normal((4, 5, 6)).astype(np.float32)
        y = layer.forward(x)
        mask = layer.mask
        assert mask.dtype == np.float32 and (mask == 0).any()
        assert np.array_equal(y, x * mask)
        d = rng.standard_normal(x.shape).astype(np.float32)
        assert np.array_equal(layer.backward(d), d * mask)
        d2 = d.copy()
        assert layer.backward(d2, in_place=True) is d2 and np.array_equal(d2, d * mask)
        again = TimeDropout(0.3, seed=4)
        x2 = x.copy()
        assert again.forward(x2, in_place=True) is x2 and np.array_equal(x2, y)
        assert not np.array_equal(layer.forward(x), y)  # the next draw: another mask


def test_both_engines_draw_the_same_masks(cython_engine):
    x = np.random.default_rng(1).standard_normal((3, 8, 16))
    outs = []
    for engine in ("numpy", "cython"):
        with backend.using(engine):
            layer = TimeDropout(0.5, seed=9)
            outs.append([layer.forward(x) for _ in range(3)])
    assert all(np.array_equal(a, b) for a, b in zip(*outs))


def test_state_round_trip_continues_the_masks():
    x = np.ones((2, 3, 50))
    a = TimeDropout(0.5, seed=3)
    a.forward(x)
    b = TimeDropout(0.5, seed=99)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.forward(x), b.forward(x))
