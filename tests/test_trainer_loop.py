"""The one training loop under Trainer and RnnlmTrainer: the textbook API, hooks, stopping and
continuing mid-epoch, and checkpoint save/restore in one process."""
import numpy as np
import pytest

from fastseq import SGD, Adam, BetterRnnlm, PeekySeq2seq, RnnlmTrainer, Trainer, checkpoint, files
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


def test_hooks_see_every_iteration_and_epoch(addition):
    _, trainer = seq2seq_run(addition)
    events = []
    trainer.hooks.append(lambda loop, e: events.append((e, loop.total_iters)))
    trainer.fit(addition.x_train, addition.t_train, max_epoch=2, batch_size=128)
    per_epoch = len(addition.x_train) // 128
    assert [e for e, _ in events].count("epoch") == 2
    assert [n for e, n in events if e == "epoch"] == [per_epoch, 2 * per_epoch]
    assert [n for e, n in events if e == "iteration"] == \
        [n for n in range(1, 2 * per_epoch) if n != per_epoch]


def _stop_at(n):
    def hook(loop, event):
        if loop.total_iters == n:
            loop.stop_reason = "test"
    return hook


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
    trainer.hooks.append(_stop_at(stop))
    fit(trainer, 3)
    assert trainer.total_iters == stop and trainer.current_epoch == 1 and trainer.iteration > 0
    checkpoint.save(tmp_path / "c.npz", trainer, {"note": "test"})
    arrays, meta = files.load_checkpoint(tmp_path / "c.npz")
    assert meta["note"] == "test" and meta["position"]["total_iters"] == stop
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
