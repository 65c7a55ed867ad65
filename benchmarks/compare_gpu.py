"""fastseq on CuPy against PyTorch + cuDNN (nn.LSTM on CUDA), same models and sizes, one run.

    python -m benchmarks.compare_gpu [--data-dir gpu_data] [--json out.json]
    python -m benchmarks.compare_gpu --device cpu --smoke      # the same code paths on a CPU
    python -m benchmarks.compare_gpu --report LOGDIR           # gpu_check.sh's one table

Parts, each stopped after --part-budget seconds (rounds in which fastseq with CUDA graphs,
fastseq eager and PyTorch take turns; the median round is reported):
  seq2seq, peeky  one addition epoch (45,000 questions, batch 128, D=16, H=128, Adam 1e-3, clip
                  5.0, reversed questions)
  better          BetterRnnlm PTB training iterations (batch 20, time 35, V=10,000, D=H=650,
                  two LSTM layers, dropout 0.5, tied weights, SGD lr 20, clip 0.25); fastseq
                  with CUDA graphs and eager; PyTorch:
                  Embedding, Dropout, a two-layer nn.LSTM (dropout 0.5 between the layers),
                  Dropout, Linear tied to the embedding
Both sides run float32 without TF32, keep the data on the device, draw their batches there and
read the loss back only at the end of a timed span. PyTorch is only a comparison here, never a
dependency of fastseq.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, TEXTBOOK_DATA, take_turns, timed, torch_seq2seq

ADD = dict(D=16, H=128, batch=128, lr=1e-3, clip=5.0)
PTB = dict(V=10000, H=650, batch=20, time=35, lr=20.0, clip=0.25, dropout=0.5)
TARGETS = {"peeky": 0.5, "better": 1.2}  # fastseq CuPy time / PyTorch time must be <= this


def find_data_dir(arg):
    for d in ([arg] if arg else []) + [ROOT / "gpu_data", TEXTBOOK_DATA]:
        if d and Path(d, "addition.txt").exists():
            return Path(d)
    return None


# ------------------------------------------------------------------------------------ devices

class Device:
    """Where both sides run: 'cuda' (fastseq on CuPy) or 'cpu' (fastseq's CPU engine)."""

    def __init__(self, name, smoke=False):
        self.name = name
        from fastseq import backend
        if name == "cuda":
            backend.use("cupy")
            import cupy
            self.cupy = cupy
        self.backend = backend
        self.torch = None
        try:
            import torch
            if name == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("torch has no CUDA device here")
            if name == "cpu" and smoke:
                torch.set_num_threads(1)  # tiny problems: threads only cost hand-off time
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            self.torch = torch
            self.tdev = torch.device(name)
        except Exception as e:  # ImportError, or a CPU-only torch on the GPU machine
            self.torch_error = f"{type(e).__name__}: {e}"

    def sync(self):
        if self.name == "cuda":
            self.cupy.cuda.Device().synchronize()
            if self.torch is not None:
                self.torch.cuda.synchronize()

    def describe(self):
        d = {"device": self.name, "fastseq": self.backend.describe()}
        if self.torch is not None:
            d["torch"] = self.torch.__version__
            if self.name == "cuda":
                d["gpu"] = self.torch.cuda.get_device_name()
                d["cudnn"] = self.torch.backends.cudnn.version()
        if self.name == "cuda":
            d["cupy"] = self.cupy.__version__
        return d


# ----------------------------------------------------------------------------- addition epoch

def addition_data(data_dir, smoke):
    from fastseq.datasets.sequence import load_dataset
    path = data_dir / "addition.txt" if data_dir else None
    data = load_dataset(str(path) if path else "addition.txt")
    x, t = data.x_train[:, ::-1].copy(), data.t_train
    if smoke:
        x, t = x[:4 * ADD["batch"]], t[:4 * ADD["batch"]]
    return x, t, len(data.vocab)


def smoke_sizes():
    """Tiny models for --smoke: the code paths run, the times mean nothing."""
    ADD.update(H=32, batch=16)
    PTB.update(H=32, V=500)


def fastseq_addition(model_name, x, t, V, graphs):
    """run() -> (seconds, mean loss) of one epoch over x, t."""
    import fastseq
    cls = fastseq.PeekySeq2seq if model_name == "peeky" else fastseq.Seq2seq
    model = cls(V, ADD["D"], ADD["H"], seed=0)
    trainer = fastseq.Trainer(model, fastseq.Adam(ADD["lr"]), seed=0, progress=False,
                              cuda_graphs=graphs)
    B = ADD["batch"]
    trainer.fit(x[:3 * B], t[:3 * B], 1, B, ADD["clip"])  # warm-up: kernels compiled, captured

    def run():
        trainer.fit(x, t, 1, B, ADD["clip"])
        return trainer.epoch_losses[-1]
    return run, trainer


def torch_addition(dev, model_name, x, t, V):
    torch = dev.torch
    from torch import nn
    torch.manual_seed(0)
    D, H, B = ADD["D"], ADD["H"], ADD["batch"]
    peeky = model_name == "peeky"
    model = torch_seq2seq(torch, V, D, H, peeky).to(dev.tdev)
    opt = torch.optim.Adam(model.parameters(), lr=ADD["lr"])
    lossf = nn.CrossEntropyLoss()
    xd = torch.as_tensor(x.astype(np.int64), device=dev.tdev)
    td = torch.as_tensor(t.astype(np.int64), device=dev.tdev)
    gen = torch.Generator(device=dev.tdev)
    gen.manual_seed(0)

    def epoch(n_iters):
        perm = torch.randperm(len(xd), device=dev.tdev, generator=gen)
        total = torch.zeros((), device=dev.tdev)
        for i in range(n_iters):
            idx = perm[i * B:(i + 1) * B]
            xb, tb = xd[idx], td[idx]
            score = model(xb, tb[:, :-1])
            loss = lossf(score.reshape(-1, V), tb[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), ADD["clip"])
            opt.step()
            total += loss.detach()
        return float(total) / n_iters

    epoch(3)  # warm-up
    return lambda: epoch(len(xd) // B)


def part_addition(dev, model_name, args, data_dir):
    x, t, V = addition_data(data_dir, args.smoke)
    runners, graphed = {}, None
    if dev.name == "cuda":
        runners["fastseq CuPy, CUDA graphs"], graphed = fastseq_addition(model_name, x, t, V, True)
        runners["fastseq CuPy, eager"] = fastseq_addition(model_name, x, t, V, False)[0]
    else:
        runners["fastseq CPU"] = fastseq_addition(model_name, x, t, V, False)[0]
    if dev.torch is not None:
        runners["PyTorch " + ("cuDNN" if dev.name == "cuda" else "CPU")] = \
            torch_addition(dev, model_name, x, t, V)
    res = interleave(dev, runners, args, unit="s/epoch", scale=1.0,
                     what=f"{model_name} addition epoch ({len(x)} questions)")
    return graph_note(res, graphed, ADD["clip"])


def graph_note(res, trainer, max_grad):
    """Whether the graphed runner really replayed graphs (and why not, if not)."""
    if trainer is not None:
        step = trainer.device_step(max_grad)
        res["graphs"] = {"reason": getattr(step, "reason", "no GraphStep"),
                         "counts": getattr(step, "counts", None)}
    return res


# ------------------------------------------------------------------------- BetterRnnlm on PTB

def ptb_corpus(data_dir, smoke):
    ptb_dir = data_dir / "ptb" if data_dir else None
    if ptb_dir and (ptb_dir / "ptb.train.txt").exists():
        from fastseq.datasets import ptb
        corpus, _, _ = ptb.load_data("train", data_dir=str(ptb_dir))
        if smoke:  # a small vocabulary: the code paths, not the sizes
            return corpus[:20_000] % PTB["V"], f"PTB train, ids mod {PTB['V']}"
        return corpus, "PTB train"
    rng = np.random.default_rng(0)
    return rng.integers(0, PTB["V"], 20_000 if smoke else 1_000_000), "random ids (no PTB)"


def fastseq_better(corpus, H, iters, graphs):
    import fastseq
    model = fastseq.BetterRnnlm(PTB["V"], H, H, PTB["dropout"], seed=0)
    trainer = fastseq.RnnlmTrainer(model, fastseq.SGD(PTB["lr"]), progress=False,
                                   cuda_graphs=graphs)
    xs, ts = corpus[:-1], corpus[1:]
    kw = dict(max_epoch=1, batch_size=PTB["batch"], time_size=PTB["time"], max_grad=PTB["clip"])
    trainer.fit(xs, ts, max_iters=2, **kw)  # warm-up

    def run():
        trainer.fit(xs, ts, max_iters=iters, eval_interval=iters, **kw)
        return trainer.epoch_losses[-1]
    run.trainer = trainer
    return run


def torch_better(dev, corpus, H, iters):
    torch = dev.torch
    from torch import nn
    torch.manual_seed(0)
    V, B, T, p = PTB["V"], PTB["batch"], PTB["time"], PTB["dropout"]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, H)
            self.drop = nn.Dropout(p)
            self.lstm = nn.LSTM(H, H, num_layers=2, dropout=p, batch_first=True)
            self.out = nn.Linear(H, V)
            self.out.weight = self.embed.weight  # tied

        def forward(self, x, state):
            hs, state = self.lstm(self.drop(self.embed(x)), state)
            return self.out(self.drop(hs)), state

    net = Net().to(dev.tdev)
    opt = torch.optim.SGD(net.parameters(), lr=PTB["lr"])
    lossf = nn.CrossEntropyLoss()
    data = torch.as_tensor(np.asarray(corpus, dtype=np.int64), device=dev.tdev)
    n = len(data) - 1
    rows = torch.arange(B, device=dev.tdev) * (n // B)
    steps = torch.arange(T, device=dev.tdev)
    st = {"time": 0, "state": None}

    def run_iters(k):
        total = torch.zeros((), device=dev.tdev)
        for _ in range(k):
            pos = (rows[:, None] + st["time"] + steps[None, :]) % n
            st["time"] += T
            xb, tb = data[pos], data[pos + 1]
            if st["state"] is not None:
                st["state"] = tuple(s.detach() for s in st["state"])
            scores, st["state"] = net(xb, st["state"])
            loss = lossf(scores.reshape(-1, V), tb.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), PTB["clip"])
            opt.step()
            total += loss.detach()
        return float(total) / k

    run_iters(2)  # warm-up
    return lambda: run_iters(iters)


def part_better(dev, args, data_dir):
    corpus, source = ptb_corpus(data_dir, args.smoke)
    H = PTB["H"]
    iters = 2 if args.smoke else args.ptb_iters
    graphed = None
    if dev.name == "cuda":
        runners = {"fastseq CuPy, CUDA graphs": fastseq_better(corpus, H, iters, True),
                   "fastseq CuPy, eager": fastseq_better(corpus, H, iters, False)}
        graphed = runners["fastseq CuPy, CUDA graphs"].trainer
    else:
        runners = {"fastseq CPU": fastseq_better(corpus, H, iters, False)}
    if dev.torch is not None:
        runners["PyTorch " + ("cuDNN" if dev.name == "cuda" else "CPU")] = \
            torch_better(dev, corpus, H, iters)
    res = interleave(dev, runners, args, unit="ms/iter", scale=1000.0 / iters,
                     what=f"BetterRnnlm H={H} ({source}), {iters} iterations per round")
    return graph_note(res, graphed, PTB["clip"])


# ------------------------------------------------------------------------------------ driver

def interleave(dev, runners, args, unit, scale, what):
    """Rounds in which the runners take turns, until --rounds or the part's budget; the median
    per runner."""
    losses = {k: None for k in runners}

    def turn(name):
        seconds, loss = timed(runners[name], sync=dev.sync)
        losses[name] = float(loss)
        return seconds

    times = take_turns(turn, runners, args.rounds, pause=0, budget=args.part_budget)
    rows = [{"runner": k, "median": statistics.median(v) * scale, "rounds": len(v),
             "all": [round(s * scale, 4) for s in v], "loss": losses[k], "unit": unit}
            for k, v in times.items()]
    return {"what": what, "rows": rows}


PARTS = ("seq2seq", "peeky", "better")


def run_parts(args):
    dev = Device(args.device, args.smoke)
    data_dir = find_data_dir(args.data_dir)
    result = {"info": dev.describe(), "data_dir": str(data_dir), "parts": {}}
    if dev.torch is None:
        result["info"]["torch_error"] = dev.torch_error
    print(json.dumps(result["info"]), flush=True)
    for name in args.parts:
        t0 = time.perf_counter()
        try:
            if name == "better":
                res = part_better(dev, args, data_dir)
            else:
                res = part_addition(dev, name, args, data_dir)
        except Exception as e:  # keep the other parts; the table shows the error
            import traceback
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        result["parts"][name] = res
        print(json.dumps({name: res}), flush=True)
    return result


# ------------------------------------------------------------------------------------- table

def ratio_rows(parts, targets=True):
    """[(label, fastseq value, torch value, ratio, target)] from run_parts' result (the targets
    are for the GPU: targets=False leaves them out)."""
    out = []
    for name in PARTS:
        res = parts.get(name)
        if res is None:
            continue
        if "error" in res:
            out.append((name, "ERROR", res["error"][:60], "", ""))
            continue
        rows = res["rows"]
        torch_row = next((r for r in rows if r["runner"].startswith("PyTorch")), None)
        for r in rows:
            if r is torch_row:
                continue
            ratio = r["median"] / torch_row["median"] if torch_row else None
            target = TARGETS.get(name) if targets else None
            first = r is rows[0]
            verdict = ""
            if ratio is not None and target is not None and first:
                verdict = f"<= {target}x: {'PASS' if ratio <= target else 'FAIL'}"
            out.append((f"{name}: {r['runner']}", f"{r['median']:.4g} {r['unit']}",
                        f"{torch_row['median']:.4g}" if torch_row else "-",
                        f"{ratio:.2f}x" if ratio is not None else "-", verdict))
        g = res.get("graphs")
        if g:
            note = "graphs replayed: " + json.dumps(g["counts"]) if g["reason"] is None \
                else f"graphs NOT used: {g['reason']}"
            out.append((f"{name}: (graphs)", "", "", "", note[:100]))
    return out


def accuracy_row(gpu_metrics, cpu_metrics):
    def accs(m):
        return [e["test_accuracy"] for e in m["epochs"]] if m else []
    g, c = accs(gpu_metrics), accs(cpu_metrics)
    fmt = lambda a: "/".join(f"{v * 100:.1f}" for v in a) or "-"  # noqa: E731
    verdict = ""
    if g and c and len(g) == len(c):
        # "moves as on the CPU": rises over the epochs and ends within 10 points of the CPU run
        ok = g[-1] > g[0] and abs(g[-1] - c[-1]) <= 0.10
        verdict = "moves as on CPU: " + ("yes" if ok else "NO")
    return ("peeky 3 epochs, test accuracy %", "GPU " + fmt(g), "CPU " + fmt(c), "", verdict)


def print_table(rows, title):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print(title)
    line = "  ".join("-" * w for w in widths)
    print(line)
    for k, r in enumerate(rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
        if k == 0:
            print(line)
    print(line)


def report(logdir):
    """gpu_check.sh's one table: its steps, the timing ratios and the 3-epoch accuracies."""
    logdir = Path(logdir)

    def load(name):
        try:
            return json.loads((logdir / name).read_text())
        except (OSError, ValueError):
            return None

    rows = [("item", "fastseq / status", "PyTorch", "ratio", "target / note")]
    steps = (logdir / "steps.tsv").read_text().splitlines() if (logdir / "steps.tsv").exists() \
        else []
    for line in steps:
        name, status, secs, note = (line.split("\t") + ["", "", "", ""])[:4]
        rows.append((f"step {name}", f"{status} ({secs}s)", "", "", note[:70]))
    cmp = load("compare.json")
    if cmp:
        rows += ratio_rows(cmp.get("parts", {}), cmp.get("info", {}).get("device") == "cuda")
    rows.append(accuracy_row(load("train_gpu/metrics.json"), load("train_cpu/metrics.json")))
    info = (cmp or {}).get("info", {})
    title = (f"fastseq GPU check: {info.get('gpu', 'no GPU')}, CuPy {info.get('cupy', '-')}, "
             f"PyTorch {info.get('torch', '-')} (cuDNN {info.get('cudnn', '-')}); "
             f"{info.get('fastseq', '')}")
    print_table(rows, title)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: fastseq on CuPy, PyTorch on CUDA (default); cpu: both on the CPU")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (4 addition batches of 16, H=32, 2 PTB iterations, 1 round)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the textbook's addition.txt and ptb/ (default gpu_data/, "
                        "else FASTSEQ_TEXTBOOK_DATA; generated data otherwise)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per part (default 3)")
    p.add_argument("--ptb-iters", type=int, default=50,
                   help="BetterRnnlm iterations per round (default 50)")
    p.add_argument("--part-budget", type=float, default=60.0,
                   help="no new round after this many seconds in a part (default 60)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--report", default=None, metavar="LOGDIR",
                   help="print gpu_check.sh's table from LOGDIR and exit")
    args = p.parse_args(argv)
    if args.report:
        report(args.report)
        return 0
    if args.smoke:
        args.rounds = 1
        smoke_sizes()
    result = run_parts(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    rows = [("part: runner", "fastseq", "PyTorch", "ratio", "target")] + \
        ratio_rows(result["parts"], args.device == "cuda")
    print_table(rows, f"compare_gpu ({args.device}{', smoke' if args.smoke else ''}): "
                      f"{result['info']}")
    return 1 if any("error" in r for r in result["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
