"""Training and evaluation: one loop (TrainLoop) under Trainer (seq2seq, shuffled mini-batches)
and RnnlmTrainer (language models, truncated BPTT), with callbacks (fastseq.callbacks) for
everything around the steps; eval_seq2seq, eval_perplexity.

Every trainer has state_dict() / load_state_dict(): the model's, the optimiser's and the loop's
own state (position, the current epoch's order, random generators, loss figures, the callbacks'
state), which is all a checkpoint holds (fastseq.checkpoint)."""
import contextlib
import math

import numpy as np

from . import backend
from ._checks import check_count, check_positive
from .callbacks import Bar, ProgressBar
from .functions import clip_grads
from .layers import rng_state, set_rng_state
from .models.base import Model, make_rng


def _checked_once(model, x, t):
    """On the GPU a whole data set's ids are checked here, once; the batches then skip the check
    (each one would read a value back to the host). A context for the loop over the batches."""
    if backend.get_array_module(x) is np or not isinstance(model, Model):
        return contextlib.nullcontext()
    model.check_data(x, t)
    return backend.ids_checked()


class TrainingDiverged(FloatingPointError):
    """A non-finite loss or gradient: training stopped before the update that would use it."""


class TrainLoop:
    """The loop Trainer and RnnlmTrainer share: batches, forward/backward, a finiteness guard,
    gradient clipping, the update, the mean loss of every ``eval_interval`` iterations
    (``loss_list``) and of every epoch (``epoch_losses``), and ``callbacks`` (Callback objects,
    called in order; a progress bar is the first when ``progress``).

    Position: ``current_epoch`` epochs are finished and ``iteration`` batches of the next one
    are done; ``fit`` continues from there, so a loop stopped mid-epoch (``stop_reason`` set, e.g.
    by a callback) or restored from a checkpoint picks up at the next batch. ``epoch_log`` is the
    finished epoch's record, which callbacks fill in at the epoch's end. ``fit`` puts a fastseq
    model in training mode (``model.train()``); evaluation switches it to ``eval()`` and back.

    On the GPU a step reads nothing back to the host: the loss stays on the device, is summed
    there and read once per logging interval (``eval_interval``, else once per epoch), which is
    where the finiteness guard runs. ``cuda_graphs`` (None or True: where the model allows; False:
    never) replays the steps from a CUDA graph (fastseq.cuda_graph).
    """

    def __init__(self, model, optimizer, progress=True, cuda_graphs=None):
        self.model, self.optimizer = model, optimizer
        self.cuda_graphs = cuda_graphs
        self._device_step = None  # (max_grad, step function) on the GPU
        self.loss_list, self.epoch_losses = [], []
        self.eval_interval = None
        self.current_epoch = 0
        self.iteration = 0
        self.total_iters = 0
        self.n_iters = None      # batches per epoch of the fit in progress
        self.window = [0.0, 0]   # loss sum and count of the current eval_interval window
        self.epoch_loss_sum = 0.0
        self.epoch_log = {}
        self.callbacks = [ProgressBar()] if progress else []
        self.stop_reason = None
        self._data = None  # what batch() reads, during run()

    # subclasses: the batch of iteration ``it``, new-epoch setup, their own state
    def begin_epoch(self):
        pass

    def batch(self, it):
        raise NotImplementedError

    def report(self, mean_loss):
        """The window's figure for loss_list (and the progress bar): the mean loss."""
        self.loss_list.append(mean_loss)
        return "loss", f"{mean_loss:.4f}"

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self):
        """{'model', 'optimizer', 'loop'}: each part's state (references; a checkpoint copies)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loop": self.loop_state()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"], params=self.model.params)
        self.load_loop_state(state["loop"])

    def loop_state(self):
        return {"epoch": self.current_epoch, "iteration": self.iteration,
                "total_iters": self.total_iters, "loss_list": list(self.loss_list),
                "epoch_losses": list(self.epoch_losses),
                "window": [float(self.window[0]), self.window[1]],  # float(): a device sum
                "epoch_loss_sum": float(self.epoch_loss_sum),
                "global_rng": rng_state(np.random.mtrand._rand),
                "callbacks": {c.state_key: c.state_dict() for c in self.callbacks
                              if c.state_key is not None}}

    def load_loop_state(self, s):
        self.current_epoch, self.iteration, self.total_iters = \
            s["epoch"], s["iteration"], s["total_iters"]
        self.loss_list[:], self.epoch_losses[:] = s["loss_list"], s["epoch_losses"]
        self.window[:] = s["window"]
        self.epoch_loss_sum = s["epoch_loss_sum"]
        set_rng_state(np.random.mtrand._rand, s["global_rng"])
        for c in self.callbacks:
            if c.state_key is not None and c.state_key in s["callbacks"]:
                c.load_state_dict(s["callbacks"][c.state_key])

    # -- one step ------------------------------------------------------------------------------
    def step(self, x, t, max_grad):
        """forward, backward, guard, clip, update; returns the loss as a float (on the GPU, a 0-d
        device array, and the guard waits for the logging interval)."""
        if backend.get_array_module(x) is not np:
            return self.device_step(max_grad)(x, t)
        model = self.model
        loss = float(model.forward(x, t))
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the loss is {loss} at epoch {self.current_epoch + 1}, "
                                   f"iteration {self.iteration + 1}")
        model.backward()
        params, grads = model.params, model.grads
        norm = clip_grads(grads, math.inf if max_grad is None else max_grad)
        if not math.isfinite(norm):
            raise TrainingDiverged(f"a non-finite gradient at epoch {self.current_epoch + 1}, "
                                   f"iteration {self.iteration + 1}, in parameter "
                                   f"{self._non_finite(grads)}")
        self.optimizer.update(params, grads)
        return loss

    def device_step(self, max_grad):
        """The step function for device arrays (replayed from a CUDA graph where it can be)."""
        if self._device_step is not None and self._device_step[0] == max_grad:
            return self._device_step[1]
        model, optimizer = self.model, self.optimizer
        params, grads = model.params, model.grads

        def step(x, t):
            loss = model.forward(x, t)
            model.backward()
            if max_grad is not None:
                clip_grads(grads, max_grad)
            optimizer.update(params, grads)
            return loss

        if self.cuda_graphs is not False:
            from .cuda_graph import GraphStep
            step = GraphStep(step, model, optimizer)
        self._device_step = (max_grad, step)
        return step

    def _check_mean(self, mean, what):
        if not math.isfinite(mean):
            raise TrainingDiverged(f"the mean loss of {what} is {mean} (epoch "
                                   f"{self.current_epoch + 1}, iteration {self.iteration})")
        return mean

    def _non_finite(self, grads):
        names = self.model.param_names if isinstance(self.model, Model) else None
        for i, g in enumerate(grads):
            xp = backend.get_array_module(g)
            if not bool(xp.isfinite(g).all()):
                return names[i] if names else f"#{i}"
        return "(the norm overflowed)"

    # -- the loop ------------------------------------------------------------------------------
    def run(self, data, max_epoch, n_iters, max_grad, eval_interval):
        """Train on ``data`` ((x, t, ...) as ``batch`` reads it; x and t go to the device once)."""
        if self.iteration >= n_iters:
            raise ValueError(f"the epoch in progress is at iteration {self.iteration} but an "
                             f"epoch now has {n_iters}")
        self._data = (backend.asarray(data[0]), backend.asarray(data[1]), *data[2:])
        try:
            with _checked_once(self.model, *self._data[:2]):
                self.eval_interval, self.n_iters = eval_interval, n_iters
                if isinstance(self.model, Model):
                    self.model.train()
                try:
                    for _ in range(max_epoch):
                        if self._run_epoch(n_iters, max_grad, eval_interval):
                            break
                finally:
                    self._call("on_fit_end")
        finally:
            self._data = None
        return self

    def _run_epoch(self, n_iters, max_grad, eval_interval):
        """One epoch (or its rest); True when a callback asked to stop."""
        if self.iteration == 0:
            self.begin_epoch()
        self._call("on_epoch_begin")
        for it in range(self.iteration, n_iters):
            loss = self.step(*self.batch(it), max_grad)
            self.iteration, self.total_iters = it + 1, self.total_iters + 1
            self.epoch_loss_sum += loss
            w = self.window
            w[0] += loss
            w[1] += 1
            if eval_interval and w[1] == eval_interval:
                # float(): on the GPU the one value read back per interval
                mean = self._check_mean(float(w[0]) / w[1], "the last interval")
                self._call("on_report", *self.report(mean))
                w[0], w[1] = 0.0, 0
            if self.iteration < n_iters:
                self._call("on_iteration")
                if self.stop_reason:
                    return True
        self.epoch_losses.append(self._check_mean(float(self.epoch_loss_sum) / n_iters,
                                                  "the epoch"))
        self.epoch_loss_sum = 0.0
        self.current_epoch += 1
        self.iteration = 0
        self.epoch_log = {"epoch": self.current_epoch, "loss": self.epoch_losses[-1]}
        self._call("on_epoch_end")
        return bool(self.stop_reason)

    def _call(self, event, *args):
        for c in self.callbacks:
            getattr(c, event)(self, *args)

    def _check_fit_args(self, max_epoch, batch_size, max_grad, eval_interval):
        check_count("max_epoch", max_epoch)
        check_count("batch_size", batch_size)
        if eval_interval is not None:
            check_count("eval_interval", eval_interval)
        return check_positive("max_grad", max_grad, optional=True)


class Trainer(TrainLoop):
    """Mini-batch training of a seq2seq model: fit(x, t, max_epoch, batch_size, max_grad,
    eval_interval), rows shuffled every epoch by ``rng`` (seeded with ``seed``; the global NumPy
    generator when None, as in the textbook). ``order`` is the current epoch's row order."""

    def __init__(self, model, optimizer, seed=None, progress=True, cuda_graphs=None):
        super().__init__(model, optimizer, progress, cuda_graphs)
        self.rng = make_rng(seed)
        self.order = None
        self._order_on_device = None

    def fit(self, x, t, max_epoch=10, batch_size=32, max_grad=None, eval_interval=20):
        max_grad = self._check_fit_args(max_epoch, batch_size, max_grad, eval_interval)
        if len(x) != len(t):
            raise ValueError(f"x has {len(x)} rows but t has {len(t)}")
        if len(x) < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the data ({len(x)} rows)")
        shuffled = 0 if self.order is None else len(self.order)
        if 0 < self.iteration < len(x) // batch_size and shuffled != len(x):
            raise ValueError(f"the epoch in progress shuffled {shuffled} rows but x has {len(x)}")
        return self.run((x, t, batch_size), max_epoch, len(x) // batch_size, max_grad,
                        eval_interval)

    def begin_epoch(self):
        self.order = self.rng.permutation(len(self._data[0]))

    def loop_state(self):
        """The loop's state, the current epoch's row order and the shuffle generator (None when
        it is NumPy's global one, which the loop's state holds anyway)."""
        own = self.rng is not np.random.mtrand._rand
        return dict(super().loop_state(), order=self.order,
                    shuffle_rng=rng_state(self.rng) if own else None)

    def load_loop_state(self, s):
        if (s["shuffle_rng"] is None) != (self.rng is np.random.mtrand._rand):
            raise ValueError("the state's shuffle generator does not fit this trainer (seeded "
                             "in one, NumPy's global generator in the other)")
        order = s["order"]
        if order is not None:
            order = np.asarray(backend.to_cpu(order))
            if order.ndim != 1 or order.dtype.kind not in "iu" or \
                    not np.array_equal(np.sort(order), np.arange(len(order))):
                raise ValueError("the state's row order is not a permutation of the rows")
        super().load_loop_state(s)
        self.order = order
        if s["shuffle_rng"] is not None:
            set_rng_state(self.rng, s["shuffle_rng"])

    def batch(self, it):
        x, t, bs = self._data
        if self._order_on_device is None or self._order_on_device[0] is not self.order:
            # the epoch's order goes to the device once, not a slice per batch
            self._order_on_device = (self.order, backend.asarray(self.order))
        idx = self._order_on_device[1][it * bs:(it + 1) * bs]
        return x[idx], t[idx]

    def plot(self, path=None, ylim=None):
        from .plot import plot_curve
        return plot_curve(self.loss_list, f"iterations (x{self.eval_interval})", "loss", path, ylim)


