#!/usr/bin/env bash
# Rebuild the shipped next-scale (VAR) model: multi-scale tokenizer + next-scale transformer on mnist:train.
# Usage: bash scripts/make_next_scale.sh [RUNS_DIR]
set -euo pipefail
runs=${1:-runs/next-scale}
export OMP_WAIT_POLICY=PASSIVE

time argen train-tokenizer --data mnist:train --preset mnist-multiscale --out "$runs/tok" --steps 500 \
    --batch-size 64 --lr 1e-3 --warmup-steps 50 --weight-decay 0 --ema-decay 0.99 --save-every 100 --preview-every 100
time argen tokenize --tokenizer "$runs/tok/final" --data mnist:train --out "$runs/tokens"
time argen train --tokens "$runs/tokens" --tokenizer "$runs/tok/final" --preset mnist-next-scale --out "$runs/gen" \
    --steps 1000 --batch-size 64 --lr 2e-3 --warmup-steps 60 --ema-decay 0.995 --save-every 250 --preview-every 250

python scripts/pack_default.py --pipeline "$runs/gen/pipeline" --name next-scale-mnist --cfg 1.0
