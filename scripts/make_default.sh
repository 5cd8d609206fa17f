#!/usr/bin/env bash
# Rebuild the shipped default (tokenizer + raster generator + MNIST classifier) from scratch on a CPU.
# Usage: bash scripts/make_default.sh [RUNS_DIR]   (about 25 minutes on 2 cores: tokenizer ~11, generator ~12, classifier ~2)
set -euo pipefail
runs=${1:-runs/default}
assets=src/argen/assets
export OMP_WAIT_POLICY=PASSIVE

time argen train-tokenizer --data mnist --preset mnist-small --out "$runs/tok" --steps 700 --batch-size 64 \
    --lr 1e-3 --warmup-steps 50 --weight-decay 0 --ema-decay 0.99 --save-every 100 --preview-every 100
time argen tokenize --tokenizer "$runs/tok/final" --data mnist --out "$runs/tokens"
time argen train --tokens "$runs/tokens" --tokenizer "$runs/tok/final" --preset mnist-small --out "$runs/gen" \
    --steps 1000 --batch-size 64 --lr 2e-3 --warmup-steps 60 --ema-decay 0.995 --save-every 250 --preview-every 250
time argen train-classifier --data mnist --out "$runs/classifier" --steps 600 --batch-size 64 --lr 1e-3

rm -rf "$assets/raster-mnist" "$assets/mnist-classifier"
cp -r "$runs/gen/pipeline" "$assets/raster-mnist"
mkdir -p "$assets/mnist-classifier"
cp "$runs/classifier/final/config.json" "$runs/classifier/final/model.safetensors" "$assets/mnist-classifier/"
