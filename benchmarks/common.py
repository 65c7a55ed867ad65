"""Shared by the benchmarks: the one timing harness (turns in rotating order, in one process or
in worker processes), data, the engines, and the PyTorch models compared with fastseq's."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The textbook's data files (addition.txt, date.txt, ptb/) where present: FASTSEQ_TEXTBOOK_DATA,
# else shared/data beside the repository's folder; fastseq's generated sets (and random ids for
# PTB) otherwise.
TEXTBOOK_DATA = Path(os.environ.get("FASTSEQ_TEXTBOOK_DATA") or ROOT.parent / "shared" / "data")
D, H, BATCH = 16, 128, 128  # the addition task's sizes


def textbook_file(name):
    """The textbook's file `name` where present, else the bare name (a generated set)."""
    path = TEXTBOOK_DATA / name
    return str(path) if path.exists() else name


def addition_data():
    from fastseq.datasets.sequence import load_dataset
    return load_dataset(textbook_file("addition.txt"))


# --- the timing harness --------------------------------------------------------------------------

def timed(fn, sync=None):
    """(seconds, result) of one call fn(); sync() (a device synchronisation) around it."""
    if sync:
        sync()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - t0, out


def take_turns(turn, names, rounds, pause=0.1, budget=None, after_round=None):
    """{name: [turn(name) per round]}: in each of `rounds` rounds every name takes one turn, in an
    order rotating from round to round (a, b, c; b, c, a; ...), so the slow and fast spells of a
    shared machine hit every name alike. `pause` seconds before each turn let the previous turn's
    threads go idle; after `budget` seconds, the round under way is the last; after_round(r)
    is called after round r."""
    names = list(names)
    out = {n: [] for n in names}
    t_end = None if budget is None else time.perf_counter() + budget
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if pause:
                time.sleep(pause)
            out[n].append(turn(n))
        if after_round:
            after_round(r)
        if t_end is not None and time.perf_counter() > t_end:
            break
    return out


def ratio_stats(slow, fast):
    """Quartiles (q1, median, q3), min and max of the per-round ratios slow / fast."""
    r = np.asarray(slow) / np.asarray(fast)
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return q1, med, q3, r.min(), r.max()


def ratio_line(times, slow, fast, label):
    """Median and quartiles of the per-round ratios times[slow] / times[fast]."""
    q1, med, q3, _, _ = ratio_stats(times[slow], times[fast])
    return f"{label}: {med:.2f}x (quartiles {q1:.2f}-{q3:.2f}x)", med


def set_engine(name):
    """numpy | cython | cupy; returns False (with a reason) when the engine cannot run here."""
    from fastseq import backend
    if name == "cupy":
        if not backend.gpu_available():
            return False
        backend.use("cupy")
        return True
    backend.use("numpy")
    if name == "cython" and not backend.cython_available():
        return False
    backend.use(name)
    return True


# --- side-by-side runs: one worker process per setup, taking turns, optionally under load -------

# setup name -> (environment for its worker, what it measures)
SETUPS = {
    "default": ({}, "fastseq, default engine and threads"),
    "one": ({"FASTSEQ_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
            "fastseq pinned to one thread"),
    "numpy": ({"FASTSEQ_KERNEL": "numpy", "FASTSEQ_BLOCK_EXT": "1"},
              "fastseq NumPy engine, no compiled extension importable"),
    "torch": ({}, "PyTorch CPU, default threads"),
    "old": ({}, "fastseq of --old-checkout, default engine and threads"),
}


def old_checkout_env(path):
    """env_of for start_workers / interleaved: the setup 'old' imports fastseq from the built
    checkout at path (worker_setup puts it first on sys.path), the others as SETUPS says."""
    path = str(Path(path).resolve())
    if not (Path(path) / "fastseq" / "__init__.py").exists():
        raise SystemExit(f"--old-checkout {path}: no fastseq package there")
    return lambda name: {"FASTSEQ_CHECKOUT": path} if name == "old" else SETUPS[name][0]


def setups_env(ap, args):
    """env_of for the setups of args.setups: with --old-checkout, the setup 'old' is added and
    imports fastseq from that checkout (old_checkout_env); without it, 'old' is refused."""
    if args.old_checkout:
        args.setups += [] if "old" in args.setups else ["old"]
        return old_checkout_env(args.old_checkout)
    if "old" in args.setups:
        ap.error("the setup 'old' needs --old-checkout")
    return lambda name: SETUPS[name][0]


class _NoExtension:
    """Import hook making fastseq._ext unimportable: the pure NumPy engine, as users without a
    compiler get it."""

    def find_spec(self, name, path=None, target=None):
        if name == "fastseq._ext" or name.startswith("fastseq._ext."):
            raise ImportError(f"{name} blocked: measuring the pure NumPy engine")
        return None


def checkouts_line(old):
    """'old: PATH at COMMIT; this checkout at COMMIT' for a report."""
    def commit(path):
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path,
                           capture_output=True, text=True)
        return r.stdout.strip() or "?"
    return f"old: {old} at {commit(old)}; this checkout at {commit(ROOT)}"


