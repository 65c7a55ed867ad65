"""pytest benchmarks/ --benchmark-only: one training step and one batched greedy evaluation of the
5,000-question test split, per engine x model (addition task, D=16, H=128, batch 128)."""
import numpy as np
import pytest

import fastseq
from benchmarks.common import BATCH, D, H, addition_data
from fastseq import backend

MODELS = {"seq2seq": fastseq.Seq2seq, "peeky": fastseq.PeekySeq2seq}


@pytest.fixture(scope="module")
def data():
    return addition_data()


def _model(name, data):
    return MODELS[name](len(data.vocab), D, H, seed=0)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_train_step(benchmark, engine, model_name, data):
    model = _model(model_name, data)
    opt = fastseq.Adam(1e-3)
    x = backend.asarray(data.x_train[:BATCH, ::-1].copy())
    t = backend.asarray(data.t_train[:BATCH])
    params, grads = model.params, model.grads

    def step():
        model.forward(x, t)
        model.backward()
        fastseq.clip_grads(grads, 5.0)
        opt.update(params, grads)

    benchmark.group = f"train-step-{model_name}"
    benchmark.pedantic(step, rounds=30, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_eval_5000(benchmark, engine, model_name, data):
    model = _model(model_name, data)
    benchmark.group = f"eval-5000-{model_name}"
    acc = benchmark.pedantic(fastseq.eval_seq2seq, args=(model, data.x_test, data.t_test),
                             rounds=5, warmup_rounds=1, iterations=1)
    assert 0.0 <= acc <= 1.0


def test_rnnlm_train_step(benchmark, engine):
    V, B, T = 10000, 20, 35
    model = fastseq.Rnnlm(V, 100, 100, seed=0)
    opt = fastseq.SGD(20.0)
    rng = np.random.default_rng(0)
    xs = backend.asarray(rng.integers(0, V, (B, T)))
    ts = backend.asarray(rng.integers(0, V, (B, T)))
    params, grads = model.params, model.grads

    def step():
        model.forward(xs, ts)
        model.backward()
        fastseq.clip_grads(grads, 0.25)
        opt.update(params, grads)

    benchmark.group = "train-step-rnnlm"
    benchmark.pedantic(step, rounds=15, warmup_rounds=2, iterations=1)


def test_rnnlm_generate_100_words(benchmark, engine):
    """Sampling 100 words (one step at a time through the stateful layers); aim: < 50 ms on CPU."""
    model = fastseq.Rnnlm(10000, 100, 100, seed=0)
    state = {"seed": 0}

    def sample():
        model.reset_state()
        state["seed"] += 1
        return model.generate(0, skip_ids=[1, 2, 3], sample_size=100, seed=state["seed"])

    benchmark.group = "generate-100-words-rnnlm"
    ids = benchmark.pedantic(sample, rounds=15, warmup_rounds=2, iterations=1)
    assert len(ids) == 100
