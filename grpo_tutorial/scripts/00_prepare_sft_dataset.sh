#!/usr/bin/env bash
# Step 0: prepare the SFT dataset once (format, chat template, tokenize, shard for the GPU count).
# Output: $OUTPUT_ROOT/data/sft_prepared, used by scripts/01_train_sft.sh
# OUTPUT_ROOT (default: outputs) is relative to the directory you run the script from; any directory works.
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPTS_DIR/_common.sh"

need_prepare_script prepare_sft_dataset.py
# shellcheck disable=SC2086
run "$PYTHON" "$PREPARE_DIR/prepare_sft_dataset.py" \
    --model "$MODEL" \
    --dataset "$SFT_DATASET" $SFT_SPLIT_ARGS \
    --num-samples "$SFT_SAMPLES" \
    --num-workers "$NUM_WORKERS" \
    --output-path "$SFT_PREPARED"
