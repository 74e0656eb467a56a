#!/usr/bin/env bash
# μP LR-transfer sweep (docs/training.md, "μP"): widths 64, 128, 256 x {standard, μP} x peak lrs 1e-3..1.6e-2 (μP from 2e-3),
# each 100 updates of 4 x 128 tokens of the standard library, 4 layers of tiny-15m's kind (head
# width 32, 3x MLP). Base width 64: at width 64 μP and SP are the same model (tested:
# test_mup_at_the_base_width_is_the_standard_parameterization), so the μP runs at 64 are not run
# again; `runs lr-sweep --shared-width 64` counts the standard ones for both.
#   bash recipes/mup-sweep.sh [OUT_ROOT]
#   slimlm runs lr-sweep OUT_ROOT/* --shared-width 64 --out docs/training-mup.png
set -euo pipefail
OUT=${1:-runs/mup}
SLIMLM=${SLIMLM:-slimlm}
for w in 64 256 128; do
  for lr in ${LRS:-1e-3 2e-3 4e-3 8e-3 1.6e-2}; do
    for par in standard mup; do
    [ "$par" = mup ] && [ "$w" = 64 ] && continue
    [ "$par" = mup ] && [ "$lr" = 1e-3 ] && continue  # the μP optimum sits higher; saves 2 runs
    heads=$((w / 32)); kv=$((heads / 2))
      run=$OUT/$par-w$w-lr$lr
      $SLIMLM train recipes/tiny15m-stdlib-short.toml --out_dir "$run" --train.steps 100 \
        --schedule.lr "$lr" --schedule.warmup_steps 10 --model.num_layers 4 \
        --model.hidden_size "$w" --model.num_heads "$heads" --model.num_kv_heads "$kv" \
        --model.intermediate_size $((3 * w)) --model.parameterization "$par" --model.mup.base_width 64 \
        --log.eval_every 0 2>&1 | grep -E "^(done|error)" | sed "s|^|$run: |" || true
    done
  done
done
