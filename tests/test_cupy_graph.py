"""fastseq.cuda_graph.GraphStep without a GPU: the capture logic driven by a stand-in device API.

On NumPy nothing can be recorded, so the stand-in imitates what matters to GraphStep: capture
runs the Python step once but its array work does not happen (the arrays are restored
afterwards, as a captured stream executes nothing), and a launch redoes the array work of the
step on the graph's input buffers without the host side effects (a graph replays kernels, not
Python). Captured and plain training must then give identical weights.
"""
import contextlib

import numpy as np
import pytest

import fastseq
from fastseq import cuda_graph
from fastseq.functions import clip_grads


class FakeGraph:
    def __init__(self, api, x, t):
        self.api, self.x, self.t = api, x, t

    def launch(self):
        api, opt = self.api, self.api.optimizer
        saved = getattr(opt, "iter", 0)
        if api.device_iter is not None:  # the launch right after capture: the device counter
            opt.iter = api.device_iter   # has not seen the captured step's increment yet
            api.device_iter = None
        api.launches += 1
        states = [(m, m.h, m.c) for m in getattr(api.model, "lstm_layers", ())]
        api.loss_buffer[...] = api.step_fn(self.x, self.t)
        for m, h, c in states:  # what the graph does: the new state into its buffers
            h[...], c[...] = m.h, m.c
            m.h, m.c = h, c
        opt.iter = saved  # a replay runs no Python: the host counter stays as it was


class FakeApi:
    def __init__(self, step_fn, model, optimizer, fail_capture=False, fail_check=False):
        self.step_fn, self.model, self.optimizer = step_fn, model, optimizer
        self.fail_capture = fail_capture
        self.fail_check = fail_check
        self.buffers = []
        self.mark = 0
        self.launches = 0
        self.captures = 0
        self.direct = 0
        self.capturing = False
        self.loss_buffer = None
        self.device_iter = None

    def check(self):
        if self.fail_check:
            raise RuntimeError("pretend libcublas was not found")

    def empty_like(self, a):
        b = np.empty_like(a)
        self.buffers.append(b)
        return b

    def copy(self, dst, src):
        dst[...] = src

    def launch(self, graph):
        graph.launch()

    @contextlib.contextmanager
    def direct_products(self):
        self.direct += 1
        yield

    def _arrays(self):
        opt = self.optimizer
        states = [a for m in getattr(self.model, "lstm_layers", ()) for a in (m.h, m.c)
                  if a is not None]
        return self.model.params + self.model.grads + list(getattr(opt, "m", None) or []) \
            + list(getattr(opt, "v", None) or []) + states

    @contextlib.contextmanager
    def capture(self):
        self.captures += 1
        self.device_iter = getattr(self.optimizer, "iter", 0)
        arrays = self._arrays()
        before = [a.copy() for a in arrays]
        out = {}
        self.capturing = True
        try:
            yield out
        finally:
            self.capturing = False
            for a, b in zip(arrays, before):  # a captured stream executed nothing
                a[...] = b
        if self.fail_capture:
            raise RuntimeError("pretend the step read a value back while capturing")
        x, t = self.buffers[self.mark:self.mark + 2]  # GraphStep's input buffers come first
        self.mark = len(self.buffers)
        out["graph"] = FakeGraph(self, x, t)


def _lm(cls):
    def make(V, D, H, seed, dtype):
        return cls(50, 16, 16, 0.0, seed=seed, dtype=dtype) if cls is fastseq.BetterRnnlm \
            else cls(50, 8, 16, seed=seed, dtype=dtype)
    make.lm = True
    return make


def _data(seed=0, n=64, lm=False):
    rng = np.random.default_rng(seed)
    if lm:
        return rng.integers(0, 50, (n, 6)), rng.integers(0, 50, (n, 6))
    return rng.integers(0, 13, (n, 7)), rng.integers(0, 13, (n, 5))


def _make(model_cls=fastseq.PeekySeq2seq, opt=None, max_grad=1.0):
    model = model_cls(13, 8, 16, seed=3, dtype=np.float64)
    opt = opt or fastseq.Adam(0.01)
    out = np.zeros(())  # the step's loss as a buffer, like the device scalar a graph writes

    def step(x, t):
        loss = model.forward(x, t)
        model.backward()
        clip_grads(model.grads, max_grad)
        opt.update(model.params, model.grads)
        return loss

    def buffered(x, t):
        out[...] = step(x, t)
        return out

    return model, opt, step, buffered


def _batches(n_steps, bs=16, seed=0, lm=False):
    x, t = _data(seed, lm=lm)
    return [(x[(k * bs) % 64:(k * bs) % 64 + bs], t[(k * bs) % 64:(k * bs) % 64 + bs])
            for k in range(n_steps)]


