"""Smoke test of benchmarks.bucketing at a tiny size: every kind of batch trains."""
import numpy as np
import pytest

from benchmarks.bucketing import KINDS, measure


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_batch_trains(tmp_path, kind):
    rng = np.random.RandomState(0)
    words = ["".join(rng.choice(list("abcdef"), rng.randint(2, 9))) for _ in range(300)]
    path = tmp_path / "d.tsv"
    path.write_text("".join(f"{w}\t{' '.join(w)}\n" for w in words))
    m = measure(str(path), "space", kind, batches=2, bs=16)
    assert m["kind"] == kind and m["epoch_seconds"] > 0 and np.isfinite(m["loss"])
