#!/usr/bin/env bash
# GaLore vs AdamW at equal tokens, each at its own best peak lr, 3 seeds (docs/training.md).
# Model: the μP sweep's width-256 standard model (4 layers, head width 32, 3x MLP); 100 updates of
# 4 x 128 tokens. AdamW's lr sweep is recipes/mup-sweep.sh's standard-w256 runs (1e-3..1.6e-2, seed 0)
# plus 5e-4 here (1e-3 was the lowest of that grid and the best); GaLore's is run here (2e-3..1.6e-2;
# rank 64, projector every 50 updates, alpha 0.25).
# Then seeds 1 and 2 (model init and data order) at each optimizer's best lr: ADAMW_LR / GALORE_LR.
#   bash recipes/galore-seeds.sh [OUT_ROOT] [MUP_ROOT]
set -uo pipefail
OUT=${1:-runs/galore-seeds}
MUP=${2:-runs/mup}
SLIMLM=${SLIMLM:-slimlm}
M="--model.num_layers 4 --model.hidden_size 256 --model.num_heads 8 --model.num_kv_heads 4 --model.intermediate_size 768"
G="--optim.name galore --optim.galore.rank 64 --optim.galore.update_proj_gap 50"
train() {  # run-folder, overrides...
  local run=$1; shift
  $SLIMLM train recipes/tiny15m-stdlib-short.toml --out_dir "$run" --train.steps 100 --schedule.warmup_steps 10 \
    --log.eval_every 0 $M "$@" 2>&1 | grep -E "^(done|error)" | sed "s|^|$run: |" || true
}
for lr in 2e-3 4e-3 8e-3 1.6e-2; do train "$OUT/galore-lr$lr-seed0" $G --schedule.lr $lr; done
train "$OUT/adamw-lr5e-4-seed0" --schedule.lr 5e-4
best() { $SLIMLM runs lr-sweep "$@" | awk 'NR==2 {print $NF}'; }
ADAMW_LR=${ADAMW_LR:-$(best "$MUP"/standard-w256-lr* "$OUT"/adamw-lr*-seed0)}
GALORE_LR=${GALORE_LR:-$(best "$OUT"/galore-lr*-seed0)}
echo "best lr: adamw $ADAMW_LR, galore $GALORE_LR"
for seed in 1 2; do
  train "$OUT/adamw-lr$ADAMW_LR-seed$seed" --schedule.lr "$ADAMW_LR" --model.parameterization standard \
    --train.seed $seed --data.seed $seed
  train "$OUT/galore-lr$GALORE_LR-seed$seed" $G --schedule.lr "$GALORE_LR" --train.seed $seed --data.seed $seed
done
