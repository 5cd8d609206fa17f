#!/usr/bin/env bash
# The recipe on another dataset: a Fashion-MNIST classifier, tokenizer and raster generator trained from scratch on
# fashion-mnist:train (60,000 images; Debian package `dataset-fashion-mnist`), judged against Fashion-MNIST's own
# real-data floor (fashion-mnist:test) with its own classifier. Nothing here is tuned to Fashion-MNIST: the tokenizer
# and generator settings are the MNIST ones (the raster generator with the dropout recipe of docs/quality.md).
# Usage: bash scripts/make_fashion.sh [RUNS_DIR]   (STEPS overrides the generator's length)
# Measured at STEPS=800 on 2 cores: classifier 1.5 min, tokenizer 3.4, tokenize 1, generator 5.4, evaluation 1.2
# (docs/quality.md has its figures); the default 2,000 generator steps take about 14 min.
set -euo pipefail
runs=${1:-runs/fashion}
steps=${STEPS:-2000}
export OMP_WAIT_POLICY=PASSIVE

time argen train-classifier --data fashion-mnist:train --eval-data fashion-mnist:test --out "$runs/classifier" \
    --steps 1500 --batch-size 64 --lr 1e-3
time argen train-tokenizer --data fashion-mnist:train --preset mnist-small --out "$runs/tok" --steps 500 \
    --batch-size 64 --lr 1e-3 --warmup-steps 50 --weight-decay 0 --ema-decay 0.99 --save-every 100 --preview-every 100
time argen eval-tokenizer --tokenizer "$runs/tok/final" --data fashion-mnist:test --classifier "$runs/classifier/final"
time argen tokenize --tokenizer "$runs/tok/final" --data fashion-mnist:train --out "$runs/tokens"
time argen train --tokens "$runs/tokens" --tokenizer "$runs/tok/final" --preset mnist-small --out "$runs/gen" \
    --steps "$steps" --batch-size 64 --lr 2e-3 --warmup-steps 60 --weight-decay 0.1 --ema-decay 0.995 \
    --set resid_dropout=0.1 --set ffn_dropout=0.1 --set token_dropout=0.1 --save-every 250 --preview-every 500
time argen eval --model "$runs/gen/pipeline" --data fashion-mnist --classifier "$runs/classifier/final" -n 1000 \
    --seeds 0 --sweep cfg_scale=1,1.5,2,3 --json "$runs/sweep.json" --plot "$runs/sweep.svg"
