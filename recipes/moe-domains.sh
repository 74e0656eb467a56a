#!/usr/bin/env bash
# MoE global-batch vs micro-batch balancing on a code + prose mixture, then per-domain expert load
# (docs/training.md, "MoE"). Each micro-batch is one row (one domain: a packed row comes from one
# source), 4 per update, so micro-batch balancing pushes every single-domain sequence to spread
# over all experts while global balancing only balances the update (Qiu et al., 2025).
# Model: 4 layers, width 256, 4 experts of width 384, top-2 (768 active MLP units, like the dense
# width-256 model's 3x MLP); aux weight 0.01; 150 updates of 4 x 128 tokens, 50% code / 50% prose.
#   slimlm data prepare shakespeare --tokenizer data/tok-stdlib-8k --out data/shakespeare-8k --val-fraction 0.1
#   bash recipes/moe-domains.sh [OUT_ROOT]
set -uo pipefail
OUT=${1:-runs/moe-domains}
SLIMLM=${SLIMLM:-slimlm}
for bal in global micro_batch; do
  run=$OUT/moe-$bal
  $SLIMLM train recipes/tiny15m-stdlib-short.toml --out_dir "$run" --train.steps 150 --schedule.warmup_steps 15 \
    --model.num_layers 4 --model.hidden_size 256 --model.num_heads 8 --model.num_kv_heads 4 \
    --model.intermediate_size 768 --model.moe.num_experts 4 --model.moe.top_k 2 --model.moe.intermediate_size 384 \
    --model.moe.balance $bal --data.train data/stdlib-8k,data/shakespeare-8k --data.weights 0.5,0.5 \
    --data.micro_batch 1 --train.grad_accum 4 --log.eval_every 50 2>&1 | grep -E "^(done|error)" | sed "s|^|$run: |" || true
  $SLIMLM expert-load "$run" --data code=data/stdlib-8k --data prose=data/shakespeare-8k --batches 8 --micro-batch 4 --seq-len 128
done
