#!/usr/bin/env bash
# Stage 1: teach the <start_working_out>...<SOLUTION> format with SFT on OpenMathReasoning-mini.
# Data preparation and training in one command. Output: $OUTPUT_ROOT/sft_qwen_reasoning_model
# OUTPUT_ROOT (default: outputs) is relative to the directory you run the script from; any directory works.
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPTS_DIR/_common.sh"

# shellcheck disable=SC2086
run os-train sft \
    --model "$MODEL" \
    --dataset "$SFT_DATASET" $SFT_SPLIT_ARGS \
    --format openmath-reasoning \
    --chat-template reasoning \
    --num-samples "$SFT_SAMPLES" \
    --max-steps "$MAX_STEPS" \
    --devices "$DEVICES" \
    --output-dir "$SFT_OUTPUT" \
    $EXTRA_ARGS $SFT_EXTRA_ARGS

echo "SFT adapter saved to $SFT_OUTPUT. Next: bash $SCRIPTS_DIR/02_grpo_end_to_end.sh"
