#!/usr/bin/env bash
# Step 0: prepare the SFT dataset once (format, chat template, tokenize, shard for the GPU count).
# Output: $OUTPUT_ROOT/data/sft_prepared, used by scripts/01_train_sft.sh
[ -f scripts/_common.sh ] || { echo "Error: run this script from the grpo_tutorial/ directory, e.g.: cd grpo_tutorial && bash scripts/$(basename "$0")" >&2; exit 2; }
source scripts/_common.sh

# shellcheck disable=SC2086
python prepare_dataset/prepare_sft_dataset.py \
    --model "$MODEL" \
    --dataset "$SFT_DATASET" $SFT_SPLIT_ARGS \
    --num-samples "$SFT_SAMPLES" \
    --num-workers "$NUM_WORKERS" \
    --output-path "$SFT_PREPARED"
