"""benchmarks/compare_gpu.py (what benchmarks/gpu_check.sh runs), as far as a CPU can run it:
the PyTorch side and fastseq's side of the comparison in --smoke mode on the CPU, and the one
table the GPU check prints from its logs."""
import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def compare_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    compare_gpu = importlib.import_module("benchmarks.compare_gpu")
    saved = dict(compare_gpu.ADD), dict(compare_gpu.PTB)
    yield compare_gpu
    compare_gpu.ADD.update(saved[0])
    compare_gpu.PTB.update(saved[1])


def test_compare_gpu_smoke_on_cpu(compare_gpu, tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "cmp.json"
    rc = compare_gpu.main(["--device", "cpu", "--smoke", "--parts", "peeky", "better",
                           "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    res = json.loads(out.read_text())
    for part in ("peeky", "better"):
        runners = [r["runner"] for r in res["parts"][part]["rows"]]
        assert runners == ["fastseq CPU", "PyTorch CPU"], res["parts"][part]
        for r in res["parts"][part]["rows"]:
            assert r["median"] > 0 and r["loss"] == r["loss"]  # timed, and the loss is a number
    assert "peeky: fastseq CPU" in capsys.readouterr().out


def test_report_is_one_table(compare_gpu, tmp_path, capsys):
    (tmp_path / "steps.tsv").write_text("env\tok\t3\t\ntests\tok\t40\t45 passed in 38s\n"
                                        "train_cpu\tTIMEOUT\t120\t\n")
    rows = [{"runner": "fastseq CuPy, CUDA graphs", "median": 0.2, "unit": "s/epoch"},
            {"runner": "fastseq CuPy, eager", "median": 0.9, "unit": "s/epoch"},
            {"runner": "PyTorch cuDNN", "median": 1.0, "unit": "s/epoch"}]
    cmp = {"info": {"device": "cuda", "gpu": "NVIDIA H200", "cupy": "14.0", "torch": "2.9"},
           "parts": {"peeky": {"rows": rows, "graphs": {"reason": None, "counts": {
                         "eager": 1, "captured": 1, "replayed": 350}}},
                     "better": {"rows": [{"runner": "fastseq CuPy", "median": 13.0,
                                          "unit": "ms/iter"},
                                         {"runner": "PyTorch cuDNN", "median": 10.0,
                                          "unit": "ms/iter"}],
                                "graphs": {"reason": "capture failed, steps run eagerly (x)",
                                           "counts": {}}},
                     "seq2seq": {"error": "RuntimeError: boom"}}}
    (tmp_path / "compare.json").write_text(json.dumps(cmp))
    for side, accs in (("gpu", [0.1, 0.4, 0.8]), ("cpu", [0.1, 0.45, 0.85])):
        (tmp_path / f"train_{side}").mkdir()
        (tmp_path / f"train_{side}" / "metrics.json").write_text(json.dumps(
            {"epochs": [{"test_accuracy": a} for a in accs]}))
    compare_gpu.report(tmp_path)
    text = capsys.readouterr().out
    assert text.startswith("fastseq GPU check: NVIDIA H200")
    assert "step tests" in text and "45 passed" in text and "TIMEOUT" in text
    assert "0.20x" in text and "<= 0.5x: PASS" in text   # Peeky with graphs against PyTorch
    assert "1.30x" in text and "<= 1.2x: FAIL" in text   # BetterRnnlm
    assert "seq2seq" in text and "ERROR" in text
    assert '"replayed": 350' in text and "graphs NOT used: capture failed" in text
    assert "GPU 10.0/40.0/80.0" in text and "moves as on CPU: yes" in text
