"""Every model checks its sizes the same way (models.base.check_size), and generation refuses a
sample_size below 1; LSTM weights come from one helper (models.base.lstm_params)."""
import numpy as np
import pytest

from fastseq import BetterRnnlm, PeekySeq2seq, Rnnlm, Seq2seq
from fastseq.models import REGISTRY
from fastseq.models.base import check_size, lstm_params

SEQ2SEQ = [entry.cls for entry in REGISTRY.values() if entry.task == "seq2seq"]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", None, True])
def test_check_size_names_the_argument(bad):
    with pytest.raises(ValueError, match=rf"^width must be an integer >= 1, got {bad!r}$"):
        check_size("width", bad)
    assert check_size("width", np.int64(3)) == 3 and type(check_size("width", 3)) is int


def test_peeky_hidden_size_zero():
    with pytest.raises(ValueError, match=r"^hidden_size must be an integer >= 1, got 0$"):
        PeekySeq2seq(13, 16, 0)


@pytest.mark.parametrize("cls", SEQ2SEQ + [Rnnlm, BetterRnnlm])
@pytest.mark.parametrize("arg", ["vocab_size", "wordvec_size", "hidden_size"])
@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_every_model_checks_its_sizes(cls, arg, bad):
    sizes = {"vocab_size": 13, "wordvec_size": 8, "hidden_size": 8}
    sizes[arg] = bad
    with pytest.raises(ValueError, match=rf"^{arg} must be an integer >= 1, got {bad!r}$"):
        cls(**sizes)


@pytest.mark.parametrize("cls", SEQ2SEQ)
@pytest.mark.parametrize("bad", [0, -3])
def test_seq2seq_generate_refuses_sample_size_below_one(cls, bad):
    m = cls(13, 8, 8, seed=0)
    with pytest.raises(ValueError, match=rf"^sample_size must be an integer >= 1, got {bad}$"):
        m.generate(np.zeros((2, 4), dtype=np.int64), 1, bad)
    assert np.asarray(m.generate(np.zeros((2, 4), dtype=np.int64), 1, 1)).shape == (2, 1)


@pytest.mark.parametrize("cls", [Rnnlm, BetterRnnlm])
def test_rnnlm_generate_refuses_sample_size_below_one(cls):
    m = cls(20, 8, 8, seed=0)
    for bad in (-3, 0):
        with pytest.raises(ValueError, match=rf"^sample_size must be an integer >= 1, got {bad}$"):
            m.generate(1, sample_size=bad)
    assert m.generate(1, sample_size=1) == [1]


def test_lstm_params_shapes_scale_and_reproducibility():
    Wx, Wh, b = lstm_params(np.random.RandomState(0), 400, 100, np.float64)
    assert Wx.shape == (400, 400) and Wh.shape == (100, 400) and b.shape == (400,)
    assert Wx.dtype == Wh.dtype == b.dtype == np.float64 and not b.any()
    assert abs(Wx.std() * np.sqrt(400) - 1) < 0.02 and abs(Wh.std() * np.sqrt(100) - 1) < 0.02
    again = lstm_params(np.random.RandomState(0), 400, 100, np.float64)
    assert all(np.array_equal(p, q) for p, q in zip((Wx, Wh, b), again))


def test_models_initialise_their_lstms_with_lstm_params():
    """A model's LSTM weights are the helper's draws from the model's seed stream."""
    m = Rnnlm(20, 6, 8, seed=5)
    rng = np.random.RandomState(5)
    rng.standard_normal((20, 6))  # the embedding is drawn first
    for p, q in zip(m.lstm.params, lstm_params(rng, 6, 8)):
        np.testing.assert_array_equal(p, q)
