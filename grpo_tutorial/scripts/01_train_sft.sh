#!/usr/bin/env bash
# Step 1: SFT on the dataset prepared by step 0. Training refuses data prepared for another GPU count.
# Output: $OUTPUT_ROOT/sft_qwen_reasoning_model
[ -f scripts/_common.sh ] || { echo "Error: run this script from the grpo_tutorial/ directory, e.g.: cd grpo_tutorial && bash scripts/$(basename "$0")" >&2; exit 2; }
source scripts/_common.sh

if [ ! -d "$SFT_PREPARED" ]; then
    echo "Error: no prepared SFT dataset in $SFT_PREPARED. Run step 0 first: bash scripts/00_prepare_sft_dataset.sh" >&2
    exit 2
fi

# shellcheck disable=SC2086
os-train sft \
    --model "$MODEL" \
    --dataset "$SFT_PREPARED" \
    --max-steps "$MAX_STEPS" \
    --devices "$DEVICES" \
    --output-dir "$SFT_OUTPUT" \
    $EXTRA_ARGS $SFT_EXTRA_ARGS
