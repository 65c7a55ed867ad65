"""fastseq.metrics: exact match, WER and token error rate against several references, on cases
computed by hand."""
import pytest

from fastseq.metrics import closest, score


def test_one_reference_each_by_hand():
    # "abc" vs "abd": 1 substitution; "xy" vs "xy": right; "" vs "pq": 2 deletions
    s = score(["abd", "xy", ""], [["abc"], ["xy"], ["pq"]])
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(1 / 3)
    assert s["wer"] == pytest.approx(2 / 3)
    assert (s["errors"], s["ref_tokens"]) == (3, 7) and s["ter"] == pytest.approx(3 / 7)


def test_any_reference_counts_and_the_closest_one_is_charged():
    preds = [["AH", "B"], ["K", "AE", "T"], ["D", "AO", "G", "Z"]]
    refs = [[["AA", "B"], ["AH", "B"]],                 # the second is exact: right, 0 errors
            [["K", "AA", "T", "S"], ["K", "AH", "T"]],  # 2 errors vs 4 tokens, 1 vs 3: the 2nd
            [["D", "AO", "G"], ["D", "AA", "G", "Z"]]]  # 1 vs 3 and 1 vs 4: the first of equals
    s = score(preds, refs)
    assert s["accuracy"] == pytest.approx(1 / 3) and s["wer"] == pytest.approx(2 / 3)
    assert s["errors"] == 0 + 1 + 1
    assert s["ref_tokens"] == 2 + 3 + 3
    assert s["ter"] == pytest.approx(2 / 8)


def test_tokens_are_compared_as_wholes_not_characters():
    # as strings "AH B" vs "AA B" differ in one character of four; as tokens in one of two
    assert score(["AH B"], [["AA B"]])["ter"] == pytest.approx(1 / 4)
    assert score([["AH", "B"]], [[["AA", "B"]]])["ter"] == pytest.approx(1 / 2)


def test_insertions_can_exceed_the_reference_length():
    s = score(["abcdef"], [["ab"]])
    assert s["errors"] == 4 and s["ter"] == pytest.approx(2.0) and s["wer"] == 1.0


def test_closest_and_errors():
    assert closest("kitten", ["sitting", "kitchen"]) == (2, 7)
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        score(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="source 0 has no reference"):
        score(["a"], [[]])
    with pytest.raises(ValueError, match="nothing to score"):
        score([], [])
