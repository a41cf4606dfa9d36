#!/usr/bin/env bash
# Step 2: prepare the GRPO prompt dataset once (math task: DAPO-Math-17k), sharded for the GPU count.
# Output: $OUTPUT_ROOT/data/grpo_prepared, used by scripts/03_train_grpo.sh
# OUTPUT_ROOT (default: outputs) is relative to the directory you run the script from; any directory works.
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPTS_DIR/_common.sh"

need_prepare_script prepare_grpo_dataset.py
# shellcheck disable=SC2086
run "$PYTHON" "$PREPARE_DIR/prepare_grpo_dataset.py" \
    --task-type math \
    --model "$MODEL" \
    --dataset "$GRPO_DATASET" $GRPO_CONFIG_ARGS \
    --num-samples "$GRPO_SAMPLES" \
    --num-workers "$NUM_WORKERS" \
    --output-path "$GRPO_PREPARED"
