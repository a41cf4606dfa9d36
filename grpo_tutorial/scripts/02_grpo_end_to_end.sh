#!/usr/bin/env bash
# Stage 2: improve answer correctness with GRPO on DAPO-Math-17k, starting from the SFT adapter.
# Data preparation and training in one command. Output: $OUTPUT_ROOT/grpo_final_model
# OUTPUT_ROOT (default: outputs) is relative to the directory you run the script from; any directory works.
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPTS_DIR/_common.sh"

if [ ! -f "$SFT_OUTPUT/adapter_config.json" ] && [ ! -f "$SFT_OUTPUT/config.json" ]; then
    echo "Error: no SFT model in $SFT_OUTPUT. Run stage 1 first: bash $SCRIPTS_DIR/01_sft_end_to_end.sh" >&2
    exit 2
fi

# shellcheck disable=SC2086
run os-train grpo \
    --model "$SFT_OUTPUT" \
    --dataset "$GRPO_DATASET" $GRPO_CONFIG_ARGS \
    --format dapo-math \
    --task math \
    --num-samples "$GRPO_SAMPLES" \
    --max-steps "$MAX_STEPS" \
    --devices "$DEVICES" \
    --output-dir "$GRPO_OUTPUT" \
    $EXTRA_ARGS $GRPO_EXTRA_ARGS

echo "GRPO adapter saved to $GRPO_OUTPUT. Try it: os generate --model $GRPO_OUTPUT \"What is 7 * 8?\""
