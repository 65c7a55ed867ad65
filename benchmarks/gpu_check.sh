#!/usr/bin/env bash
# The GPU check: one script for an NVIDIA machine without network access.
#
#   cp -r DATA gpu_data                        # beforehand (DATA: the textbook's dataset/, ptb/)
#   bash benchmarks/gpu_check.sh               # gpu_data/ is git-ignored, so carry it along
#
# Steps, each time-bounded (a failing step never stops the ones after it); logs and results go
# to $OUT/gpu_check/ when $OUT is set, else /tmp/gpu_check/:
#   env        nvidia-smi, Python, NumPy, CuPy, PyTorch (CUDA, cuDNN) versions
#   install    pip install --no-build-isolation --no-deps -e .   (nothing from the internet;
#              on failure the source tree is used through PYTHONPATH)
#   smoke      an NVRTC-compiled kernel, fastseq.backend.use("cupy"), a product by direct cuBLAS
#              call captured into a CUDA graph and replayed
#   tests      GPU=1 python -m pytest tests -m gpu
#   compare    python -m benchmarks.compare_gpu: Seq2seq and PeekySeq2seq addition epochs and
#              BetterRnnlm PTB iterations, fastseq CuPy (CUDA graphs and eager) vs PyTorch cuDNN
#   train_gpu  GPU=1 python -m fastseq.train --epochs 3 (PeekySeq2seq, gpu_data/addition.txt)
#   train_cpu  the same on the CPU, for the accuracy side by side
# and at the end ONE table (python -m benchmarks.compare_gpu --report). The whole run stays under
# GPU_CHECK_BUDGET seconds (default 480). Exit status: 0 when every step passed.
# GPU_CHECK_SKIP="step ..." skips steps (install included): a dry run on a CPU machine, e.g.
# GPU_CHECK_SKIP="install train_cpu", shows the GPU steps failing with their reasons and the
# table still printed.

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
BUDGET=${GPU_CHECK_BUDGET:-480}
LOGDIR=${OUT:-/tmp}/gpu_check
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
PY=${PYTHON:-python}
export PY LOGDIR
export CUPY_TF32=0           # exact float32 products on both sides (PyTorch: set in compare_gpu)
export PYTHONUNBUFFERED=1
START=$SECONDS
FAILED=0
DATA=gpu_data

remaining() { echo $(( BUDGET - (SECONDS - START) )); }

# step NAME LIMIT_S -- command...   runs the command with timeout min(LIMIT, time left), logs it
# to $LOGDIR/NAME.log and appends "name<TAB>status<TAB>seconds<TAB>note" to steps.tsv
step() {
    local name=$1 limit=$2; shift 3
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
        printf '%s\tskipped\t0\tGPU_CHECK_SKIP\n' "$name" >>"$LOGDIR/steps.tsv"
        return 1
    fi
    local left; left=$(remaining)
    (( left - 20 < limit )) && limit=$(( left - 20 ))
    if (( limit < 10 )); then
        printf '%s\tskipped\t0\tout of time budget\n' "$name" >>"$LOGDIR/steps.tsv"
        FAILED=1
        return 1
    fi
    local log="$LOGDIR/$name.log" t0=$SECONDS rc status
    echo "=== [$name] (limit ${limit}s) $*"
    if [[ $(type -t "$1") == function ]]; then
        export -f "$1"
        timeout -k 5 "$limit" bash -c "$1" >"$log" 2>&1
    else
        timeout -k 5 "$limit" "$@" >"$log" 2>&1
    fi
    rc=$?
    if (( rc == 0 )); then status=ok
    elif (( rc == 124 || rc == 137 )); then status=TIMEOUT; FAILED=1
    else status="FAIL($rc)"; FAILED=1
    fi
    tail -n $(( rc == 0 ? 6 : 25 )) "$log" | cut -c1-220
    local note; note=$(grep -E "passed|failed|error|Error" "$log" | tail -n 1 | cut -c1-70)
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" $(( SECONDS - t0 )) "$note" >>"$LOGDIR/steps.tsv"
    return $rc
}

