"""Smoke tests of benchmarks.convert_file and benchmarks.compare_g2p at tiny sizes, and the check
that compare_g2p's PyTorch network is fastseq's AttentionSeq2seq: given fastseq's weights it
gives the same loss and the same greedy answers."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import compare_g2p
from benchmarks.common import ROOT, TEXTBOOK_DATA

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_G2P_EN = importlib.util.find_spec("g2p_en") is not None
needs_cmudict = pytest.mark.skipif(
    bool(compare_g2p.missing_files()),
    reason=f"needs the CMUdict split {', '.join(compare_g2p.missing_files())} under "
           f"{TEXTBOOK_DATA} (set FASTSEQ_TEXTBOOK_DATA)")


def run_script(module, *args, env=None):
    env = {**os.environ, "FASTSEQ_TEXTBOOK_DATA": str(TEXTBOOK_DATA), **(env or {})}
    p = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_convert_file_reports_speed_memory_and_checks_every_line():
    out = run_script("convert_file", "--lines", "400", "--train-iters", "2")
    assert re.search(r"^generate --input, greedy: 400 lines in [0-9.]+ s \([0-9,]+ lines/s, "
                     r".*\); peak RSS [0-9]+ MiB$", out, re.M), out
    assert re.search(r"^same, 4 lines: [0-9.]+ s; peak RSS [0-9]+ MiB \(ratio of peaks "
                     r"[0-9.]+\)$", out, re.M), out
    assert "line for line: 400 lines checked" in out


@needs_cmudict
def test_compare_g2p_runs_each_side_in_its_own_process():
    out = run_script("compare_g2p", "--limit", "300", "--hidden", "8", "--wordvec", "4",
                     "--encoder", "uni", "--rounds", "1", "--batches", "1", "--eval-rounds", "1",
                     "--sides", "fastseq", "torch", "g2p_en")
    assert "300 training pairs (3 batches of 128, bucketed), 300 test words" in out
    assert "H=8, encoder uni" in out and "each side in its own process" in out
    for side, present in (("fastseq", True), ("torch", HAS_TORCH), ("g2p_en", HAS_G2P_EN)):
        assert bool(re.search(rf"^{side}: greedy test WER [0-9.]+%", out, re.M)) == present, out
        assert bool(re.search(rf"^\| {side} \| [0-9.]+ \| [0-9.]+ \|$", out, re.M)) == present
    assert bool(re.search(r"^fastseq vs torch: [0-9.]+x faster", out, re.M)) == HAS_TORCH
    assert re.search(r"^fastseq: beam search \(width 5\) over the 300 test words: median", out,
                     re.M), out


def test_compare_g2p_skips_without_the_data(tmp_path):
    out = run_script("compare_g2p", env={"FASTSEQ_TEXTBOOK_DATA": str(tmp_path)})
    assert out.startswith("skipped: the CMUdict split is not here (cmudict/g014b2b.train")


def copy_weights(torch, tm, model):
    """fastseq's weights into the PyTorch network (gates f, g, i, o -> i, f, g, o; fastseq's one
    bias into bias_ih, bias_hh zeroed; layer l's backward LSTM into *_l{l-1}_reverse)."""
    P = dict(zip(model.param_names, model.params))

    def gates(w):
        f, g, i, o = np.split(w, 4, axis=-1)
        return torch.from_numpy(np.ascontiguousarray(np.concatenate([i, f, g, o], axis=-1)))

    with torch.no_grad():
        tm.enc_embed.weight.copy_(torch.from_numpy(P["encoder.embed.W"]))
        tm.dec_embed.weight.copy_(torch.from_numpy(P["decoder.embed.W"]))
        for side, lstm in (("encoder", tm.enc), ("decoder", tm.dec)):
            for name in P:
                m = re.fullmatch(rf"{side}\.lstm(\d*)(_back)?\.Wx", name)
                if not m:
                    continue
                layer = int(m.group(1) or 1) - 1
                suffix = f"_l{layer}" + ("_reverse" if m.group(2) else "")
                stem = name[:-3]
                getattr(lstm, "weight_ih" + suffix).copy_(gates(P[stem + ".Wx"]).T)
                getattr(lstm, "weight_hh" + suffix).copy_(gates(P[stem + ".Wh"]).T)
                getattr(lstm, "bias_ih" + suffix).copy_(gates(P[stem + ".b"]))
                getattr(lstm, "bias_hh" + suffix).zero_()
        tm.out.weight.copy_(torch.from_numpy(P["decoder.affine.W"]).T)
        tm.out.bias.copy_(torch.from_numpy(P["decoder.affine.b"]))


