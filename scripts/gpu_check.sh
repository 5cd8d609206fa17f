#!/usr/bin/env bash
# The GPU check: the sampling and training speed bench on the GPU in fp32 and bf16 first (while the GPU is idle:
# other work can then share it), then the test suite's CUDA-marked tests (a training step of every order in fp32
# and bf16, every order sampling with fp32 and bf16 weights, the shipped pipeline's token agreement CUDA fp32 vs
# CPU fp32 and bf16 vs fp32). Under 8 minutes: each part has its own time limit. The line "== CUDA-marked tests"
# marks the end of the timed part. CI stays CPU-only; this is run by hand on a machine with CUDA.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (bench JSON and the test log go to OUT_DIR, default gpu-check/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}

if ! $PYTHON -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch ($($PYTHON -c 'import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda)' 2>&1)); nothing to check here" >&2
    exit 2
fi
$PYTHON -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")'

failed=()
start=$SECONDS

for dtype in fp32 bf16; do
    echo "== argen bench --device cuda --dtype $dtype (limit 90 s)"
    timeout 90 $PYTHON -m argen.cli bench --device cuda --dtype "$dtype" --batch-sizes 1 8 64 --repeats 3 --train \
        --setting plain:cfg_scale=1 --setting cfg:cfg_scale=2 --json "$OUT/bench-$dtype.json"
    status=$?
    [ "$status" -eq 0 ] || failed+=("bench $dtype (exit $status$([ "$status" -eq 124 ] && echo ', timed out'))")
done

echo "== CUDA-marked tests (limit 240 s)"
timeout 240 $PYTHON -m pytest -m cuda -q -s -rs tests 2>&1 | tee "$OUT/tests.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || failed+=("CUDA tests (exit $status$([ "$status" -eq 124 ] && echo ', timed out'))")
grep -q " passed" "$OUT/tests.log" || failed+=("CUDA tests: none passed")

echo "== done in $((SECONDS - start)) s; figures in $OUT/"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'gpu_check FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "gpu_check passed"
