"""Draw several runs' test-accuracy (or perplexity) curves from their metrics.json in one PNG.

    python -m benchmarks.plot_runs OUT.png LABEL=runs/a/metrics.json LABEL=runs/b/metrics.json ...
"""
import json
import sys

from fastseq.plot import plot_curves


def main(argv):
    out, specs = argv[0], argv[1:]
    curves, key = {}, "test_accuracy"
    for spec in specs:
        label, path = spec.split("=", 1)
        epochs = json.load(open(path))["epochs"]
        key = "test_accuracy" if "test_accuracy" in epochs[0] else "val_perplexity"
        scale = 100 if key == "test_accuracy" else 1
        curves[label] = [e[key] * scale for e in epochs]
    ylabel = "test accuracy (%)" if key == "test_accuracy" else "validation perplexity"
    plot_curves(curves, "epoch", ylabel, out, ylim=(0, 100) if key == "test_accuracy" else None)
    for label, ys in curves.items():
        print(f"{label}: final {ys[-1]:.2f}, best {max(ys) if key == 'test_accuracy' else min(ys):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
