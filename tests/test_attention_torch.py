"""AttentionSeq2seq against the same network in PyTorch (an independent reference; skipped where
PyTorch is not installed): given the same weights, the same loss and the same gradients."""
import importlib
from pathlib import Path

import numpy as np
import pytest

from fastseq import backend
from fastseq.models.attention import AttentionSeq2seq

torch = pytest.importorskip("torch")


@pytest.fixture
def common(monkeypatch):
    """benchmarks/common.py, where the PyTorch network lives."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    return importlib.import_module("benchmarks.common")


V, D, H, N, Tq, Ta = 11, 5, 7, 6, 6, 4


@pytest.mark.parametrize("pad", [None, 10])
def test_same_loss_and_gradients_as_pytorch(common, pad):
    rng = np.random.default_rng(3)
    xs = rng.integers(0, 10, (N, Tq))
    ts = rng.integers(0, 10, (N, Ta))
    if pad is not None:  # trailing pads of different lengths in the questions
        for n, k in enumerate([0, 1, 2, 3, 0, 5]):
            xs[n, Tq - k:] = pad
    with backend.using("numpy"):
        model = AttentionSeq2seq(V, D, H, seed=0, dtype=np.float64, pad_id=pad)
        loss = model.forward(xs, ts)
        model.backward()
        grads = {n: g.copy() for n, g in zip(model.param_names, model.grads)}
    ref = common.torch_attention_seq2seq(torch, V, D, H, pad).double()
    common.copy_attention_weights(torch, ref, model)
    x, t = torch.from_numpy(xs), torch.from_numpy(ts)
    score = ref(x, t[:, :-1])
    ref_loss = torch.nn.functional.cross_entropy(score.reshape(-1, V), t[:, 1:].reshape(-1))
    ref_loss.backward()
    assert float(loss) == pytest.approx(ref_loss.item(), rel=1e-12)

    def gates(g):  # PyTorch's gate rows i, f, g, o as fastseq's columns f, g, i, o
        i, f, g_, o = np.split(g.numpy(), 4, axis=0)
        return np.concatenate([f, g_, i, o], axis=0).T

    for side, emb, lstm in (("encoder", ref.enc_embed, ref.enc), ("decoder", ref.dec_embed, ref.dec)):
        np.testing.assert_allclose(grads[f"{side}.embed.W"], emb.weight.grad.numpy(), atol=1e-12)
        np.testing.assert_allclose(grads[f"{side}.lstm.Wx"], gates(lstm.weight_ih_l0.grad), atol=1e-12)
        np.testing.assert_allclose(grads[f"{side}.lstm.Wh"], gates(lstm.weight_hh_l0.grad), atol=1e-12)
        np.testing.assert_allclose(grads[f"{side}.lstm.b"], gates(lstm.bias_ih_l0.grad[:, None])[0],
                                   atol=1e-12)
    np.testing.assert_allclose(grads["decoder.affine.W"], ref.out.weight.grad.numpy().T, atol=1e-12)
    np.testing.assert_allclose(grads["decoder.affine.b"], ref.out.bias.grad.numpy(), atol=1e-12)