def worker_setup():
    """Call first thing in a worker process, before importing fastseq: FASTSEQ_CHECKOUT (the
    setup 'old') imports fastseq from that checkout."""
    if os.environ.get("FASTSEQ_BLOCK_EXT") == "1":
        sys.meta_path.insert(0, _NoExtension())
    checkout = os.environ.get("FASTSEQ_CHECKOUT")
    if checkout:
        sys.path.insert(0, checkout)
        import fastseq
        if not Path(fastseq.__file__).resolve().is_relative_to(Path(checkout)):
            raise SystemExit(f"worker: fastseq came from {fastseq.__file__}, not {checkout}")


def worker_serve(commands, ready=None):
    """Serve a worker's commands: each stdin line `NAME ARG...` calls commands[NAME](*ARGS) and
    answers its reply (a sequence, written space-separated on one line); `quit` or the end of
    stdin ends the loop. ready() (a warm-up) runs before the worker says `ready`."""
    if ready:
        ready()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] not in commands:
            raise SystemExit(f"worker: unknown command {cmd[0]!r} (known: {sorted(commands)})")
        print(*commands[cmd[0]](*cmd[1:]), flush=True)


def worker_loop(run):
    """Serve turns: read `run S` lines on stdin, run iterations for about S seconds (one at
    least) and answer with the count and the seconds they took."""
    def turn(seconds):
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < float(seconds):
            run(1)
            n += 1
        return n, f"{time.perf_counter() - t0:.9f}"

    worker_serve({"run": turn}, ready=lambda: run(5))  # 5 iterations' warm-up


def start_load(n):
    """n CPU-bound competing processes (kill them with stop_load)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(procs):
    for p in procs:
        p.kill()
        p.wait()


def start_workers(module, args, names, env_of=lambda name: SETUPS[name][0]):
    """{name: worker process} for each name (`python -m benchmarks.MODULE --worker NAME *args`
    in the environment env_of(name) on top of this one's), each started once it has said `ready`;
    names whose worker fails to start are left out (with a note). Stop them with stop_workers."""
    procs = {}
    for s in names:
        env = {**os.environ, **env_of(s)}
        p = subprocess.Popen([sys.executable, "-m", f"benchmarks.{module}", "--worker", s, *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                             cwd=ROOT)
        if p.stdout.readline().strip() == "ready":
            procs[s] = p
        else:
            p.kill()
            p.wait()
            print(f"note: setup {s!r} unavailable here", file=sys.stderr)
    if not procs:
        raise SystemExit("no setup could start (is fastseq importable? install it with "
                         "`pip install -e .` or set PYTHONPATH to the checkout)")
    return procs


def ask(proc, *command):
    """Send one command line to a worker; its reply line, split into words."""
    proc.stdin.write(" ".join(map(str, command)) + "\n")
    proc.stdin.flush()
    reply = proc.stdout.readline().split()
    if not reply:
        raise RuntimeError(f"a benchmark worker ended without answering {command!r} "
                           f"(exit status {proc.wait()}; its error output is above)")
    return reply


def stop_workers(procs):
    for p in procs.values():
        try:
            p.stdin.write("quit\n")
            p.stdin.close()
        except OSError:
            pass
        p.wait()


def interleaved(module, args, setups, rounds, turn, pause=0.1,
                env_of=lambda name: SETUPS[name][0]):
    """take_turns over worker processes, one per setup (`python -m benchmarks.MODULE --worker
    SETUP *args`, serving worker_loop in the environment env_of(SETUP)): each turn trains for
    about `turn` seconds. Returns {setup: [seconds per iteration, per round]}; setups whose
    worker fails to start are left out."""
    procs = start_workers(module, args, setups, env_of)

    def one_turn(s):
        n, seconds = ask(procs[s], "run", turn)
        return float(seconds) / int(n)

    try:
        return take_turns(one_turn, procs, rounds, pause)
    finally:
        stop_workers(procs)


def machine_line():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "unknown CPU")
    try:
        ncpu = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ncpu = os.cpu_count()
    return f"machine: {cpu}{cpu_flags()}, {ncpu} CPUs; numpy {np.__version__}"


def cpuinfo_flags():
    """The set of flags /proc/cpuinfo lists for this CPU, or None where it has no flags line."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(l.split(":", 1)[1].split()) for l in f if l.startswith("flags")),
                        None)
    except OSError:
        return None


def cpu_flags():
    """' (avx2 avx512f fma)': the vector-instruction flags /proc/cpuinfo lists for this CPU (those
    it lacks marked 'no'), for a machine line; '' where /proc/cpuinfo has no flags line."""
    flags = cpuinfo_flags()
    if flags is None:
        return ""
    words = [f if f in flags else f"no {f}" for f in ("avx2", "avx512f", "fma")]
    return f" ({', '.join(words)})"


