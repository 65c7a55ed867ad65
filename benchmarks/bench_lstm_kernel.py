"""Micro-benchmark of one LSTM forward+backward per engine (the engines take turns).

    python -m benchmarks.bench_lstm_kernel            # (128, 7, 16), H=128, float32
    python -m benchmarks.bench_lstm_kernel --n 5000   # batched inference shape (forward only timing too)
"""
import argparse

import numpy as np

import fastseq.ops._numpy as _numpy
from benchmarks.common import take_turns, timed

try:
    import fastseq.ops._cython as _cython
except ImportError:  # extension not built
    _cython = None


def case(N, T, D, H, dtype):
    """run() -> (forward seconds, forward + backward seconds) of one engine on one problem."""
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((N, T, D)).astype(dtype)
    Wx = (rng.standard_normal((D, 4 * H)) / np.sqrt(D)).astype(dtype)
    Wh = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(dtype)
    b = np.zeros(4 * H, dtype)
    h0 = np.zeros((N, H), dtype)
    c0 = np.zeros((N, H), dtype)
    dhs = rng.standard_normal((N, T, H)).astype(dtype)
    grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]

    def run(engine):
        f, (_, _, _, cache) = timed(lambda: engine.forward(xs, Wx, Wh, b, h0, c0))
        return f, f + timed(lambda: engine.backward(dhs, cache, grads))[0]

    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--t", type=int, default=7)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--h", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args()
    engines = [("numpy", _numpy)] + ([("cython", _cython)] if _cython else [])
    if _cython:
        print(f"cython engine threads: {_cython._threads()}; "
              f"row chunks at N={a.n}: {_cython._cpu.chunks(a.n)}")
    run = case(a.n, a.t, a.d, a.h, np.dtype(a.dtype))
    times = take_turns(lambda name: run(dict(engines)[name]), dict(engines), a.reps, pause=0)
    for name, _ in engines:
        f, fb = np.min(times[name], axis=0)  # min: least disturbed by other processes
        print(f"{name:7s} N={a.n} T={a.t} D={a.d} H={a.h} {a.dtype}: "
              f"forward {f * 1e3:8.3f} ms   forward+backward {fb * 1e3:8.3f} ms (best of {a.reps})")


if __name__ == "__main__":
    main()
