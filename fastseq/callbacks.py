"""Callbacks of the training loop (fastseq.trainer.TrainLoop): everything around the steps.

A callback overrides the events it needs; the loop calls them in the order of
``loop.callbacks``::

    on_epoch_begin(loop)     before the first (or, resumed, the next) batch of an epoch
    on_iteration(loop)       after each update but an epoch's last
    on_report(loop, k, v)    every eval_interval iterations: the window's figure (name, text)
    on_epoch_end(loop)       after an epoch's last update; loop.epoch_log is the epoch's record
    on_fit_end(loop)         when fit returns or raises

A callback stops training by setting ``loop.stop_reason`` (the loop stops after the current
iteration). One with a ``state_key`` keeps state across a checkpoint: its state_dict() is part
of the loop's. The callbacks here: ProgressBar, EveryIterations, LRSchedule, EarlyStopping,
SaveBest; and StopOnSignal, the context that turns Ctrl-C into ``loop.stop_reason``.
"""
import math
import signal
import sys


class Callback:
    state_key = None

    def on_epoch_begin(self, loop):
        pass

    def on_iteration(self, loop):
        pass

    def on_report(self, loop, name, text):
        pass

    def on_epoch_end(self, loop):
        pass

    def on_fit_end(self, loop):
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass


class Bar:
    """A tqdm progress bar when tqdm is installed and ``enabled``, else nothing."""

    def __init__(self, total, desc, enabled=True, initial=0):
        self.tqdm = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.tqdm = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                             initial=initial)

    def update(self):
        if self.tqdm is not None:
            self.tqdm.update(1)

    def show(self, name, text):
        if self.tqdm is not None:
            self.tqdm.set_postfix({name: text})

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()
            self.tqdm = None


class ProgressBar(Callback):
    """One bar per epoch, with the last reported figure."""

    def __init__(self):
        self.bar = None

    def on_epoch_begin(self, loop):
        self.bar = Bar(loop.n_iters, f"epoch {loop.current_epoch + 1}", initial=loop.iteration)

    def on_iteration(self, loop):
        self.bar.update()

    def on_report(self, loop, name, text):
        self.bar.show(name, text)

    def on_epoch_end(self, loop):
        self.on_fit_end(loop)

    def on_fit_end(self, loop):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EveryIterations(Callback):
    """Calls ``action(loop)`` every ``n`` iterations (counted over the whole run)."""

    def __init__(self, n, action):
        self.n, self.action = n, action

    def on_iteration(self, loop):
        if self.n and loop.total_iters % self.n == 0:
            self.action(loop)


class _Monitor(Callback):
    """Follows ``loop.epoch_log[monitor]`` (lower is better, or higher with ``higher=True``;
    NaN is never better; a tie is not better)."""

    def __init__(self, monitor, higher=False):
        self.monitor, self.best, self.higher = monitor, None, higher

    def improved(self, loop):
        value = loop.epoch_log[self.monitor]
        if self.best is None or (value > self.best if self.higher else value < self.best):
            self.best = value
            return True
        return False

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        best = state["best"]
        if best is not None and not (isinstance(best, (int, float)) and math.isfinite(best)):
            raise ValueError(f"{self.state_key}: best must be a finite number or null, "
                             f"got {best!r}")
        self.best = best


class LRSchedule(_Monitor):
    """Multiplies the optimiser's learning rate by ``factor`` once the monitored figure has been
    no better than the best so far for ``patience`` epochs in a row (the textbook's PTB schedule:
    factor 1/4, patience 1); the count then starts again. Writes 'lr' (the rate the epoch trained
    with) and 'lr_note' into the epoch log."""

    state_key = "lr_schedule"

    def __init__(self, monitor, factor=0.25, higher=False, patience=1):
        super().__init__(monitor, higher)
        self.factor, self.patience, self.bad_epochs = factor, patience, 0

    def on_epoch_end(self, loop):
        opt = loop.optimizer
        loop.epoch_log["lr"] = opt.lr
        self.bad_epochs = 0 if self.improved(loop) else self.bad_epochs + 1
        if self.bad_epochs >= self.patience:
            self.bad_epochs = 0
            opt.lr = opt.lr * self.factor
            loop.epoch_log["lr_note"] = f"worse: lr -> {opt.lr:g}"
        elif self.bad_epochs:
            loop.epoch_log["lr_note"] = f"not better ({self.bad_epochs} of {self.patience})"

    def state_dict(self):
        return dict(super().state_dict(), bad_epochs=self.bad_epochs)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.bad_epochs = int(state.get("bad_epochs", 0))


class SaveBest(_Monitor):
    """Calls ``save(loop)`` after every epoch whose monitored figure is the best so far."""

    state_key = "save_best"

    def __init__(self, monitor, save, higher=False):
        super().__init__(monitor, higher)
        self.save = save

    def on_epoch_end(self, loop):
        if self.improved(loop):
            self.save(loop)
            loop.epoch_log["best"] = True


class EarlyStopping(_Monitor):
    """Stops training after ``patience`` epochs in a row without a better monitored figure."""

    state_key = "early_stopping"

    def __init__(self, monitor, patience=3, higher=False):
        super().__init__(monitor, higher)
        self.patience, self.bad_epochs = patience, 0

    def stopped(self):
        """Whether training has stopped here (also after a resume from the stopping epoch)."""
        return self.bad_epochs >= self.patience

    def on_epoch_end(self, loop):
        self.bad_epochs = 0 if self.improved(loop) else self.bad_epochs + 1
        if self.stopped():
            loop.stop_reason = f"early stopping: no better {self.monitor} in {self.patience} epochs"

    def state_dict(self):
        return dict(super().state_dict(), bad_epochs=self.bad_epochs)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.bad_epochs = int(state["bad_epochs"])


class Interrupted(BaseException):
    """A second SIGINT/SIGTERM: stop at once."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopOnSignal:
    """A context, not a callback: inside ``with``, the first SIGINT/SIGTERM asks the loop to stop
    after this iteration (``signum`` records it); a second raises Interrupted at once."""

    def __init__(self, loop):
        self.loop, self.signum, self.saved = loop, None, {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.saved[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        self.loop.stop_reason = signal.Signals(signum).name
        print(f"\nfastseq: {signal.Signals(signum).name} received: stopping after this iteration "
              f"and saving (again to stop at once)", file=sys.stderr, flush=True)
