#!/usr/bin/env bash
# One-shot GPU check for a lent NVIDIA machine (no network, only this working tree).
#
#   cp -r ../shared/data gpu_data          # on the calling machine: gpu_data/ is git-ignored,
#   bash benchmarks/gpu_check.sh           # so pass it along with the tree (e.g. carry=gpu_data)
#
# Steps (each time-bounded; a failing step never stops the ones after it):
#   env      nvidia-smi, Python / NumPy / CuPy / pytest versions (tries `pip install cupy-cuda12x`
#            if CuPy is missing)
#   install  pip install --no-build-isolation --no-deps -e .   (builds the Cython kernel if it can)
#   smoke    compile and run one ElementwiseKernel (NVRTC works), fastseq.backend.use("cupy")
#   tests    GPU=1 python -m pytest tests -m gpu -q
#   bench    GPU=1 pytest benchmarks/ --benchmark-only -k cupy   (when benchmarks/bench_*.py exist)
#   timing   CuPy vs NumPy LSTM engine, forward+backward, two textbook-sized problems
#   train    GPU=1 python -m fastseq.train --epochs 3 --data gpu_data/addition.txt --out /tmp/gpu_run
# then a summary table. Whole run is kept under GPU_CHECK_BUDGET seconds (default 360).
# Logs go to $OUT/gpu_check/ when $OUT is set (the device runner fetches $OUT), else /tmp/gpu_check/.
# GPU_CHECK_INSTALL=0 / GPU_CHECK_PIP_CUPY=0 skip the pip steps (dry runs on a CPU machine).
# Exit status: 0 when every step that ran passed, 1 otherwise.

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
BUDGET=${GPU_CHECK_BUDGET:-360}
LOGDIR=${OUT:-/tmp}/gpu_check
mkdir -p "$LOGDIR"
PY=${PYTHON:-python}
export PY
export CUPY_TF32=0          # exact float32 GEMMs (TF32 would break the 1e-5 comparisons)
export PYTHONUNBUFFERED=1
START=$SECONDS
ROWS=()
FAILED=0

remaining() { echo $(( BUDGET - (SECONDS - START) )); }

# step NAME LIMIT_S NOTE -- command...    runs the command with timeout min(LIMIT, time left)
step() {
    local name=$1 limit=$2 note=$3; shift 4
    local left; left=$(remaining)
    (( left - 5 < limit )) && limit=$(( left - 5 ))
    if (( limit < 10 )); then
        ROWS+=("$name|skip|0|out of time budget")
        return 0
    fi
    local log="$LOGDIR/$name.log" t0=$SECONDS rc
    echo "=== [$name] (limit ${limit}s) $*"
    if [[ $(type -t "$1") == function ]]; then   # shell functions run in a child bash
        export -f "$1"
        timeout -k 5 "$limit" bash -c "$1" >"$log" 2>&1
    else
        timeout -k 5 "$limit" "$@" >"$log" 2>&1
    fi
    rc=$?
    local dt=$(( SECONDS - t0 )) status
    if (( rc == 0 )); then
        status=ok
    elif (( rc == 5 )) && [[ " $* " == *" pytest "* ]]; then
        status=empty; rc=0                      # pytest: no tests selected
    elif (( rc == 124 || rc == 137 )); then
        status=TIMEOUT; FAILED=1
    else
        status="FAIL($rc)"; FAILED=1
    fi
    # excerpt: the whole log when short, else its tail (longer on failure)
    local n=8; (( rc != 0 )) && n=25
    (( $(wc -l <"$log") <= 16 )) && n=16
    tail -n "$n" "$log" | cut -c1-200
    local summary; summary=$(grep -E "passed|failed|error|skipped" "$log" | tail -n 1 | cut -c1-70)
    ROWS+=("$name|$status|$dt|${note}${summary:+ $summary}")
    return $rc
}

skip() { ROWS+=("$1|skip|0|$2"); echo "=== [$1] skipped: $2"; }

# ------------------------------------------------------------------------------------- env
env_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "(no nvidia-smi)"
    $PY - <<'EOF'
import sys, platform
print("python", sys.version.split()[0], platform.machine())
for m in ("numpy", "cupy", "pytest", "pytest_benchmark", "Cython", "scipy"):
    try:
        mod = __import__(m)
        print(f"{m:18s}", getattr(mod, "__version__", "?"))
    except Exception as e:
        print(f"{m:18s} MISSING ({type(e).__name__}: {e})")
try:
    import cupy
    rt = cupy.cuda.runtime
    print("CUDA runtime", rt.runtimeGetVersion(), "driver", rt.driverGetVersion(),
          "devices", rt.getDeviceCount())
except Exception as e:
    print("cupy/CUDA unusable:", type(e).__name__, e)
EOF
}
step env 40 "" -- env_info

if [[ ${GPU_CHECK_PIP_CUPY:-1} == 1 ]] && ! $PY -c "import cupy" >/dev/null 2>&1; then
    step pip-cupy 60 "no network expected" -- \
        $PY -m pip install --retries 0 --timeout 10 cupy-cuda12x
fi

# --------------------------------------------------------------------------------- install
if [[ ${GPU_CHECK_INSTALL:-1} == 1 ]]; then
    step install 150 "editable" -- $PY -m pip install --no-build-isolation --no-deps -e .
