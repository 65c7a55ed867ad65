"""The GPU switch from the outside: GPU=1 without a usable GPU is one clear line and exit 2, and
without GPU=1 fastseq never imports CuPy (subprocesses, so the environment is the process's own).
"""
import os
import subprocess
import sys
import textwrap

import pytest

# A stand-in `cupy` package: importable, but with no CUDA device behind it (what a machine with
# CuPy installed and no GPU looks like to fastseq).
_STUB = '''
class _Runtime:
    @staticmethod
    def getDeviceCount():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

class cuda:
    runtime = _Runtime()

def get_array_module(*args):
    import numpy
    return numpy
'''


def _run(code_or_args, tmp_path, gpu=None, stub=False, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "GPU"}
    if gpu is not None:
        env["GPU"] = gpu
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root]
    if stub:
        d = tmp_path / "stub"
        (d / "cupy").mkdir(parents=True)
        (d / "cupy" / "__init__.py").write_text(_STUB)
        paths.insert(0, str(d))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    args = code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args]
    return subprocess.run([sys.executable] + args, env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def _has_cupy():
    try:
        import cupy  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("stub", [False, True], ids=["no CuPy", "CuPy without a GPU"])
def test_gpu_1_without_a_gpu_is_one_line_and_exit_2(tmp_path, stub):
    if not stub and _has_cupy():
        pytest.skip("CuPy is installed here: the 'no CuPy' case cannot be shown")
    r = _run(["-m", "fastseq.train", "--epochs", "1", "--out", str(tmp_path / "o")], tmp_path,
             gpu="1", stub=stub)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastseq: "), r.stderr
    assert ("no usable NVIDIA GPU" in lines[0]) if stub else ("CuPy" in lines[0])
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_without_gpu_1_cupy_is_never_imported(tmp_path):
    """import fastseq, a few training steps of a seq2seq model and a language model, saving and
    evaluating: with an importable cupy on the path, none of it imports it."""
    code = textwrap.dedent('''
        import sys
        import numpy as np
        import fastseq
        from fastseq import backend
        rng = np.random.default_rng(0)
        x, t = rng.integers(0, 13, (32, 7)), rng.integers(0, 13, (32, 5))
        model = fastseq.PeekySeq2seq(13, 8, 16, seed=0)
        trainer = fastseq.Trainer(model, fastseq.Adam(), seed=0, progress=False)
        trainer.fit(x, t, max_epoch=1, batch_size=16, max_grad=5.0)
        fastseq.trainer.eval_seq2seq(model, x[:4], t[:4])
        lm = fastseq.BetterRnnlm(50, 8, 8, seed=0)
        corpus = rng.integers(0, 50, 400)
        fastseq.RnnlmTrainer(lm, fastseq.SGD(1.0), progress=False).fit(
            corpus[:-1], corpus[1:], max_epoch=1, batch_size=4, time_size=5, max_grad=0.25)
        model.save_params("m.npz")
        backend.info()
        assert "cupy" not in sys.modules, "fastseq imported cupy without GPU=1"
        print("ok")
    ''')
    r = _run(code, tmp_path, stub=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
