#!/usr/bin/env bash
# Step 2: prepare the GRPO prompt dataset once (math task: DAPO-Math-17k), sharded for the GPU count.
# Output: $OUTPUT_ROOT/data/grpo_prepared, used by scripts/03_train_grpo.sh
[ -f scripts/_common.sh ] || { echo "Error: run this script from the grpo_tutorial/ directory, e.g.: cd grpo_tutorial && bash scripts/$(basename "$0")" >&2; exit 2; }
source scripts/_common.sh

# shellcheck disable=SC2086
python prepare_dataset/prepare_grpo_dataset.py \
    --task-type math \
    --model "$MODEL" \
    --dataset "$GRPO_DATASET" $GRPO_CONFIG_ARGS \
    --num-samples "$GRPO_SAMPLES" \
    --num-workers "$NUM_WORKERS" \
    --output-path "$GRPO_PREPARED"
