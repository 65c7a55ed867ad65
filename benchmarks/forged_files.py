"""Forged fastseq files at the metadata limits: how long each worst case takes to load or to be
refused, and the memory it costs.

    python -m benchmarks.forged_files [--rounds 3]

Every file carries a valid checksum (anyone can compute one). The promise measured (see
fastseq.files and docs/RELIABILITY.md): any envelope under the metadata limit loads or is refused
in under 2 s and under 500 MB above the process's baseline. Each case is read in a fresh child
process (fastseq imported first, then the baseline taken): seconds are the median over the
rounds, memory the largest peak RSS above that baseline (read from Linux's /proc). The envelope cases go through
``fastseq.files.read_npz``; the checkpoint cases through ``--resume``'s loader
(``fastseq.run.load_resume``: the file, then the checkpoint's and the run's schemas).
"""
import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, machine_line

SECONDS, MEGABYTES = 2.0, 500  # the bounds each case must stay under

CHILD = """
import sys, time
from fastseq.files import FastseqFileError, read_npz
from fastseq.run import RunError, load_resume

def kb(field):  # this process's own figures (ru_maxrss would count the parent's before exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
kind, path = sys.argv[1:]
before = kb("VmRSS:")
t0 = time.perf_counter()
try:
    read_npz(path) if kind == "file" else load_resume(path)
    outcome = "loaded"
except (FastseqFileError, RunError):
    outcome = "refused"
seconds = time.perf_counter() - t0
print(seconds, (kb("VmHWM:") - before) / 1024, outcome)
"""


# ---------------------------------------------------------------------------------------------
# the cases

def envelope_cases(limits):
    """{case: envelope bytes}: {"meta": {"x": value}} with the value at the limits."""
    head = b'{"format":"fastseq.npz","version":2,"arrays":[],"meta":{"x":'
    room = limits.max_envelope_bytes - len(head) - 2
    n = limits.max_values - 10  # under the value limit, with room for the envelope's own

    def keys(count):
        return b"{" + b",".join(b'"%x":0' % i for i in range(count)) + b"}"
    values = {
        "one long string": b'"' + b"x" * (room - 2) + b'"',
        "one long string of escapes": b'"' + b"\\n" * ((room - 2) // 2) + b'"',
        "millions of tiny values (over the value limit)":
            b"[" + b",".join([b"0"] * ((room - 1) // 2)) + b"]",
        "as many tiny values as allowed": b"[" + b",".join([b"0"] * n) + b"]",
        "as many empty objects as allowed": b"[" + b",".join([b"{}"] * (n // 2)) + b"]",
        "as many distinct keys as allowed": keys(limits.max_keys - 10),
        "a million distinct keys (over the key limit)": keys(n),
        "deep nesting": b"[" * room,
        "one long number": b"1" * room,
    }
    return {case: head + v + b"}}" for case, v in values.items()}


def forge(path, text):
    """A fastseq file whose envelope is ``text`` (no arrays), with a valid checksum."""
    import hashlib
    import zipfile

    import numpy as np

    def npy(a):
        b = io.BytesIO()
        np.lib.format.write_array(b, a, allow_pickle=False)
        return b.getvalue()

    digest = hashlib.sha256(text).hexdigest().encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("__fastseq__.npy", npy(np.frombuffer(text, np.uint8)))
        z.writestr("__fastseq_sha256__.npy", npy(np.frombuffer(digest, np.uint8)))


def finished_run(folder):
    """A one-epoch addition run (tiny sizes) in ``folder``: its checkpoint is the one forged."""
    from fastseq.datasets.sequence import generate_addition
    from fastseq.train import main
    data = folder / "add.txt"
    data.write_text("\n".join(generate_addition(600, seed=5)) + "\n")
    out = folder / "run"
    args = ["--data", str(data), "--model", "peeky", "--epochs", "1", "--batch-size", "32",
            "--hidden-size", "8", "--wordvec-size", "4", "--seed", "7", "--engine", "numpy",
            "--out", str(out), "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if main(args) != 0:
            raise SystemExit("forged_files: the small training run failed")
    return out


def checkpoint_cases(folder, limits):
    """{case: run folder}: the run's checkpoint with its loss curve (or its callbacks' state)
    grown to the value limit, written by the library (a valid checksum)."""
    from fastseq import files
    run = finished_run(folder)
    arrays, meta = files.load_checkpoint(run / "checkpoint.npz")
    used = len(json.dumps(meta)) // 4  # well above the values the metadata holds
    n = limits.max_values - used

    def grown(name, change):
        m = json.loads(json.dumps(meta))
        change(m)
        target = folder / name
        target.mkdir()
        files.write_npz(target / "checkpoint.npz", arrays, m)
        return target

    def curve(m):
        m["state"]["loop"]["loss_list"] = [0.5] * n

    def curve_without_epoch(m):
        curve(m)
        del m["state"]["loop"]["epoch"]

    def callbacks(m):
        m["state"]["loop"]["callbacks"] = {f"{i:x}": 0 for i in range(limits.max_keys - 1000)}

    return {"checkpoint: a loss curve at the value limit": grown("curve", curve),
            "checkpoint: that curve, a field missing": grown("missing", curve_without_epoch),
            "checkpoint: as many callback states as keys allowed":
                grown("callbacks", callbacks)}


# ---------------------------------------------------------------------------------------------
# measuring

def measure(kind, path):
    """(seconds, MB above the baseline, outcome) of one load in a fresh child process."""
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"forged_files: the child failed on {path}:\n{r.stderr}")
    seconds, mb, outcome = r.stdout.split()
    return float(seconds), float(mb), outcome


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="loads of each case (default 3)")
    args = p.parse_args(argv)
    from fastseq.files import DEFAULT_LIMITS as limits

    with tempfile.TemporaryDirectory(prefix="fastseq-forged-") as tmp:
        folder = Path(tmp)
        cases = {}
        for i, (case, text) in enumerate(envelope_cases(limits).items()):
            forge(folder / f"e{i}.npz", text)
            cases[case] = ("file", folder / f"e{i}.npz")
        cases.update({case: ("run", run) for case, run in checkpoint_cases(folder, limits).items()})
        print(machine_line())
        print(f"limits: {limits.max_envelope_bytes >> 20} MB of metadata, {limits.max_values:,} "
              f"values, {limits.max_keys:,} object keys, depth {limits.max_depth}; "
              f"{args.rounds} rounds\n")
        print("| case | outcome | seconds | peak RSS above baseline (MB) |")
        print("|---|---|---:|---:|")
        over = []
        for case, (kind, path) in cases.items():
            runs = [measure(kind, path) for _ in range(args.rounds)]
            seconds = statistics.median(s for s, _, _ in runs)
            mb = max(m for _, m, _ in runs)
            print(f"| {case} | {runs[0][2]} | {seconds:.2f} | {mb:.0f} |", flush=True)
            if seconds >= SECONDS or mb >= MEGABYTES:
                over.append(case)
    if over:
        print(f"\nover {SECONDS} s or {MEGABYTES} MB: {', '.join(over)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
