"""pytest benchmarks/ --benchmark-only: word-by-word text generation, 100 words from an Rnnlm of
the PTB size (V=10000, D=H=100), per engine. (An idle CPU does it in well under 50 ms.)"""
import fastseq


def test_generate_100_words(benchmark, engine):
    m = fastseq.Rnnlm(10000, 100, 100, seed=0)
    m.generate(1, sample_size=5, seed=0)  # warm up

    def run():
        m.reset_state()
        return m.generate(1, skip_ids=[2, 3], sample_size=100, seed=0)

    benchmark.group = "generate-100-words"
    out = benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)
    assert len(out) == 100