class BucketTrainer(Trainer):
    """A Trainer for rows of different lengths, padded at their end with ``pad_id``: each batch
    holds rows of similar lengths and is cut to its longest row (the columns after it are
    padding in every row), so short rows do not pay for the longest ones.

    An epoch's order: the rows shuffled, cut into chunks of ``chunk`` batches, each chunk sorted
    by length (source + target) and cut into batches, the batches shuffled; the rows left over
    (fewer than a batch) are drawn at random and skipped, as in Trainer. ``bucket=False``: plain
    shuffled batches, still cut to their longest row. The order is a permutation of the rows
    drawn from the seeded generator, so a checkpoint's state resumes it as Trainer's."""

    def __init__(self, model, optimizer, pad_id, seed=None, progress=True, cuda_graphs=None,
                 chunk=64, bucket=True):
        super().__init__(model, optimizer, seed, progress, cuda_graphs)
        self.pad_id, self.chunk, self.bucket = int(pad_id), check_count("chunk", chunk), bucket
        self._lengths = None

    def fit(self, x, t, max_epoch=10, batch_size=32, max_grad=None, eval_interval=20):
        from .functions import true_lengths
        x_host, t_host = np.asarray(backend.to_cpu(x)), np.asarray(backend.to_cpu(t))
        # columns each row needs: its source; <s>, its target and the end symbol (a pad)
        self._lengths = (true_lengths(x_host, self.pad_id),
                         np.minimum(true_lengths(t_host, self.pad_id) + 1, t_host.shape[1]))
        try:
            return super().fit(x, t, max_epoch, batch_size, max_grad, eval_interval)
        finally:
            self._lengths = None

    def begin_epoch(self):
        n, bs = len(self._data[0]), self._data[2]
        order = self.rng.permutation(n)
        if self.bucket:
            m = n - n % bs
            key = self._lengths[0] + self._lengths[1]
            size = bs * self.chunk
            for s in range(0, m, size):
                part = order[s:min(s + size, m)]
                order[s:s + len(part)] = part[np.argsort(key[part], kind="stable")]
            batches = order[:m].reshape(-1, bs)[self.rng.permutation(m // bs)]
            order = np.concatenate([batches.ravel(), order[m:]])
        self.order = order

    def batch(self, it):
        bs = self._data[2]
        rows = self.order[it * bs:(it + 1) * bs]
        x, t = super().batch(it)
        return x[:, :int(self._lengths[0][rows].max())], t[:, :int(self._lengths[1][rows].max())]


def eval_seq2seq(model, questions, corrects, id_to_char=None, verbose=False, is_reverse=False,
                 batch_size=10000, workers=None):
    """Exact-match accuracy of greedy answers over all questions, decoded in batches.

    ``corrects`` rows start with the start symbol ('_'), as in the textbook; the rest of each row
    is the answer. With one question this returns 1.0 or 0.0 (textbook: 1 or 0). Batches bound
    the memory (None = all at once); every engine spreads a batch's rows over its threads by
    itself. ``workers`` threads (default 1) decode disjoint slices instead, each on a copy of the
    model that shares its weights and uses single-threaded BLAS.
    """
    questions, corrects = np.asarray(backend.to_cpu(questions)), np.asarray(backend.to_cpu(corrects))
    if questions.ndim == 1 and corrects.ndim == 1:
        questions, corrects = questions[None], corrects[None]
    if questions.ndim != 2 or corrects.ndim != 2:
        raise ValueError(f"questions and corrects must be 2-D (N, T) arrays of ids, got shapes "
                         f"{questions.shape} and {corrects.shape}")
    N = len(questions)
    if N != len(corrects):
        raise ValueError(f"{N} questions but {len(corrects)} correct answers")
    if N == 0:
        raise ValueError("no questions to evaluate (empty input)")
    if corrects.shape[1] < 2:
        raise ValueError(f"each correct answer needs the start symbol and at least one id, got "
                         f"rows of {corrects.shape[1]}")
    start_ids = corrects[:, 0]
    answers = corrects[:, 1:]
    bs = batch_size or N
    guesses = np.empty_like(answers)
    workers = 1 if workers is None else max(1, int(workers))

    def decode(m, rows):
        for s in range(0, len(rows), bs):
            sl = rows[s:s + bs]
            g = m.generate(questions[sl], start_ids[sl], answers.shape[1])
            guesses[sl] = np.asarray(g).reshape(-1, answers.shape[1])

    if workers == 1:
        decode(model, np.arange(N))
    else:
        from concurrent.futures import ThreadPoolExecutor

        parts = np.array_split(np.arange(N), workers)
        models = [model] + [model.inference_copy() for _ in range(workers - 1)]

        def work(k):
            with backend.single_blas_thread():  # each decoding thread runs its own products
                decode(models[k], parts[k])

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(workers)))  # list(): re-raise any worker's error
    ok = (guesses == answers).all(axis=1)
    if verbose and id_to_char is not None:
        for q, c, g, k in zip(questions[:3], answers[:3], guesses[:3], ok[:3]):
            q = q[::-1] if is_reverse else q
            mark = "O" if k else "X"
            print(f"Q {''.join(id_to_char[int(i)] for i in q)}  T {''.join(id_to_char[int(i)] for i in c)}"
                  f"  {mark} {''.join(id_to_char[int(i)] for i in g)}")
    return float(ok.mean())


