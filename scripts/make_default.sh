#!/usr/bin/env bash
# Rebuild the shipped default, raster-mnist: a raster generator (preset mnist-small) and its speculative drafter on
# the shipped raster VQ's tokens of mnist:train (mnist:test stays held out for `argen eval`), packed with guidance
# 1.75 ramped along the tokens at token temperature 1.25 (chosen by `argen eval --sweep`; docs/quality.md has every
# recipe tried). The recipe: dropout 0.1 (residual, FFN, token), weight decay 0.1, and 25 % of the teacher-forced
# input tokens replaced by random codes (`input_noise`); 1,500 steps, then 1,500 more from that model at a lower
# learning rate with a fresh data order.
# Usage: bash scripts/make_default.sh [RUNS_DIR]
# TOKENIZER=fresh trains the VQ tokenizer from scratch first (500 steps, ~4 min) and CLASSIFIER=fresh the MNIST
# classifier `argen eval` scores with (600 steps, ~2 min) instead of reusing the shipped ones. Both are shared:
# the masked and random-order models read the same tokens, and every figure in docs/ is under that classifier.
# STEPS and NAME override each generator stage's length and the asset folder (a smoke run: STEPS=20
# NAME=raster-mnist-smoke). About 29 min at 2 threads on an otherwise idle 2-core machine: generator 12 + 14,
# drafter 2.
set -euo pipefail
runs=${1:-runs/default}
steps=${STEPS:-1500}
name=${NAME:-raster-mnist}
tok=${TOKENIZER:-raster}  # a pipeline name: its tokenizer
export OMP_WAIT_POLICY=PASSIVE
recipe=(--weight-decay 0.1 --set resid_dropout=0.1 --set ffn_dropout=0.1 --set token_dropout=0.1
    --set input_noise=0.25)

if [ "$tok" = fresh ]; then
    time argen train-tokenizer --data mnist:train --preset mnist-small --out "$runs/tok" --steps 500 --batch-size 64 \
        --lr 1e-3 --warmup-steps 50 --weight-decay 0 --ema-decay 0.99 --save-every 100 --preview-every 100
    tok="$runs/tok/final"
fi
classifier=()
if [ "${CLASSIFIER:-}" = fresh ]; then
    time argen train-classifier --data mnist:train --eval-data mnist:test --out "$runs/classifier" --steps 600 \
        --batch-size 64 --lr 1e-3
    classifier=(--classifier "$runs/classifier/final")
fi
time argen tokenize --tokenizer "$tok" --data mnist:train --out "$runs/tokens"
time argen train --tokens "$runs/tokens" --tokenizer "$tok" --preset mnist-small --out "$runs/gen" \
    --steps "$steps" --batch-size 64 --lr 2e-3 --warmup-steps 60 --ema-decay 0.995 "${recipe[@]}" \
    --save-every 500 --preview-every 500
# Continuing as a new run (fresh optimiser, seed 1's data order) lowers FD further; held-out NLL stays flat.
time argen train --tokens "$runs/tokens" --tokenizer "$tok" --preset mnist-small --init "$runs/gen/final" \
    --out "$runs/tuned" --steps "$steps" --batch-size 64 --lr 1e-3 --warmup-steps 50 --ema-decay 0.995 --seed 1 \
    "${recipe[@]}" --save-every 500 --preview-every 500

# The drafter of speculative="draft": a much smaller raster generator on the same tokens, the same regularisers.
time argen train --tokens "$runs/tokens" --tokenizer "$tok" --preset mnist-small --set dim=64 \
    --set num_heads=2 --set num_layers=2 --out "$runs/draft" --steps 600 --batch-size 64 --lr 3e-3 \
    --warmup-steps 40 --ema-decay 0.99 "${recipe[@]}" --save-every 200 --preview-every 200

python scripts/pack_default.py --pipeline "$runs/tuned/pipeline" --name "$name" --cfg 1.75 \
    --set 'cfg_schedule="linear"' --set temperature=1.25 --draft "$runs/draft/final" "${classifier[@]}"
