"""Training steps replayed from a CUDA graph (CuPy): one launch per step instead of hundreds.

The addition models run hundreds of small kernels per training step, so on a GPU their time goes
into launching kernels, not into running them. For fixed shapes a step (forward, backward,
clipping, update) launches the same kernels with the same arguments every time; only the values
in the buffers change. ``GraphStep`` runs the first step of each shape as usual (kernels compiled,
memory pools warm), records the second into a CUDA graph by stream capture, launches it, and from
then on copies each batch into the graph's two input buffers and launches the graph.

What capture needs from the step, and how fastseq's CuPy path provides it:
- no value read back by the host: the loss stays a 0-d device array (the trainer sums it on the
  device and reads it once per logging interval), clipping computes the norm and the rate on the
  device, Adam's step size comes from a device counter, and the trainer checks the ids of the
  whole data set once instead of every batch (``backend.ids_checked``);
- cuBLAS products: CuPy refuses cuBLAS while a stream captures, so during capture the products go
  to cuBLAS directly through a handle of fastseq's own (``fastseq.ops._cupy.cublas_matmul``);
- memory: what the step allocates while it is captured comes from a memory pool of the graph's
  own, kept with the graph, so no other array is ever given an address the graph writes to;
- random numbers: cuRAND calls cannot be captured, so dropout masks on the device are hashed
  from a seed and a draw counter kept on the device (``fastseq.ops._cupy.dropout_mask``);
- state carried from step to step (the language models' LSTM h and c, truncated BPTT): the
  graph reads the state from buffers of its own and writes the new state back into them at the
  end; a state set or reset between steps is copied into them before the next launch.

Shapes: one graph per batch shape, at most ``MAX_GRAPHS``; others run eagerly. A changed learning
rate is recaptured (it is a kernel argument in the graph). If capture fails, the reason is kept in
``GraphStep.reason`` and every step runs eagerly from then on.
"""
import collections
import contextlib

MAX_GRAPHS = 2


def capture_problem(optimizer):
    """Why training steps that update with ``optimizer`` cannot be captured (a sentence), or
    None (every fastseq model's step can be)."""
    if type(optimizer).__name__ not in ("Adam", "SGD"):
        return f"the optimiser {type(optimizer).__name__} is not known to be capturable"
    return None


class GraphStep:
    """``step(x, t) -> loss``: ``step_fn`` (one whole training step on device arrays, returning
    the loss as a 0-d device array) replayed from a CUDA graph after its first call for a shape.

    The returned loss is the graph's own buffer: use it (e.g. add it to a device sum) before the
    next call. ``optimizer.iter`` advances on every step as it would eagerly. ``api`` supplies the
    device operations (streams, capture, copies); tests pass a stand-in.
    """

    def __init__(self, step_fn, model, optimizer, api=None):
        self.step_fn, self.model, self.optimizer = step_fn, model, optimizer
        self.reason = capture_problem(optimizer)
        self._api = api
        self._graphs = {}   # (x shape, x dtype, t shape, t dtype) -> _Captured
        self._warm = set()  # shapes whose eager warm-up step has run
        self._checked = False  # whether the direct products were checked (api.check)
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}

    @property
    def api(self):
        if self._api is None:
            self._api = CupyGraphApi()
        return self._api

    def __call__(self, x, t):
        if not self._checked and self.reason is None:
            self._checked = True
            try:
                self.api.check()
            except Exception as e:  # no usable direct cuBLAS calls: no graphs, eager steps
                self.reason = f"direct cuBLAS products unavailable ({type(e).__name__}: {e})"
        if self.reason is not None:
            return self._eager(x, t)
        key = (x.shape, str(x.dtype), t.shape, str(t.dtype))
        entry = self._graphs.get(key)
        if entry is not None and entry.lr != self.optimizer.lr:
            del self._graphs[key]  # the learning rate is baked into the graph: record it again
            entry = None
        if entry is None:
            if key not in self._warm or len(self._graphs) >= MAX_GRAPHS or \
                    not _states_ready(self.model, x.shape[0]):
                self._warm.add(key)
                return self._eager(x, t, direct=True)
            entry = self._capture(key, x, t)
            if entry is None:  # capture failed: self.reason says why
                return self._eager(x, t)
            return entry.loss
        api = self.api
        api.copy(entry.x, x)
        api.copy(entry.t, t)
        for lstm, h, c in entry.states:  # a state set or reset since the last step
            lstm.h, lstm.c = _into(api, lstm.h, h), _into(api, lstm.c, c)
        api.launch(entry.graph)
        self.optimizer.count_step()  # what the update did on the host while it was recorded
        self.counts["replayed"] += 1
        return entry.loss

    def _eager(self, x, t, direct=False):
        self.counts["eager"] += 1
        with self.api.direct_products() if direct else contextlib.nullcontext():
            return self.step_fn(x, t)

    def _capture(self, key, x, t):
        api, opt = self.api, self.optimizer
        xb, tb = api.empty_like(x), api.empty_like(t)
        api.copy(xb, x)
        api.copy(tb, t)
        saved = opt.state_dict()
        # the carried LSTM states: the graph reads them from buffers of its own
        states = []
        for lstm in _stateful(self.model):
            h, c = api.empty_like(lstm.h), api.empty_like(lstm.c)
            api.copy(h, lstm.h)
            api.copy(c, lstm.c)
            lstm.h, lstm.c = h, c
            states.append((lstm, h, c))
        try:
            with api.capture() as captured:
                loss = self.step_fn(xb, tb)
                for lstm, h, c in states:  # the new state back into the buffers, in the graph
                    api.copy(h, lstm.h)
                    api.copy(c, lstm.c)
        except Exception as e:  # a host round trip or an uncapturable call inside the step
            opt.load_state_dict(saved)
            for lstm, h, c in states:
                lstm.h, lstm.c = h, c  # what they held before the attempt
            self.reason = f"capture failed, steps run eagerly ({type(e).__name__}: {e})"
            return None
        for lstm, h, c in states:
            lstm.h, lstm.c = h, c
        entry = _Captured(captured["graph"], captured.get("pool"), xb, tb, loss, opt.lr, states)
        self._graphs[key] = entry
        api.launch(entry.graph)  # capture recorded the step; this runs it, for this batch
        self.counts["captured"] += 1
        return entry


