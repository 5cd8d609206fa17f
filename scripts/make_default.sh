#!/usr/bin/env bash
# Rebuild the shipped default (tokenizer + raster generator + MNIST classifier) from scratch on a CPU, trained on
# the 4,000 digits of mnist:train so that mnist:test stays held out for `argen eval`.
# Usage: bash scripts/make_default.sh [RUNS_DIR]
# About 30 minutes on 2 cores: tokenizer ~9, generator ~16, classifier ~2, draft ~2 (measured with other work).
set -euo pipefail
runs=${1:-runs/default}
export OMP_WAIT_POLICY=PASSIVE

time argen train-tokenizer --data mnist:train --preset mnist-small --out "$runs/tok" --steps 500 --batch-size 64 \
    --lr 1e-3 --warmup-steps 50 --weight-decay 0 --ema-decay 0.99 --save-every 100 --preview-every 100
time argen tokenize --tokenizer "$runs/tok/final" --data mnist:train --out "$runs/tokens"
time argen train --tokens "$runs/tokens" --tokenizer "$runs/tok/final" --preset mnist-small --out "$runs/gen" \
    --steps 1000 --batch-size 64 --lr 2e-3 --warmup-steps 60 --ema-decay 0.995 --save-every 250 --preview-every 250
time argen train-classifier --data mnist:train --eval-data mnist:test --out "$runs/classifier" --steps 600 \
    --batch-size 64 --lr 1e-3

# The drafter of speculative="draft": a much smaller raster generator on the same tokens.
time argen train --tokens "$runs/tokens" --tokenizer "$runs/tok/final" --preset mnist-small --set dim=64 \
    --set num_heads=2 --set num_layers=2 --out "$runs/draft" --steps 600 --batch-size 64 --lr 3e-3 \
    --warmup-steps 40 --ema-decay 0.99 --save-every 200 --preview-every 200

python scripts/pack_default.py --pipeline "$runs/gen/pipeline" --name raster-mnist --cfg 2.0 \
    --classifier "$runs/classifier/final" --draft "$runs/draft/final"
