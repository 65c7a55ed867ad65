"""Same seed, same engine: bit-identical parameters whatever the thread count or the machine's
load (the Cython engine cuts its work into pieces fixed by the shapes and adds them in order)."""
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a few addition-like Adam steps with clipping, batch 128 (so the LSTM runs in row chunks),
# Seq2seq and PeekySeq2seq, then SGD steps of an Rnnlm and of a BetterRnnlm with H 256 (batch 20:
# its LSTM products in panels); prints a digest of every parameter's bytes
TRAIN = textwrap.dedent("""
    import hashlib, numpy as np, fastseq
    from fastseq.trainer import TrainLoop
    rng = np.random.default_rng(0)
    x = rng.integers(0, 13, (1024, 7)); t = rng.integers(0, 13, (1024, 5))
    h = hashlib.sha256()
    for cls in (fastseq.Seq2seq, fastseq.PeekySeq2seq):
        model = cls(13, 16, 64, seed=0)
        loop = TrainLoop(model, fastseq.Adam(1e-2), progress=False)
        for i in range(8):
            loop.step(x[i * 128:(i + 1) * 128], t[i * 128:(i + 1) * 128], 1.0)
        for p in model.params:
            h.update(np.ascontiguousarray(p).tobytes())
    lm = fastseq.Rnnlm(2000, 32, 32, seed=0)  # batch 20: one chunk; the affine layer's products
    loop = TrainLoop(lm, fastseq.SGD(1.0), progress=False)
    ids = rng.integers(0, 2000, (4, 20, 36))
    for i in range(4):
        loop.step(ids[i, :, :-1], ids[i, :, 1:], 0.25)
    for p in lm.params:
        h.update(np.ascontiguousarray(p).tobytes())
    # H 256 at batch 20: one chunk whose LSTM products run in panels on fastseq's threads (the
    # compiled engine only: the NumPy engine hands products this large to OpenBLAS's threads)
    if fastseq.backend.config.engine == "cython":
        big = fastseq.BetterRnnlm(500, 256, 256, seed=0)
        loop = TrainLoop(big, fastseq.SGD(1.0), progress=False)
        ids = rng.integers(0, 500, (2, 20, 36))
        for i in range(2):
            loop.step(ids[i, :, :-1], ids[i, :, 1:], 0.25)
        for p in big.params:
            h.update(np.ascontiguousarray(p).tobytes())
    print(fastseq.backend.config.engine, h.hexdigest())
""")