else
    skip install "GPU_CHECK_INSTALL=0"; false
fi || {
    echo "install failed: running from the source tree (PYTHONPATH=$ROOT)"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
}

# ----------------------------------------------------------------------------------- smoke
smoke() {
    $PY - <<'EOF'
import time
import cupy
t = time.time()
k = cupy.ElementwiseKernel("T x", "T y", "y = tanh(x)", "fastseq_smoke")
x = cupy.linspace(-2, 2, 5, dtype=cupy.float32)
print("ElementwiseKernel tanh:", k(x), f"({time.time() - t:.2f}s incl. NVRTC compile)")
from fastseq import backend
backend.use("cupy")
print(backend.describe())
EOF
}
step smoke 90 "NVRTC compile" -- smoke

# ----------------------------------------------------------------------------------- tests
step tests 150 "-m gpu" -- env GPU=1 $PY -m pytest tests -m gpu -q -p no:cacheprovider -rfEs

# ----------------------------------------------------------------------------------- bench
if ls benchmarks/bench_*.py >/dev/null 2>&1; then
    step bench 100 "-k cupy" -- env GPU=1 $PY -m pytest benchmarks/ --benchmark-only -k cupy -q \
        -p no:cacheprovider --benchmark-columns=min,median,mean,rounds --benchmark-sort=name
else
    skip bench "no benchmarks/bench_*.py yet"
fi

# ---------------------------------------------------------------------------------- timing
timing() {
    $PY - <<'EOF'
import time
import numpy as np
import cupy
from fastseq import backend
from fastseq.lstm import _cupy, _numpy

def bench(fn, sync, reps):
    fn(); sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps * 1e3

print(f"{'problem (N,T,D,H) float32':34s} {'numpy ms':>10s} {'cupy ms':>10s} {'speedup':>8s} {'hs diff':>9s}")
for shape, label in (((128, 29, 16, 256), "date seq2seq decoder"),
                     ((20, 35, 650, 650), "PTB better-RNNLM layer")):
    N, T, D, H = shape
    rng = np.random.default_rng(0)
    cpu = [rng.standard_normal((N, T, D)).astype(np.float32),
           (rng.standard_normal((D, 4 * H)) / np.sqrt(D)).astype(np.float32),
           (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(np.float32),
           np.zeros(4 * H, np.float32), np.zeros((N, H), np.float32), np.zeros((N, H), np.float32)]
    dhs = rng.standard_normal((N, T, H)).astype(np.float32)
    gpu = [backend.to_gpu(a) for a in cpu]
    dhs_g = backend.to_gpu(dhs)

    def run(eng, args, d, xp):
        hs, _, _, cache = eng.forward(*args)
        grads = [xp.zeros_like(a) for a in args[1:4]]
        eng.backward(d, cache, grads)
        return hs

    sync = cupy.cuda.Device().synchronize
    tn = bench(lambda: run(_numpy, cpu, dhs, np), lambda: None, 2)
    tg = bench(lambda: run(_cupy, gpu, dhs_g, cupy), sync, 20)
    diff = float(np.abs(backend.to_cpu(run(_cupy, gpu, dhs_g, cupy)) - run(_numpy, cpu, dhs, np)).max())
    print(f"{str(shape) + ' ' + label:34s} {tn:10.2f} {tg:10.2f} {tn / tg:7.1f}x {diff:9.1e}")
EOF
}
step timing 60 "fwd+bwd" -- timing

# ----------------------------------------------------------------------------------- train
TRAIN_ARGS=(--epochs 3 --out /tmp/gpu_run)
if [[ -f gpu_data/addition.txt ]]; then
    TRAIN_ARGS+=(--data gpu_data/addition.txt); TRAIN_NOTE="gpu_data/addition.txt"
else
    TRAIN_NOTE="NO gpu_data/: generated data"
    echo "gpu_data/addition.txt missing (copy ../shared/data to gpu_data/ before the run)"
fi
if GPU=1 $PY -m fastseq.train --help 2>/dev/null | grep -q -- --no-progress; then
    TRAIN_ARGS+=(--no-progress)
fi
rm -rf /tmp/gpu_run
step train 150 "$TRAIN_NOTE" -- env GPU=1 $PY -m fastseq.train "${TRAIN_ARGS[@]}"
if [[ -f /tmp/gpu_run/metrics.json ]]; then
    cp /tmp/gpu_run/metrics.json "$LOGDIR/train_metrics.json" 2>/dev/null
    $PY - <<'EOF'
import json
m = json.load(open("/tmp/gpu_run/metrics.json"))
def short(v):
    s = json.dumps(v)
    return s if len(s) <= 150 else s[:147] + "..."
for k, v in m.items():
    print(f"  {k}: {short(v)}")
EOF
fi

# --------------------------------------------------------------------------------- summary
{
    echo
    echo "==================== gpu_check summary ($(( SECONDS - START ))s of ${BUDGET}s budget) ===================="
    printf "%-9s %-9s %6s  %s\n" step status sec note
    for r in "${ROWS[@]}"; do
        IFS='|' read -r n s d note <<<"$r"
        printf "%-9s %-9s %6s  %s\n" "$n" "$s" "$d" "$note"
    done
    echo "logs: $LOGDIR"
} | tee "$LOGDIR/summary.txt"
exit $FAILED
