#!/usr/bin/env bash
# Rebuild the shipped next-scale (VAR) model: the shipped multi-scale tokenizer's tokens of mnist:train (mnist:test
# stays held out for `argen eval`), a next-scale transformer (preset mnist-next-scale: depth 6, width 192, 4.20 M
# parameters, 7 scales) regularised with VAR's dropout and stochastic depth (0.1 each), weight decay 0.1, and 25 %
# random codes among the 6x6 map's tokens where they feed the 7x7 step (`input_noise_maps=1`: the finest map is
# what a small dataset's generator otherwise memorises), trained 3,000 steps, then a smaller, shorter-trained guide
# model for autoguidance, both packed into argen/assets/next-scale-mnist with cfg 2 on VAR's ramp, autoguidance 2.5
# on the same ramp, token temperature 1 (chosen by `argen eval --sweep`; docs/quality.md has the sweeps and what did
# not help).
# Usage: bash scripts/make_next_scale.sh [RUNS_DIR]
# TOKENIZER=fresh trains the multi-scale tokenizer from scratch first instead of reusing the shipped one (preset
# mnist-multiscale: scales 1..7, prefix_dropout 0.25; 2,000 steps, ~14 min), as the shipped one was made (it
# drew its dead-code restarts with replacement, before session 15's fix, so a fresh one differs in its draws). STEPS and
# NAME override the generator's length and the asset folder (a smoke run: STEPS=30 NAME=next-scale-mnist-smoke).
# The generator takes about 66-70 min at 2 threads on a 2-core AVX-512 machine (1.3-1.4 s a step).
set -euo pipefail
runs=${1:-runs/next-scale}
steps=${STEPS:-3000}
name=${NAME:-next-scale-mnist}
tok=${TOKENIZER:-next-scale}  # a pipeline name: its tokenizer
export OMP_WAIT_POLICY=PASSIVE

if [ "$tok" = fresh ]; then
    time argen train-tokenizer --data mnist:train --preset mnist-multiscale --out "$runs/tok" --steps 2000 \
        --batch-size 64 --lr 1e-3 --warmup-steps 50 --weight-decay 0 --ema-decay 0.99 --save-every 500 \
        --preview-every 500
    tok="$runs/tok/final"
fi
time argen tokenize --tokenizer "$tok" --data mnist:train --out "$runs/tokens"
time argen train --tokens "$runs/tokens" --tokenizer "$tok" --preset mnist-next-scale --out "$runs/gen" \
    --steps "$steps" --batch-size 64 --lr 2e-3 --warmup-steps 60 --weight-decay 0.1 --ema-decay 0.995 \
    --set drop_rate=0.1 --set drop_path=0.1 --set input_noise=0.25 --set input_noise_maps=1 \
    --save-every 500 --preview-every 1000
# The guide of autoguidance: the same recipe, narrower (dim 128, 4 heads, 1.90 M parameters) and stopped early (500
# steps, ~7 min) and without EMA (its raw weights are weaker than their average, and guided better: 1.42x against
# 1.50x): a weaker model whose errors resemble the generator's, so guidance against it sharpens digits without the
# variety plain CFG costs (Karras et al. 2024; docs/quality.md, sessions 20-22).
time argen train --tokens "$runs/tokens" --tokenizer "$tok" --preset mnist-next-scale --out "$runs/guide" \
    --steps "${GUIDE_STEPS:-500}" --batch-size 64 --lr 2e-3 --warmup-steps 60 --weight-decay 0.1 --ema-decay 0 \
    --set dim=128 --set num_heads=4 --set drop_rate=0.1 --set drop_path=0.1 --set input_noise=0.25 \
    --set input_noise_maps=1 --save-every 250 --preview-every 1000

python scripts/pack_default.py --pipeline "$runs/gen/pipeline" --name "$name" --cfg 2 \
    --set 'cfg_schedule="var_ramp"' --set temperature=1 --set guide_scale=2.5 --guide "$runs/guide/final"
