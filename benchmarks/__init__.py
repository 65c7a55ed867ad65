"""fastseq's benchmarks, run from the repository root: ``python -m benchmarks.NAME --help``;
``pytest benchmarks/ --benchmark-only`` for the per-engine pytest-benchmark suite."""
