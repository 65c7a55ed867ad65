"""fastseq.load rebuilds saved models; python -m fastseq.generate answers and generates with them;
refusals (mismatched metadata, non-finite weights, bad arguments) are one clear line."""
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import fastseq
from fastseq import Adam, PeekySeq2seq, Trainer
from fastseq.datasets import sequence
from fastseq.generate import main
from fastseq.files import FastseqFileError, read_npz, write_npz
from fastseq.models import REGISTRY

WORDS = ["<eos>", "the", "cat", "sat", "on", "mat", "N", "<unk>", "$", "a", "dog", "ran"]


def seq2seq_meta(vocab, reverse):
    return {"chars": [vocab.id_to_char[i] for i in range(len(vocab))],
            "question_width": vocab.question_width, "answer_width": vocab.answer_width,
            "reverse": reverse}


@pytest.fixture(scope="module")
def addition_vocab():
    lines = sequence.generate_addition(40, seed=5) + ["71+118 _189 "]
    return sequence.build(*sequence.parse_lines(lines), seed=None)


@pytest.fixture(scope="module")
def trained_addition(tmp_path_factory, addition_vocab):
    """A PeekySeq2seq (reversed input) that has learnt 41 sums by heart, 71+118 among them."""
    d = addition_vocab
    x = np.concatenate([d.x_train, d.x_test])[:, ::-1].copy()
    t = np.concatenate([d.t_train, d.t_test])
    m = PeekySeq2seq(len(d.vocab), 16, 64, seed=0)
    Trainer(m, Adam(0.02), seed=0, progress=False).fit(x, t, 80, 41)
    path = tmp_path_factory.mktemp("run") / "model.npz"
    m.save_params(path, meta=seq2seq_meta(d.vocab, True))
    return path


def lm_file(tmp_path, name="rnnlm", **meta):
    cls = REGISTRY[name].cls
    m = cls(len(WORDS), 8, 8, seed=0)
    path = tmp_path / "lm.npz"
    m.save_params(path, meta={"vocab": WORDS, **meta})
    return m, path


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_model_is_rebuilt(tmp_path, name, addition_vocab):
    entry = REGISTRY[name]
    v = addition_vocab.vocab
    V = len(v) if entry.task == "seq2seq" else len(WORDS)
    m = entry.cls(V, 8, 8, seed=3)
    meta = seq2seq_meta(v, False) if entry.task == "seq2seq" else {"vocab": WORDS}
    m.save_params(tmp_path / "m.npz", meta=meta)
    saved = fastseq.load(tmp_path / "m.npz")
    assert type(saved.model) is entry.cls and saved.task == entry.task
    assert saved.model.config() == m.config()
    assert all(np.array_equal(a, b) for a, b in zip(saved.model.params, m.params))
    if entry.task == "seq2seq":
        assert saved.vocab.char_to_id == v.char_to_id and saved.reverse is False
        assert saved.vocab.question_width == 7 and saved.vocab.answer_width == 5
    else:
        assert saved.vocab == WORDS


def test_checkpoint_file_is_rebuilt(tmp_path, addition_vocab):
    """A checkpoint.npz (parameters under param/, optimiser state beside them, the run's
    configuration and vocabulary in its metadata) gives the same model as model.npz."""
    v = addition_vocab.vocab
    m = PeekySeq2seq(len(v), 8, 12, seed=1)
    arrays = {f"param/{n}": p for n, p in zip(m.param_names, m.params)}
    arrays.update({f"optim/m/{i}": np.zeros_like(p) for i, p in enumerate(m.params)})
    meta = {"format": "fastseq-checkpoint-1", "model_class": "PeekySeq2seq",
            "param_names": m.param_names, "model_config": m.config(),
            "config": {"model": "peeky", "reverse": True, "wordvec_size": 8, "hidden_size": 12},
            "vocabulary": seq2seq_meta(v, True)}
    write_npz(tmp_path / "checkpoint.npz", arrays, meta)
    saved = fastseq.load(tmp_path / "checkpoint.npz")
    assert saved.reverse is True and saved.model.config() == m.config()
    assert all(np.array_equal(a, b) for a, b in zip(saved.model.params, m.params))
    del meta["model_config"]
    write_npz(tmp_path / "checkpoint.npz", arrays, meta)
    with pytest.raises(FastseqFileError, match="checkpoint.npz: metadata field 'model_config' is "
                                               "missing"):
        fastseq.load(tmp_path / "checkpoint.npz")


