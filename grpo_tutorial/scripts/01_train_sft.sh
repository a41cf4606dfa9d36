#!/usr/bin/env bash
# Step 1: SFT on the dataset prepared by step 0. Training refuses data prepared for another GPU count.
# Output: $OUTPUT_ROOT/sft_qwen_reasoning_model
# OUTPUT_ROOT (default: outputs) is relative to the directory you run the script from; any directory works.
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPTS_DIR/_common.sh"

if [ ! -d "$SFT_PREPARED" ]; then
    echo "Error: no prepared SFT dataset in $SFT_PREPARED. Run step 0 first: bash $SCRIPTS_DIR/00_prepare_sft_dataset.sh" >&2
    exit 2
fi

# shellcheck disable=SC2086
run os-train sft \
    --model "$MODEL" \
    --dataset "$SFT_PREPARED" \
    --max-steps "$MAX_STEPS" \
    --devices "$DEVICES" \
    --output-dir "$SFT_OUTPUT" \
    $EXTRA_ARGS $SFT_EXTRA_ARGS
