"""The one training loop under Trainer and RnnlmTrainer: the textbook API, callbacks, stopping
and continuing mid-epoch, and checkpoint save/restore in one process."""
import numpy as np
import pytest

from fastseq import SGD, Adam, BetterRnnlm, PeekySeq2seq, RnnlmTrainer, Trainer, checkpoint, files
from fastseq.callbacks import Callback
from fastseq.datasets.sequence import build, generate_addition, parse_lines


@pytest.fixture(scope="module")
def addition():
    return build(*parse_lines(generate_addition(700, seed=2)), seed=0)


def seq2seq_run(data):
    model = PeekySeq2seq(len(data.vocab), 4, 8, seed=1)
    return model, Trainer(model, Adam(1e-2), seed=5, progress=False)


def lm_run():
    model = BetterRnnlm(30, 8, 8, dropout_ratio=0.3, seed=1)
    return model, RnnlmTrainer(model, SGD(1.0), progress=False)


LM_DATA = np.random.RandomState(0).randint(0, 30, 2001)


def test_textbook_api(addition, tmp_path):
    model, trainer = seq2seq_run(addition)
    trainer.fit(addition.x_train, addition.t_train, 2, 64, 5.0, 4)  # positional, as the book
    iters = 2 * (len(addition.x_train) // 64)
    assert trainer.total_iters == iters and len(trainer.loss_list) == iters // 4
    assert trainer.current_epoch == 2 and len(trainer.epoch_losses) == 2
    assert trainer.loss_list[-1] < trainer.loss_list[0]
    png = trainer.plot(str(tmp_path / "loss.png"))
    assert png is None or (tmp_path / "loss.png").exists()
    lm, lm_trainer = lm_run()
    lm_trainer.fit(LM_DATA[:-1], LM_DATA[1:], 1, 4, 5, 0.25, 10)
    assert len(lm_trainer.ppl_list) == len(lm_trainer.loss_list) == 100 // 10


class Recorder(Callback):
    def __init__(self, events):
        self.events = events

    def on_iteration(self, loop):
        self.events.append(("iteration", loop.total_iters))

    def on_epoch_end(self, loop):
        self.events.append(("epoch", loop.total_iters))


def test_callbacks_see_every_iteration_and_epoch(addition):
    _, trainer = seq2seq_run(addition)
    events = []
    trainer.callbacks.append(Recorder(events))
    trainer.fit(addition.x_train, addition.t_train, max_epoch=2, batch_size=128)
    per_epoch = len(addition.x_train) // 128
    assert [e for e, _ in events].count("epoch") == 2
    assert [n for e, n in events if e == "epoch"] == [per_epoch, 2 * per_epoch]
    assert [n for e, n in events if e == "iteration"] == \
        [n for n in range(1, 2 * per_epoch) if n != per_epoch]


class StopAt(Callback):
    def __init__(self, n):
        self.n = n

    def on_iteration(self, loop):
        if loop.total_iters == self.n:
            loop.stop_reason = "test"


@pytest.mark.parametrize("kind,stop", [("seq2seq", 25), ("lm", 50)])  # in the second epoch
def test_stop_save_restore_continue_is_bit_identical(kind, stop, addition, tmp_path):
    def fresh():
        return seq2seq_run(addition) if kind == "seq2seq" else lm_run()

    def fit(trainer, epochs):
        if kind == "seq2seq":
            trainer.fit(addition.x_train, addition.t_train, max_epoch=epochs, batch_size=32,
                        max_grad=5.0)
        else:
            trainer.fit(LM_DATA[:-1], LM_DATA[1:], max_epoch=epochs, batch_size=4, time_size=5,
                        max_grad=0.25, max_iters=40)

    ref_model, ref = fresh()
    fit(ref, 3)
    model, trainer = fresh()
    trainer.callbacks.append(StopAt(stop))
    fit(trainer, 3)
    assert trainer.total_iters == stop and trainer.current_epoch == 1 and trainer.iteration > 0
    checkpoint.save(tmp_path / "c.npz", trainer, {"note": "test"})
    arrays, meta = files.load_checkpoint(tmp_path / "c.npz")
    assert meta["note"] == "test" and meta["state"]["loop"]["total_iters"] == stop
    model2, resumed = fresh()
    checkpoint.restore(resumed, arrays, meta)
    fit(resumed, 3 - resumed.current_epoch)
    for a, b in zip(ref_model.params, model2.params):
        assert np.array_equal(a, b)
    assert ref.epoch_losses == resumed.epoch_losses and ref.loss_list == resumed.loss_list


def test_restore_refuses_another_model(addition, tmp_path):
    _, trainer = seq2seq_run(addition)
    trainer.fit(addition.x_train, addition.t_train, max_epoch=1, batch_size=128)
    checkpoint.save(tmp_path / "c.npz", trainer)
    _, other = lm_run()
    with pytest.raises(checkpoint.CheckpointError, match="PeekySeq2seq"):
        checkpoint.restore(other, *files.load_checkpoint(tmp_path / "c.npz"))


# --- the state protocol and the callbacks ------------------------------------------------------

def test_dropout_state_round_trip_gives_the_same_masks():
    from fastseq.layers import TimeDropout
    x = np.ones((2, 3, 4))
    a = TimeDropout(0.5, seed=3)
    a.forward(x)
    state = a.state_dict()
    b = TimeDropout(0.5, seed=99)
    b.load_state_dict({"rng": dict(state["rng"], keys=state["rng"]["keys"].copy()),
                       "device": None})
    assert np.array_equal(a.forward(x), b.forward(x))
    assert TimeDropout(0.5, seed=3).state_dict() == {"rng": None, "device": None}  # not drawn yet


def test_model_state_dict_round_trip_and_refusal_before_any_change():
    a, b = BetterRnnlm(30, 8, 8, seed=1), BetterRnnlm(30, 8, 8, seed=2)
    a.forward(LM_DATA[:20].reshape(2, 10), LM_DATA[1:21].reshape(2, 10))  # carried state, masks
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(p, q) for p, q in zip(a.params, b.params))
    assert all(np.array_equal(x, y) for s, t in zip(a.get_state(), b.get_state())
               for x, y in zip(s, t))
    xs, ts = LM_DATA[30:50].reshape(2, 10), LM_DATA[31:51].reshape(2, 10)
    assert a.forward(xs, ts) == b.forward(xs, ts)  # same state, same dropout masks
    c = BetterRnnlm(30, 8, 8, seed=3)
    before = [p.copy() for p in c.params]
    bad = a.state_dict()
    bad["params"] = dict(bad["params"], **{"lstm2.b": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match=r"lstm2\.b is float32\(5,\)"):
        c.load_state_dict(bad)
    assert all(np.array_equal(p, q) for p, q in zip(before, c.params))


def test_train_and_eval_switch_dropout_for_the_whole_model():
    m = BetterRnnlm(30, 8, 8, dropout_ratio=0.5, seed=1)
    xs, ts = LM_DATA[:20].reshape(2, 10), LM_DATA[1:21].reshape(2, 10)
    m.eval()
    m.reset_state()
    first = m.forward(xs, ts)
    m.reset_state()
    assert m.forward(xs, ts) == first  # no dropout: deterministic
    m.train()
    m.reset_state()
    assert m.forward(xs, ts) != first
    assert m.eval() is m and not m.training


class _Figures(Callback):
    """Puts a given figure per epoch into the epoch log as 'val'."""

    def __init__(self, figures):
        self.figures = figures

    def on_epoch_end(self, loop):
        loop.epoch_log["val"] = self.figures[loop.current_epoch - 1]


def test_early_stopping_and_lr_schedule_follow_the_monitored_figure(addition):
    from fastseq.callbacks import EarlyStopping, LRSchedule
    _, trainer = seq2seq_run(addition)
    schedule, stop = LRSchedule("val", 0.5), EarlyStopping("val", patience=2)
    trainer.callbacks += [_Figures([3.0, 2.0, 2.5, 2.0, 1.0, 0.5]), schedule, stop]
    trainer.fit(addition.x_train, addition.t_train, max_epoch=6, batch_size=256)
    assert trainer.current_epoch == 4 and trainer.stop_reason.startswith("early stopping")
    assert trainer.optimizer.lr == pytest.approx(1e-2 / 4)  # halved after epochs 3 and 4
    state = trainer.state_dict()["loop"]["callbacks"]
    assert state["lr_schedule"] == {"best": 2.0, "bad_epochs": 0}
    assert state["early_stopping"]["bad_epochs"] == 2


def test_higher_is_better_and_the_schedule_waits_its_patience(addition):
    """An accuracy (higher is better; a tie is not better): the rate falls after 2 epochs in a
    row without a better figure, the count starts again; early stopping after 3."""
    from fastseq.callbacks import EarlyStopping, LRSchedule, SaveBest
    _, trainer = seq2seq_run(addition)
    saved = []
    best = SaveBest("val", lambda loop: saved.append(loop.current_epoch), higher=True)
    schedule = LRSchedule("val", 0.5, higher=True, patience=2)
    stop = EarlyStopping("val", patience=3, higher=True)
    trainer.callbacks += [_Figures([0.1, 0.5, 0.5, 0.4, 0.6, 0.6, 0.6, 0.6, 0.9]), best,
                          schedule, stop]
    trainer.fit(addition.x_train, addition.t_train, max_epoch=9, batch_size=256)
    assert saved == [1, 2, 5]
    assert trainer.current_epoch == 8 and stop.stopped()
    assert trainer.optimizer.lr == pytest.approx(1e-2 / 4)  # after epochs 4 and 7
    assert schedule.state_dict() == {"best": 0.6, "bad_epochs": 1}
