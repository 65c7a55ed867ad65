"""A language-model corpus from any UTF-8 text file: words split on whitespace, '<eos>' after
each line; the last 10% of the lines are held out (5% validation, 5% test)."""
import numpy as np

from .sequence import read_text  # regular files only, bounded, BOM dropped

UNK, EOS = "<unk>", "<eos>"


def load_text_corpus(path):
    """((train, val, test) word-id arrays (int32), words): ids are given in order of first
    appearance in the training lines, after <unk> (0) and <eos> (1); words seen only in the
    held-out lines become <unk>. ValueError when too few lines to hold any out (< 20)."""
    lines = read_text(path).splitlines()
    n = len(lines)
    cut1, cut2 = n - n // 10, n - n // 20  # [0, cut1) train, [cut1, cut2) val, [cut2, n) test
    if cut1 < 1 or cut2 - cut1 < 1 or n - cut2 < 1:
        raise ValueError(f"{path}: {n} lines are too few to hold out validation and test lines "
                         f"(needs >= 20)")
    word_to_id = {UNK: 0, EOS: 1}
    splits = []
    for part, grow in ((lines[:cut1], True), (lines[cut1:cut2], False), (lines[cut2:], False)):
        ids = []
        for line in part:
            for w in line.split() + [EOS]:
                i = word_to_id.get(w)
                if i is None:
                    i = len(word_to_id) if grow else 0
                    if grow:
                        word_to_id[w] = i
                ids.append(i)
        splits.append(np.array(ids, dtype=np.int32))
    words = sorted(word_to_id, key=word_to_id.get)
    return splits, words


def words_to_text(words):
    """Words joined by spaces, with <eos> as a line break."""
    lines = [[]]
    for w in words:
        if w == EOS:
            lines.append([])
        else:
            lines[-1].append(w)
    return "\n".join(map(" ".join, lines))
