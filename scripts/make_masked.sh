#!/usr/bin/env bash
# Rebuild the shipped masked (MaskGIT) model: the shipped raster tokenizer's tokens of mnist:train (mnist:test stays
# held out for `argen eval`), a bidirectional transformer of the raster default's size (preset mnist-masked),
# packed into argen/assets/masked-mnist with the order's linear guidance schedule.
# Usage: bash scripts/make_masked.sh [RUNS_DIR]
# STEPS, BATCH and NAME override the training length, batch size and asset folder (a smoke run: STEPS=30 BATCH=8
# NAME=masked-mnist-smoke). The masked loss sees a random fraction of each image, so it trains for twice the
# raster generator's 1,000 steps: about 30 minutes on 2 cores.
set -euo pipefail
runs=${1:-runs/masked}
steps=${STEPS:-2000}
batch=${BATCH:-64}
name=${NAME:-masked-mnist}
export OMP_WAIT_POLICY=PASSIVE
tok=$(python -c "from argen.pipeline import ASSETS; print(ASSETS / 'raster-mnist' / 'tokenizer')")

time argen tokenize --tokenizer "$tok" --data mnist:train --out "$runs/tokens"
time argen train --tokens "$runs/tokens" --tokenizer "$tok" --preset mnist-masked --out "$runs/gen" \
    --steps "$steps" --batch-size "$batch" --lr 2e-3 --warmup-steps 100 --weight-decay 0.05 --ema-decay 0.995 \
    --set resid_dropout=0.1 --set ffn_dropout=0.1 --save-every 250 --preview-every 1000

python scripts/pack_default.py --pipeline "$runs/gen/pipeline" --name "$name" --cfg 1.0 --set steps=16 \
    --set choice_temperature=9.0
