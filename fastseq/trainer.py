"""Training loops and evaluation: Trainer (seq2seq), eval_seq2seq, RnnlmTrainer (language models,
truncated BPTT), eval_perplexity."""
import os
import time

import numpy as np

from . import backend
from .functions import clip_grads


def progress(iterable, total=None, desc=None, enabled=True):
    """A tqdm progress bar when tqdm is installed and enabled, else the iterable itself."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_step(model, optimizer, params, grads, x, t, max_grad=None):
    """forward, backward, optional global-norm clipping, update; returns the loss."""
    loss = model.forward(x, t)
    model.backward()
    if max_grad is not None:
        clip_grads(grads, max_grad)
    optimizer.update(params, grads)
    return loss


class Trainer:
    """Mini-batch training: fit(x, t, max_epoch, batch_size, max_grad) with per-epoch shuffling.

    loss_list holds the mean loss every eval_interval iterations (textbook); epoch_losses the mean
    loss of each epoch.
    """

    def __init__(self, model, optimizer, seed=None, progress=True):
        self.model, self.optimizer = model, optimizer
        self.loss_list, self.epoch_losses = [], []
        self.eval_interval = None
        self.current_epoch = 0
        self.rng = np.random.RandomState(seed) if seed is not None else np.random.mtrand._rand
        self.show_progress = progress

    def fit(self, x, t, max_epoch=10, batch_size=32, max_grad=None, eval_interval=20):
        if len(x) != len(t):
            raise ValueError(f"x has {len(x)} rows but t has {len(t)}")
        if len(x) < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the data ({len(x)} rows)")
        x, t = backend.asarray(x), backend.asarray(t)  # whole set on the device once
        model, optimizer = self.model, self.optimizer
        params, grads = model.params, model.grads
        max_iters = len(x) // batch_size
        self.eval_interval = eval_interval
        for _ in range(max_epoch):
            idx = backend.asarray(self.rng.permutation(len(x)))
            xs_all, ts_all = x[idx], t[idx]
            total, count, epoch_total = 0.0, 0, 0.0
            bar = progress(range(max_iters), total=max_iters, desc=f"epoch {self.current_epoch + 1}",
                           enabled=self.show_progress)
            for it in bar:
                sl = slice(it * batch_size, (it + 1) * batch_size)
                loss = train_step(model, optimizer, params, grads, xs_all[sl], ts_all[sl], max_grad)
                total += loss
                epoch_total += loss
                count += 1
                if eval_interval and count == eval_interval:
                    self.loss_list.append(total / count)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{total / count:.4f}")
                    total, count = 0.0, 0
            self.epoch_losses.append(epoch_total / max_iters)
            self.current_epoch += 1
        return self

    def plot(self, path=None, ylim=None):
        from .plot import plot_curve
        return plot_curve(self.loss_list, f"iterations (x{self.eval_interval})", "loss", path, ylim)


def _default_workers(N, batch_size):
    """Two decoding threads on a multi-core CPU running the NumPy LSTM engine (NumPy releases
    the GIL in its products and ufuncs); one elsewhere (the Cython engine threads by itself)."""
    from .lstm import kernel_name
    if backend.is_gpu() or kernel_name() != "numpy" or (os.cpu_count() or 1) < 2:
        return 1
    return 2 if N >= 2 * batch_size else 1


def eval_seq2seq(model, questions, corrects, id_to_char=None, verbose=False, is_reverse=False,
                 batch_size=500, workers=None):
    """Exact-match accuracy of greedy answers over all questions, decoded in batches.

    ``corrects`` rows start with the start symbol ('_'), as in the textbook; the rest of each row
    is the answer. With one question this returns 1.0 or 0.0 (textbook: 1 or 0). Batches of 500
    keep each step's arrays in cache (faster on CPU than one batch of 5000); None = all at once.
    ``workers`` threads decode disjoint slices, each on a copy of the model that shares its
    weights and uses single-threaded BLAS (default: see _default_workers).
    """
    questions, corrects = np.asarray(backend.to_cpu(questions)), np.asarray(backend.to_cpu(corrects))
    if questions.ndim == 1:
        questions, corrects = questions[None], corrects[None]
    N = len(questions)
    start_ids = corrects[:, 0]
    answers = corrects[:, 1:]
    bs = batch_size or N
    guesses = np.empty_like(answers)
    workers = _default_workers(N, bs) if workers is None else max(1, int(workers))

    def decode(m, rows):
        for s in range(0, len(rows), bs):
            sl = rows[s:s + bs]
            g = m.generate(questions[sl], start_ids[sl], answers.shape[1])
            guesses[sl] = np.asarray(g).reshape(-1, answers.shape[1])

    if workers == 1:
        decode(model, np.arange(N))
    else:
        from concurrent.futures import ThreadPoolExecutor

        from .functions import blas_threads
        parts = np.array_split(np.arange(N), workers)
        models = [model] + [model.inference_copy() for _ in range(workers - 1)]

        def work(k):
            with blas_threads(1):
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


def _lm_batch(x, t, rows, time_idx, time_size):
    """Batch (B, T) of x and t: row i reads positions (rows[i] + time_idx + j) % len(x), j < T."""
    pos = rows[:, None] + (time_idx + np.arange(time_size))[None, :]
    pos %= len(x)
    return x[pos], t[pos]


class RnnlmTrainer:
    """Truncated-BPTT training of a stateful language model (textbook layout).

    The data is read as ``batch_size`` parallel streams: row i starts at offset ``i * jump``
    (``jump = len(xs) // batch_size``) and advances by ``time_size`` words per iteration. The
    running time index continues across iterations, epochs and ``fit`` calls, and the model's
    LSTM state carries from batch to batch. ``ppl_list`` holds the perplexity of every
    ``eval_interval`` iterations; ``epoch_losses`` the mean loss of each epoch.
    """

    def __init__(self, model, optimizer, progress=True):
        self.model, self.optimizer = model, optimizer
        self.time_idx = 0
        self.ppl_list, self.epoch_losses = [], []
        self.eval_interval = None
        self.current_epoch = 0
        self.show_progress = progress

    def get_batch(self, x, t, batch_size, time_size):
        """The next (batch_x, batch_t), advancing the running time index by time_size."""
        jump = len(x) // batch_size
        rows = np.arange(batch_size) * jump
        if backend.get_array_module(x) is not np:
            rows = backend.xp.asarray(rows)
            pos = rows[:, None] + backend.xp.arange(self.time_idx, self.time_idx + time_size)[None, :]
            pos %= len(x)
            bx, bt = x[pos], t[pos]
        else:
            bx, bt = _lm_batch(x, t, rows, self.time_idx, time_size)
        self.time_idx += time_size
        return bx, bt

    def fit(self, xs, ts, max_epoch=10, batch_size=20, time_size=35, max_grad=None,
            eval_interval=20, max_iters=None):
        """``max_iters`` caps the iterations per epoch (default len(xs) // (batch_size * time_size))."""
        if len(xs) != len(ts):
            raise ValueError(f"xs has {len(xs)} words but ts has {len(ts)}")
        for name, v in (("batch_size", batch_size), ("time_size", time_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        n_iters = len(xs) // (batch_size * time_size)
        if n_iters < 1:
            raise ValueError(f"the corpus ({len(xs)} words) is shorter than one batch "
                             f"({batch_size} x {time_size} words)")
        if max_iters is not None:
            n_iters = min(n_iters, int(max_iters))
        xs, ts = backend.asarray(xs), backend.asarray(ts)
        model, optimizer = self.model, self.optimizer
        params, grads = model.params, model.grads  # tied weights are held once: no dedup needed
        self.eval_interval = eval_interval
        total, count = 0.0, 0
        for _ in range(max_epoch):
            epoch_total = 0.0
            bar = progress(range(n_iters), total=n_iters, desc=f"epoch {self.current_epoch + 1}",
                           enabled=self.show_progress)
            for _it in bar:
                bx, bt = self.get_batch(xs, ts, batch_size, time_size)
                loss = train_step(model, optimizer, params, grads, bx, bt, max_grad)
                total += loss
                epoch_total += loss
                count += 1
                if eval_interval and count == eval_interval:
                    ppl = float(np.exp(total / count))
                    self.ppl_list.append(ppl)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(ppl=f"{ppl:.2f}")
                    total, count = 0.0, 0
            self.epoch_losses.append(epoch_total / n_iters)
            self.current_epoch += 1
        return self

    def plot(self, path=None, ylim=None):
        from .plot import plot_curve
        return plot_curve(self.ppl_list, f"iterations (x{self.eval_interval})", "perplexity",
                          path, ylim)


def eval_perplexity(model, corpus, batch_size=10, time_size=35, max_iters=None, progress_bar=False):
    """exp(mean loss) of predicting corpus[k + 1] from corpus[.. k] (textbook formula).

    ``max_iters = (len - 1) // (B * T)``, ``jump = (len - 1) // B``; iteration k reads row i from
    offset ``k * T + i * jump``: inputs ``corpus[(offset + t) % len]``, targets one word ahead.
    The model's state is reset first (and its previous state restored afterwards), and it runs with
    ``train_flg=False``. ``max_iters`` may cap the iterations (quick estimates).
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
    saved = model.get_state() if hasattr(model, "get_state") else None
    model.reset_state()
    rows = np.arange(batch_size) * jump
    steps = np.arange(time_size)
    import inspect
    try:
        has_flag = "train_flg" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        has_flag = False
    total = 0.0
    try:
        for k in progress(range(iters), total=iters, desc="perplexity", enabled=progress_bar):
            pos = rows[:, None] + (k * time_size + steps)[None, :]
            xs = corpus[pos % n]
            ts = corpus[(pos + 1) % n]
            loss = model.forward(xs, ts, train_flg=False) if has_flag else model.forward(xs, ts)
            total += loss
    finally:
        if saved is not None:
            model.set_state(saved)
        else:
            model.reset_state()
    return float(np.exp(total / iters))