def _train(threads, env_extra=None, code=TRAIN):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTSEQ_THREADS": str(threads),
           **(env_extra or {})}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_same_bits_with_one_thread_two_threads_and_under_load(cython_engine):
    one = _train(1, {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert one[0] == "cython"
    two = _train(2)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = _train(2)
    finally:
        busy.kill()
        busy.wait()
    assert one == two == loaded


def test_numpy_engine_same_bits_with_one_thread_two_threads_and_under_load():
    """The pure numpy engine too: its products this small run on one BLAS thread whatever the
    thread setting (backend.single_blas_thread), so OpenBLAS's splits never enter."""
    code = "import sys; sys.modules['fastseq._ext'] = None\n" + TRAIN
    env = {"FASTSEQ_KERNEL": "numpy"}
    one = _train(1, {**env, "OPENBLAS_NUM_THREADS": "1"}, code)
    assert one[0] == "numpy"
    two = _train(2, env, code)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = _train(2, env, code)
    finally:
        busy.kill()
        busy.wait()
    assert one == two == loaded


def test_chunked_partial_sums_differ_from_one_product():
    """The check above can fail: the chunks' shares summed in another order give other bits."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(1)
    parts = rng.standard_normal((4, 1000)).astype(np.float32)
    forward = ((parts[0] + parts[1]) + parts[2]) + parts[3]
    other = (parts[0] + parts[1]) + (parts[2] + parts[3])
    assert hashlib.sha256(forward.tobytes()).digest() != hashlib.sha256(other.tobytes()).digest()


@pytest.mark.parametrize("M,K,N", [(5, 3, 4), (700, 100, 3000), (100, 700, 3000), (1, 128, 512),
                                   (512, 128, 13), (0, 3, 4), (3, 0, 4)])
def test_chunked_matmul_matches_numpy_for_any_thread_count(M, K, N, cython_engine):
    """fastseq.functions.matmul on the cython engine: C-ordered and transposed operands, the
    same bits on 1, 2 and 3 threads."""
    np = pytest.importorskip("numpy")
    from fastseq import backend
    kernel = backend.compiled()
    rng = np.random.default_rng(M + K + N)
    for dtype, tol in ((np.float32, 1e-4), (np.float64, 1e-12)):
        for a_t in (False, True):
            for b_t in (False, True):
                a = rng.standard_normal((K, M) if a_t else (M, K)).astype(dtype)
                b = rng.standard_normal((N, K) if b_t else (K, N)).astype(dtype)
                a, b = (a.T if a_t else a), (b.T if b_t else b)
                outs = []
                for n in (1, 2, 3):
                    out = np.full((M, N), np.nan, dtype)
                    assert kernel.matmul(a, b, out, n)
                    outs.append(out)
                ref = a.astype(np.float64) @ b.astype(np.float64)
                np.testing.assert_allclose(outs[0], ref, rtol=tol, atol=tol * max(K, 1))
                for other in outs[1:]:
                    np.testing.assert_array_equal(other, outs[0])
    assert not kernel.matmul(np.ones((4, 6), np.float32)[:, ::2], np.ones((3, 2), np.float32),
                             np.empty((4, 2), np.float32))  # strides BLAS cannot take


@pytest.mark.parametrize("B,M,K,N", [(5, 1, 7, 3), (256, 1, 256, 16), (128, 10, 256, 29),
                                     (3, 4, 0, 6), (0, 2, 3, 4)])
def test_stacked_matmul_matches_numpy_for_any_thread_count(B, M, K, N, cython_engine):
    """fastseq.functions.matmul of (B, M, K) @ (B, K, N) stacks on the cython engine (attention's
    products): C-ordered and transposed matrices, the same bits on 1, 2 and 3 threads."""
    np = pytest.importorskip("numpy")
    from fastseq import backend
    from fastseq.functions import matmul
    kernel = backend.compiled()
    rng = np.random.default_rng(B + M + K + N)
    for dtype, tol in ((np.float32, 1e-4), (np.float64, 1e-12)):
        for a_t in (False, True):
            for b_t in (False, True):
                a = rng.standard_normal((B, K, M) if a_t else (B, M, K)).astype(dtype)
                b = rng.standard_normal((B, N, K) if b_t else (B, K, N)).astype(dtype)
                a = a.transpose(0, 2, 1) if a_t else a
                b = b.transpose(0, 2, 1) if b_t else b
                outs = []
                for n in (1, 2, 3):
                    out = np.full((B, M, N), np.nan, dtype)
                    assert kernel.bmatmul(a, b, out, n)
                    outs.append(out)
                ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
                np.testing.assert_allclose(outs[0], ref, rtol=tol, atol=tol * max(K, 1))
                np.testing.assert_array_equal(matmul(a, b), outs[0])
                for other in outs[1:]:
                    np.testing.assert_array_equal(other, outs[0])
    assert not kernel.bmatmul(np.ones((2, 4, 6), np.float32)[:, :, ::2],
                              np.ones((2, 3, 2), np.float32), np.empty((2, 4, 2), np.float32))


def _kernel():
    from fastseq import backend
    kernel = backend.compiled()
    if kernel is None or not kernel.can_thread():
        pytest.skip("the Cython kernel is not built here or cannot thread")
    return kernel


def test_worker_threads_take_chunks(cython_engine):
    """The caller takes every chunk nobody else claimed, so the result never depends on the
    workers; this checks they do take part (4 chunks of a 512-row product, repeated)."""
    import numpy as np
    kernel = _kernel()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((512, 256)), rng.standard_normal((256, 1024))
    out = np.empty((512, 1024))
    before = kernel.chunks_helped()
    for _ in range(200):
        assert kernel.matmul(a, b, out, 2)
        if kernel.chunks_helped() > before:
            break
    assert kernel.chunks_helped() > before
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-10)


def test_no_openmp_runtime_is_loaded():
    """fastseq's threads are its own (fs_pool.h): importing and running the kernels starts no
    OpenMP runtime, whose idle threads would spin or sleep by its own rules."""
    code = textwrap.dedent("""
        import numpy as np, fastseq
        from fastseq import backend
        if backend.compiled() is None:
            print("skip"); raise SystemExit
        backend.use("cython")
        m = fastseq.Seq2seq(13, 16, 64, seed=0)
        x = np.random.default_rng(0).integers(0, 13, (128, 7))
        m.forward(x, x[:, :5]); m.backward()
        fastseq.Adam().update(m.params, m.grads)
        print(any("libgomp" in line or "libomp" in line for line in open("/proc/self/maps")))
    """)
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    if r.stdout.strip() == "skip":
        pytest.skip("the Cython kernel is not built here")
    assert r.stdout.strip() == "False"


def test_kernels_work_in_a_forked_child_and_from_two_threads_at_once(cython_engine):
    """A child forked after the workers started gets fresh ones (no hang), and two Python
    threads calling the kernel together get the same results as one (the second runs its
    chunks itself while the first holds the workers)."""
    import multiprocessing
    import threading
    import numpy as np
    kernel = _kernel()
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((512, 256)), rng.standard_normal((256, 1024))
    ref = np.empty((512, 1024))
    assert kernel.matmul(a, b, ref, 2)  # the workers exist from here on
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply_async(_child_matmul, (a, b)).get(timeout=60)
    np.testing.assert_array_equal(child, ref)
    outs, errors = [np.empty_like(ref) for _ in range(4)], []

    def work(out):
        try:
            for _ in range(20):
                assert kernel.matmul(a, b, out, 2)
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    for out in outs:
        np.testing.assert_array_equal(out, ref)


def _child_matmul(a, b):
    import numpy as np
    from fastseq import backend
    out = np.empty((a.shape[0], b.shape[1]))
    assert backend.compiled().matmul(a, b, out, 2)
    return out