class RnnlmTrainer(TrainLoop):
    """Truncated-BPTT training of a stateful language model (textbook layout).

    The data is read as ``batch_size`` parallel streams: row i starts at offset ``i * jump``
    (``jump = len(xs) // batch_size``) and advances by ``time_size`` words per iteration. The
    running time index continues across iterations, epochs and ``fit`` calls, and the model's
    LSTM state carries from batch to batch. ``ppl_list`` holds the perplexity of every
    ``eval_interval`` iterations (``loss_list`` the mean loss); ``epoch_losses`` the mean loss
    of each epoch.
    """

    def __init__(self, model, optimizer, progress=True, cuda_graphs=None):
        super().__init__(model, optimizer, progress, cuda_graphs)
        self.time_idx = 0
        self._rows = None  # (key, each row's offset in the corpus)
        self.ppl_list = []

    def get_batch(self, x, t, batch_size, time_size):
        """The next (batch_x, batch_t), advancing the running time index by time_size: row i
        reads positions (i * jump + time_idx + j) % len(x), j < time_size."""
        xp = backend.get_array_module(x)
        key = (len(x), batch_size, xp)
        if self._rows is None or self._rows[0] != key:  # on the device once, not per batch
            self._rows = (key, xp.asarray(np.arange(batch_size) * (len(x) // batch_size)))
        pos = self._rows[1][:, None] + xp.arange(self.time_idx, self.time_idx + time_size)[None, :]
        pos %= len(x)
        self.time_idx += time_size
        return x[pos], t[pos]

    def batch(self, it):
        return self.get_batch(*self._data)

    def loop_state(self):
        return dict(super().loop_state(), time_idx=self.time_idx, ppl_list=list(self.ppl_list))

    def load_loop_state(self, s):
        super().load_loop_state(s)
        self.time_idx = s["time_idx"]
        self.ppl_list[:] = s["ppl_list"]

    def report(self, mean_loss):
        super().report(mean_loss)
        ppl = float(np.exp(mean_loss))
        self.ppl_list.append(ppl)
        return "ppl", f"{ppl:.2f}"

    def fit(self, xs, ts, max_epoch=10, batch_size=20, time_size=35, max_grad=None,
            eval_interval=20, max_iters=None):
        """``max_iters`` caps the iterations per epoch (default: len(xs) // (batch_size *
        time_size))."""
        max_grad = self._check_fit_args(max_epoch, batch_size, max_grad, eval_interval)
        check_count("time_size", time_size)
        if len(xs) != len(ts):
            raise ValueError(f"xs has {len(xs)} words but ts has {len(ts)}")
        n_iters = len(xs) // (batch_size * time_size)
        if n_iters < 1:
            raise ValueError(f"the corpus ({len(xs)} words) is shorter than one batch "
                             f"({batch_size} x {time_size} words)")
        if max_iters is not None:
            n_iters = min(n_iters, check_count("max_iters", max_iters))
        return self.run((xs, ts, batch_size, time_size), max_epoch, n_iters, max_grad,
                        eval_interval)

    def plot(self, path=None, ylim=None):
        from .plot import plot_curve
        return plot_curve(self.ppl_list, f"iterations (x{self.eval_interval})", "perplexity",
                          path, ylim)


def eval_perplexity(model, corpus, batch_size=10, time_size=35, max_iters=None, progress_bar=False):
    """exp(mean loss) of predicting corpus[k + 1] from corpus[.. k] (textbook formula).

    ``max_iters = (len - 1) // (B * T)``, ``jump = (len - 1) // B``; iteration k reads row i from
    offset ``k * T + i * jump``: inputs ``corpus[(offset + t) % len]``, targets one word ahead.
    The model's state is reset first (and its previous state restored afterwards), and it runs in
    evaluation mode (``model.eval()``; its mode is restored afterwards). ``max_iters`` may cap
    the iterations (quick estimates).
    """
    corpus = np.asarray(backend.to_cpu(corpus))
    n = len(corpus)
    iters = (n - 1) // (batch_size * time_size)
    if iters < 1:
        raise ValueError(f"the corpus ({n} words) is shorter than one evaluation batch "
                         f"({batch_size} x {time_size} + 1 words)")
    if max_iters is not None:
        iters = min(iters, int(max_iters))
    jump = (n - 1) // batch_size
    saved, was_training = model.get_state(), model.training
    model.reset_state()
    model.eval()
    rows = np.arange(batch_size) * jump
    steps = np.arange(time_size)
    params = model.params
    if params and backend.get_array_module(params[0]) is not np:
        # on the GPU: the corpus goes over once and the batches are gathered there
        xp = backend.get_array_module(params[0])
        corpus, rows, steps = xp.asarray(corpus), xp.asarray(rows), xp.asarray(steps)
    checked = _checked_once(model, corpus, corpus)
    total = 0.0
    bar = Bar(iters, "perplexity", enabled=progress_bar)
    try:
        with checked:
            for k in range(iters):
                pos = rows[:, None] + (k * time_size + steps)[None, :]
                loss = model.forward(corpus[pos % n], corpus[(pos + 1) % n])
                total += loss  # on the GPU a 0-d array: read once, at the end
                bar.update()
    finally:
        bar.close()
        model.set_state(saved)
        model.train(was_training)
    return float(np.exp(float(total) / iters))
