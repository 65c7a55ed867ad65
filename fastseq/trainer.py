"""Training loops and evaluation: Trainer (seq2seq), eval_seq2seq."""
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
                loss = model.forward(xs_all[sl], ts_all[sl])
                model.backward()
                if max_grad is not None:
                    clip_grads(grads, max_grad)
                optimizer.update(params, grads)
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


def eval_seq2seq(model, questions, corrects, id_to_char=None, verbose=False, is_reverse=False,
                 batch_size=None):
    """Exact-match accuracy of greedy answers over all questions, decoded in batches.

    ``corrects`` rows start with the start symbol ('_'), as in the textbook; the rest of each row
    is the answer. With one question this returns 1.0 or 0.0 (textbook: 1 or 0).
    """
    questions, corrects = np.asarray(backend.to_cpu(questions)), np.asarray(backend.to_cpu(corrects))
    if questions.ndim == 1:
        questions, corrects = questions[None], corrects[None]
    N = len(questions)
    start_ids = corrects[:, 0]
    answers = corrects[:, 1:]
    bs = batch_size or N
    guesses = np.empty_like(answers)
    for s in range(0, N, bs):
        g = model.generate(questions[s:s + bs], start_ids[s:s + bs], answers.shape[1])
        guesses[s:s + bs] = np.asarray(g).reshape(-1, answers.shape[1])
    ok = (guesses == answers).all(axis=1)
    if verbose and id_to_char is not None:
        for q, c, g, k in zip(questions[:3], answers[:3], guesses[:3], ok[:3]):
            q = q[::-1] if is_reverse else q
            mark = "O" if k else "X"
            print(f"Q {''.join(id_to_char[int(i)] for i in q)}  T {''.join(id_to_char[int(i)] for i in c)}"
                  f"  {mark} {''.join(id_to_char[int(i)] for i in g)}")
    return float(ok.mean())


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0
