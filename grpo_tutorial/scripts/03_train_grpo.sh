#!/usr/bin/env bash
# Step 3: GRPO from the SFT adapter (step 1) on the prompts prepared by step 2.
# Output: $OUTPUT_ROOT/grpo_final_model
# OUTPUT_ROOT (default: outputs) is relative to the directory you run the script from; any directory works.
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPTS_DIR/_common.sh"

if [ ! -f "$SFT_OUTPUT/adapter_config.json" ] && [ ! -f "$SFT_OUTPUT/config.json" ]; then
    echo "Error: no SFT model in $SFT_OUTPUT. Run step 1 first: bash $SCRIPTS_DIR/01_train_sft.sh" >&2
    exit 2
fi
if [ ! -d "$GRPO_PREPARED" ]; then
    echo "Error: no prepared GRPO dataset in $GRPO_PREPARED. Run step 2 first: bash $SCRIPTS_DIR/02_prepare_grpo_dataset.sh" >&2
    exit 2
fi

# shellcheck disable=SC2086
run os-train grpo \
    --model "$SFT_OUTPUT" \
    --dataset "$GRPO_PREPARED" \
    --task math \
    --max-steps "$MAX_STEPS" \
    --devices "$DEVICES" \
    --output-dir "$GRPO_OUTPUT" \
    $EXTRA_ARGS $GRPO_EXTRA_ARGS