@pytest.mark.parametrize("model_cls", [fastseq.Seq2seq, fastseq.PeekySeq2seq,
                                       _lm(fastseq.Rnnlm), _lm(fastseq.BetterRnnlm)],
                         ids=["Seq2seq", "PeekySeq2seq", "Rnnlm", "BetterRnnlm"])
def test_captured_steps_equal_plain_steps(model_cls):
    """Language models carry their LSTM state from step to step (through the graph's buffers,
    and a reset between steps is honoured)."""
    lm = getattr(model_cls, "lm", False)
    batches = _batches(7, lm=lm)
    plain_model, plain_opt, plain_step, _ = _make(model_cls)
    plain_losses = []
    for k, (x, t) in enumerate(batches):
        if lm and k == 5:
            plain_model.reset_state()
        plain_losses.append(float(plain_step(x, t)))

    model, opt, _, buffered = _make(model_cls)
    api = FakeApi(buffered, model, opt)
    api.loss_buffer = np.zeros(())
    gstep = cuda_graph.GraphStep(buffered, model, opt, api=api)
    losses = []
    for k, (x, t) in enumerate(batches):
        if lm and k == 5:
            model.reset_state()
        losses.append(float(gstep(x, t)))
    assert gstep.reason is None
    # first step eager (with the products as they will be captured), second captured and
    # launched, the rest replayed
    assert gstep.counts == {"eager": 1, "captured": 1, "replayed": 5}
    assert api.direct == 1 and api.captures == 1 and api.launches == 6
    assert opt.iter == plain_opt.iter == 7
    np.testing.assert_array_equal(losses, plain_losses)
    for p, q in zip(model.params, plain_model.params):
        np.testing.assert_array_equal(p, q)
    for m, n in zip(opt.m + opt.v, plain_opt.m + plain_opt.v):
        np.testing.assert_array_equal(m, n)


def test_capture_failure_falls_back_to_eager_steps():
    batches = _batches(5)
    plain_model, plain_opt, plain_step, _ = _make()
    for x, t in batches:
        plain_step(x, t)
    model, opt, _, buffered = _make()
    api = FakeApi(buffered, model, opt, fail_capture=True)
    gstep = cuda_graph.GraphStep(buffered, model, opt, api=api)
    for x, t in batches:
        gstep(x, t)
    assert "capture failed" in gstep.reason and "read a value back" in gstep.reason
    assert gstep.counts == {"eager": 5, "captured": 0, "replayed": 0}
    assert opt.iter == 5  # the failed capture's host update was undone
    for p, q in zip(model.params, plain_model.params):
        np.testing.assert_array_equal(p, q)


def test_no_direct_products_means_eager_steps():
    model, opt, _, buffered = _make()
    api = FakeApi(buffered, model, opt, fail_check=True)
    gstep = cuda_graph.GraphStep(buffered, model, opt, api=api)
    for x, t in _batches(3):
        gstep(x, t)
    assert "direct cuBLAS products unavailable" in gstep.reason
    assert gstep.counts == {"eager": 3, "captured": 0, "replayed": 0} and api.direct == 0


def test_new_learning_rate_is_recaptured_and_shapes_are_bounded():
    model, opt, _, buffered = _make()
    api = FakeApi(buffered, model, opt)
    api.loss_buffer = np.zeros(())
    gstep = cuda_graph.GraphStep(buffered, model, opt, api=api)
    batches = _batches(4)
    for x, t in batches:
        gstep(x, t)
    opt.lr = 0.005
    gstep(*batches[0])
    assert gstep.counts["captured"] == 2
    x, t = _data(1, 64)
    for bs in (8, 8, 8, 4, 4, 4):  # a second shape gets a graph; a third runs eagerly
        gstep(x[:bs], t[:bs])
    gstep(x[:2], t[:2])
    gstep(x[:2], t[:2])
    assert gstep.counts["captured"] == 3
    assert gstep.counts["eager"] == 1 + 1 + 3 + 2
    assert opt.iter == 4 + 1 + 6 + 2


def test_capture_problem_names_the_reason():
    assert cuda_graph.capture_problem(fastseq.Adam()) is None
    assert cuda_graph.capture_problem(fastseq.SGD()) is None
    assert "not known" in cuda_graph.capture_problem(object())


def test_uncapturable_model_runs_eagerly():
    model = fastseq.Rnnlm(50, 8, 8, seed=0)
    calls = []
    gstep = cuda_graph.GraphStep(lambda x, t: calls.append(1) or 1.0, model, object(),
                                 api=object())
    for _ in range(3):
        assert gstep(np.zeros((2, 3), int), np.zeros((2, 3), int)) == 1.0
    assert len(calls) == 3 and gstep.counts["eager"] == 3
