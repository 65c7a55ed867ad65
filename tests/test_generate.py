"""Sampling functions, Rnnlm.generate (priming, skip_ids, reproducibility) and the generate CLI."""
import subprocess
import sys

import numpy as np
import pytest

from fastseq import BetterRnnlm, Rnnlm
from fastseq.generate import ids_to_text, main
from fastseq.sampling import (make_sampler, sample_from_logits, softmax_temperature, top_k_filter,
                              top_p_filter)


def test_softmax_temperature():
    z = np.array([1.0, 2.0, 3.0])
    p1 = softmax_temperature(z)
    assert p1.sum() == pytest.approx(1.0) and np.all(np.diff(p1) > 0)
    cold, hot = softmax_temperature(z, 0.5), softmax_temperature(z, 5.0)
    assert cold[2] > p1[2] > hot[2]
    assert softmax_temperature(z, 0).tolist() == [0.0, 0.0, 1.0]
    assert softmax_temperature(np.array([0.0, -np.inf]))[1] == 0.0
    with pytest.raises(ValueError):
        softmax_temperature(z, -1)


def test_top_k_keeps_exactly_k():
    z = np.array([0.5, 3.0, -1.0, 2.0, 2.0, 0.0])
    f = top_k_filter(z, 3)
    assert np.isfinite(f).sum() == 3
    assert set(np.flatnonzero(np.isfinite(f))) == {1, 3, 4}
    assert np.array_equal(top_k_filter(z, 10), z)
    with pytest.raises(ValueError):
        top_k_filter(z, 0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        assert sample_from_logits(z, top_k=2, rng=rng) in (1, 3, 4)


def test_top_p_keeps_the_nucleus():
    p = np.array([0.05, 0.5, 0.3, 0.15])
    z = np.log(p)
    keep = lambda q: set(np.flatnonzero(np.isfinite(top_p_filter(z, q))))  # noqa: E731
    assert keep(0.5) == {1}
    assert keep(0.6) == {1, 2}
    assert keep(0.8) == {1, 2}
    assert keep(0.81) == {1, 2, 3}
    assert keep(1.0) == {0, 1, 2, 3}
    assert keep(0.01) == {1}
    rng = np.random.default_rng(1)
    seen = {sample_from_logits(z, top_p=0.8, rng=rng) for _ in range(300)}
    assert seen == {1, 2}


def test_temperature_zero_is_greedy_and_seeds_reproduce():
    rng = np.random.default_rng(2)
    z = rng.standard_normal(50)
    assert sample_from_logits(z, temperature=0) == int(np.argmax(z))
    assert sample_from_logits(z, greedy=True, temperature=3.0) == int(np.argmax(z))
    a = [sample_from_logits(z, rng=g) for g in [np.random.default_rng(5)] for _ in range(20)]
    s1, s2 = make_sampler(50, seed=9), make_sampler(50, seed=9)
    assert [s1(z) for _ in range(30)] == [s2(z) for _ in range(30)]
    assert len(set(a)) > 3


def test_sampling_follows_the_distribution():
    p = np.array([0.1, 0.6, 0.3])
    s = make_sampler(3, seed=0)
    counts = np.bincount([s(np.log(p)) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, p, atol=0.03)


def test_skip_ids_in_sampler():
    z = np.array([5.0, 4.0, 0.0, -1.0])
    s = make_sampler(4, skip_ids=[0, 1], seed=0)
    assert {s(z) for _ in range(100)} <= {2, 3}
    assert make_sampler(4, skip_ids=[0], greedy=True)(z) == 1
    with pytest.raises(ValueError):
        make_sampler(4, skip_ids=[4])


@pytest.mark.parametrize("cls,args", [(Rnnlm, (20, 6, 8)), (BetterRnnlm, (20, 8, 8))])
def test_model_generate_length_seed_skip(cls, args):
    m = cls(*args, seed=0)
    m.reset_state()
    a = m.generate(3, skip_ids=[0, 1, 2], sample_size=30, seed=4)
    m.reset_state()
    b = m.generate(3, skip_ids=[0, 1, 2], sample_size=30, seed=4)
    assert a == b and len(a) == 30 and a[0] == 3
    assert all(isinstance(i, int) for i in a)
    assert not {0, 1, 2} & set(a[1:])
    m.reset_state()
    g1 = m.generate(3, sample_size=15, greedy=True)
    m.reset_state()
    g2 = m.generate(3, sample_size=15, temperature=0)
    assert g1 == g2


def test_generate_uses_global_numpy_random_like_the_textbook():
    m = Rnnlm(20, 6, 8, seed=0)
    np.random.seed(11)
    m.reset_state()
    a = m.generate(1, sample_size=20)
    np.random.seed(11)
    m.reset_state()
    assert m.generate(1, sample_size=20) == a


def test_generation_step_matches_predict():
    """The per-step generation path computes the same scores as predict()."""
    m = BetterRnnlm(20, 8, 8, seed=1)
    ids = [3, 7, 9, 11, 2]
    m.reset_state()
    ref = m.predict(np.array([ids]))[0]
    m.reset_state()
    step = m._stepper()
    out = np.array([step(np.array([[i]])) for i in ids])
    assert np.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("engine", ["numpy", "cython"])
def test_lstm_stepper_carries_the_state_as_step(engine):
    """TimeLSTM.stepper(): the layer's (h, c) carried from step to step (zeros when unset), the
    same bits as step(), and step()'s error for an input of the wrong width."""
    from fastseq import backend
    from fastseq.layers import TimeLSTM
    if engine == "cython" and not backend.cython_available():
        pytest.skip("fastseq._ext is not importable here")
    rng = np.random.default_rng(5)
    with backend.using(engine):
        layers = [TimeLSTM(rng.standard_normal((4, 24)).astype(np.float32),
                           rng.standard_normal((6, 24)).astype(np.float32),
                           rng.standard_normal(24).astype(np.float32), stateful=True)
                  for _ in range(2)]
        a, b = layers
        b.params = a.params
        run = b.stepper()
        for t in range(4):
            x = rng.standard_normal((1, 4)).astype(np.float32)
            np.testing.assert_array_equal(run(x), a.step(x))
            np.testing.assert_array_equal(b.c, a.c)
        with pytest.raises(ValueError, match="TimeLSTM.step expects"):
            run(np.zeros((1, 5), np.float32))


def test_priming_feeds_all_but_the_last_word():
    m = Rnnlm(20, 6, 8, seed=2)
    phrase = [4, 5, 6, 7]
    m.reset_state()
    a = m.generate(phrase, sample_size=12, seed=3)
    assert a[:4] == phrase and len(a) == 3 + 12
    m.reset_state()
    m.predict(np.array([phrase[:-1]]))
    b = m.generate(phrase[-1], sample_size=12, seed=3)
    assert a[3:] == b
    m.reset_state()
    m.generate(phrase, sample_size=2)
    primed = m.get_state()[0][0].copy()
    m.reset_state()
    m.generate(phrase[-1], sample_size=2)
    assert primed.shape == (1, 8) and not np.allclose(primed, m.get_state()[0][0])


def test_generate_rejects_batched_state_and_bad_ids():
    m = Rnnlm(20, 6, 8, seed=2)
    m.predict(np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="reset_state"):
        m.generate(1)
    m.reset_state()
    with pytest.raises(ValueError):
        m.generate(20)
    with pytest.raises(ValueError):
        m.generate(1, top_p=0)


def test_sampling_100_words_keeps_state_and_skips():
    """100 words in one call (its speed is measured in benchmarks/test_bench_generate.py)."""
    m = Rnnlm(10000, 100, 100, seed=0)
    m.reset_state()
    out = m.generate(1, skip_ids=[2, 3], sample_size=100, seed=0)
    assert len(out) == 100 and not {2, 3} & set(out[1:])
    m.reset_state()
    assert m.generate(1, skip_ids=[2, 3], sample_size=100, seed=0) == out


def test_ids_to_text():
    assert ids_to_text(["a", "b", "<eos>", "c"]) == "a b\nc"


WORDS = ["<eos>", "the", "meaning", "of", "life", "is", "N", "<unk>", "$", "good", "bad", "cat"]


@pytest.fixture
def tiny_model_file(tmp_path):
    m = Rnnlm(len(WORDS), 6, 8, seed=0)
    path = tmp_path / "model.npz"
    m.save_params(path, meta={"task": "ptb", "vocab": WORDS})
    return path


def test_cli_happy_path(tiny_model_file, capsys):
    rc = main(["--model", str(tiny_model_file), "--start", "the meaning of life is", "--length", "40",
               "--temperature", "0.8", "--seed", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.startswith("the meaning of life is")
    words = text.split()
    assert "<eos>" not in words and not {"N", "<unk>", "$"} & set(words)
    assert set(words) <= set(WORDS)
    rc = main(["--model", str(tiny_model_file), "--start", "the meaning of life is", "--length", "40",
               "--temperature", "0.8", "--seed", "0"])
    assert capsys.readouterr().out == text  # seeded
    rc = main(["--model", str(tiny_model_file), "--start", "cat", "--greedy", "--length", "5",
               "--top-k", "3"])
    assert rc == 0


def test_cli_out_of_vocabulary_start_word(tiny_model_file):
    r = subprocess.run([sys.executable, "-m", "fastseq.generate", "--model", str(tiny_model_file),
                        "--start", "the zebra"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "zebra" in lines[0] and "vocabulary" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_missing_model_file(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope.npz")]) == 2
    assert "not found" in capsys.readouterr().err


def test_blocked_draw_matches_one_running_sum_and_skips_zero_weights():
    """_draw searches blocks of weights, then one block: the same index as one running sum over
    all weights for the same random number, and never a zero weight (whole zero blocks too)."""
    from fastseq.sampling import _draw
    w = np.exp(np.random.default_rng(0).standard_normal(10_000) * 3)
    w[:128] = 0.0          # a whole block of zeros
    w[5000:5100] = 0.0
    w[-1] = 0.0

    def one_sum(weights, rng):
        cdf = np.cumsum(weights)
        return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))

    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    got = [_draw(w, r1) for _ in range(3000)]
    assert got == [one_sum(w, r2) for _ in range(3000)]
    assert all(w[i] > 0 for i in got)
    sparse = np.zeros(1000)
    sparse[[3, 700, 999]] = [1.0, 2.0, 1.0]
    rng = np.random.default_rng(1)
    counts = np.bincount([_draw(sparse, rng) for _ in range(20_000)], minlength=1000)
    assert set(np.flatnonzero(counts)) == {3, 700, 999}
    assert abs(counts[700] / 20_000 - 0.5) < 0.02
