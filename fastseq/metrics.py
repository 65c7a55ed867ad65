"""Scores of transduction output against one or more references per source.

    score(["AH B", ...], [["AH B", "AA B"], ...])    # strings: compared character by character
    score([["AH", "B"], ...], [[["AH", "B"]], ...])  # token lists: compared token by token

A prediction is right when it equals ANY of its references (exact match; word error rate, WER, is
the fraction of sources that are not right). The token error rate (TER: phone error rate, PER, for
phones; character error rate, CER, for characters) is

    TER = sum_n d(p_n, r*_n) / sum_n |r*_n|,   r*_n = the reference of source n closest to p_n

with d the Levenshtein distance (insertions, deletions and substitutions cost 1; computed by
rapidfuzz), and among equally close references the first one given.
"""
from rapidfuzz.distance import Levenshtein


def closest(prediction, references):
    """(distance, length) of the reference closest to ``prediction`` (the first of equals)."""
    best = None
    for ref in references:
        d = Levenshtein.distance(prediction, ref)
        if best is None or d < best[0]:
            best = (d, len(ref))
            if d == 0:
                break
    return best


def score(predictions, references):
    """{'n', 'accuracy', 'wer', 'ter', 'errors', 'ref_tokens'} of predictions (N sequences)
    against references (N non-empty lists of sequences); a sequence is a str (its characters)
    or a list of tokens."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("nothing to score (no predictions)")
    right = errors = ref_tokens = 0
    for n, (p, refs) in enumerate(zip(predictions, references)):
        if not refs:
            raise ValueError(f"source {n} has no reference")
        d, length = closest(p, refs)
        right += d == 0
        errors += d
        ref_tokens += length
    N = len(predictions)
    return {"n": N, "accuracy": right / N, "wer": (N - right) / N,
            "ter": errors / ref_tokens if ref_tokens else float(errors > 0),
            "errors": errors, "ref_tokens": ref_tokens}
