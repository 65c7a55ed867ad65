"""Data sets: the Penn Treebank (ptb) and the textbook's toy sequence tasks (sequence)."""
