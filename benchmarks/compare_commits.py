"""Did a change make anything slower? The pytest-benchmark suite of an older commit against this
checkout, in alternating rounds on the same machine, one table of medians and ratios.

    python -m benchmarks.compare_commits 6561929                # older commit vs this checkout
    python -m benchmarks.compare_commits 6561929 --rounds 5 -k "eval or train_step"
    python -m benchmarks.compare_commits 6561929 -k rnnlm --old-checkout ../old   # built already

The older commit is checked out into a git worktree beside this one (removed afterwards) and its
extensions are built there; both sides run `pytest benchmarks/test_bench_*.py --benchmark-only`
in turn (benchmarks.common.take_turns: old-new, new-old, ...), so machine drift hits both
alike. A benchmark present on one side only is listed with one figure. Ratios:
old time / new time, above 1 the current code is faster: the median of the per-round ratios,
with their quartiles (4 rounds or more).
"""
import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, take_turns


def run(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, check=True, **kw)


def checkout(commit, where):
    run(["git", "worktree", "add", "--detach", "-q", str(where), commit], cwd=ROOT)
    shared = ROOT.parent / "shared"
    if shared.exists() and not (where.parent / "shared").exists():
        (where.parent / "shared").symlink_to(shared)  # the benchmarks read ../shared/data
    run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=where,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_round(root, keyword, out):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={out}"] + sorted(str(p) for p in root.glob("benchmarks/test_bench_*.py"))
    if keyword:
        cmd += ["-k", keyword]
    env = dict(os.environ, PYTHONPATH=str(root))
    subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not Path(out).exists():
        raise SystemExit(f"compare_commits: the benchmarks of {root} produced no results")
    with open(out) as f:
        return {b["fullname"].split("::", 1)[1]: b["stats"]["median"] for b in json.load(f)["benchmarks"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commit", help="the older commit (anything git rev-parse accepts)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k filter")
    ap.add_argument("--old-checkout", type=Path, default=None,
                    help="an existing built checkout of the older commit to run instead of a "
                         "fresh worktree (saves the build when the run is split with -k)")
    args = ap.parse_args(argv)
    sha = run(["git", "rev-parse", "--short", args.commit], cwd=ROOT, capture_output=True,
              text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="fastseq-compare-", dir=ROOT.parent))
    old_root = tmp / sha
    if args.old_checkout is not None:
        old_root = args.old_checkout.resolve()
        head = run(["git", "rev-parse", "--short", "HEAD"], cwd=old_root, capture_output=True,
                   text=True).stdout.strip()
        if head != sha:
            raise SystemExit(f"compare_commits: {old_root} is at {head}, not {sha}")
    try:
        if args.old_checkout is None:
            checkout(sha, old_root)
        roots, runs = {"old": old_root, "new": ROOT}, itertools.count()
        rounds = take_turns(
            lambda side: bench_round(roots[side], args.keyword, tmp / f"{side}{next(runs)}.json"),
            roots, args.rounds, pause=0,
            after_round=lambda r: print(f"round {r + 1}/{args.rounds} done", file=sys.stderr,
                                        flush=True))
        times = {"old": {}, "new": {}}
        for side, results in rounds.items():
            for res in results:
                for name, median in res.items():
                    times[side].setdefault(name, []).append(median)
    finally:
        if args.old_checkout is None:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_root)], cwd=ROOT,
                           stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"| benchmark | {sha} (ms) | this checkout (ms) | {sha} / this | quartiles |")
    print("|---|---|---|---|---|")
    for name in sorted(set(times["old"]) | set(times["new"])):
        old = statistics.median(times["old"][name]) * 1e3 if name in times["old"] else None
        new = statistics.median(times["new"][name]) * 1e3 if name in times["new"] else None
        ratio = spread = "-"
        if old and new:  # per-round ratios: the two sides of a round ran back to back
            per_round = [o / n for o, n in zip(times["old"][name], times["new"][name])]
            ratio = f"{statistics.median(per_round):.2f}x"
            if len(per_round) >= 4:
                q = statistics.quantiles(per_round, n=4)
                spread = f"{q[0]:.2f}-{q[2]:.2f}x"
        cells = ["-" if v is None else f"{v:.1f}" for v in (old, new)]
        print(f"| {name} | {cells[0]} | {cells[1]} | {ratio} | {spread} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