def torch_seq2seq(torch, V, D, H, peeky):
    """The addition Seq2seq (peeky=False) or PeekySeq2seq in PyTorch: nn.Embedding, nn.LSTM and
    nn.Linear with the same sizes and data flow as fastseq's models (decoder from the encoder's
    last h with c = 0; Peeky feeds h to every decoder step and to the output layer)."""
    nn = torch.nn

    class TorchSeq2seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_embed = nn.Embedding(V, D)
            self.enc = nn.LSTM(D, H, batch_first=True)
            self.dec_embed = nn.Embedding(V, D)
            self.dec = nn.LSTM(D + H if peeky else D, H, batch_first=True)
            self.out = nn.Linear(2 * H if peeky else H, V)

        def forward(self, xs, ts_in):
            _, (h, _) = self.enc(self.enc_embed(xs))
            e = self.dec_embed(ts_in)
            hh = h[0][:, None, :].expand(-1, e.shape[1], -1)
            if peeky:
                e = torch.cat([hh, e], dim=2)
            out, _ = self.dec(e, (h, torch.zeros_like(h)))
            if peeky:
                out = torch.cat([hh, out], dim=2)
            return self.out(out)

    return TorchSeq2seq()


def torch_attention_seq2seq(torch, V, D, H, pad=None):
    """fastseq's AttentionSeq2seq in PyTorch: nn.Embedding + nn.LSTM encoder, the decoder LSTM
    started from the encoder's state at each question's true end (c = 0), dot-product attention
    (keys after a question's end masked when ``pad`` is given), nn.Linear on [context ; h].
    encode(xs) -> (hs, keys, h); step(ids, hs, keys, state) -> (scores, state)."""
    nn = torch.nn

    class TorchAttentionSeq2seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_embed = nn.Embedding(V, D)
            self.enc = nn.LSTM(D, H, batch_first=True)
            self.dec_embed = nn.Embedding(V, D)
            self.dec = nn.LSTM(D, H, batch_first=True)
            self.out = nn.Linear(2 * H, V)

        def encode(self, xs):
            hs, _ = self.enc(self.enc_embed(xs))
            if pad is None:
                return hs, None, hs[:, -1]
            lengths = (xs != pad).int().cumsum(1).argmax(1) + 1  # one past the last real id
            keys = torch.arange(xs.shape[1])[None, :] < lengths[:, None]
            return hs, keys, hs[torch.arange(len(xs)), lengths - 1]

        def step(self, ids, hs, keys, state):
            dec, state = self.dec(self.dec_embed(ids), state)
            s = torch.bmm(dec, hs.transpose(1, 2))
            if keys is not None:
                s = s.masked_fill(~keys[:, None, :], float("-inf"))
            c = torch.bmm(torch.softmax(s, dim=2), hs)
            return self.out(torch.cat([c, dec], dim=2)), state

        def forward(self, xs, ts_in):
            hs, keys, h = self.encode(xs)
            return self.step(ts_in, hs, keys, (h[None].contiguous(), torch.zeros_like(h)[None]))[0]

        @torch.no_grad()
        def generate(self, xs, start_ids, sample_size):
            hs, keys, h = self.encode(xs)
            state, ids, cols = (h[None].contiguous(), torch.zeros_like(h)[None]), start_ids, []
            for _ in range(sample_size):
                score, state = self.step(ids, hs, keys, state)
                ids = score.argmax(dim=2)
                cols.append(ids)
            return torch.cat(cols, dim=1)

    return TorchAttentionSeq2seq()


def copy_attention_weights(torch, torch_model, fastseq_model):
    """Give the PyTorch model fastseq's weights (fastseq's gate columns f, g, i, o become
    PyTorch's rows i, f, g, o; fastseq's one bias goes to bias_ih, bias_hh is zeroed)."""
    from fastseq.backend import to_cpu
    P = {n: to_cpu(p) for n, p in zip(fastseq_model.param_names, fastseq_model.params)}

    def gates(w):
        f, g, i, o = np.split(w, 4, axis=-1)
        return torch.from_numpy(np.ascontiguousarray(np.concatenate([i, f, g, o], axis=-1)))

    m = torch_model
    with torch.no_grad():
        for side, emb, lstm in (("encoder", m.enc_embed, m.enc), ("decoder", m.dec_embed, m.dec)):
            emb.weight.copy_(torch.from_numpy(P[f"{side}.embed.W"]))
            lstm.weight_ih_l0.copy_(gates(P[f"{side}.lstm.Wx"]).T)
            lstm.weight_hh_l0.copy_(gates(P[f"{side}.lstm.Wh"]).T)
            lstm.bias_ih_l0.copy_(gates(P[f"{side}.lstm.b"]))
            lstm.bias_hh_l0.zero_()
        m.out.weight.copy_(torch.from_numpy(P["decoder.affine.W"]).T)
        m.out.bias.copy_(torch.from_numpy(P["decoder.affine.b"]))
