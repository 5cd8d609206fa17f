#!/usr/bin/env bash
# Rebuild the shipped random-order (RandAR) model: the shipped raster tokenizer's tokens of mnist:train (mnist:test
# stays held out for `argen eval`), a random-order decoder of the raster default's size (preset mnist-random-order),
# packed into argen/assets/random-order-mnist with guidance ramped from 1 to 2.4 along the steps and token
# temperature 1.1 (the setting that meets the bar: docs/quality.md).
# Usage: bash scripts/make_random_order.sh [RUNS_DIR]
# STEPS, TUNE_STEPS, BATCH and NAME override the two stages' lengths, the batch size and the asset folder (a smoke
# run: STEPS=30 TUNE_STEPS=20 BATCH=8 NAME=random-order-mnist-smoke). Every batch is trained along fresh random
# permutations, a harder task than one fixed order (RandAR), so it trains long: 3,500 steps from scratch, then
# 2,000 more as a fine-tuning run from those weights (`--init`: a fresh optimizer, lr 1e-3 cosine, another data
# order), which lowered FD at every guidance. About 60 + 36 min at 2 threads on an otherwise idle 2-core machine.
set -euo pipefail
runs=${1:-runs/random-order}
steps=${STEPS:-3500}
tune_steps=${TUNE_STEPS:-2000}
batch=${BATCH:-64}
name=${NAME:-random-order-mnist}
export OMP_WAIT_POLICY=PASSIVE
tok=$(python -c "from argen.pipeline import ASSETS; print(ASSETS / 'raster-mnist' / 'tokenizer')")
dropout=(--set resid_dropout=0.1 --set ffn_dropout=0.1)

time argen tokenize --tokenizer "$tok" --data mnist:train --out "$runs/tokens"
time argen train --tokens "$runs/tokens" --tokenizer "$tok" --preset mnist-random-order --out "$runs/gen" \
    --steps "$steps" --batch-size "$batch" --lr 2e-3 --warmup-steps 100 --weight-decay 0.05 --ema-decay 0.995 \
    "${dropout[@]}" --save-every 250 --preview-every 1000
time argen train --tokens "$runs/tokens" --tokenizer "$tok" --preset mnist-random-order --init "$runs/gen/final" \
    --out "$runs/tuned" --steps "$tune_steps" --batch-size "$batch" --lr 1e-3 --warmup-steps 50 --weight-decay 0.05 \
    --ema-decay 0.995 --seed 1 "${dropout[@]}" --save-every 250

python scripts/pack_default.py --pipeline "$runs/tuned/pipeline" --name "$name" --cfg 2.4 --set 'cfg_schedule="linear"' \
    --set temperature=1.1
