"""The date-format task: the seeded generator, the textbook's date.txt, pad-aware reversal."""
import datetime

import numpy as np

from fastseq.datasets.sequence import (generate_date, load_dataset, pad_id, parse_lines,
                                       reverse_padded, true_lengths)

from conftest import TEXTBOOK_DATA, needs_textbook

FORMATS = ["%m/%d/%y", "%b %d, %Y", "%B %d, %Y", "%A, %B %d, %Y"]


def parse_question(q):
    for fmt in FORMATS:
        try:
            return datetime.datetime.strptime(q.strip(), fmt).date()
        except ValueError:
            pass
    raise AssertionError(f"unparsable question {q!r}")


def test_generator_is_seeded_and_correct():
    lines = generate_date(400, seed=3)
    assert lines == generate_date(400, seed=3)
    assert lines != generate_date(400, seed=4)
    questions, answers = parse_lines(lines)
    assert {len(q) for q in questions} == {29} and {len(a) for a in answers} == {11}
    shapes = set()
    for q, a in zip(questions, answers):
        assert parse_question(q).isoformat() == a[1:]
        shapes.add("/" if "/" in q else ("day" if q.count(",") == 2 else "month"))
        assert q.islower() or q.isupper() or "/" in q or q.strip() == q.strip().title()
    assert shapes == {"/", "day", "month"}


def test_generated_default_data_when_no_file():
    d = load_dataset("date.txt")
    assert d.source == "generated date.txt"
    assert d.x_train.shape == (45000, 29) and d.t_train.shape == (45000, 11)
    assert d.x_test.shape == (5000, 29)
    assert pad_id(d.vocab) == d.vocab.char_to_id[" "]


@needs_textbook("date.txt")
def test_textbook_date_file():
    d = load_dataset(str(TEXTBOOK_DATA / "date.txt"))
    assert d.x_train.shape == (45000, 29) and d.t_test.shape == (5000, 11)
    assert len(d.vocab) == 59
    assert d.vocab.decode(d.t_train[0])[0] == "_"


def test_reverse_padded():
    ids = np.array([[1, 2, 3, 0, 0], [4, 0, 5, 0, 0], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(reverse_padded(ids, 0),
                                  [[3, 2, 1, 0, 0], [5, 0, 4, 0, 0], [5, 4, 3, 2, 1], [0] * 5])
    np.testing.assert_array_equal(reverse_padded(ids, None), ids[:, ::-1])
    np.testing.assert_array_equal(true_lengths(ids, 0), [3, 3, 5, 1])


def test_train_cli_date_task_with_attention_and_beam(tmp_path, capsys):
    """--task date: AttentionSeq2seq by default, padding-aware (pad id from the data), greedy and
    beam accuracy per epoch, attention.png; the saved model answers through fastseq.generate."""
    import json

    import pytest

    import fastseq
    from fastseq.generate import main as generate
    from fastseq.train import main
    data = tmp_path / "date-small.txt"
    data.write_text("\n".join(generate_date(1500, seed=7)) + "\n")
    out = tmp_path / "run"
    assert main(["--task", "date", "--data", str(data), "--epochs", "1", "--hidden-size", "16",
                 "--wordvec-size", "8", "--batch-size", "100", "--beam", "3", "--out", str(out),
                 "--no-progress", "--mask"]) == 0
    assert "beam 3" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["model"] == "attention" and m["config"]["beam"] == 3
    e = m["epochs"][0]
    assert 0 <= e["test_accuracy"] <= 1 and 0 <= e["beam3_accuracy"] <= 1
    saved = fastseq.load(out / "model.npz")
    assert type(saved.model).__name__ == "AttentionSeq2seq"
    assert saved.model.pad_id == saved.vocab.char_to_id[" "] and saved.reverse is True
    assert generate(["--model", str(out / "model.npz"), "--question", "June 3, 1999",
                     "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.strip()) <= 10
    pytest.importorskip("matplotlib")
    assert (out / "attention.png").stat().st_size > 1000
    # the date task's default: the textbook's setting, pads are data
    out2 = tmp_path / "run2"
    assert main(["--task", "date", "--data", str(data), "--epochs", "1", "--hidden-size", "8",
                 "--wordvec-size", "4", "--batch-size", "200", "--out", str(out2),
                 "--no-progress"]) == 0
    assert fastseq.load(out2 / "model.npz").model.pad_id is None