@needs_cmudict
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch (a benchmark-only dependency)")
@pytest.mark.parametrize("encoder,layers", [("uni", 1), ("bi", 1), ("bi", 2)])
def test_the_pytorch_network_is_fastseqs(encoder, layers):
    import torch
    data = compare_g2p.G2PData(limit=200)
    model = compare_g2p.fastseq_model(len(data.symbols), 6, 10, encoder, layers)
    if model is None:
        pytest.skip(f"this fastseq's AttentionSeq2seq has no encoder={encoder!r}")
    rng = np.random.RandomState(0)
    for p in model.params:  # weights far from the initial ones, so that the check is not a tie
        p[...] = rng.standard_normal(p.shape).astype(p.dtype) * 0.5
    tm = compare_g2p.torch_model(torch, len(data.symbols), 6, 10, encoder == "bi", layers)
    copy_weights(torch, tm, model)
    tm.eval()
    xs, ts = data.batches(64)[0]
    loss = float(model.forward(xs, ts))
    x = torch.from_numpy(xs.astype(np.int64))
    t = torch.from_numpy(ts.astype(np.int64))
    lengths = (x != compare_g2p.PAD).sum(dim=1)
    targets = t[:, 1:].clone()
    ends = (t != compare_g2p.PAD).sum(dim=1)
    targets[torch.arange(t.shape[1] - 1)[None, :] + 1 > ends[:, None]] = -1
    with torch.no_grad():
        scores = tm(x, lengths, t[:, :-1])
        tloss = torch.nn.functional.cross_entropy(scores.reshape(-1, len(data.symbols)),
                                                  targets.reshape(-1), ignore_index=-1)
    assert float(tloss) == pytest.approx(loss, rel=1e-5)
    mine = model.generate(data.X_test[:50], compare_g2p.START, data.steps)
    with torch.inference_mode():
        x_test = torch.from_numpy(data.X_test[:50].astype(np.int64))
        theirs = tm.greedy(x_test, (x_test != 0).sum(dim=1), data.steps).numpy()
    assert (mine == theirs).mean() > 0.99 and len({tuple(r) for r in mine}) > 5


def test_conversion_floor_counts_each_product():
    """2 layers, bidirectional, H 8 (4 per direction), V 10; one 3-symbol source, 2 steps."""
    from benchmarks.conversion_floor import conversion_flop
    cfg = {"hidden_size": 8, "layers": 2, "encoder": "bi"}
    # encoder: 2 directions x (h Wh 4x16 + layer 2's [x ; h] (8 + 4) x 16) per symbol
    enc = 2 * 2 * (4 * 16 + 12 * 16) * 3
    # decoder per step: h Wh 8x32, layer 2 16x32, affine 16x10; attention 2 x 3 x 8
    dec = 2 * ((8 * 32 + 16 * 32 + 16 * 10) * 2 + 2 * 8 * 3 * 2)
    assert conversion_flop(cfg, 10, np.array([3.0]), np.array([2.0])) == (enc, dec)
    assert conversion_flop(cfg, 10, np.array([3.0]), np.array([2.0]), k=5) == (enc, 5 * dec)


def test_conversion_floor_prints_the_floor_beside_the_measured_time(tmp_path):
    from fastseq.train import main
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdef"), rng.integers(2, 6))) for _ in range(120)]
    (tmp_path / "train.tsv").write_text("".join(f"{w}\t{' '.join(w.upper())}\n" for w in words))
    (tmp_path / "words.txt").write_text("\n".join(words[:50]) + "\n")
    assert main(["--task", "pairs", "--data", str(tmp_path / "train.tsv"), "--target-tokens",
                 "space", "--epochs", "1", "--hidden-size", "8", "--wordvec-size", "4",
                 "--batch-size", "32", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = run_script("conversion_floor", "--model", str(tmp_path / "run" / "best.npz"),
                     "--words", str(tmp_path / "words.txt"), "--rounds", "1",
                     "--gemm-size", "128", "--beam", "3")
    assert "encoder bi layers 2; 50 sources" in out
    for name in ("greedy", "beam 3"):
        assert re.search(rf"^\| {name} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| "
                         r"[0-9]+% \|$", out, re.M), out