env_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 \
        || echo "(no nvidia-smi)"
    $PY - <<'EOF'
import sys
print("python", sys.version.split()[0])
for m in ("numpy", "cupy", "torch", "Cython", "pytest"):
    try:
        mod = __import__(m)
        print(f"{m:8s}", getattr(mod, "__version__", "?"))
    except Exception as e:
        print(f"{m:8s} MISSING ({type(e).__name__}: {e})")
try:
    import cupy
    rt = cupy.cuda.runtime
    print("CUDA runtime", rt.runtimeGetVersion(), "driver", rt.driverGetVersion(),
          "devices", rt.getDeviceCount())
except Exception as e:
    print("cupy/CUDA unusable:", type(e).__name__, e)
try:
    import torch
    print("torch CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
          "cuDNN", torch.backends.cudnn.version())
except Exception as e:
    print("torch unusable:", type(e).__name__, e)
EOF
}

smoke() {
    $PY - <<'EOF'
import time
import numpy as np
import cupy
t = time.time()
k = cupy.ElementwiseKernel("T x", "T y", "y = tanh(x)", "fastseq_smoke")
print("ElementwiseKernel:", k(cupy.linspace(-2, 2, 5, dtype=cupy.float32)),
      f"({time.time() - t:.2f}s incl. NVRTC)")
from fastseq import backend
from fastseq.ops import _cupy
backend.use("cupy")
print(backend.describe())
a = cupy.asarray(np.random.default_rng(0).standard_normal((64, 32)), dtype=cupy.float32)
b = cupy.asarray(np.random.default_rng(1).standard_normal((32, 48)), dtype=cupy.float32)
for x, y in ((a, b), (a.T.copy().T, b), (a, b.T.copy().T)):
    err = float(abs(_cupy.cublas_matmul(x, y) - x @ y).max())
    print("direct cuBLAS matmul vs cupy.matmul: max abs diff", err)
    assert err < 1e-4
s = cupy.cuda.Stream(non_blocking=True)
_cupy.prepare_direct_products(s.ptr)
out = cupy.empty((64, 48), cupy.float32)
with s, _cupy.capturing():
    s.begin_capture()
    _cupy.matmul(a, b, out=out)
    out *= 2
    g = s.end_capture()
out[...] = 0
g.launch(stream=cupy.cuda.get_current_stream())
err = float(abs(out - 2 * (a @ b)).max())
print("captured direct matmul replayed: max abs diff", err)
assert err < 1e-4
EOF
}

step env 40 -- env_info

if step install 150 -- \
        $PY -m pip install --no-build-isolation --no-deps --no-index -e .; then
    :
else
    echo "not installed: running from the source tree (PYTHONPATH=$ROOT)"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

[[ -f $DATA/addition.txt ]] || echo "WARNING: $DATA/addition.txt missing: copy the textbook's data files to $DATA/ and carry it"

step smoke 60 -- smoke
step tests 150 -- env GPU=1 $PY -m pytest tests -m gpu -q -rs --tb=short -p no:cacheprovider --continue-on-collection-errors
step compare 200 -- $PY -m benchmarks.compare_gpu --data-dir "$DATA" --json "$LOGDIR/compare.json" \
    --part-budget 45
TRAIN=(--epochs 3 --no-progress)
[[ -f $DATA/addition.txt ]] && TRAIN+=(--data "$DATA/addition.txt")
step train_gpu 75 -- env GPU=1 $PY -m fastseq.train "${TRAIN[@]}" --out "$LOGDIR/train_gpu"
step train_cpu 75 -- env -u GPU $PY -m fastseq.train "${TRAIN[@]}" --out "$LOGDIR/train_cpu"

echo
$PY -m benchmarks.compare_gpu --report "$LOGDIR" | tee "$LOGDIR/table.txt"
echo "($(( SECONDS - START ))s of a ${BUDGET}s budget; logs in $LOGDIR)"
exit $FAILED
