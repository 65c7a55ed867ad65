"""The timing harness itself (benchmarks/common.py): the order of turns and when rounds stop."""
from benchmarks.common import ratio_stats, take_turns


def test_turns_rotate_from_round_to_round():
    calls = []
    out = take_turns(lambda n: calls.append(n) or len(calls), "abc", 4, pause=0)
    assert "".join(calls) == "abc" + "bca" + "cab" + "abc"
    assert out == {"a": [1, 6, 8, 10], "b": [2, 4, 9, 11], "c": [3, 5, 7, 12]}


def test_budget_ends_after_the_round_under_way():
    rounds = []
    out = take_turns(lambda n: n, ["x", "y"], 5, pause=0, budget=-1.0, after_round=rounds.append)
    assert out == {"x": ["x"], "y": ["y"]} and rounds == [0]


def test_ratio_stats_are_per_round():
    q1, med, q3, lo, hi = ratio_stats([2.0, 4.0, 9.0], [1.0, 1.0, 3.0])
    assert (lo, med, hi) == (2.0, 3.0, 4.0) and q1 == 2.5 and q3 == 3.5