# one graph, its memory pool, its input buffers, its loss buffer, the learning rate it was
# recorded with and [(lstm, h buffer, c buffer)] for the carried LSTM states
_Captured = collections.namedtuple("_Captured", "graph pool x t loss lr states")


def _stateful(model):
    """The LSTM layers whose state carries from one step to the next."""
    return [m for m in model.lstm_layers if m.stateful]


def _states_ready(model, N):
    """Whether every carried state exists with N rows (else: one more eager step first)."""
    return all(m.h is not None and m.c is not None and m.h.shape[0] == N and m.c.shape[0] == N
               for m in _stateful(model))


def _into(api, now, buf):
    """The graph's state buffer ``buf``, first made to hold ``now`` (a state set or reset since
    the last step; None: zeros) unless ``now`` is that buffer already."""
    if now is not buf:
        api.copy(buf, 0 if now is None else now)
    return buf


class CupyGraphApi:
    """The device side of GraphStep on CuPy: a non-blocking capture stream, a memory pool per
    graph, products by direct cuBLAS calls while capturing, launches on the current stream."""

    def __init__(self):
        import cupy
        from .ops import _cupy
        self.cupy, self._cupy_engine = cupy, _cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def empty_like(self, a):
        return self.cupy.empty(a.shape, dtype=a.dtype)

    def check(self):
        """Direct cuBLAS products work here and agree with CuPy's, for both operand orders (once,
        before the first graph: a wrong product must not train a model)."""
        import numpy
        cupy, engine = self.cupy, self._cupy_engine
        rng = numpy.random.default_rng(0)
        for dtype in (numpy.float32, numpy.float64):
            a = cupy.asarray(rng.standard_normal((5, 3)).astype(dtype))
            b = cupy.asarray(rng.standard_normal((3, 4)).astype(dtype))
            for x, y in ((a, b), (cupy.asfortranarray(a), b), (a, cupy.asfortranarray(b))):
                with self.direct_products():
                    got = engine.cublas_matmul(x, y)
                if not bool(cupy.allclose(got, cupy.matmul(x, y), rtol=1e-4, atol=1e-5)):
                    raise RuntimeError("direct cuBLAS products disagree with CuPy's")

    def copy(self, dst, src):
        dst[...] = src

    def launch(self, graph):
        graph.launch(stream=self.cupy.cuda.get_current_stream())

    @contextlib.contextmanager
    def direct_products(self):
        with self._cupy_engine.capturing():
            yield

    @contextlib.contextmanager
    def capture(self):
        """Record everything launched inside the block; yields a dict that holds the graph
        ('graph') and its memory pool ('pool') afterwards."""
        cupy, engine = self.cupy, self._cupy_engine
        pool = cupy.cuda.MemoryPool()
        out = {"pool": pool}
        engine.prepare_direct_products(self.stream.ptr)
        with cupy.cuda.using_allocator(pool.malloc), self.stream, self.direct_products():
            self.stream.begin_capture()
            try:
                yield out
            except BaseException:
                with contextlib.suppress(Exception):  # leave capture mode; the graph is void
                    self.stream.end_capture()
                raise
            out["graph"] = self.stream.end_capture()