def test_trained_model_answers_on_the_command_line(trained_addition, capsys):
    saved = fastseq.load(trained_addition)
    assert saved.answer("71+118") == ["189"]
    assert main(["--model", str(trained_addition), "--question", "71+118"]) == 0
    assert capsys.readouterr().out == "189\n"
    r = subprocess.run([sys.executable, "-m", "fastseq.generate", "--model", str(trained_addition),
                        "--question", "71+118", "--question", "71+118"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "189\n189\n" and r.stderr == ""


@pytest.mark.parametrize("argv,message", [
    (["--question", "12*3"], "outside the vocabulary"),
    (["--question", "1234+5678"], "input width is 7"),
    (["--question", "  "], "--question is empty"),
    (["--question", "1+1", "--top-k", "3"], "--top-k: for language models only"),
    (["--question", "1+1", "--start", "the"], "--start: for language models only"),
    ([], "give --question"),
])
def test_seq2seq_cli_refusals(trained_addition, capsys, argv, message):
    assert main(["--model", str(trained_addition), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastseq: ") and message in err and len(err.splitlines()) == 1


def test_language_model_cli(tmp_path, capsys):
    _, path = lm_file(tmp_path)
    assert main(["--model", str(path), "--start", "the cat", "--length", "8", "--seed", "1"]) == 0
    words = capsys.readouterr().out.split()
    assert words[:2] == ["the", "cat"] and set(words) <= set(WORDS)
    assert main(["--model", str(path), "--question", "1+1"]) == 2
    assert "--question needs a seq2seq model" in capsys.readouterr().err


def test_tiny_temperature_acts_as_greedy(tmp_path, capsys):
    _, path = lm_file(tmp_path)
    base = ["--model", str(path), "--start", "the", "--length", "12"]
    assert main(base + ["--greedy"]) == 0
    greedy = capsys.readouterr().out
    for t in ("1e-310", "1e-6", "0"):
        assert main(base + ["--temperature", t, "--seed", "3"]) == 0
        assert capsys.readouterr().out == greedy
    for t in ("nan", "inf", "-1"):
        assert main(base + ["--temperature", t]) == 2
        err = capsys.readouterr().err
        assert "temperature" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("where", ["model", "checkpoint"])
def test_non_finite_weights_refused_by_load_and_generate(tmp_path, where):
    m, path = lm_file(tmp_path)
    arrays, meta = read_npz(path)
    name = list(arrays)[-1]
    arrays[name] = arrays[name].copy()
    arrays[name][0] = np.nan
    if where == "checkpoint":
        arrays = {f"param/{k}": a for k, a in arrays.items()}
        meta = {"format": "fastseq-checkpoint-1", "model_class": "Rnnlm",
                "model_config": m.config(), "config": {}, "vocabulary": {"vocab": WORDS}}
    write_npz(path, arrays, meta)
    with pytest.raises(FastseqFileError, match=f"{name}.*non-finite"):
        fastseq.load(path)
    r = subprocess.run([sys.executable, "-m", "fastseq.generate", "--model", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and "non-finite" in r.stderr


def test_huge_vocab_size_in_metadata_refused_before_allocating(tmp_path):
    """A few-KB file whose (checksummed) metadata says vocab_size 25,000,000 is refused without
    allocating the 3+ GB such a model would take."""
    m = fastseq.Rnnlm(len(WORDS), 8, 8, seed=0)
    arrays = {n: p for n, p in zip(m.param_names, m.params)}
    path = tmp_path / "m.npz"
    write_npz(path, arrays, {"model": "Rnnlm", "vocab_source": "ptb",
                             "config": {"vocab_size": 25_000_000, "wordvec_size": 8,
                                        "hidden_size": 8}})
    assert path.stat().st_size < 10_000
    tracemalloc.start()
    try:
        with pytest.raises(FastseqFileError, match=r"vocab_size=25000000.*shape \(25000000, 8\)"):
            fastseq.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20
    write_npz(path, arrays, {"model": "Rnnlm", "vocab": WORDS, "config": {"vocab_size": 13,
                                                                         "wordvec_size": 8,
                                                                         "hidden_size": 8}})
    with pytest.raises(FastseqFileError, match="12 words but the model .Rnnlm. has vocab_size 13"):
        fastseq.load(path)


@pytest.mark.parametrize("change,message", [
    ({"model": "Transformer"}, "does not know"),
    ({"model": None}, "lm.npz: metadata field 'model' must be a string"),
    ({"config": {"vocab_size": 12, "wordvec_size": 8, "hidden_size": 8, "layers": 3}},
     "not valid for Rnnlm: .*unexpected keyword argument 'layers'"),
    ({"config": {"vocab_size": 12, "wordvec_size": 0, "hidden_size": 8}},
     "wordvec_size must be an integer >= 1, got 0"),
    ({"config": {"vocab_size": 12, "wordvec_size": 8, "hidden_size": -8}},
     "field 'config.hidden_size' = -8 is out of range"),
    ({"config": {"vocab_size": 12, "wordvec_size": 8, "hidden_size": [8]}},
     "field 'config.hidden_size' must be null or .*, got list"),
    ({"config": {"vocab_size": 12, "wordvec_size": 9, "hidden_size": 8}}, "metadata and weights"),
    ({"config": None}, "field 'config' must be a JSON object, got null"),
    ({"vocab": WORDS[:-1] + ["the"]}, "twice"),
    ({"vocab": [1, 2]}, r"field 'vocab\[0\]' must be a string of 1 to 4096 characters"),
    ({"vocab": "the cat"}, "field 'vocab' must be a list .* got str 'the cat'"),
])
def test_wrong_metadata_refused_naming_both_sides(tmp_path, change, message):
    m, path = lm_file(tmp_path)
    arrays, meta = read_npz(path)
    meta.update(change)
    write_npz(path, arrays, meta)
    with pytest.raises(FastseqFileError, match=message):
        fastseq.load(path)


def test_seq2seq_vocabulary_mismatch(tmp_path, addition_vocab):
    v = addition_vocab.vocab
    m = PeekySeq2seq(len(v), 8, 8, seed=0)
    meta = seq2seq_meta(v, True)
    meta["chars"] = meta["chars"][:-1]
    m.save_params(tmp_path / "m.npz", meta=meta)
    with pytest.raises(FastseqFileError, match=r"12 characters but the model \(PeekySeq2seq\) has "
                                               r"vocab_size 13"):
        fastseq.load(tmp_path / "m.npz")
    meta = seq2seq_meta(v, "yes")
    m.save_params(tmp_path / "m.npz", meta=meta)
    with pytest.raises(FastseqFileError, match="reverse"):
        fastseq.load(tmp_path / "m.npz")


@pytest.mark.parametrize("task", ["addition", "date", "text"])
def test_a_training_run_is_rebuilt_from_model_and_checkpoint(tmp_path, task, capsys):
    """What python -m fastseq.train writes (model.npz and checkpoint.npz, seq2seq and language
    model) is rebuilt by fastseq.load and used by fastseq.generate."""
    from fastseq.train import main as train
    data = tmp_path / "data.txt"
    if task in ("addition", "date"):
        make = sequence.generate_addition if task == "addition" else sequence.generate_date
        data.write_text("\n".join(make(200, seed=3)) + "\n")
        flags = ["--hidden-size", "8", "--wordvec-size", "4", "--batch-size", "32"]
    else:
        data.write_text("the cat sat on the mat\na dog ran on the mat\n" * 600)
        flags = ["--model", "rnnlm", "--hidden-size", "8", "--wordvec-size", "8"]
    out = tmp_path / "run"
    assert train(["--task", task, "--data", str(data), "--epochs", "1", "--no-progress",
                  "--out", str(out), *flags]) == 0
    a, b = fastseq.load(out / "model.npz"), fastseq.load(out / "checkpoint.npz")
    assert type(a.model) is type(b.model) and a.model.config() == b.model.config()
    assert all(np.array_equal(x, y) for x, y in zip(a.model.params, b.model.params))
    capsys.readouterr()
    if task != "text":
        assert a.reverse is True and b.reverse is True
        assert a.vocab.char_to_id == b.vocab.char_to_id
        q = "1+2" if task == "addition" else "May 31, 1986"
        assert main(["--model", str(out / "checkpoint.npz"), "--question", q]) == 0
        assert capsys.readouterr().out.strip() == a.answer(q)[0]
    else:
        assert a.vocab == b.vocab and a.vocab[2:4] == ["the", "cat"]
        assert main(["--model", str(out / "checkpoint.npz"), "--start", "the cat", "--length", "5",
                     "--seed", "0"]) == 0
        assert capsys.readouterr().out.split()[:2] == ["the", "cat"]
