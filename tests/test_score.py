"""python -m fastseq.score: a converted file scored against references (several per source)."""
import json

import pytest

from fastseq.score import main


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_bytes(text.encode())
    return str(p)


def test_scores_against_the_closest_reference(tmp_path, capsys):
    refs = write(tmp_path, "refs", "ab\tA B\tA P\ncd\tK D\nef\tE F\n")
    preds = write(tmp_path, "preds", "ef\tE F X\t-1.5\nab\tA P\ncd\tK T\ncd\tK D\n")  # nbest: first
    out = tmp_path / "s.json"
    assert main([refs, preds, "--tokens", "space", "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    # ab right (second reference); cd one substitution (first line of its n-best); ef one insertion
    assert s["n"] == 3 and s["errors"] == 2 and s["ref_tokens"] == 6
    assert s["wer"] == pytest.approx(2 / 3) and s["ter"] == pytest.approx(2 / 6)
    assert "WER 66.67%" in capsys.readouterr().out


def test_characters_by_default(tmp_path):
    refs = write(tmp_path, "refs", "\ufeffx\tabc\r\n")
    preds = write(tmp_path, "preds", "x\tabd\n")
    out = tmp_path / "s.json"
    assert main([refs, preds, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ter"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("preds_text, message", [
    ("ab\tA B\n", "no prediction for 1 of the 2 sources"),
    ("ab A B\ncd\tK\n", "line 1: no tab"),
    ("ab\tA\ncd\t\xff\n", None),
])
def test_bad_prediction_files_are_one_line_errors(tmp_path, capsys, preds_text, message):
    refs = write(tmp_path, "refs", "ab\tA B\ncd\tK D\n")
    p = tmp_path / "preds"
    p.write_bytes(preds_text.encode("latin-1") if message is None else preds_text.encode())
    assert main([refs, str(p), "--tokens", "space"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastseq: ") and "\n" not in err
    assert (message or "is not UTF-8") in err


def test_unknown_token_kind_and_bad_reference_line(tmp_path, capsys):
    refs = write(tmp_path, "refs", "ab\tA B\nno tab\n")
    preds = write(tmp_path, "preds", "ab\tA B\n")
    with pytest.raises(SystemExit) as e:
        main([refs, preds, "--tokens", "word"])
    assert e.value.code == 2
    assert "argument --tokens: expected one of char, space, got 'word'" in capsys.readouterr().err
    assert main([refs, preds]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastseq: {refs}, line 2: no tab") and "\n" not in err


def test_a_bad_reference_line_names_no_flag_score_lacks(tmp_path, capsys):
    refs = write(tmp_path, "refs", "ab\tA B\ncd\n")
    preds = write(tmp_path, "preds", "ab\tA B\ncd\tK\n")
    assert main([refs, preds, "--tokens", "space"]) == 2
    err = capsys.readouterr().err
    assert "line 2: no tab" in err and "--skip-bad-lines" not in err
