#!/usr/bin/env bash
# Every GPU check of attnforge in one command, sized for a short GPU lease (at most ~10 minutes; each step
# has its own time limit so one slow step cannot starve the others, and every benchmark rewrites its
# JSON after each row, so a step cut off keeps what it finished).
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        # OUTDIR: $OUT if set, else benchmarks/results/gpu
#
# Needs a CUDA GPU with torch, triton and transformers installed (nothing is downloaded: attnforge is
# installed from this checkout without dependencies). In order of what the open issues need most (each
# benchmark checks its kernels against a reference before timing them):
#   1. benchmarks/kernels.py    #5: dense / uniform window / mixed per-head plan vs SDPA and FlexAttention
#   2. benchmarks/decode.py     #6: decode kernels' HBM bandwidth; tokens/s vs HF + SDPA at 8k and 32k
#   3. benchmarks/linear_kernel.py  #7: the linear hybrid vs SDPA at 8k and 32k (forward; and training)
#   4. tests/test_gpu.py        the compiled kernels against float64 (forward, backward, decode, no-sync
#                               decoding, the plan cache in a Llama), default launch configs
#   5. benchmarks/softcap.py    Gemma 2's soft-capped attention (global and sliding layers) vs FlexAttention's
#                               score_mod and the eager formula (no issue asks for it)
#   6. benchmarks/padded.py     padded and packed batches vs SDPA with HF's mask and FlexAttention (no
#                               issue asks for it: last, in what the lease has left)
# CPU smoke test of the same scripts (no figures): tests/test_benchmarks.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
# attnforge's kernel cache in OUTDIR: its autotune.json (every launch config's time, per kernel, head dim,
# dtype, length bucket and plan) comes back with the results
export ATTNFORGE_CACHE_DIR="$OUTDIR/attnforge_cache"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY="${PYTHON:-python3}"

step() {   # step NAME SECONDS command...: run with a time limit, log its output and exit status
    local name=$1 limit=$2
    shift 2
    echo "=== $(date -u +%T) $name (limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    git log -1 --format='attnforge %H %s' 2>/dev/null || true
} 2>&1 | tee "$OUTDIR/env.txt" | tee -a "$LOG"

step install 30 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
step kernels 245 "$PY" benchmarks/kernels.py --json "$OUTDIR/kernels.json" \
    --shapes 32x8x32768x128 9x3x32768x64 32x32x16384x128 9x3x8192x64 32x32x4096x128
step decode 100 "$PY" benchmarks/decode.py --json "$OUTDIR/decode.json" --shapes smollm2 llama8b \
    --contexts 8192 32768 --steps 16
step linear 55 "$PY" benchmarks/linear_kernel.py --json "$OUTDIR/linear_kernel.json" --lengths 8192 32768 --backward
# default launch configs here: tuning every config of every kernel of the tests would take minutes of compiles
step tests 100 env ATTNFORGE_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step softcap 30 "$PY" benchmarks/softcap.py --json "$OUTDIR/softcap.json" --shapes 16x8x8192x256 32x16x8192x128
step padded 30 "$PY" benchmarks/padded.py --json "$OUTDIR/padded.json" --shapes 9x3x8192x64 32x8x8192x128
echo "=== $(date -u +%T) done; results in $OUTDIR" | tee -a "$LOG"
